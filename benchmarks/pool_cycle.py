"""Goal 1: a checkout + return with no I/O, per variant, on a QueuePool over in-memory SQLite."""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter_ns

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from .measure import Summary, interleaved, summarise
from .variants import Variant, inside


def make_engine(variant: Variant) -> Engine:
    # In-memory SQLite with a QueuePool: each pooled connection is its own empty database, no I/O.
    engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=5, max_overflow=10)
    variant.attach(engine)
    # Open the connection once so that no cycle below pays for creating it.
    engine.pool.connect().close()
    return engine


def pool_cycles(engine: Engine, n: int) -> float:
    """µs per `pool.connect()` + `close()`: the pool's own checkout and return."""
    pool = engine.pool
    t0 = perf_counter_ns()
    for _ in range(n):
        pool.connect().close()
    return (perf_counter_ns() - t0) / n / 1000


def engine_cycles(engine: Engine, n: int) -> float:
    """µs per `engine.connect()` + `close()`: what a Core caller pays, Connection object included."""
    t0 = perf_counter_ns()
    for _ in range(n):
        engine.connect().close()
    return (perf_counter_ns() - t0) / n / 1000


def transaction_cycles(engine: Engine, n: int) -> float:
    """µs per `engine.begin()`: `SELECT 1`; COMMIT; return: a whole transaction with nothing to wait for.

    In-memory SQLite answers without I/O, so under callgrind the count is exact: what the exporter adds
    to a transaction (pool cycle, BEGIN, statement, COMMIT, reset-on-return), free of the event loop's
    timing that moves the asyncpg counts of section 2.
    """
    t0 = perf_counter_ns()
    for _ in range(n):
        with engine.begin() as conn:
            conn.exec_driver_sql("SELECT 1")
    return (perf_counter_ns() - t0) / n / 1000


def close_cycles(engine: Engine, n: int) -> float:
    """µs per `engine.connect()`: `SELECT 1`; close with the transaction open: how an ORM read ends.

    The transaction ends through `Connection.close()` (SQLAlchemy's ROLLBACK, outcome `close`).
    """
    t0 = perf_counter_ns()
    for _ in range(n):
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    return (perf_counter_ns() - t0) / n / 1000


def rollback_cycles(engine: Engine, n: int) -> float:
    """µs per `engine.connect()`: `SELECT 1`; `rollback()`; close: the application's own rollback."""
    t0 = perf_counter_ns()
    for _ in range(n):
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            conn.rollback()
    return (perf_counter_ns() - t0) / n / 1000


def run(variants: list[Variant], *, rounds: int, cycles: int) -> dict[str, dict[str, Summary]]:
    engines = {v.name: make_engine(v) for v in variants}
    for engine in engines.values():  # warm up every code path before the first timed round
        pool_cycles(engine, cycles // 10 + 1)
        engine_cycles(engine, cycles // 10 + 1)
    names = [v.name for v in variants]
    by_name = {v.name: v for v in variants}

    def timed(loop: Callable[[Engine, int], float], name: str) -> float:
        with inside(by_name[name]):
            return loop(engines[name], cycles)

    pool = interleaved(names, rounds, lambda name: timed(pool_cycles, name))
    eng = interleaved(names, rounds, lambda name: timed(engine_cycles, name))
    for engine in engines.values():
        engine.dispose()
    return {"pool": summarise(pool), "engine": summarise(eng)}
