"""The pool's live numbers, read where they live at the moment they are asked for."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from sqlalchemy.pool import NullPool, Pool, QueuePool

from .stats import PoolStats

perf_counter = time.perf_counter


class PoolReading(NamedTuple):
    """The pool's own numbers at one instant; None where the pool class has no such notion."""

    pool_class: str
    used: int
    idle: int | None
    size: int | None
    max: int | None
    overflow: int | None
    timeout: float | None
    pending: int
    oldest_pending: float
    oldest_checkout: float


def read_pool(pool: Pool, stats: PoolStats) -> PoolReading:
    """Read live state where it lives: QueuePool counts itself; other pools through our checkouts."""
    now = perf_counter()
    pending = len(stats.waiting)
    oldest_pending = stats.oldest_pending(now)
    oldest_checkout = stats.oldest_checkout(now)
    if isinstance(pool, QueuePool):
        size = pool.size()
        max_overflow: int = pool._max_overflow
        used = pool.checkedout()
        idle = _idle_open(pool)
        return PoolReading(
            type(pool).__name__,
            used=used,
            idle=idle,
            size=size,
            max=size + max_overflow if max_overflow >= 0 else None,
            overflow=max(0, used + idle - size),
            timeout=pool.timeout(),
            pending=pending,
            oldest_pending=oldest_pending,
            oldest_checkout=oldest_checkout,
        )
    return PoolReading(
        type(pool).__name__,
        used=len(stats.checked_out),
        idle=0 if isinstance(pool, NullPool) else None,
        size=None,
        max=None,
        overflow=None,
        timeout=None,
        pending=pending,
        oldest_pending=oldest_pending,
        oldest_checkout=oldest_checkout,
    )


def _idle_open(pool: QueuePool) -> int:
    """Idle slots that hold an open DBAPI connection.

    `checkedin()` counts slots, and a slot comes back empty after a hard invalidation, a detach
    or a garbage-collected async connection (it reconnects at its next checkout): counting it
    would report connections the database no longer has.
    """
    queue: Any = pool._pool
    items = getattr(queue, "queue", None)  # sqlalchemy.util.queue.Queue: a deque
    if items is None:
        # AsyncAdaptedQueue creates its asyncio.Queue lazily; not created yet means empty.
        if "_queue" not in vars(queue):
            return 0
        items = getattr(queue._queue, "_queue", None)
    if items is None:
        return pool.checkedin()
    # tuple() copies the deque in one C call, so a concurrent get/put cannot break the walk.
    return sum(1 for record in tuple(items) if record.dbapi_connection is not None)
