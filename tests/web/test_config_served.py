"""The web config file served: mTLS with a real ssl client, bcrypt users, reload without restart, headers.

Each test runs our real Server (the TLS ones under asyncio's loop and uvloop's) with the file's TLS
(TLSReloader) and policy (WebPolicy) over real sockets on 127.0.0.1; the file and the certificates
are changed on disk while it runs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import trustme
from cryptography import x509
from prometheus_client import CollectorRegistry

from sqlalchemy_pool_exporter.web.app import Server, make_app
from sqlalchemy_pool_exporter.web.config.bcrypt import BcryptUsers
from sqlalchemy_pool_exporter.web.config.file import WebConfigFile
from sqlalchemy_pool_exporter.web.config.policy import WebPolicy
from sqlalchemy_pool_exporter.web.config.tls import TLSReloader

from ..conftest import serving

# The lowest bcrypt cost: the tests count hashes, they do not need slow ones.
COST = 4


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    serial: int


# How a server refused a connection. Whether the kernel then sends a FIN or a reset depends on whether
# the client's bytes were read before the close, so the stage is asserted, not the socket error.
IN_HANDSHAKE = "refused during the handshake"
NO_RESPONSE = "closed after the handshake, without a response"
_CLOSED = (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)


def https_get(
    port: int, context: ssl.SSLContext, path: str = "/metrics", headers: Mapping[str, str] | None = None
) -> Reply | str:
    """One request over a real ssl client socket: the reply, or how the server refused the connection."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
        except _CLOSED:
            return IN_HANDSHAKE
        with tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            data = b""
            try:
                tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
                while chunk := tls.recv(65536):
                    data += chunk
            except _CLOSED:
                return NO_RESPONSE
    if not data:
        return NO_RESPONSE
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    return Reply(int(status_line.split()[1]), fields, body, x509.load_der_x509_certificate(der).serial_number)


def ok(reply: Reply | str) -> Reply:
    assert isinstance(reply, Reply) and reply.status == 200, reply
    return reply


def serial_of(cert: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(COST)).decode()


@dataclass
class PKI:
    """A server certificate for 127.0.0.1, and client certificates from a trusted and an untrusted CA."""

    server_ca: trustme.CA
    client_ca: trustme.CA
    directory: Path

    def client(self, *sans: str, ca: trustme.CA | None = None) -> ssl.SSLContext:
        """A client that trusts our server; with `sans`, presenting a certificate of `ca` (ours by default)."""
        context = ssl.create_default_context()
        self.server_ca.configure_trust(context)
        if sans:
            (ca or self.client_ca).issue_cert(*sans).configure_cert(context)
        return context

    def issue_server(self, name: str = "server") -> trustme.LeafCert:
        """A new server certificate written to server.pem/server.key, each replaced atomically."""
        cert = self.server_ca.issue_cert("127.0.0.1")
        for suffix, pem in (("pem", cert.private_key_and_cert_chain_pem), ("key", cert.private_key_pem)):
            tmp = self.directory / f"{name}.{suffix}.new"
            pem.write_to_path(str(tmp))
            os.replace(tmp, self.directory / f"{name}.{suffix}")
        return cert


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    made = PKI(trustme.CA(), trustme.CA(), tmp_path)
    made.client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    return made


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TLS_BLOCK = """tls_server_config:
  cert_file: server.pem
  key_file: server.key
"""
MTLS_BLOCK = (
    TLS_BLOCK
    + """  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: client-ca.pem
"""
)


def tls_server(app: aiohttp.web.Application, config: Path, *, other_auth: bool = False) -> Server:
    source = WebConfigFile(config)
    WebPolicy(source, tls=True, other_auth=other_auth).install(app)
    return Server(app, "127.0.0.1", 0, tls=TLSReloader(source))


@pytest.mark.both_loops
async def test_mtls_require_and_verify_client_cert(registry: CollectorRegistry, pki: PKI) -> None:
    """RequireAndVerifyClientCert: no certificate or one from another CA gets no response; ours gets 200."""
    pki.issue_server()
    server = tls_server(make_app(registry=registry), write(pki.directory / "web.yml", MTLS_BLOCK))
    await server.start()
    try:
        ok(await asyncio.to_thread(https_get, server.port, pki.client("prometheus")))
        # TLS 1.3: the client's side of the handshake ends before the server checks; the server then closes.
        assert await asyncio.to_thread(https_get, server.port, pki.client()) == NO_RESPONSE
        untrusted = pki.client("prometheus", ca=trustme.CA())
        assert await asyncio.to_thread(https_get, server.port, untrusted) == NO_RESPONSE
        # TLS 1.2: the handshake itself fails.
        tls12 = pki.client()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert await asyncio.to_thread(https_get, server.port, tls12) == IN_HANDSHAKE
    finally:
        await server.stop()


@pytest.mark.both_loops
async def test_verify_client_cert_if_given(registry: CollectorRegistry, pki: PKI) -> None:
    pki.issue_server()
    text = TLS_BLOCK + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: client-ca.pem\n"
    server = tls_server(make_app(registry=registry), write(pki.directory / "web.yml", text))
    await server.start()
    try:
        for client in (pki.client(), pki.client("prometheus")):
            ok(await asyncio.to_thread(https_get, server.port, client))
        untrusted = pki.client("prometheus", ca=trustme.CA())
        assert await asyncio.to_thread(https_get, server.port, untrusted) == NO_RESPONSE
    finally:
        await server.stop()


@pytest.mark.both_loops
async def test_client_allowed_sans(registry: CollectorRegistry, pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    """Only a verified certificate with a listed DNS, e-mail or IP SAN gets in (IPs compared as addresses)."""
    pki.issue_server()
    text = MTLS_BLOCK + '  client_allowed_sans: ["prometheus", "::1", "prom@example.org"]\n'
    server = tls_server(make_app(registry=registry), write(pki.directory / "web.yml", text))
    await server.start()
    try:
        for sans in (("prometheus",), ("other", "0:0:0:0:0:0:0:1"), ("prom@example.org",)):
            ok(await asyncio.to_thread(https_get, server.port, pki.client(*sans)))
        with caplog.at_level(logging.WARNING, "sqlalchemy_pool_exporter.web"):
            for _ in range(3):
                refused = await asyncio.to_thread(https_get, server.port, pki.client("grafana", "127.0.0.1"))
                assert refused == NO_RESPONSE
    finally:
        await server.stop()
    refused = [r.getMessage() for r in caplog.records if "refused a TLS connection" in r.getMessage()]
    assert refused == ["refused a TLS connection: the client certificate has none of client_allowed_sans"]


@pytest.mark.both_loops
async def test_rotation_is_picked_up_without_restart(registry: CollectorRegistry, pki: PKI) -> None:
    """Certificates replaced on disk (atomically, then in place), then the client auth policy changed:
    each new connection sees the change, on the same running server."""
    first = pki.issue_server()
    config = write(pki.directory / "web.yml", TLS_BLOCK)
    server = tls_server(make_app(registry=registry), config)
    await server.start()
    try:
        client = pki.client()
        assert ok(await asyncio.to_thread(https_get, server.port, client)).serial == serial_of(first)

        second = pki.issue_server()  # new files renamed over the old ones (what cert-manager does)
        assert ok(await asyncio.to_thread(https_get, server.port, client)).serial == serial_of(second)

        # Rewritten in place: same inode, maybe the same size and timestamp tick; the bytes differ.
        third = pki.server_ca.issue_cert("127.0.0.1")
        third.private_key_and_cert_chain_pem.write_to_path(str(pki.directory / "server.pem"))
        third.private_key_pem.write_to_path(str(pki.directory / "server.key"))
        assert ok(await asyncio.to_thread(https_get, server.port, client)).serial == serial_of(third)

        # Not only certificates: the verify mode and client CA reload too (an sni_callback could not).
        write(config, MTLS_BLOCK)
        assert await asyncio.to_thread(https_get, server.port, client) == NO_RESPONSE
        ok(await asyncio.to_thread(https_get, server.port, pki.client("prometheus")))
        # The client CA rotated: certificates of the old one are refused from the next connection on.
        new_ca = trustme.CA()
        new_ca.cert_pem.write_to_path(str(pki.directory / "client-ca.pem"))
        assert await asyncio.to_thread(https_get, server.port, pki.client("prometheus")) == NO_RESPONSE
        ok(await asyncio.to_thread(https_get, server.port, pki.client("prometheus", ca=new_ca)))
    finally:
        await server.stop()


@pytest.mark.both_loops
async def test_a_broken_tls_file_refuses_connections_until_fixed(
    registry: CollectorRegistry, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    first = pki.issue_server()
    server = tls_server(make_app(registry=registry), write(pki.directory / "web.yml", TLS_BLOCK))
    await server.start()
    try:
        good_key = (pki.directory / "server.key").read_bytes()
        pki.server_ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(pki.directory / "server.key"))
        with caplog.at_level(logging.WARNING, "sqlalchemy_pool_exporter.web"):
            # No context to shake hands with: the connection is closed before any TLS.
            assert await asyncio.to_thread(https_get, server.port, pki.client()) == IN_HANDSHAKE
        (pki.directory / "server.key").write_bytes(good_key)
        assert ok(await asyncio.to_thread(https_get, server.port, pki.client())).serial == serial_of(first)
    finally:
        await server.stop()
    [line] = [r.getMessage() for r in caplog.records if "refused a TLS connection" in r.getMessage()]
    assert line.startswith("refused a TLS connection: no usable TLS configuration: tls_server_config: cannot load ")
    assert "KEY_VALUES_MISMATCH" in line


async def test_inline_certificate_and_key(registry: CollectorRegistry, pki: PKI) -> None:
    cert = pki.server_ca.issue_cert("127.0.0.1")

    def block(pem: bytes) -> str:
        return "|\n" + "".join(f"    {line}\n" for line in pem.decode().splitlines())

    text = (
        "tls_server_config:\n"
        f"  cert: {block(cert.private_key_and_cert_chain_pem.bytes())}"
        f"  key: {block(cert.private_key_pem.bytes())}"
    )
    server = tls_server(make_app(registry=registry), write(pki.directory / "web.yml", text))
    await server.start()
    try:
        assert ok(await asyncio.to_thread(https_get, server.port, pki.client())).serial == serial_of(cert)
    finally:
        await server.stop()


# -- basic_auth_users, headers, rate_limit (plain HTTP: the policy does not depend on TLS) -----------


def plain_app(registry: CollectorRegistry, config: Path, users: BcryptUsers) -> aiohttp.web.Application:
    app = make_app(registry=registry)
    WebPolicy(WebConfigFile(config), tls=False, other_auth=False, users=users).install(app)
    return app


async def status(c: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None) -> int:
    async with c.get(url, headers=headers) as r:
        return r.status


async def test_bcrypt_cost_is_paid_once_per_credential(registry: CollectorRegistry, tmp_path: Path) -> None:
    config = write(tmp_path / "web.yml", f"basic_auth_users:\n  prom: {hashed('s3cret')}\n  ops: {hashed('0ps')}\n")
    users = BcryptUsers()
    async with serving(plain_app(registry, config, users)) as server, aiohttp.ClientSession() as c:
        url = f"{server.url}/metrics"
        assert [await status(c, url, basic("prom", "s3cret")) for _ in range(5)] == [200] * 5
        assert users.computed == 1
        assert [await status(c, url, basic("prom", "wrong")) for _ in range(3)] == [401] * 3
        assert users.computed == 2
        # An unknown user is checked against a dummy hash (timing), once per credential too.
        assert [await status(c, url, basic("nobody", "s3cret")) for _ in range(3)] == [401] * 3
        assert users.computed == 3
        # Nothing to check: no bcrypt at all.
        assert await status(c, url) == 401
        assert await status(c, url, {"Authorization": "Basic !!!"}) == 401
        assert await status(c, url, {"Authorization": "Bearer s3cret"}) == 401
        assert await status(c, f"{server.url}/healthz") == 200
        assert users.computed == 3
        # Five at once with one new credential share one computation.
        together = await asyncio.gather(*(status(c, url, basic("ops", "0ps")) for _ in range(5)))
        assert together == [200] * 5
        assert users.computed == 4
        # The password changes in the file: the old one fails at the next request, the new one works.
        write(config, f"basic_auth_users:\n  prom: {hashed('n3w')}\n  ops: {hashed('0ps')}\n")
        assert await status(c, url, basic("prom", "s3cret")) == 401
        assert await status(c, url, basic("prom", "n3w")) == 200
        assert users.computed == 6
        async with c.get(url) as r:
            assert r.headers["WWW-Authenticate"] == 'Basic realm="pool-exporter", charset="UTF-8"'


async def test_password_checks_beyond_the_bound_get_429(registry: CollectorRegistry, tmp_path: Path) -> None:
    """With one check in flight and max_pending 1, another new credential is answered 429 at once."""
    config = write(tmp_path / "web.yml", f"basic_auth_users:\n  prom: {hashed('s3cret')}\n")
    users = BcryptUsers(max_pending=1)
    async with serving(plain_app(registry, config, users)) as server, aiohttp.ClientSession() as c:
        url = f"{server.url}/metrics"
        # Holding the hashing lock parks the first check deterministically (no timing involved).
        async with users._lock:
            first = asyncio.create_task(status(c, url, basic("prom", "s3cret")))
            while users.pending == 0:
                await asyncio.sleep(0.01)
            async with c.get(url, headers=basic("prom", "guess")) as r:
                assert (r.status, r.headers["Retry-After"]) == (429, "1")
        assert await first == 200
        assert users.computed == 1


async def test_password_checks_wait_in_lanes_served_in_turn() -> None:
    """A lane per (user of the file or unknown, client): a full lane gets 429, another lane is still
    admitted, and its check is computed right after the one computing, ahead of the full lane's queue."""
    users = BcryptUsers(max_pending=2)
    table = {"prom": hashed("s3cret").encode()}
    order: list[str] = []

    def check(name: str, user: str, password: str, client: str) -> asyncio.Task[bool | None]:
        task = asyncio.create_task(users.check(basic(user, password)["Authorization"], table, client))
        task.add_done_callback(lambda _: order.append(name))
        return task

    # Holding the hashing lock parks every check deterministically (no timing involved).
    async with users._lock:
        flood = [check(f"guess{i}", "prom", f"guess{i}", "10.0.0.2") for i in range(2)]
        while users.pending < 2:
            await asyncio.sleep(0.01)
        # The flood's lane is full: a third guess from it is refused at once, whatever the user.
        assert await users.check(basic("prom", "guess2")["Authorization"], table, "10.0.0.2") is None
        # The same user from another client, and an unknown user from the flood's client: lanes of their own.
        prometheus = check("prometheus", "prom", "s3cret", "10.0.0.1")
        unknown = check("unknown", "nobody", "x", "10.0.0.2")
        while users.pending < 4:
            await asyncio.sleep(0.01)
    assert [await t for t in (*flood, prometheus, unknown)] == [False, False, True, False]
    # One hash at a time, lanes in turn: the flood's first, then each other lane, then its second.
    assert order == ["guess0", "prometheus", "unknown", "guess1"]
    assert users.computed == 4 and users.pending == 0 and users._lanes == {}


async def test_headers_on_every_response(registry: CollectorRegistry, tmp_path: Path) -> None:
    headers = {
        "Content-Security-Policy": "default-src 'self'",
        "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "sameorigin",
        "X-XSS-Protection": "1",
    }
    text = (
        "http_server_config:\n  headers:\n"
        + "".join(f'    {k}: "{v}"\n' for k, v in headers.items() if k != "X-XSS-Protection")
        + "    X-XSS-Protection: 1\n"  # a number, as in the toolkit's own example
        + f"basic_auth_users:\n  prom: {hashed('s3cret')}\n"
    )
    config = write(tmp_path / "web.yml", text)
    async with serving(plain_app(registry, config, BcryptUsers())) as server, aiohttp.ClientSession() as c:
        for path, auth, expected in (
            ("/metrics", basic("prom", "s3cret"), 200),
            ("/metrics", None, 401),
            ("/nowhere", basic("prom", "s3cret"), 404),
            ("/healthz", None, 200),
        ):
            async with c.get(server.url + path, headers=auth) as r:
                assert r.status == expected
                assert {k: r.headers.get(k) for k in headers} == headers, path
        # Headers follow the file: one removed is gone from the next response.
        write(config, text.replace('    X-Frame-Options: "sameorigin"\n', ""))
        async with c.get(f"{server.url}/healthz") as r:
            assert "X-Frame-Options" not in r.headers and r.headers["X-Content-Type-Options"] == "nosniff"


async def test_rate_limit(registry: CollectorRegistry, tmp_path: Path) -> None:
    """A bucket of 2 refilled once an hour: the third request gets 429; /healthz is never limited."""
    config = write(tmp_path / "web.yml", "rate_limit:\n  interval: 1h\n  burst: 2\n")
    async with serving(plain_app(registry, config, BcryptUsers())) as server, aiohttp.ClientSession() as c:
        assert [await status(c, f"{server.url}/metrics") for _ in range(3)] == [200, 200, 429]
        assert await status(c, f"{server.url}/healthz") == 200
        write(config, "rate_limit:\n  interval: 0\n")
        assert await status(c, f"{server.url}/metrics") == 200


async def test_a_broken_file_fails_closed_until_fixed(
    registry: CollectorRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = f"basic_auth_users:\n  prom: {hashed('s3cret')}\n"
    config = write(tmp_path / "web.yml", good)
    async with serving(plain_app(registry, config, BcryptUsers())) as server, aiohttp.ClientSession() as c:
        url, auth = f"{server.url}/metrics", basic("prom", "s3cret")
        assert await status(c, url, auth) == 200
        with caplog.at_level(logging.ERROR, "sqlalchemy_pool_exporter.webconfig"):
            write(config, "basic_auth_users: [\n")
            assert [await status(c, url, auth) for _ in range(3)] == [500] * 3
            assert await status(c, f"{server.url}/healthz") == 200
            # Turning TLS on needs a restart: until then the file cannot be followed.
            write(config, TLS_BLOCK)
            assert await status(c, url, auth) == 500
        write(config, good)
        assert await status(c, url, auth) == 200
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"the web config file cannot be used, requests get 500: {config}: not valid YAML: ")
