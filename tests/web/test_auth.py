"""Bearer token and basic auth (everything but /healthz), and TLS with real certificates."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from prometheus_client import CollectorRegistry

from sqlalchemy_pool_exporter.service import startup
from sqlalchemy_pool_exporter.service.settings import load
from sqlalchemy_pool_exporter.web.app import make_app
from sqlalchemy_pool_exporter.web.auth import Auth

from ..conftest import serving

PATHS = ("/metrics", "/readyz", "/pools", "/", "/nowhere")


def basic(user: str, password: str) -> dict[str, str]:
    # Spelled out (RFC 7617): aiohttp.encode_basic_auth is new in 3.14, where BasicAuth became deprecated.
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def status(c: aiohttp.ClientSession, url: str, **kwargs: object) -> int:
    async with c.get(url, **kwargs) as r:  # type: ignore[arg-type]
        return r.status


async def test_bearer_token(registry: CollectorRegistry) -> None:
    app = make_app(registry=registry, auth=Auth(token="t0ken"))
    async with serving(app) as server, aiohttp.ClientSession() as c:
        assert await status(c, f"{server.url}/healthz") == 200
        for path in PATHS:
            assert await status(c, server.url + path) == 401
            assert await status(c, server.url + path, headers={"Authorization": "Bearer wrong"}) == 401
        good = {"Authorization": "Bearer t0ken"}
        assert [await status(c, server.url + p, headers=good) for p in PATHS] == [200, 200, 200, 200, 404]
        async with c.get(f"{server.url}/metrics") as r:
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="pool-exporter"'


async def test_basic_auth(registry: CollectorRegistry) -> None:
    app = make_app(registry=registry, auth=Auth(user="prom", password="pa:ss"))
    async with serving(app) as server, aiohttp.ClientSession() as c:
        assert await status(c, f"{server.url}/healthz") == 200
        assert await status(c, f"{server.url}/metrics") == 401
        assert await status(c, f"{server.url}/metrics", headers=basic("prom", "nope")) == 401
        assert await status(c, f"{server.url}/metrics", headers=basic("other", "pa:ss")) == 401
        assert await status(c, f"{server.url}/metrics", headers={"Authorization": "Basic !!!"}) == 401
        assert await status(c, f"{server.url}/metrics", headers=basic("prom", "pa:ss")) == 200
        # A bearer token is no use when only basic auth is configured.
        assert await status(c, f"{server.url}/metrics", headers={"Authorization": "Bearer pa:ss"}) == 401


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return ca, cert_path, key_path


async def test_tls_with_a_real_certificate(
    registry: CollectorRegistry, tls_files: tuple[trustme.CA, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert_path, key_path = tls_files
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    context = startup.check(load(tls_cert=str(cert_path), tls_key=str(key_path), auth_token="tok")).ssl_context
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    app = make_app(registry=registry, auth=Auth(token="tok"))
    async with serving(app, ssl_context=context) as server:
        assert server.url.startswith("https://127.0.0.1:")
        async with aiohttp.ClientSession() as c:
            assert await status(c, f"{server.url}/healthz", ssl=client_context) == 200
            assert await status(c, f"{server.url}/metrics", ssl=client_context) == 401
            ok = await status(c, f"{server.url}/metrics", ssl=client_context, headers={"Authorization": "Bearer tok"})
            assert ok == 200
            # An untrusting client refuses the certificate.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await status(c, f"{server.url}/healthz", ssl=ssl.create_default_context())
            # Plain HTTP on the TLS port gets nowhere.
            with pytest.raises(aiohttp.ClientError):
                await status(c, f"http://127.0.0.1:{server.port}/healthz")
