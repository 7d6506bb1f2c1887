"""Plain in-process counters that listeners update on the hot path and collectors read.

Why not prometheus_client objects: each `observe()` takes a lock and walks Python layers
(about 1.1 µs); these are list and int updates (about 0.2 µs). Under the GIL an update of one
list slot or attribute cannot interleave with another thread's (no eval-breaker check falls
inside `x[i] += 1`), so counts stay exact for threaded sync engines too.
"""

from __future__ import annotations

import time
import weakref
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client.utils import floatToGoString

from .advice import Window
from .holders import DEFAULT_MAX_HOLDERS, Holders, Slot

if TYPE_CHECKING:
    import traceback


_INF = float("inf")


def probe(bounds: Sequence[float]) -> tuple[float, ...]:
    """`bounds` and two +Inf: what bucket() reads, so that [1] and [2] exist for any bucket set.

    bisect_left over it equals bisect_left over `bounds` (a value past the last bound, +Inf or not,
    lands on the first +Inf: index len(bounds), the +Inf bucket; NaN lands on 0 in both)."""
    return (*bounds, _INF, _INF)


def bucket(probe: tuple[float, ...], value: float) -> int:
    """The bucket of `value`: bisect_left(bounds, value), with the first three bounds tried first.

    Most pool waits, holds, transactions and statements fall in the first three buckets, and a float
    comparison in bytecode is a specialised instruction (3.11+), where bisect_left compares through
    the generic rich comparison (~0.45k Ir a search, callgrind). pool.py and dialect.py inline this
    expression: keep them in step (tests/instrumentation/test_stats.py checks it against bisect_left).
    """
    return 0 if value <= probe[0] else 1 if value <= probe[1] else 2 if value <= probe[2] else bisect_left(probe, value)


class Histogram:
    """Fixed buckets; `counts[i]` holds observations in (bounds[i-1], bounds[i]], the last is +Inf."""

    __slots__ = ("bounds", "counts", "les", "probe", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds: tuple[float, ...] = tuple(bounds)
        self.probe = probe(self.bounds)  # what the inlined bucket() reads
        # Spelled as prometheus_client spells `le`, so merged multiprocess series line up.
        self.les: tuple[str, ...] = (*(floatToGoString(b) for b in self.bounds), "+Inf")  # type: ignore[no-untyped-call]
        self.counts: list[int] = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # pool.py (checkout/checkin) and dialect.py (transactions, statements) inline this and bucket():
        # keep them in step.
        self.counts[bucket(self.probe, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """(le, cumulative count) pairs ending with +Inf, and the sum, from one copy of the counts."""
        counts = list(self.counts)
        total = self.sum
        running = 0
        buckets: list[tuple[str, float]] = []
        for le, n in zip(self.les, counts, strict=True):
            running += n
            buckets.append((le, running))
        return buckets, total


class Checkout(NamedTuple):
    """A connection currently checked out: when, by which proxy (weakly), from where, by which holder."""

    started: float
    fairy: Any  # weakref.ref to the _ConnectionFairy (SQLAlchemy's own); dead: the app dropped it unreturned
    stack: traceback.StackSummary | None
    slot: Slot | None  # the holder's slot; None when no holder was ever set in this process


class PoolStats:
    """Everything counted for one instrumented engine since it was instrumented."""

    def __init__(self, buckets: Mapping[str, Sequence[float]], max_holders: int = DEFAULT_MAX_HOLDERS) -> None:
        # Wall-clock start of every count below: an OpenTelemetry cumulative point's start time.
        self.started_ns = time.time_ns()
        self.wait = Histogram(buckets["wait"])
        self.use = Histogram(buckets["use"])
        self.create = Histogram(buckets["create"])
        self.transaction: dict[str, Histogram] = {}
        self.statement: dict[str, Histogram] = {}
        self.bounds: dict[str, tuple[float, ...]] = {key: tuple(b) for key, b in buckets.items()}
        self.timeouts = 0
        self.created = 0
        self.closed = 0
        self.disconnects = 0
        self.leaked = 0
        self.errors = 0
        self.connect_errors: dict[str, int] = {}
        self.invalidations: dict[str, int] = {"hard": 0, "soft": 0}
        self.savepoints: dict[str, int] = {"release": 0, "rollback": 0}
        self.sessions: dict[str, int] = {}
        self.statement_errors: dict[str, int] = {}
        self.holders = Holders(max_holders)
        # Whether transactions are timed (instrument(transactions=...)); without, no such series.
        self.transactions = True
        # Pool record -> start of the transaction open on it (dialect.py).
        self.open_transactions: dict[Any, float] = {}
        # Live state: the start times of the callers waiting now (a list: pool.py says why not a dict
        # by token) and the checked-out connections by connection record. The checkout path stores
        # plain (started, fairy weakref, stack, holder slot) tuples: building a NamedTuple there costs
        # ~0.2 µs, 10% of the whole budget (docs/performance.md); `checkouts` names them.
        self.waiting: list[float] = []
        self.checked_out: dict[Any, tuple[float, Any, traceback.StackSummary | None, Slot | None]] = {}
        # The advice window (advice.py): read at scrape or flush only, from the counters above.
        self.window = Window()
        self.window.start(self)
        # Pool record -> the server's id of the backend its DBAPI connection is (backends.py), set when
        # the pool opens the connection, dropped when it closes it. Weak: a record may just vanish.
        self.backend_pids: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        # The last joined server view (serverview.py), or None: off, not polled yet, or the poll failed.
        self.server: Any = None

    @property
    def checkouts(self) -> dict[Any, Checkout]:
        """The connections checked out now, by connection record (a snapshot)."""
        return {record: Checkout._make(entry) for record, entry in tuple(self.checked_out.items())}

    def transaction_histogram(self, outcome: str) -> Histogram:
        hist = self.transaction.get(outcome)
        if hist is None:
            hist = self.transaction[outcome] = Histogram(self.bounds["use"])
        return hist

    def statement_histogram(self, operation: str) -> Histogram:
        hist = self.statement.get(operation)
        if hist is None:
            hist = self.statement[operation] = Histogram(self.bounds["statement"])
        return hist

    def oldest_pending(self, now: float) -> float:
        starts = tuple(self.waiting)
        return now - min(starts) if starts else 0.0

    def oldest_checkout(self, now: float) -> float:
        out = tuple(self.checked_out.values())
        return now - min([entry[0] for entry in out]) if out else 0.0


def bump(counts: dict[str, int], key: str, by: int = 1) -> None:
    counts[key] = counts.get(key, 0) + by
