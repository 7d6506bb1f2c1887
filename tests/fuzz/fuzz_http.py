"""Fuzz the HTTP request pieces we parse ourselves: Accept, Authorization, `name[]` and Accept-Encoding.

Input: four lines: Accept, Authorization, Accept-Encoding, the query string. They go, as aiohttp
hands them over (header bytes decoded with surrogateescape, no CR, LF or NUL, which its parser
refuses), into a request for our real /metrics handler over a real SQLite pool with checkouts,
histograms and a held connection, and through `Auth.allows`, `basic_credentials` and the web config's
bcrypt cache key. Oracle: no exception; the body parses as the format its Content-Type names (text or
OpenMetrics, checked by tests/fuzz/oracles.py), the Content-Type is printable ASCII; only the exact
credentials are let in.

Run: python tests/fuzz/fuzz_http.py tests/fuzz/corpus/http -dict=tests/fuzz/http.dict
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import re
import sys
from typing import Any

import atheris
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine
from sqlalchemy.pool import QueuePool

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["sqlalchemy_pool_exporter"]):
    from sqlalchemy_pool_exporter.core import Exporter
    from sqlalchemy_pool_exporter.web.app import metrics_handler
    from sqlalchemy_pool_exporter.web.auth import Auth, basic_credentials
    from sqlalchemy_pool_exporter.web.config.bcrypt import BcryptUsers

from oracles import absolute, check_openmetrics, check_text

TOKEN = "s3cret-Token"
USER, PASSWORD = "alice", "pa:ss wörd"
AUTH = Auth(token=TOKEN, user=USER, password=PASSWORD)
BCRYPT = BcryptUsers()
USERS = {USER: b"$2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG"}
LOOP = asyncio.new_event_loop()
CHECKED: set[tuple[str, bytes]] = set()
VALUES = re.compile(rb"^([^#\n].*) [^ \n]+$", re.MULTILINE)


def setup() -> Any:
    registry = CollectorRegistry()
    exporter = Exporter(registry)
    engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=2, max_overflow=1)
    exporter.instrument(engine, name='app "main"\n\\')
    for _ in range(3):
        with engine.begin() as conn:
            conn.exec_driver_sql("SELECT 1")
    held = engine.connect()
    return metrics_handler(registry, exporters=[exporter]), (engine, held)


HANDLER, KEEP = setup()
BASE = make_mocked_request("GET", "/metrics")  # aiohttp's own Request; each input is a clone of it


def header(raw: bytes) -> str:
    return raw.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"").decode("utf-8", "surrogateescape")


def expected(authorization: str) -> bool:
    """What may be let in: the token after `Bearer`, or alice's user and password in strict base64."""
    raw = authorization.encode("utf-8", "surrogateescape")
    scheme, _, rest = raw.partition(b" ")
    if scheme.lower() == b"bearer":
        return rest.strip() == TOKEN.encode()
    if scheme.lower() == b"basic":
        try:
            return base64.b64decode(rest.strip(), validate=True) == f"{USER}:{PASSWORD}".encode()
        except ValueError:
            return False
    return False


def one_input(data: bytes) -> None:
    # One value a line: a header value can hold no line break (aiohttp refuses one), so none is lost.
    parts = [*data.split(b"\n", 3), b"", b"", b""]
    accept, authorization, encoding = header(parts[0]), header(parts[1]), header(parts[2])
    query = header(parts[3]).replace("#", "").replace(" ", "%20")
    headers = CIMultiDict(Accept=accept, Authorization=authorization, **{"Accept-Encoding": encoding})
    try:
        request = BASE.clone(rel_url="/metrics?" + query, headers=headers)
        request.query  # noqa: B018 - yarl's query parsing: a request aiohttp would refuse is not ours
    except (ValueError, UnicodeError):
        return

    allowed = AUTH.allows(request)
    if allowed != expected(authorization):
        raise AssertionError(f"allows() is {allowed} for {authorization!r}")
    pair = basic_credentials(authorization)
    assert pair is None or (isinstance(pair[0], bytes) and isinstance(pair[1], bytes)), pair
    assert BCRYPT.cached(authorization, USERS) is False

    response = LOOP.run_until_complete(HANDLER(request))
    content_type = response.headers["Content-Type"]
    assert content_type.isascii() and content_type.isprintable(), content_type
    body = response.body
    assert isinstance(body, bytes)
    # The /metrics response compresses itself (exposition/response.py) when Accept-Encoding takes gzip.
    encoding = response.headers.get("Content-Encoding")
    assert encoding in (None, "gzip"), encoding
    if encoding == "gzip":
        body = gzip.decompress(body)
    # Most inputs negotiate one of a few bodies, differing in values only (a held connection's age):
    # each shape is checked once.
    shape = (content_type, VALUES.sub(b"\\1", body))
    if shape in CHECKED:
        return
    if len(CHECKED) < 10_000:
        CHECKED.add(shape)
    if content_type.startswith("application/openmetrics-text") and "escaping=" in content_type:
        # `escaping=dots|values` (OpenMetrics 2.0's name escaping, prometheus_client's own encoder):
        # `_` is written `__`, which an OpenMetrics 1.0 parser reads as other names; the body is checked
        # for its frame only.
        assert body.decode("utf-8").endswith("# EOF\n"), body[-40:]
    elif content_type.startswith("application/openmetrics-text"):
        check_openmetrics(body)
    else:
        assert content_type.startswith("text/plain"), content_type
        check_text(body)


def main() -> None:
    atheris.Setup(absolute(sys.argv), one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
