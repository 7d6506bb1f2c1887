"""The pool's live numbers, read where they live at the moment they are asked for."""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Protocol

from sqlalchemy.pool import NullPool, Pool, QueuePool

from .. import compat
from . import holders
from .advice import Advice
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
    # Connections held now by holder name; None until a holder was ever set in the process.
    holders: tuple[tuple[str, int], ...] | None = None
    # The advice window's numbers (advice.py); None until it saw a checkout.
    advice: Advice | None = None
    # (server, database, driver) the pool connects to (labels.server_labels); None for file databases.
    connects_to: tuple[str, str, str] | None = None
    # The last server view of the checkouts (serverview.ServerJoin); None: off, not yet, or the poll failed.
    server: Any = None


class PoolSource(Protocol):
    """What collectors, the exposition, the multiprocess writer and the views read of one pool."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> PoolStats: ...

    @property
    def db_system(self) -> str:
        """The database as OpenTelemetry's `db.system.name` says it (metricnames.db_system)."""
        ...

    def read(self) -> PoolReading | None: ...

    def fail(self, where: str, exc: BaseException) -> None: ...


def read_pool(pool: Pool, stats: PoolStats, connects_to: tuple[str, str, str] | None = None) -> PoolReading:
    """Read live state where it lives: QueuePool counts itself; other pools through our checkouts."""
    now = perf_counter()
    advice = stats.window.advice(stats, now)
    held_by = _held_by_holder(stats) if holders.ATTRIBUTING[0] else None
    pending = len(stats.waiting)
    oldest_pending = stats.oldest_pending(now)
    oldest_checkout = stats.oldest_checkout(now)
    if isinstance(pool, QueuePool):
        size = pool.size()
        max_overflow = compat.max_overflow(pool)
        used = pool.checkedout()
        idle = _idle_open(pool)
        # Positional: a NamedTuple's __new__ takes keywords at ~0.45 µs more, for every pool at every scrape.
        return PoolReading(
            type(pool).__name__,
            used,
            idle,
            size,
            size + max_overflow if max_overflow is not None and max_overflow >= 0 else None,  # max
            max(0, used + idle - size),  # overflow
            pool.timeout(),
            pending,
            oldest_pending,
            oldest_checkout,
            held_by,
            advice,
            connects_to,
            stats.server,
        )
    return PoolReading(
        type(pool).__name__,
        len(stats.checked_out),  # used
        0 if isinstance(pool, NullPool) else None,  # idle
        None,  # size
        None,  # max
        None,  # overflow
        None,  # timeout
        pending,
        oldest_pending,
        oldest_checkout,
        held_by,
        advice,
        connects_to,
        stats.server,
    )


def _held_by_holder(stats: PoolStats) -> tuple[tuple[str, int], ...]:
    """Connections checked out now, by holder; every holder the pool has seen, at 0 when it holds none."""
    counts = {slot.name: 0 for slot in stats.holders.all()}
    for entry in tuple(stats.checked_out.values()):
        name = entry[3].name if entry[3] is not None else holders.NONE
        counts[name] = counts.get(name, 0) + 1
    return tuple(counts.items())


def _idle_open(pool: QueuePool) -> int:
    """Idle slots that hold an open DBAPI connection.

    `checkedin()` counts slots, and a slot comes back empty after a hard invalidation, a detach
    or a garbage-collected async connection (it reconnects at its next checkout): counting it
    would report connections the database no longer has.
    """
    records = compat.idle_records(pool)
    if records is None:
        return pool.checkedin()
    return sum(1 for record in records if record.dbapi_connection is not None)
