"""Secrets in odd URLs: an unencoded '@' in the password, credentials in the query string."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_plus

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.labels import pool_name, safe_url
from sqlalchemy_pool_exporter.service.settings import ENV_PREFIX, SettingError, load

from .cli_process import assert_exit_2_one_line, cli_env, run_cli, serving

pytestmark = pytest.mark.reliability

# Secrets are written in Greek capitals: nothing else in a URL, a pool name or our messages is.
GREEK = "ΑΒΓΔΕΖΗΘΛΞΠΣΦΨΩ"
# Everything a password may hold that means something in a URL.
URL_CHARS = "@:/?#&=%+;!$*,()[]~. '\"\\\t"


def _leaks(text: str) -> bool:
    """Whether any secret character shows, raw or percent-encoded (decoded twice for good measure)."""
    return any(c in GREEK for c in text + unquote_plus(text) + unquote_plus(unquote_plus(text)))


@contextlib.contextmanager
def _no_settings_env() -> Iterator[None]:
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX) or key == "PROMETHEUS_MULTIPROC_DIR":
            del os.environ[key]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


passwords = st.text(alphabet=GREEK + URL_CHARS, min_size=1, max_size=24)
# Query values hold no '&' or '=': keys are shown (only values are masked), and an unencoded '&'
# in a value makes what follows it a key of its own.
query_values = st.lists(
    st.tuples(
        st.sampled_from(["pwd", "password", "odbc_connect", "options", "token", "sslmode", "application_name"]),
        st.text(alphabet=GREEK + ";@/?: ", min_size=1, max_size=8),
    ),
    max_size=3,
)


def _ats_kept(url: URL) -> int:
    """How many '@' the parsed URL still shows."""
    parts = [url.username or "", url.password or "", url.host or "", url.database or ""]
    parts += [k + v for k, vs in url.query.items() for v in ((vs,) if isinstance(vs, str) else vs)]
    return sum(p.count("@") for p in parts)


@settings(max_examples=500, database=None, deadline=None)
@given(
    password=passwords,
    port=st.sampled_from(["", ":5432", ":6543"]),
    database=st.sampled_from(["", "/appdb", "/"]),
    query=query_values,
)
def test_no_part_of_a_password_reaches_a_name_a_printed_url_or_a_setting_error(
    password: str, port: str, database: str, query: list[tuple[str, str]]
) -> None:
    """Fault: passwords holding '@', '/', '?', '#', ':' and more, unencoded, in URLs with or without
    port, database and query (whose values, under keys not known to be harmless, are secrets too).

    Whatever SQLAlchemy makes of the URL, no character of the password or of such a query value
    appears in the default pool name or in safe_url() given the URL's text, nor in the one-line
    error of a setting given that text. Given SQLAlchemy's parsed URL, the same holds whenever the
    parse kept every '@' (it drops a query piece without '=', and with it all trace of the '@').
    """
    qs = "&".join(f"{k}={v}" for k, v in query if k not in ("sslmode", "application_name"))
    raw = f"postgresql+asyncpg://usr:{password}@dbhost{port}{database}" + (f"?{qs}" if qs else "")
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        url = None
    if url is not None:
        assert not _leaks(pool_name(raw)), (raw, pool_name(raw))
        assert not _leaks(safe_url(raw)), (raw, safe_url(raw))
        if _ats_kept(url) == raw.count("@"):
            assert not _leaks(pool_name(url)), (raw, pool_name(url))
            assert not _leaks(safe_url(url)), (raw, safe_url(url))
    with _no_settings_env():
        for setting in ("database_url", "namespace", "metrics_path", "host"):
            try:
                loaded = load(**{setting: raw})
            except SettingError as exc:
                assert not _leaks(exc.line()), (raw, exc.line())
                continue
            if setting == "database_url":
                shown = loaded.url()
                assert shown is not None
                assert not _leaks(pool_name(shown)) and not _leaks(safe_url(shown)), raw


async def test_pages_and_labels_show_only_what_follows_the_last_at(
    registry: CollectorRegistry, exporter: Exporter, serve, emitted
) -> None:
    """Fault: a pool whose URL has an unencoded '@' in the password (`app:Pa55@TaiL-c0ffee@host`)
    and credentials in its query string (`?pwd=`, `?odbc_connect=...PWD=...`).

    The pool label, /pools and / name it `127.0.0.1:1/app`; /pools's URL masks both query values and
    keeps sslmode; `TaiL-c0ffee` and the query secrets appear nowhere.
    """
    tail, pwd, odbc = "TaiL-c0ffee", "Q-5ecret-91", "O-5ecret-27"
    url = (
        f"postgresql+asyncpg://app:Pa55@{tail}@127.0.0.1:1/app"
        f"?pwd={pwd}&odbc_connect=DRIVER%3Dx%3BPWD%3D{odbc}&sslmode=disable"
    )
    engine = create_engine(url)
    exporter.instrument(engine)
    try:
        async with serve(exporter) as base, aiohttp.ClientSession() as http:
            pages = {}
            for path in ("/metrics", "/pools", "/"):
                async with http.get(base + path) as r:
                    assert r.status == 200
                    pages[path] = await r.text()
    finally:
        pool_exporter.uninstrument(engine)
        engine.dispose()
    for text in pages.values():
        emitted.add(text)
        for secret in (tail, "Pa55", pwd, odbc):
            assert secret not in text
    families = text_string_to_metric_families(pages["/metrics"])
    labels = {s.labels["pool"] for f in families for s in f.samples if "pool" in s.labels}
    assert labels == {"127.0.0.1:1/app"}
    (listed,) = json.loads(pages["/pools"])["pools"]
    assert listed["name"] == "127.0.0.1:1/app"
    assert listed["url"] == "postgresql+asyncpg://app:***@127.0.0.1:1/app?pwd=***&odbc_connect=***&sslmode=disable"
    assert "127.0.0.1:1/app" in pages["/"]


def test_serve_refuses_an_unencoded_at_and_never_prints_the_tail(tmp_path: Path) -> None:
    """Fault: `serve --database-url postgresql://app:Pa@TaiL-c0ffee@127.0.0.1:1/app`.

    It used to start, look up and log `TaiL-c0ffee@127.0.0.1`; now it exits 2 with one line that
    tells to percent-encode the '@', and holds no part of the password.
    """
    result = run_cli(
        ["serve", "--host", "127.0.0.1", "--port", "0", "--multiproc-dir", str(tmp_path)],
        cli_env(POOL_EXPORTER_DATABASE_URL="postgresql://app:Pa@TaiL-c0ffee@127.0.0.1:1/app"),
    )
    assert_exit_2_one_line(result, "database_url", "TaiL", "Pa@")
    assert "%40" in result.stderr


@pytest.mark.parametrize(
    ("setting", "url"),
    [
        ("namespace", "postgresql://app:Pa@TaiL-c0ffee@db.internal/app"),
        ("namespace", "postgresql://app:Pa ss TaiL-c0ffee@db.internal/app"),
        ("namespace", "postgresql://ad@min:Pa@TaiL-c0ffee@db.internal/app"),
        # A path setting quotes it as a Path: `postgresql:/app:...`, one '/' left.
        ("multiproc_dir", "postgresql://app:Pa@TaiL-c0ffee@db.internal/app"),
    ],
)
def test_a_url_given_to_another_setting_is_masked_whole(tmp_path: Path, setting: str, url: str) -> None:
    """Fault: a database URL pasted into --namespace or --multiproc-dir (whose errors quote the
    value), its password holding an '@' or spaces, or its user an '@'.

    The one-line error masks everything after `user:`: no piece of the password.
    """
    args = ["serve", "--port", "0", "--multiproc-dir", str(tmp_path), "--" + setting.replace("_", "-"), url]
    assert_exit_2_one_line(run_cli(args), setting, "TaiL", "Pa")


async def test_serve_logs_mask_query_secrets(tmp_path: Path) -> None:
    """Fault: the server view's URL carries a password in its query string (`?pwd=`).

    `serve` logs the URL with `pwd=***` and the value nowhere (the denylist used to miss `pwd`).
    """
    env = cli_env(
        POOL_EXPORTER_DATABASE_URL="postgresql://app@127.0.0.1:1/app?pwd=Q-5ecret-91&sslmode=disable",
        POOL_EXPORTER_PROBE_INTERVAL="60",
    )
    with serving(tmp_path, env=env) as server:
        pass
    log = server.text()
    assert "Q-5ecret-91" not in log
    assert "server view: postgresql://app@127.0.0.1:1/app?pwd=***&sslmode=disable" in log, log
