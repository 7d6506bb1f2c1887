"""Credentials a client sends never reach our log, not even through the errors aiohttp logs for us.

aiohttp's parser quotes the offending bytes in its exceptions ("Got more than 8190 bytes when reading:
b'Authorization: Basic ...'", "Invalid header value char ... b'Cookie: ...'") and logs them, with
the traceback, to the logger our server gives it.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from pathlib import Path

import pytest

from .cli_process import serving

pytestmark = pytest.mark.reliability

BOUND = 30.0
# One secret per run, random, so that no other text can contain a piece of it by chance.
SECRET = secrets.token_urlsafe(7500)  # 10,000 characters
BASIC = base64.b64encode(f"prom:{SECRET}".encode()).decode()
SHORT = secrets.token_urlsafe(24)
SHORT_BASIC = base64.b64encode(f"prom:{SHORT}".encode()).decode()

HEADERS = {
    # over aiohttp's 8190-byte line limit: LineTooLong quotes the first 100 bytes
    "basic, too long": f"Authorization: Basic {BASIC}",
    "bearer, too long": f"Authorization: Bearer {SECRET}",
    "cookie, too long": f"Cookie: session={SECRET}",
    # short, with a byte no header may hold after the secret: the parser quotes the whole line
    "basic, bad byte": f"Authorization: Basic {SHORT_BASIC}\x7f",
    "bearer, bad byte": f"Authorization: Bearer {SHORT}\x7f",
    "cookie, bad byte": f"Cookie: session={SHORT}\x7f",
}


def _pieces(text: str, size: int = 12) -> list[str]:
    """Every `size`-character window of the start of `text` (a log quotes a prefix)."""
    return [text[i : i + size] for i in range(0, min(len(text), 300) - size + 1)]


async def _status(port: int, request: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize("case", list(HEADERS))
async def test_credentials_in_a_rejected_header_never_reach_the_log(tmp_path: Path, case: str) -> None:
    """Fault: a request to a real `serve` (DEBUG logs) whose Authorization (Basic, Bearer) or Cookie
    header is over-long or holds a byte no header may hold.

    It gets a 4xx and the server keeps answering; the log says a bad request came, and holds no piece of
    the secret, plain or base64 (aiohttp quoted the header's first 100 bytes, or all of it, at ERROR).
    """
    header = HEADERS[case]
    request = f"GET /metrics HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode()
    with serving(tmp_path, "--log-level", "DEBUG") as server:
        assert 400 <= await _status(server.port, request) < 500
        assert await _status(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 200
    log = server.text()
    assert "Error handling request from 127.0.0.1" in log, log[-3000:]
    for secret in (SECRET, BASIC, SHORT, SHORT_BASIC):
        leaked = [piece for piece in _pieces(secret) if piece in log]
        assert not leaked, (case, leaked[:3], log[-3000:])
