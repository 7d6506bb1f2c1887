"""Pool size advice: the offered load over a sliding window, sampled from counters PoolStats already keeps.

Nothing here runs on the hot path: a scrape, a multiprocess flush or a view calls `Window.advice()`,
which reads the counters (checkouts, hold time, connections opened) and keeps a ring of snapshots
covering the window. The busy time of the connections still checked out is added to the hold sum, so
the offered load is the time-average of busy connections over the window exactly (λ·W by Little's law),
without waiting for the long holds to end.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

from . import erlang

if TYPE_CHECKING:
    from .stats import PoolStats

DEFAULT_WINDOW = 300.0
DEFAULT_WAIT_PROBABILITY = 0.01
# A day: the ring holds about STEPS snapshots whatever the window, so longer would only blur the advice.
MAX_WINDOW = 86400.0
# The ring keeps about this many snapshots per window (one per window/STEPS seconds, at least 1 s apart).
STEPS = 100

perf_counter = time.perf_counter


class Snapshot(NamedTuple):
    at: float  # perf_counter
    checkouts: int
    hold_sum: float  # seconds held, returned and still out
    created: int


class Advice(NamedTuple):
    """What a window of a pool's traffic says about its size."""

    seconds: float  # the time the window covers (less than the setting until it filled)
    rate: float  # λ: checkouts per second
    mean_hold: float  # W: seconds held per checkout (offered_load / rate)
    offered_load: float  # λ·W: connections busy on average, in Erlangs
    advised_size: int  # Erlang C's smallest size with P(wait) <= wait_probability
    wait_probability: float  # the target
    opened: int  # connections opened in the window


def snapshot(stats: PoolStats, now: float) -> Snapshot:
    out = tuple(stats.checked_out.values())
    busy = sum(now - entry[0] for entry in out) if out else 0  # no generator for an idle pool: every scrape runs this
    return Snapshot(now, stats.wait.count, stats.use.sum + busy, stats.created)


class Window:
    """A ring of snapshots over the last `seconds`; the advice from the oldest one to now."""

    def __init__(self, seconds: float = DEFAULT_WINDOW, wait_probability: float = DEFAULT_WAIT_PROBABILITY) -> None:
        self.seconds = seconds
        self.wait_probability = wait_probability
        self.step = max(1.0, seconds / STEPS)
        self.ring: deque[Snapshot] = deque()
        self.latest: Advice | None = None

    def configure(self, seconds: float, wait_probability: float) -> None:
        self.seconds = seconds
        self.wait_probability = wait_probability
        self.step = max(1.0, seconds / STEPS)

    def start(self, stats: PoolStats) -> None:
        """The window's first snapshot: the counters as they are when the pool is instrumented."""
        self.ring.append(snapshot(stats, perf_counter()))

    def advice(self, stats: PoolStats, now: float | None = None) -> Advice | None:
        """The advice over the window up to its newest snapshot; None until the window saw a checkout.

        A snapshot is taken at most every `step` seconds and the advice computed only then: every
        read between two steps (the collector, the fast renderer, the writer, /pools) sees the same numbers.
        """
        now = perf_counter() if now is None else now
        if self.ring and now - self.ring[-1].at < self.step:
            return self.latest
        return self._take(snapshot(stats, now))

    def add(self, snap: Snapshot) -> Advice | None:
        """Take `snap` into the ring (if a step after the newest) and return the advice up to it."""
        ring = self.ring
        if ring and snap.at - ring[-1].at < self.step:
            return self.latest
        return self._take(snap)

    def _take(self, snap: Snapshot) -> Advice | None:
        ring, now = self.ring, snap.at
        if ring and (snap.checkouts < ring[-1].checkouts or snap.hold_sum < ring[-1].hold_sum):
            ring.clear()  # the counters went back (merged files of workers that are gone): start over
        ring.append(snap)
        # Keep the newest snapshot at or before the window's start, so the window is covered whole.
        start = now - self.seconds
        while len(ring) > 2 and ring[1].at <= start:
            ring.popleft()
        self.latest = _advice(ring[0], ring[-1], self.wait_probability)
        return self.latest


def _advice(first: Snapshot, last: Snapshot, wait_probability: float) -> Advice | None:
    seconds = last.at - first.at
    checkouts = last.checkouts - first.checkouts
    if seconds <= 0 or checkouts <= 0:
        return None
    held = max(0.0, last.hold_sum - first.hold_sum)
    load = held / seconds
    if not math.isfinite(load):
        return None
    return Advice(
        seconds,
        checkouts / seconds,
        held / checkouts,
        load,
        erlang.advised_size(load, wait_probability),
        wait_probability,
        last.created - first.created,
    )
