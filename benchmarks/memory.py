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

import sqlalchemy_pool_exporter as pool_exporter


def _engine() -> Engine:
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
    engines = [_engine() for _ in range(pools)]
    for engine in engines:
        _exercise(engine)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, engine in enumerate(engines):
        pool_exporter.instrument(engine, name=f"m{i}", registry=registry, multiprocess=False)
        _exercise(engine)
    generate_latest(registry)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    for engine in engines:
        pool_exporter.uninstrument(engine)
        engine.dispose()
    return (after - before) / pools


def _sizes(handle: Any) -> dict[str, int]:
    return {
        "checkouts": len(handle.stats.checkouts),
        "waiting": len(handle.stats.waiting),
        "leak_warned": len(handle._leak_warned),
        "orphans": len(getattr(handle, "_orphans", ())),
        "statement_histograms": len(handle.stats.statement),
        "transaction_histograms": len(handle.stats.transaction),
    }


def growth(checkouts: int) -> dict[str, Any]:
    """Allocated blocks and our internal dicts before and after `checkouts` pool cycles."""
    engine = _engine()
    handle = pool_exporter.instrument(engine, name="growth", registry=CollectorRegistry(), multiprocess=False)
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
    pool_exporter.uninstrument(engine)
    engine.dispose()
    return {
        "checkouts": checkouts,
        "counted": count,
        "blocks_delta": blocks1 - blocks0,
        "sizes_before": sizes0,
        "sizes_after": sizes1,
    }
