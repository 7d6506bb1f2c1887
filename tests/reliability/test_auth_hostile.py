"""Auth fails closed: empty or half credentials never start a server; malformed ones are plain 401s."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.logs import Throttle
from sqlalchemy_pool_exporter.web.auth import Auth

from .cli_process import assert_exit_2_one_line, cli_env, run_cli, serving

pytestmark = pytest.mark.reliability

TOKEN = "tok-5e0c19"
USER, PASSWORD = "prom", "pw-77d2ae"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"POOL_EXPORTER_AUTH_TOKEN": ""}, "auth_token"),
        ({"POOL_EXPORTER_BASIC_AUTH_USER": USER, "POOL_EXPORTER_BASIC_AUTH_PASSWORD": ""}, "basic_auth_password"),
        ({"POOL_EXPORTER_BASIC_AUTH_USER": USER}, "basic_auth_password"),
        ({"POOL_EXPORTER_BASIC_AUTH_PASSWORD": PASSWORD}, "basic_auth_user"),
        ({"POOL_EXPORTER_BASIC_AUTH_USER": "", "POOL_EXPORTER_BASIC_AUTH_PASSWORD": PASSWORD}, "basic_auth_user"),
        ({"POOL_EXPORTER_BASIC_AUTH_USER": "pr:om", "POOL_EXPORTER_BASIC_AUTH_PASSWORD": PASSWORD}, "basic_auth_user"),
    ],
)
def test_empty_or_half_credentials_exit_2(tmp_path: Path, env: dict[str, str], setting: str) -> None:
    """Fault: an empty token (it used to accept an empty `Bearer` header), an empty basic-auth password
    (it locked everyone out), a user without a password and the reverse, a user holding ':'.

    A real `serve` process exits 2 with one line naming the setting, and never prints the password.
    """
    result = run_cli(["serve", "--host", "127.0.0.1", "--port", "0", "--multiproc-dir", str(tmp_path)], cli_env(**env))
    assert_exit_2_one_line(result, setting, PASSWORD)


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"POOL_EXPORTER_AUTH_TOKEN": " "}, "auth_token"),
        ({"POOL_EXPORTER_AUTH_TOKEN": " \t\n"}, "auth_token"),
        ({"POOL_EXPORTER_BASIC_AUTH_USER": USER, "POOL_EXPORTER_BASIC_AUTH_PASSWORD": " "}, "basic_auth_password"),
        ({"POOL_EXPORTER_BASIC_AUTH_USER": USER, "POOL_EXPORTER_BASIC_AUTH_PASSWORD": "\t "}, "basic_auth_password"),
    ],
)
def test_a_secret_of_only_whitespace_exits_2(tmp_path: Path, env: dict[str, str], setting: str) -> None:
    """Fault: a token or password of " " was accepted: it locked everyone out (no client sends a
    lone space as a credential) and, scrubbed from the log as a secret, turned every space into ***.

    A real `serve` exits 2 with one line naming the setting.
    """
    result = run_cli(["serve", "--host", "127.0.0.1", "--port", "0", "--multiproc-dir", str(tmp_path)], cli_env(**env))
    assert_exit_2_one_line(result, setting)
    assert "***" not in result.stderr


@pytest.mark.parametrize(
    "kwargs",
    [
        {"token": ""},
        {"token": " "},
        {"user": USER, "password": "  "},
        {"user": USER, "password": ""},
        {"user": USER},
        {"password": PASSWORD},
        {"user": "", "password": PASSWORD},
        {"user": "a:b", "password": PASSWORD},
    ],
)
def test_library_auth_refuses_what_would_disable_it(kwargs: dict[str, str]) -> None:
    """Fault: a library user builds Auth() with an empty token or half a user/password pair.

    It raises ValueError rather than silently letting everyone in (or no one).
    """
    with pytest.raises(ValueError):
        Auth(**kwargs)


async def _raw_status(port: int, authorization: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: " + authorization + b"\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1])


MALFORMED = [
    "Basic ä".encode(),  # not base64, not even ASCII: was a 500 with a traceback
    b"Basic \xff",  # not UTF-8 either: reaches aiohttp as a lone surrogate
    b"Bearer \xff\xfe",  # the same for a token: was a 500
    "Bearer ä".encode(),
    b"Basic " + base64.b64encode(b"\xff\xfe:\x00\xff"),
    b"Basic " + base64.b64encode(USER.encode() + b":" + PASSWORD.encode() + b"\xff"),
    b"Basic " + base64.b64encode(USER.encode()),
    b"Basic ====",
    b"Bearer " + TOKEN.encode() + b"\xc3",
    b"Digest " + "ä".encode() * 50,
    b"\xff\xfe " + TOKEN.encode(),
]


async def test_malformed_credentials_are_401s_logged_once(tmp_path: Path) -> None:
    """Fault: credentials that are not base64, not ASCII, not UTF-8, or cut short, ten times each,
    to a real `serve` with both a token and basic auth.

    Every one is answered 401 (none 500), the log holds no traceback and exactly one line about
    them (the rest are counted for the next line, a minute later), and good credentials still pass.
    """
    env = cli_env(
        POOL_EXPORTER_AUTH_TOKEN=TOKEN,
        POOL_EXPORTER_BASIC_AUTH_USER=USER,
        POOL_EXPORTER_BASIC_AUTH_PASSWORD=PASSWORD,
    )
    with serving(tmp_path, env=env) as server:
        statuses = [await _raw_status(server.port, header) for header in MALFORMED for _ in range(10)]
        good = [
            f"Bearer {TOKEN}".encode(),
            b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()),
        ]
        ok = [await _raw_status(server.port, header) for header in good]
    assert statuses == [401] * len(statuses)
    assert ok == [200, 200]
    log = server.text()
    assert "Traceback" not in log and " 500 " not in log
    assert log.count("401 for '/metrics' from 127.0.0.1: wrong or malformed credentials") == 1, log
    assert TOKEN not in log and PASSWORD not in log


async def test_rejections_are_counted_between_log_lines(
    registry: CollectorRegistry, exporter: Exporter, serve, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault: a steady stream of bad credentials (the clock is ours, so a minute passes at once).

    One WARNING for the first; the next, a minute later, says exactly how many were held back.
    """
    now = [1000.0]
    auth = Auth(token=TOKEN, rejected=Throttle(60.0, clock=lambda: now[0]))
    caplog.set_level(logging.WARNING, logger="sqlalchemy_pool_exporter.auth")
    async with serve(exporter, auth=auth) as base, aiohttp.ClientSession() as http:

        async def get(headers: dict[str, str]) -> int:
            async with http.get(base + "/metrics", headers=headers) as r:
                return r.status

        assert [await get({"Authorization": "Bearer nope"}) for _ in range(5)] == [401] * 5
        assert await get({}) == 401
        now[0] += 60.0
        assert await get({}) == 401
        assert await get({"Authorization": f"Bearer {TOKEN}"}) == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "sqlalchemy_pool_exporter.auth"]
    assert lines == [
        "401 for '/metrics' from 127.0.0.1: wrong or malformed credentials",
        "401 for '/metrics' from 127.0.0.1: no credentials (5 more since the last such line; at most one every 60 s)",
    ]
