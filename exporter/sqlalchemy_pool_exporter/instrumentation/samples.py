"""One walk over a pool's reading and stats, shared by the scrape collector and the multiprocess writer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .. import catalog
from . import holders
from .backends import STATES

if TYPE_CHECKING:
    from .reading import PoolReading
    from .serverview import ServerJoin
    from .stats import Histogram, PoolStats

Labels = tuple[str, ...]

# Catalog key of each single-valued gauge, by PoolReading field.
_GAUGES: tuple[tuple[str, str], ...] = (
    ("max", "max_connections"),
    ("size", "size"),
    ("overflow", "overflow"),
    ("timeout", "timeout"),
    ("pending", "pending"),
    ("oldest_pending", "oldest_pending"),
    ("oldest_checkout", "oldest_checkout"),
)


def gauges(r: PoolReading) -> Iterator[tuple[str, Labels, float]]:
    """(catalog key, labels after `pool`, value) for every gauge the pool class can answer."""
    yield "connections", ("used",), r.used
    if r.idle is not None:
        yield "connections", ("idle",), r.idle
    # A QueuePool answers them all (pending and the oldest ones are never None): no getattr loop.
    if r.max is not None and r.size is not None and r.overflow is not None and r.timeout is not None:
        yield "max_connections", (), r.max
        yield "size", (), r.size
        yield "overflow", (), r.overflow
        yield "timeout", (), r.timeout
        yield "pending", (), r.pending
        yield "oldest_pending", (), r.oldest_pending
        yield "oldest_checkout", (), r.oldest_checkout
    else:
        for field, key in _GAUGES:
            value = getattr(r, field)
            if value is not None:
                yield key, (), value
    if r.holders is not None:
        for name, held in r.holders:
            yield "holder_connections", (name,), held
    # One process's own numbers; the multiprocess merge keeps the busiest live worker's.
    if r.max:
        yield "worker_utilization", (), r.used / r.max
    yield "worker_pending", (), r.pending
    if r.advice is not None:
        yield "offered_load", (), r.advice.offered_load
        yield "advised_size", (), r.advice.advised_size
    if r.connects_to is not None:
        yield "info", r.connects_to, 1
    if r.server is not None:
        yield from server_gauges(r.server)


def server_gauges(server: ServerJoin) -> Iterator[tuple[str, Labels, float]]:
    """The server view's numbers by holder (serverview.py), holders in name order, states in STATES order."""
    for name in sorted(server.holders):
        v = server.holders[name]
        for state in STATES:
            n = v.states.get(state)
            if n:
                yield "holder_server_connections", (name, state), n
        yield "holder_lock_waiting", (name,), v.lock_waiting
        yield "holder_blocking", (name,), v.blocking
        yield "holder_oldest_transaction", (name,), v.oldest_transaction
        yield "holder_idle_in_transaction", (name,), v.idle_in_transaction


def counters(s: PoolStats) -> Iterator[tuple[str, Labels, float]]:
    # Plain reads where the stats offer them (`sum(counts)` for Histogram.count, the transaction
    # histograms by dict lookup): every scrape walks this for every pool (docs/performance.md).
    yield "checkouts", (), sum(s.wait.counts)
    yield "timeouts", (), s.timeouts
    yield "created", (), s.created
    yield "closed", (), s.closed
    yield "disconnects", (), s.disconnects
    yield "leaked", (), s.leaked
    yield "errors", (), s.errors
    for key, by_label in (
        ("invalidations", s.invalidations),
        ("connect_errors", s.connect_errors),
        ("statement_errors", s.statement_errors),
        ("sessions", s.sessions),
    ):
        if by_label:
            for label, n in tuple(by_label.items()):
                yield key, (label,), n
    if s.transactions:  # instrument(transactions=False): no transaction series at all (a leaner budget)
        for label, n in tuple(s.savepoints.items()):
            yield "savepoints", (label,), n
        transaction = s.transaction
        for outcome in catalog.TRANSACTION_OUTCOMES:
            hist = transaction.get(outcome) or s.transaction_histogram(outcome)
            yield "transactions", (outcome,), sum(hist.counts)
    if holders.ATTRIBUTING[0]:
        h = s.holders
        for slot in h.all():
            name = (slot.name,)
            yield "holder_checkouts", name, slot.checkouts
            yield "holder_hold", name, slot.hold
            yield "holder_wait", name, slot.wait
            yield "holder_timeouts", name, slot.timeouts
            yield "holder_held_too_long", name, slot.held_too_long
        yield "holder_folded", (), h.folded


def histograms(s: PoolStats) -> Iterator[tuple[str, Labels, Histogram]]:
    yield "wait", (), s.wait
    yield "use", (), s.use
    yield "create", (), s.create
    if s.transactions:
        transaction = s.transaction
        for outcome in catalog.TRANSACTION_OUTCOMES:
            yield "transaction_seconds", (outcome,), transaction.get(outcome) or s.transaction_histogram(outcome)
    for operation, hist in tuple(s.statement.items()):
        yield "statement_seconds", (operation,), hist
