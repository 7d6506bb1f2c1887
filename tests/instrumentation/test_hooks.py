"""Coexisting with other tools on one engine: class-level patches, layers stacked on ours, layers under ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.pool import Pool, QueuePool

from sqlalchemy_pool_exporter import Exporter, compat

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


# The one-line methods our wrappers make the call of themselves while the class has SQLAlchemy's own.
_INLINED = [
    (Pool, "connect"),
    (Pool, "_return_conn"),
    (DefaultDialect, "do_begin"),
    (DefaultDialect, "do_commit"),
    (DefaultDialect, "do_rollback"),
    (DefaultDialect, "do_execute"),
    (DefaultDialect, "do_execute_no_params"),
]


@pytest.mark.parametrize(("cls", "name"), _INLINED, ids=[name for _, name in _INLINED])
def test_a_later_patch_of_an_inlined_method_is_called_and_counted(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path, cls: type, name: str
) -> None:
    """compat.plain: the inlined call is made only while the class holds SQLAlchemy's function."""
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite", poolclass=QueuePool)
    sync_engines.append(engine)
    handle = exporter.instrument(engine)
    with engine.connect() as conn:  # the dialect's first connect runs its own statements
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.commit()
    real = vars(cls)[name]
    calls: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return real(*args, **kwargs)

    def run() -> None:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))  # do_execute
            conn.execution_options(no_parameters=True).exec_driver_sql("SELECT 1")  # do_execute_no_params
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.rollback()

    with mock.patch.object(cls, name, spy):
        run()
    assert calls  # the patch was reached through our wrapper
    run()  # SQLAlchemy's own function again: made inline
    assert sample(registry, "sqlalchemy_transactions_total", pool=handle.name, outcome="commit") == 3
    assert sample(registry, "sqlalchemy_transactions_total", pool=handle.name, outcome="rollback") == 2
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=handle.name) == 5
    assert sample(registry, "sqlalchemy_pool_connections", pool=handle.name, state="used") == 0
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 2


def test_sqlalchemy_s_one_line_methods_are_recognised_and_a_changed_body_is_not() -> None:
    for cls, name in _INLINED:
        func = vars(cls)[name]
        if name == "do_rollback" and "skip_autocommit_rollback" not in func.__code__.co_names:
            assert compat.plain(cls, name) is None  # before 2.0.5x, no skip_autocommit_rollback: called as before
        else:
            assert compat.plain(cls, name) is func, name

    class Changed(DefaultDialect):
        def do_commit(self, dbapi_connection: Any) -> None:
            dbapi_connection.commit()
            dbapi_connection.commit()

        def do_begin(self, dbapi_connection: Any) -> None:
            return None  # the same bytecode as `pass`, under another spelling: still plain

    assert compat.plain(Changed, "do_commit") is None
    assert compat.plain(Changed, "do_rollback") is None  # not Changed's own
    assert compat.plain(Changed, "do_begin") is vars(Changed)["do_begin"]


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
