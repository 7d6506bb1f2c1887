"""Coexisting with other tools on one engine: class-level patches, layers stacked on ours, layers under ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.pool import QueuePool

from sqlalchemy_pool_exporter import Exporter

from ..conftest import sample


def test_a_later_patch_of_the_dialect_class_still_reaches_an_instrumented_engine(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    sync_engines.append(engine)
    handle = exporter.instrument(engine)
    calls: list[str] = []
    real_commit = DefaultDialect.do_commit

    def spy(self: Any, dbapi_connection: Any) -> None:
        calls.append("commit")
        real_commit(self, dbapi_connection)

    with mock.patch.object(DefaultDialect, "do_commit", spy), engine.begin() as conn:
        conn.execute(text("SELECT 1"))
    assert calls == ["commit"]
    assert sample(registry, "sqlalchemy_transactions_total", pool=handle.name, outcome="commit") == 1
    with engine.begin() as conn:  # the patch is gone again, for us too
        conn.execute(text("SELECT 1"))
    assert calls == ["commit"]
    assert sample(registry, "sqlalchemy_transactions_total", pool=handle.name, outcome="commit") == 2


def _counting_layer(obj: Any, name: str, seen: list[str]) -> Any:
    """Another tool's instance-level wrapper around whatever `obj.name` is now (a tracer, a retry layer)."""
    inner = getattr(obj, name)

    def layer(*args: Any, **kwargs: Any) -> Any:
        seen.append(name)
        return inner(*args, **kwargs)

    setattr(obj, name, layer)
    return layer


def test_uninstrument_leaves_a_layer_stacked_on_ours_and_ours_passes_through(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite", poolclass=QueuePool)
    sync_engines.append(engine)
    handle = exporter.instrument(engine)
    with engine.begin() as conn:
        conn.execute(text("SELECT 1"))  # the dialect is initialised: statements are timed from here
    seen: list[str] = []
    layers = {
        "connect": _counting_layer(engine.pool, "connect", seen),
        "do_execute": _counting_layer(engine.dialect, "do_execute", seen),
        "do_commit": _counting_layer(engine.dialect, "do_commit", seen),
    }
    with engine.begin() as conn:
        conn.execute(text("SELECT 2"))
    assert seen == ["connect", "do_execute", "do_commit"]
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=handle.name) == 2
    assert sample(registry, "sqlalchemy_statement_seconds_count", pool=handle.name, operation="select") == 2

    handle.uninstrument()

    # Their layers are where they put them; ours underneath now only passes calls through.
    assert vars(engine.pool)["connect"] is layers["connect"]
    assert vars(engine.dialect)["do_execute"] is layers["do_execute"]
    assert vars(engine.dialect)["do_commit"] is layers["do_commit"]
    seen.clear()
    with engine.begin() as conn:
        assert conn.execute(text("SELECT 3")).scalar_one() == 3
    assert seen == ["connect", "do_execute", "do_commit"]
    assert handle.stats.wait.count == 2
    assert handle.stats.statement["select"].count == 2
    assert handle.stats.transaction["commit"].count == 2
    assert handle.stats.checked_out == {}  # a pass-through records nothing, not even the checkout


def test_uninstrument_restores_a_layer_that_was_under_ours(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite", poolclass=QueuePool)
    sync_engines.append(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    seen: list[str] = []
    under_connect = _counting_layer(engine.pool, "connect", seen)
    under_execute = _counting_layer(engine.dialect, "do_execute", seen)
    handle = exporter.instrument(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT 2"))
    assert seen == ["connect", "do_execute"]  # ours calls the layer it found
    assert handle.stats.wait.count == 1
    handle.uninstrument()
    assert vars(engine.pool)["connect"] is under_connect
    assert vars(engine.dialect)["do_execute"] is under_execute
