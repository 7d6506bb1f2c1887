"""Goal 4: what one instrumented pool costs in memory, and that nothing grows with checkouts."""

from __future__ import annotations

import gc
import sys
import tracemalloc
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from sqlalchemy_pool_exporter import Exporter


def sqlite_engine() -> Engine:
    """A QueuePool over in-memory SQLite, as every benchmark pool."""
    return create_engine("sqlite://", poolclass=QueuePool, pool_size=5, max_overflow=10)


def _exercise(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.commit()
        conn.execute(text("SELECT 1"))
        conn.rollback()


def footprint(pools: int = 20) -> float:
    """Bytes per instrumented pool, its series all present, measured with tracemalloc."""
    registry = CollectorRegistry()
    exporter = Exporter(registry)
    engines = [sqlite_engine() for _ in range(pools)]
    for engine in engines:
        _exercise(engine)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, engine in enumerate(engines):
        exporter.instrument(engine, name=f"m{i}")
        _exercise(engine)
    generate_latest(registry)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    exporter.close()
    for engine in engines:
        engine.dispose()
    return (after - before) / pools


def _sizes(handle: Any) -> dict[str, int]:
    return {
        "checkouts": len(handle.stats.checkouts),
        "waiting": len(handle.stats.waiting),
        "leak_warned": len(handle.leaks.warned),
        "statement_histograms": len(handle.stats.statement),
        "transaction_histograms": len(handle.stats.transaction),
    }


def growth(checkouts: int) -> dict[str, Any]:
    """Allocated blocks and our internal dicts before and after `checkouts` pool cycles."""
    engine = sqlite_engine()
    exporter = Exporter(CollectorRegistry())
    handle = exporter.instrument(engine, name="growth")
    pool = engine.pool
    for _ in range(10_000):  # warm every lazily built structure
        pool.connect().close()
    _exercise(engine)
    gc.collect()
    blocks0, sizes0 = sys.getallocatedblocks(), _sizes(handle)
    for _ in range(checkouts):
        pool.connect().close()
    _exercise(engine)
    gc.collect()
    blocks1, sizes1 = sys.getallocatedblocks(), _sizes(handle)
    count = handle.stats.wait.count
    exporter.close()
    engine.dispose()
    return {
        "checkouts": checkouts,
        "counted": count,
        "blocks_delta": blocks1 - blocks0,
        "sizes_before": sizes0,
        "sizes_after": sizes1,
    }
