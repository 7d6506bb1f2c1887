"""The fast exposition path writes what prometheus_client writes, for real pools, in both text formats.

Every test that takes the `exporter` fixture runs under both namings: ours and the semantic conventions'.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import logging
import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import NullPool, QueuePool

from sqlalchemy_pool_exporter import Exporter, compat
from sqlalchemy_pool_exporter.exposition import render as exposition_module
from sqlalchemy_pool_exporter.exposition.render import Exposition, format_of
from sqlalchemy_pool_exporter.metricnames import NAMES
from sqlalchemy_pool_exporter.web.app import Server, make_app

from ..conftest import PG_URL, PgEngineFactory, sample

Encoder = Callable[[Any], bytes]
ENCODERS: dict[str, Encoder] = {"text": generate_latest, "openmetrics": openmetrics.generate_latest}
HOSTILE = 'a"b\\c\nd ü名 {x} %s %d %% }{'
# Ages of the oldest checkout and waiter move between two renders; every other sample must be equal.
# Time-dependent: ages, and the offered load (the busy time of connections still out grows by the read).
AGES = ("_oldest_checkout_seconds", "_oldest_pending_seconds", "_offered_load", "_advised_size")

Families = dict[str, tuple[str, str, list[tuple[str, dict[str, str], float]]]]


def families(body: bytes, fmt: str) -> Families:
    """name -> (type, help, samples), through prometheus_client's own parser for the format."""
    parse = parse_openmetrics if fmt == "openmetrics" else parse_text
    return {
        f.name: (f.type, f.documentation, [(s.name, dict(s.labels), s.value) for s in f.samples])
        for f in parse(body.decode("utf-8"))
    }


def assert_same(ours: bytes, theirs: bytes, fmt: str) -> None:
    """Same families with the same type, help and samples (ages within a second)."""
    a, b = families(ours, fmt), families(theirs, fmt)
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for name, (kind, doc, samples) in b.items():
        got_kind, got_doc, got = a[name]
        assert (got_kind, got_doc) == (kind, doc), name
        assert [(n, labels) for n, labels, _ in got] == [(n, labels) for n, labels, _ in samples], name
        for (n, _, v), (_, _, w) in zip(got, samples, strict=True):
            if n.endswith(AGES):
                assert v == pytest.approx(w, abs=1.0), n
            else:
                assert v == w, n


@pytest.fixture(params=NAMES)
def exporter(request: pytest.FixtureRequest, registry: CollectorRegistry) -> Iterator[Exporter]:
    """An Exporter of the test's registry under each naming in turn."""
    made = Exporter(registry, names=request.param)
    yield made
    made.close()


def family(exporter: Exporter, key: str) -> str:
    """A catalog metric's family name as the parsers give it (a counter's without `_total`)."""
    name = exporter.view.by_key[key].name
    return name.removesuffix("_total") if exporter.view.by_key[key].spec.kind == "counter" else name


def exposition_of(exporter: Exporter) -> Exposition:
    return Exposition(exporter.registry, [exporter.collector])


def check_both(exporter: Exporter, *, exact: bool = True) -> dict[str, bytes]:
    """Render the registry both ways in both formats; `exact`: byte for byte (nothing checked out)."""
    registry = exporter.registry
    exposition = exposition_of(exporter)
    out = {}
    for fmt, encoder in ENCODERS.items():
        for _ in range(2):  # the second render reuses the cached line starts
            ours, theirs = exposition.render(encoder), encoder(registry)
            assert_same(ours, theirs, fmt)
            if exact:
                assert ours == theirs
            assert ours.count(b"# EOF") == (fmt == "openmetrics")
            if fmt == "openmetrics":
                assert ours.endswith(b"# EOF\n")
        out[fmt] = ours
    return out


def promtool(body: bytes, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "metrics.txt"
    path.write_bytes(body)
    with path.open("rb") as stdin:
        return subprocess.run(["promtool", "check", "metrics"], stdin=stdin, capture_output=True, text=True)


# The semantic conventions' db.client.connection.count is a gauge whose translated name ends in
# `_count`, which promtool's linter reserves for histograms and summaries: that line, and only it.
SEMCONV_LINT = 'db_client_connection_count non-histogram and non-summary metrics should not have "_count" suffix\n'


def lint_clean(body: bytes, tmp_path: Path, exporter: Exporter) -> None:
    result = promtool(body, tmp_path)
    if exporter.names == "semconv":
        assert (result.returncode, result.stdout + result.stderr) == (3, SEMCONV_LINT)
    else:
        assert result.returncode == 0, result.stdout + result.stderr


def busy_sqlite(exporter: Exporter, engines: list[Engine], path: Path, name: str) -> Engine:
    """A SQLite QueuePool that has run commits, rollbacks, savepoints, every statement kind, errors and a timeout."""
    engine = create_engine(f"sqlite:///{path}", poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=0.01)
    engines.append(engine)
    exporter.instrument(engine, name=name)
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
        conn.execute(text("UPDATE t SET x = 2"))
        conn.execute(text("SELECT x FROM t"))
        conn.execute(text("DELETE FROM t"))
        conn.commit()
        with conn.begin_nested():
            conn.execute(text("INSERT INTO t VALUES (3)"))
        conn.execute(text("SELECT 1"))
        conn.rollback()
        with pytest.raises(OperationalError):
            conn.execute(text("SELECT * FROM missing"))
        conn.rollback()
        with pytest.raises(PoolTimeout):
            engine.connect()
    return engine


def test_sqlite_pools_render_exactly_as_prometheus_client(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    for i in range(3):
        busy_sqlite(exporter, sync_engines, tmp_path / f"{i}.db", f"db{i}")
    bodies = check_both(exporter)
    parsed = families(bodies["text"], "text")
    view, pool = exporter.view, exporter.view.pool_label
    timeouts, errors = view.by_key["timeouts"], view.by_key["statement_errors"]
    assert (timeouts.name, {pool: "db1"}, 1.0) in parsed[family(exporter, "timeouts")][2]
    error = (errors.name, dict(zip(errors.labelnames, ("db2", "OperationalError"), strict=True)), 1.0)
    assert error in parsed[family(exporter, "statement_errors")][2]
    lint_clean(bodies["text"], tmp_path, exporter)


def test_checked_out_connections_and_hostile_names(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    """Quotes, backslashes, newlines, non-ASCII and format characters in pool names; live ages."""
    busy_sqlite(exporter, sync_engines, tmp_path / "a.db", HOSTILE)
    other = busy_sqlite(exporter, sync_engines, tmp_path / "b.db", '\\\\ "" \n\n é')
    check_both(exporter)
    with other.connect():  # held during the renders: a used connection and a moving age
        bodies = check_both(exporter, exact=False)
    parsed = families(bodies["openmetrics"], "openmetrics")
    pools = {s[1][exporter.view.pool_label] for s in parsed[family(exporter, "connections")][2]}
    assert pools == {HOSTILE, '\\\\ "" \n\n é'}
    lint_clean(bodies["text"], tmp_path, exporter)


def test_nullpool(registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/null.db", poolclass=NullPool)
    sync_engines.append(engine)
    exporter.instrument(engine, name="null")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    bodies = check_both(exporter)
    size = family(exporter, "size").encode()
    assert size + b"{" not in bodies["text"]
    assert b"# TYPE " + size + b" gauge\n" in bodies["text"]
    lint_clean(bodies["text"], tmp_path, exporter)


def test_no_pools_yet_and_a_gone_engine(registry: CollectorRegistry, exporter: Exporter, tmp_path: Path) -> None:
    """Families with no series still get HELP and TYPE; a garbage-collected engine's series go."""
    engine = create_engine(f"sqlite:///{tmp_path}/gone.db")
    exporter.instrument(engine, name="gone")
    check_both(exporter)
    engine.dispose()
    del engine
    gc.collect()
    bodies = check_both(exporter)
    assert b'="gone"' not in bodies["text"]


def test_counts_past_a_million_use_go_float_format(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    """floatToGoString writes 1.234567e+06 from a million up: counters, buckets and sums alike."""
    busy_sqlite(exporter, sync_engines, tmp_path / "big.db", "big")
    stats = exporter.handles()[-1].stats
    stats.timeouts = 1_234_567
    stats.wait.counts[2] += 2_500_000
    stats.wait.sum += 12_345_678.5
    stats.use.sum = float("inf")
    bodies = check_both(exporter)
    timeouts, use, pool = exporter.view.by_key["timeouts"].name, family(exporter, "use"), exporter.view.pool_label
    assert f'{timeouts}{{{pool}="big"}} 1.234567e+06\n'.encode() in bodies["text"]
    assert f'{use}_sum{{{pool}="big"}} +Inf\n'.encode() in bodies["text"]


@pytest.mark.postgres
async def test_asyncpg_pool_renders_exactly_as_prometheus_client(
    registry: CollectorRegistry, exporter: Exporter, pg_engine: PgEngineFactory, tmp_path: Path
) -> None:
    engine, _ = pg_engine(pool_size=1, max_overflow=0, pool_timeout=0.05)
    exporter.instrument(engine, name="pg")
    bad, _ = pg_engine(PG_URL.rsplit("/", 1)[0] + "/no_such_database_here")
    exporter.instrument(bad, name="pg-bad")
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        await conn.commit()
        with pytest.raises(Exception, match="division by zero"):
            await conn.execute(text("SELECT 1/0"))
        await conn.rollback()
        with pytest.raises(PoolTimeout):
            await engine.connect()
    async with engine.begin() as conn:
        await conn.execute(text("SELECT 2"))
    with pytest.raises(Exception, match="no_such_database_here"):
        async with bad.connect():
            pass
    bodies = check_both(exporter)
    parsed = families(bodies["text"], "text")
    pool, error = exporter.view.by_key["connect_errors"].labelnames
    errors = {s[1][pool]: s[1][error] for s in parsed[family(exporter, "connect_errors")][2]}
    assert set(errors) == {"pg-bad"}
    lint_clean(bodies["text"], tmp_path, exporter)
    async with engine.connect():  # a live checkout in an async pool, rendered off the loop as the handler does
        for fmt, encoder in ENCODERS.items():
            ours, theirs = await asyncio.to_thread(exposition_of(exporter).render, encoder), encoder(registry)
            assert_same(ours, theirs, fmt)


def test_other_collectors_target_info_and_name_filters(sync_engines: list[Engine], tmp_path: Path) -> None:
    """The rest of the registry goes through prometheus_client, around ours; `name[]` filters both."""
    registry = CollectorRegistry(target_info={"service": "app"})
    Counter("before", "Registered before the pools.", ["k"], registry=registry).labels("v").inc(3)
    exporter = Exporter(registry)
    busy_sqlite(exporter, sync_engines, tmp_path / "a.db", "a")
    Gauge("after", "Registered after the pools.", registry=registry).set(2.5)
    exposition = exposition_of(exporter)
    for fmt, encoder in ENCODERS.items():
        ours, theirs = exposition.render(encoder), encoder(registry)
        assert_same(ours, theirs, fmt)
        assert ours.count(b"# EOF") == (fmt == "openmetrics")
        assert list(families(ours, fmt))[-1] == "sqlalchemy_exporter_build_info"  # ours are appended
        for names in (
            ["sqlalchemy_pool_wait_seconds_count", "before_total", "target_info"],
            ["sqlalchemy_pool_use_seconds_bucket", "sqlalchemy_exporter_build_info"],
            ["sqlalchemy_pool_checkouts_total", "after", "sqlalchemy_pool_connections"],
            ["sqlalchemy_pool_connect_errors_total"],  # ours, but no series: no family at all
            ["nothing_at_all"],
        ):
            ours = exposition.render(encoder, names)
            theirs = encoder(registry.restricted_registry(names))
            # Compared as lines: a restricted registry visits collectors in set order, and its
            # OpenMetrics output (a _count without buckets) is more than the OpenMetrics parser accepts.
            assert sorted(ours.splitlines()) == sorted(theirs.splitlines())
            assert ours.count(b"# EOF") == (fmt == "openmetrics")
            assert ours.endswith(b"# EOF\n" if fmt == "openmetrics" else b"")
    # Outside a render our collector still yields everything: tests and other tools see no difference.
    assert registry.get_sample_value("sqlalchemy_pool_checkouts_total", {"pool": "a"}) == 1.0


@pytest.mark.parametrize(
    "accept",
    [
        "",
        "text/plain; version=0.0.4",
        "text/plain; version=1.0.0; escaping=allow-utf-8",
        "text/plain; version=1.0.0; escaping=dots",
        "text/plain; version=1.0.0; escaping=values",
        "application/openmetrics-text",
        "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8",
        "application/openmetrics-text; version=1.0.0; escaping=underscores",
        "application/openmetrics-text; version=2.0.0",
    ],
)
def test_every_negotiated_encoder(
    accept: str, registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    busy_sqlite(exporter, sync_engines, tmp_path / "a.db", HOSTILE)
    encoder, _ = choose_encoder(accept)
    assert format_of(encoder) is not None
    assert exposition_of(exporter).render(encoder) == encoder(registry)


def test_an_encoder_we_do_not_mirror_renders_everything_itself(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    busy_sqlite(exporter, sync_engines, tmp_path / "a.db", "a")

    def custom(target: Any) -> bytes:
        return b"".join(m.name.encode() + b"\n" for m in target.collect())

    assert format_of(custom) is None
    assert format_of(partial(generate_latest, escaping="underscores", extra=1)) is None  # type: ignore[call-arg]
    assert exposition_of(exporter).render(custom) == custom(registry)


@pytest.mark.parametrize("offload", [True, False], ids=["offloaded", "on-loop"])
@pytest.mark.parametrize("accept", ["text/plain", "application/openmetrics-text; version=1.0.0"])
async def test_metrics_route_serves_the_fast_rendering(
    offload: bool,
    accept: str,
    registry: CollectorRegistry,
    exporter: Exporter,
    sync_engines: list[Engine],
    tmp_path: Path,
) -> None:
    busy_sqlite(exporter, sync_engines, tmp_path / "a.db", HOSTILE)
    encoder, content_type = choose_encoder(accept)
    server = Server(make_app(exporter, offload=offload))
    await server.start()
    try:
        headers = {"Accept": accept, "Accept-Encoding": "gzip"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as http,
            http.get(server.url + "/metrics", headers=headers) as r,
        ):
            assert r.status == 200
            assert r.headers["Content-Type"] == content_type
            assert r.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await r.read()) == encoder(registry)
        url = server.url + "/metrics?name[]=sqlalchemy_pool_checkouts_total"
        async with aiohttp.ClientSession() as http, http.get(url, headers={"Accept": accept}) as r:
            body = await r.read()
        fmt = "openmetrics" if "openmetrics" in accept else "text"
        assert list(families(body, fmt)) == ["sqlalchemy_pool_checkouts"]
        assert_same(body, encoder(registry.restricted_registry(["sqlalchemy_pool_checkouts_total"])), fmt)
    finally:
        await server.stop()


def test_listeners_keep_counting_between_renders(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    """Cached line starts never freeze values: each render reads the stats again."""
    engine = busy_sqlite(exporter, sync_engines, tmp_path / "a.db", "a")
    seen: list[str] = []
    event.listen(engine, "checkout", lambda *a: seen.append("x"))
    exposition = exposition_of(exporter)
    before = exposition.render(generate_latest)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    after = exposition.render(generate_latest)
    assert before != after
    assert after == generate_latest(registry)
    assert seen == ["x"]


def test_a_prometheus_client_that_spells_differently_gets_its_own_encoder(
    exporter: Exporter, sync_engines: list[Engine], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The renderer checks itself against prometheus_client before its first render of a format: if a
    helper it borrows behaves differently (another version), prometheus_client renders from then on."""
    busy_sqlite(exporter, sync_engines, tmp_path / "a.db", HOSTILE)
    assert compat.FAST_RENDER is not None
    monkeypatch.setattr(compat.FAST_RENDER, "escape", staticmethod(lambda s, escaping, rune: s.upper()))
    caplog.set_level(logging.WARNING, logger="sqlalchemy_pool_exporter")
    caplog.clear()  # busy_sqlite's own pool timeout
    exposition = exposition_of(exporter)
    for _ in range(3):
        for encoder in ENCODERS.values():
            assert exposition.render(encoder) == encoder(exporter.registry)
    assert exposition.fast is False
    assert [r.getMessage() for r in caplog.records] == [
        "fast /metrics renderer failed its self-test: prometheus_client renders from now on"
    ]
    handle = exporter.handles()[0]
    assert sample(exporter.registry, "sqlalchemy_exporter_errors_total", **{exporter.view.pool_label: handle.name}) == 1


def test_a_prometheus_client_without_the_helpers_gets_its_own_encoder(
    exporter: Exporter, sync_engines: list[Engine], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    busy_sqlite(exporter, sync_engines, tmp_path / "a.db", "a")
    monkeypatch.setattr(exposition_module, "om", None)
    monkeypatch.setattr(compat, "FAST_RENDER_PROBLEM", "ImportError: cannot import name '_escape'")
    caplog.set_level(logging.WARNING, logger="sqlalchemy_pool_exporter")
    caplog.clear()  # busy_sqlite's own pool timeout
    exposition = exposition_of(exporter)
    for encoder in ENCODERS.values():
        assert exposition.render(encoder) == encoder(exporter.registry)
    assert [r.getMessage() for r in caplog.records] == [
        "fast /metrics renderer off, prometheus_client renders everything: ImportError: cannot import name '_escape'"
    ]
