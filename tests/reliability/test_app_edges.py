"""instrument() and the in-process routes under an application's unusual engines and under load.

Issue #9: a readiness probe must never wait in (or be counted by) the pool it observes; a pool name
that is not valid text (a lone surrogate) must not break a page; duplicate names and registry
clashes are explicit outcomes, never an exception from create_engine().
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool

from sqlalchemy_pool_exporter import Exporter

pytestmark = pytest.mark.reliability


async def test_readyz_neither_waits_in_nor_counts_in_an_exhausted_pool(
    make_engine, registry: CollectorRegistry, exporter: Exporter, serve, caplog: pytest.LogCaptureFixture
) -> None:
    """Load: the app holds every connection of its pool (size 1, no overflow) while a Kubernetes-style
    probe asks /readyz ten times. Before: each probe waited pool_timeout, answered 503, logged a pool
    timeout WARNING and added to pool_timeouts_total. Now: 200 each time, and the pool's numbers are
    the app's alone."""
    engine, _ = make_engine(pool_size=1, max_overflow=0, pool_timeout=1.0)
    handle = exporter.instrument(engine, name="busy")
    caplog.set_level(logging.WARNING, logger="sqlalchemy_pool_exporter")
    async with engine.connect() as held:
        await held.execute(text("SELECT 1"))
        before = (handle.stats.wait.count, handle.stats.timeouts, handle.stats.created)
        async with serve(exporter) as base, aiohttp.ClientSession() as http:
            for _ in range(10):
                async with http.get(base + "/readyz") as r:
                    assert (r.status, await r.json()) == (200, {"ready": True, "checks": {"pool busy": "ok"}})
                await asyncio.sleep(0.05)  # past the 1 s result cache at times: real probes
        assert (handle.stats.wait.count, handle.stats.timeouts, handle.stats.created) == before
        assert handle.stats.create.count == 1  # the app's one connection; the probes' are not counted
        assert registry.get_sample_value("sqlalchemy_pool_timeouts_total", {"pool": "busy"}) == 0
        assert registry.get_sample_value("sqlalchemy_pool_pending_requests", {"pool": "busy"}) == 0
    assert [r for r in caplog.records if "timed out" in r.getMessage()] == []


async def test_a_pool_name_that_is_not_valid_text_breaks_no_page(
    registry: CollectorRegistry, exporter: Exporter, serve, tmp_path: Path
) -> None:
    """Fault: names with lone surrogates, as surrogateescape-decoded paths and environment values carry
    them (here: a file name with a byte that is not UTF-8, and an explicit name). Before: every /metrics
    and / answered 500. Now: the names are made encodable once, at instrument()."""
    weird = tmp_path / "caf\udce9.db"  # os.fsdecode(b"caf\xe9.db")
    by_path = create_engine(f"sqlite:///{weird}", poolclass=QueuePool)
    explicit = create_engine("sqlite://", poolclass=QueuePool)
    try:
        a = exporter.instrument(by_path)
        b = exporter.instrument(explicit, name="pool-\udcff-\ud800")
        assert a.name == f"sqlite:{tmp_path}/caf\ufffd.db"
        assert b.name == "pool-?-?"  # not all surrogateescape bytes: each lone surrogate becomes "?"
        for engine in (by_path, explicit):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        async with serve(exporter) as base, aiohttp.ClientSession() as http:
            for path in ("/metrics", "/", "/pools", "/readyz"):
                for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
                    async with http.get(base + path, headers={"Accept": accept}) as r:
                        body = await r.text()
                        assert r.status == 200, (path, body)
            async with http.get(base + "/pools") as r:
                names = {p["name"] for p in (await r.json())["pools"]}
        assert names == {a.name, b.name}
        assert registry.get_sample_value("sqlalchemy_pool_checkouts_total", {"pool": "pool-?-?"}) == 1
    finally:
        by_path.dispose()
        explicit.dispose()


PLUGIN_TWICE = textwrap.dedent(
    """
    import gc, logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stdout)
    from sqlalchemy import create_engine, text
    from prometheus_client import REGISTRY, Gauge
    import sqlalchemy_pool_exporter as pool_exporter

    url = sys.argv[1] + "?plugin=pool_exporter&pool_exporter_name=orders"
    app = create_engine(url)           # the application
    alembic = create_engine(url)       # Alembic's env.py, from the same URL
    print("names", pool_exporter.handle_for(app).name, pool_exporter.handle_for(alembic).name)
    # Recreated after dispose(), before the old engine is garbage-collected (an engine factory).
    old = pool_exporter.handle_for(app)
    app.dispose()
    app = create_engine(url)
    print("recreated", pool_exporter.handle_for(app).name, old.active)
    # A registry clash never reaches create_engine either: the engine works, uninstrumented.
    Gauge("clash_pool_size", "the app's own", registry=REGISTRY)
    other = create_engine(sys.argv[1] + "?plugin=pool_exporter&pool_exporter_namespace=clash")
    with other.connect() as conn:
        print("works", conn.execute(text("SELECT 7")).scalar(), pool_exporter.handle_for(other))
    """
)


def test_the_url_plugin_never_raises_into_create_engine(tmp_path: Path) -> None:
    """Fault: two engines from one `?plugin=pool_exporter&pool_exporter_name=…` URL (the app and Alembic),
    an engine re-created under its name after dispose(), and a namespace whose names the registry
    already has. Before: create_engine() itself raised ValueError or DuplicateTimeseries."""
    script = tmp_path / "app.py"
    script.write_text(PLUGIN_TWICE)
    run = subprocess.run(
        [sys.executable, str(script), f"sqlite:///{tmp_path}/app.db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == (
        "WARNING pool name 'orders' is used by another live engine of this Exporter; exporting this one as 'orders#2'"
    )
    assert lines[1] == "names orders orders#2"
    assert lines[2] == "recreated orders False"
    assert lines[3].startswith("ERROR engine sqlite:///") and "cannot export namespace 'clash'" in lines[3]
    assert "namespace='...'" in lines[3]
    assert lines[4] == "works 7 None"
    assert len(lines) == 5
