"""A client cannot hold the port hostage: stalled request heads, idle floods, descriptors running out,
and Accept headers prometheus_client's negotiation chokes on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
import trustme
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from sqlalchemy_pool_exporter import Exporter

from .cli_process import cli_env, serving

pytestmark = pytest.mark.reliability

# Generous: only a server that never closes misses it. No test asserts how fast anything is.
BOUND = 30.0


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Read until the server closes (EOF or reset); False if it is still open after BOUND seconds."""
    try:
        async with asyncio.timeout(BOUND):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def _scrape(base: str, **kwargs: object) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(base + "/metrics", timeout=aiohttp.ClientTimeout(total=BOUND), **kwargs) as r,  # type: ignore[arg-type]
    ):
        return r.status, await r.text()


async def _trickle(writer: asyncio.StreamWriter) -> None:
    """A slow loris: one byte of a request head at a time, never the end of it."""
    with contextlib.suppress(ConnectionError):
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)


async def test_stalled_request_heads_are_closed_while_scrapes_answer(tmp_path: Path) -> None:
    """Fault: three connections to a real `serve` (request_head_timeout 1 s): half a request head,
    nothing at all, and one byte of a head every 100 ms.

    A scrape on a fourth connection meanwhile answers 200; the server closes all three by itself
    (they used to stay open for good), logging one line for them, no traceback.
    """
    with serving(tmp_path, "--request-head-timeout", "1") as server:
        half_r, half_w = await asyncio.open_connection("127.0.0.1", server.port)
        half_w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", server.port)
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", server.port)
        slow = asyncio.create_task(_trickle(slow_w))
        try:
            assert (await _scrape(server.base))[0] == 200
            closed = await asyncio.gather(*(_closed_by_server(r) for r in (half_r, silent_r, slow_r)))
        finally:
            slow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await slow
            for w in (half_w, silent_w, slow_w):
                w.close()
        assert closed == [True, True, True]
        assert (await _scrape(server.base))[0] == 200
    log = server.text()
    assert log.count("closed a connection that sent no complete request head within 1 s") == 1, log
    assert "Traceback" not in log


async def test_a_stalled_tls_handshake_is_closed(tmp_path: Path) -> None:
    """Fault: a TCP connection to the HTTPS port that never starts the TLS handshake.

    The server closes it within the same head deadline (asyncio's own handshake timeout is 60 s),
    while a scrape over TLS answers 200.
    """
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    args = ("--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"))
    with serving(tmp_path, "--request-head-timeout", "1", *args) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            assert (await _scrape(server.base.replace("http://", "https://"), ssl=client))[0] == 200
            assert await _closed_by_server(reader)
        finally:
            writer.close()
    assert "Traceback" not in server.text()


async def test_idle_connections_beyond_the_cap_make_room(tmp_path: Path) -> None:
    """Fault: 40 connections opened and left idle against a real `serve` with max_http_connections 8
    (and a head deadline long enough not to matter).

    The oldest idle ones are closed to stay at the cap (32 of the 40 at least), a scrape still
    answers 200, and the log has one line about it, not forty.
    """
    with serving(tmp_path, "--max-http-connections", "8", "--request-head-timeout", "120") as server:
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(40)]
        try:
            status, _ = await _scrape(server.base)
            assert status == 200

            deadline = time.monotonic() + BOUND
            closed: set[int] = set()
            while len(closed) < 32:
                assert time.monotonic() < deadline, f"only {len(closed)} of 40 idle connections closed"
                for i, (reader, _) in enumerate(conns):
                    if i not in closed and await _closed_now(reader):
                        closed.add(i)
            # The cap closes the oldest first.
            assert set(range(32)) <= closed
        finally:
            for _, writer in conns:
                writer.close()
    log = server.text()
    assert log.count("8 client connections open, the most allowed (max_http_connections)") == 1, log
    assert "Traceback" not in log


async def test_descriptor_exhaustion_keeps_scrapes_and_logs_small(tmp_path: Path) -> None:
    """Fault: a real `serve` limited to 64 open files (ulimit -n 64, default settings) gets 100 idle
    connections, more than it has descriptors for.

    A scrape still answers 200 (the cap follows the file limit and idle connections make room;
    it used to wait in the listen backlog for ever), and the whole log stays a few lines, where
    asyncio used to write a traceback per failed accept(), about a hundred per second.
    """
    with serving(tmp_path, nofile=64) as server:
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(100)]
        try:
            status, body = await _scrape(server.base)
            assert status == 200
            assert "sqlalchemy_exporter_sidecar_workers 0.0" in body
        finally:
            for _, writer in conns:
                writer.close()
    log = server.text()
    assert "Traceback" not in log
    assert "at most 32 client connections, not 200" in log
    assert len(log.splitlines()) <= 6, log[:3000]


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _idle_connections(port: int, count: int) -> list[Conn]:
    """`count` TCP connections that never send a byte (no TLS handshake either), 50 at a time; those
    the server did not take within 5 s (its backlog full) are left out."""

    async def one() -> Conn | None:
        try:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        except (TimeoutError, OSError):
            return None

    opened: list[Conn | None] = []
    for _ in range(count // 50):
        opened += await asyncio.gather(*(one() for _ in range(50)))
    return [c for c in opened if c is not None]


async def _closed_now(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 0.05) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def _wait_closed_by_server(conns: list[Conn], at_least: int) -> int:
    """How many of `conns` the server closed, once `at_least` are (or BOUND seconds passed)."""
    deadline = time.monotonic() + BOUND
    closed: set[int] = set()
    while len(closed) < at_least and time.monotonic() < deadline:
        for i, (reader, _) in enumerate(conns):
            if i not in closed and await _closed_now(reader):
                closed.add(i)
    return len(closed)


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_idle_connections_to_a_low_fd_server_leave_room_for_scrapes(tmp_path: Path, scheme: str) -> None:
    """Fault: a real `serve` with `ulimit -n 256` (so at most 128 client connections), a web config
    file (re-read for each connection and request) and, for https, its TLS; 400 TCP connections
    opened and left idle, never starting a TLS handshake (request_head_timeout long enough not to
    matter).

    A connection counts against the cap from accept() on, before its handshake: the server closes
    idle ones to stay at 128 descriptors for clients, and 8 scrapes after the flood all answer 200.
    It used to count a TLS connection only once its handshake was done: the idle ones took every
    descriptor (245), the server could not read its web config file, and 4 of 8 scrapes failed.
    """
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    tls = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n" if scheme == "https" else ""
    (tmp_path / "web.yml").write_text(tls + "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
    client = ssl.create_default_context()
    ca.configure_trust(client)
    flags = ("--web.config.file", str(tmp_path / "web.yml"), "--request-head-timeout", "120")
    with serving(tmp_path, *flags, nofile=256) as server:
        assert server.base.startswith(f"{scheme}://")
        idle = await _idle_connections(server.port, 400)
        try:
            statuses = []
            for _ in range(8):
                try:
                    statuses.append((await _scrape(server.base, ssl=client))[0])
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses.append(type(exc).__name__)
            assert statuses == [200] * 8
            # Every one of the 400 got in (the backlog drained), and all but 128 of them were closed.
            assert len(idle) == 400
            assert await _wait_closed_by_server(idle, 400 - 128) >= 400 - 128
        finally:
            for _, writer in idle:
                writer.close()
    log = server.text()
    assert "Traceback" not in log, log[:3000]
    assert "128 client connections open, the most allowed (max_http_connections)" in log, log[:3000]
    assert "cannot accept connections" not in log and "refused a TLS connection" not in log, log[:3000]


async def test_malformed_requests_are_logged_once_a_minute(tmp_path: Path) -> None:
    """Fault: 30 requests with a byte no header may hold, to a real `serve`.

    Each gets its 400; aiohttp used to log every one with its traceback (about 500 bytes each, as
    fast as a client can send them): now the first, and the rest are counted for the next line.
    """
    with serving(tmp_path) as server:
        statuses = []
        for _ in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: a\x7fb\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
            finally:
                writer.close()
            statuses.append(int(head.split(b" ", 2)[1]))
        assert (await _scrape(server.base))[0] == 200
    assert statuses == [400] * 30
    log = server.text()
    assert log.count("Error handling request from 127.0.0.1") == 1, log[:3000]
    assert log.count("Traceback") == 1


HOG = textwrap.dedent(
    """
    import asyncio, logging, os, resource, sys
    from prometheus_client import CollectorRegistry
    from sqlalchemy_pool_exporter.web.app import Server, make_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    async def main():
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        server = Server(make_app(registry=CollectorRegistry()), "127.0.0.1", 0)
        await server.start()
        await asyncio.to_thread(int)  # start the thread pool while its module can still be opened
        hog = []
        try:
            while True:  # something else in the app took every descriptor
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        print(server.port, flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the test saw accept() fail
        for fd in hog:
            os.close(fd)
        await asyncio.to_thread(sys.stdin.readline)  # the test got its answer
        await server.stop()

    asyncio.run(main())
    """
)


async def test_accept_failures_are_logged_once(tmp_path: Path) -> None:
    """Fault: an app process whose descriptors are all taken (by its own code) while a client connects.

    accept() fails with EMFILE over and over: the log gets one line saying so, not asyncio's
    traceback per attempt (about a hundred per loop tick). Once descriptors are free again, the
    waiting client is served.
    """
    log_path = tmp_path / "hog.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOG],
            env=cli_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            start_new_session=True,
        )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port = int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), BOUND))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            deadline = time.monotonic() + BOUND
            markers = ("cannot accept connections", "socket.accept() out of system resource")
            while not any(m in log_path.read_text() for m in markers):
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.05)
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), BOUND)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200 OK")
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert proc.wait(BOUND) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    log = log_path.read_text()
    assert "Traceback" not in log and "socket.accept() out of system resource" not in log, log[:3000]
    assert log.count("cannot accept connections: [Errno 24] Too many open files") == 1, log


ACCEPT_HEADERS = [
    "application/openmetrics-text; version=abc",
    "application/openmetrics-text; version=1.x",
    "application/openmetrics-text;version=1.0.0.ä",
    "text/plain; version=zz",
    "text/plain;version=",
    ";;;,,,=;version=.",
    "*/*;q=abc",
]


@pytest.mark.parametrize("accept", ACCEPT_HEADERS)
async def test_unparseable_accept_falls_back_to_text(
    registry: CollectorRegistry, exporter: Exporter, serve, accept: str
) -> None:
    """Fault: Accept headers with a version prometheus_client cannot compare (it raised TypeError: 500).

    The answer is 200 in the classic text format, as Prometheus itself falls back, and parses.
    """
    Counter("hostile_accept", "A counter.", registry=registry).inc(3)
    async with serve(exporter) as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAccept: " + accept.encode() + b"\r\n\r\n"
            )
            data = await asyncio.wait_for(reader.read(), BOUND)
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in head
    samples = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples["hostile_accept_total"] == 3.0


async def test_a_bad_media_range_does_not_hide_a_good_one(
    registry: CollectorRegistry, exporter: Exporter, serve
) -> None:
    """A range with a bad version is skipped; the next acceptable one (OpenMetrics 1.0.0) is served."""
    Counter("hostile_accept", "A counter.", registry=registry).inc(3)
    accept = "application/openmetrics-text; version=abc, application/openmetrics-text; version=1.0.0"
    async with serve(exporter) as base:
        status, body = await _scrape(base, headers={"Accept": accept})
    assert status == 200
    families = {f.name: f for f in parse_openmetrics(body)}
    assert families["hostile_accept"].samples[0].value == 3.0
