"""Exporter: owns its collector, handles and hooks; close() leaves nothing; no state shared between instances."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, QueuePool

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import AlreadyInstrumented, Exporter
from sqlalchemy_pool_exporter.instrumentation.dialect import STATEMENT_METHODS, TRANSACTION_METHODS
from sqlalchemy_pool_exporter.instrumentation.handle import MARKER
from sqlalchemy_pool_exporter.web.app import Server, make_app

from ..conftest import sample

WRAPPED = {"connect", "is_disconnect", *TRANSACTION_METHODS, *STATEMENT_METHODS, MARKER}


def our_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("pool-exporter"))


def test_close_takes_back_everything_it_installed(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    exporter = Exporter(registry)
    engines = [create_engine(f"sqlite:///{tmp_path}/{i}.db", poolclass=QueuePool) for i in range(2)]
    handles = [exporter.instrument(engine, leak_threshold=30) for engine in engines]
    for engine in engines:
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()  # a second pool to wrap and to restore
    assert our_threads() == ["pool-exporter-leaks", "pool-exporter-leaks"]
    listeners = [
        (engine, name, fn) for engine, h in zip(engines, handles, strict=True) for name, fn in h.hooks.listeners
    ]
    assert listeners and all(event.contains(e, name, fn) for e, name, fn in listeners)
    assert sample(registry, "sqlalchemy_exporter_build_info", version=pool_exporter.__version__) == 1

    exporter.close()

    assert our_threads() == []
    assert not any(event.contains(e, name, fn) for e, name, fn in listeners)
    for engine in engines:
        assert not WRAPPED & set(vars(engine.dialect))
        assert {"connect", "recreate", "_return_conn"}.isdisjoint(vars(engine.pool))
        assert type(engine.pool).connect is Pool.connect
        assert pool_exporter.handle_for(engine) is None
    assert list(registry.collect()) == []
    assert exporter.handles() == []
    exporter.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        exporter.instrument(engines[0])
    # Nothing of the old Exporter stays in the way of a new one on the same registry.
    with Exporter(registry) as again:
        assert again.instrument(engines[0]).name == handles[0].name
    for engine in engines:
        engine.dispose()


MULTIPROCESS_CLOSE = """
import os, sys, threading
from pathlib import Path
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.exposition import writer

directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
mark = directory / f"pool_exporter_{os.getpid()}.alive"
threads = lambda: sorted(t.name for t in threading.enumerate() if t.name.startswith("pool-exporter"))
exporter = Exporter(CollectorRegistry(), multiprocess_dir=directory)
engine = create_engine("sqlite://")
exporter.instrument(engine, name="closing")
with engine.connect() as conn:
    conn.execute(text("SELECT 1"))
print("open", threads(), len(writer._FORK_WRITERS), mark.exists())
exporter.close()
print("closed", threads(), len(writer._FORK_WRITERS), mark.exists())
# Our exit hook would remove this mark at exit: it must not run any more.
mark.touch()
print(os.getpid())
"""


def test_close_stops_the_multiprocess_writer_and_removes_its_process_hooks(tmp_path: Path) -> None:
    """The writer's thread, its atexit hook, its place in the at-fork hook and its liveness mark all go."""
    script = tmp_path / "close.py"
    script.write_text(MULTIPROCESS_CLOSE)
    directory = tmp_path / "mp"
    directory.mkdir()
    out = subprocess.run(
        [sys.executable, str(script)],
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out[:2] == ["open ['pool-exporter-mp'] 1 True", "closed [] 0 False"]
    assert (directory / f"pool_exporter_{out[2]}.alive").exists()


def test_registration_is_all_or_nothing_and_names_the_way_out(sync_engines: list[Engine]) -> None:
    registry = CollectorRegistry()
    Gauge("sqlalchemy_pool_size", "The app's own metric of that name.", registry=registry)
    with pytest.raises(ValueError, match=r"sqlalchemy_pool_size.*namespace='\.\.\.'"):
        Exporter(registry)
    assert [m.name for m in registry.collect()] == ["sqlalchemy_pool_size"]
    # Another namespace is the way out, and a second Exporter of a namespace is refused the same way.
    with Exporter(registry, namespace="app_db") as exporter:
        with pytest.raises(ValueError, match="namespace"):
            Exporter(registry, namespace="app_db")
        engine = create_engine("sqlite://")
        sync_engines.append(engine)
        exporter.instrument(engine, name="ok")
        assert sample(registry, "app_db_pool_checkouts_total", pool="ok") == 0


def test_an_engine_belongs_to_one_exporter_and_one_set_of_options(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine]
) -> None:
    engine = create_engine("sqlite://")
    sync_engines.append(engine)
    handle = exporter.instrument(engine, name="mine")
    assert exporter.instrument(engine) is handle
    assert exporter.instrument(engine, name="mine", statements=True) is handle
    with pytest.raises(AlreadyInstrumented, match=r"'mine' with other options \(leak_threshold=5\.0\)"):
        exporter.instrument(engine, leak_threshold=5)
    with pytest.raises(AlreadyInstrumented, match=r"name='theirs'"):
        exporter.instrument(engine, name="theirs")
    with Exporter(CollectorRegistry()) as other:
        with pytest.raises(AlreadyInstrumented, match="by Exporter"):
            other.instrument(engine)
        assert other.handles() == []
        # Once the first lets go, the second may take it.
        exporter.uninstrument(engine)
        assert other.instrument(engine).owner is other
    assert exporter.handles() == []


async def test_routes_serve_their_exporters_pools_only(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine]
) -> None:
    mine, theirs = create_engine("sqlite://"), create_engine("sqlite://")
    sync_engines.extend((mine, theirs))
    exporter.instrument(mine, name="mine")
    with Exporter(CollectorRegistry()) as other:
        other.instrument(theirs, name="theirs")
        server = Server(make_app(exporter))
        await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(server.url + "/pools") as r:
                    assert [p["name"] for p in (await r.json())["pools"]] == ["mine"]
                async with http.get(server.url + "/readyz") as r:
                    assert (await r.json())["checks"] == {"pool mine": "ok"}
                async with http.get(server.url + "/metrics") as r:
                    body = await r.text()
            assert 'pool="mine"' in body and 'pool="theirs"' not in body
        finally:
            await server.stop()


def test_dropped_engines_take_their_handles_with_them_unscraped(registry: CollectorRegistry) -> None:
    """Per-tenant engines, test fixtures: thousands come and go; nobody scrapes this registry."""
    exporter = Exporter(registry)
    for i in range(500):
        engine = create_engine("sqlite://")
        exporter.instrument(engine, name="tenant")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        if i % 100 == 0:
            assert len(exporter.handles()) >= 1
        del engine, conn
    gc.collect()
    gc.collect()  # SQLAlchemy's pool finalizers free the last engines in a second pass
    assert exporter.handles() == []
    assert len(exporter._handles) == 0 and len(exporter._by_name) == 0
    # A name is freed with its engine: the next tenant gets it without a suffix.
    engine = create_engine("sqlite://")
    assert exporter.instrument(engine, name="tenant").name == "tenant"
    exporter.close()


def test_default_exporter_is_bound_to_the_global_registry_and_retries_after_a_clash() -> None:
    blocker = Gauge("clashns_pool_size", "Someone else's metric.", registry=REGISTRY)
    engine = create_engine("sqlite://")
    try:
        with pytest.raises(ValueError, match="clashns_pool_size"):
            pool_exporter.default_exporter("clashns")
        REGISTRY.unregister(blocker)
        exporter = pool_exporter.default_exporter("clashns")
        assert exporter.registry is REGISTRY and pool_exporter.default_exporter("clashns") is exporter
        exporter.instrument(engine, name="clash")
        assert REGISTRY.get_sample_value("clashns_pool_checkouts_total", {"pool": "clash"}) == 0
        exporter.close()
        assert pool_exporter.default_exporter("clashns") is not exporter
        pool_exporter.default_exporter("clashns").close()
    finally:
        engine.dispose()


IMPORT_COLLISION = textwrap.dedent(
    """
    import exporter  # the application's own module, first on sys.path
    assert exporter.MINE == "the app's"
    from sqlalchemy import create_engine, text
    import sqlalchemy_pool_exporter as pool_exporter
    engine = create_engine("sqlite://?plugin=pool_exporter&pool_exporter_name=collide")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    handle = pool_exporter.handle_for(engine)
    print(handle.name, handle.stats.wait.count)
    """
)


@pytest.mark.parametrize("shape", ["module", "package"])
def test_an_application_exporter_module_does_not_collide(tmp_path: Path, shape: str) -> None:
    """`import exporter` in an app (its own exporter.py, or PyPI's `exporter` package) breaks neither the
    URL plugin nor the CLI: our import name is sqlalchemy_pool_exporter."""
    if shape == "module":
        (tmp_path / "exporter.py").write_text('MINE = "the app\'s"\n')
    else:
        (tmp_path / "exporter").mkdir()
        (tmp_path / "exporter" / "__init__.py").write_text('MINE = "the app\'s"\n')
        (tmp_path / "exporter" / "plugin.py").write_text("raise ImportError('not ours')\n")
    (tmp_path / "app.py").write_text(IMPORT_COLLISION)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout) == (0, "collide 1\n"), run.stderr
    cli = Path(sys.executable).parent / "pool-exporter"
    version = subprocess.run([str(cli), "--version"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert (version.returncode, version.stdout) == (0, f"pool-exporter {pool_exporter.__version__}\n"), version.stderr
