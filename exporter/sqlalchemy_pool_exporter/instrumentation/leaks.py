"""Leak detection: where a connection was checked out, connections held too long, and ones never returned."""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from ..logs import STACK
from .stats import Checkout, PoolStats

log = logging.getLogger("sqlalchemy_pool_exporter")

try:  # installed with sqlalchemy[asyncio]; sync-only installs may lack it
    from greenlet import getcurrent as _getcurrent  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    _getcurrent = None


_OURS = os.path.dirname(os.path.abspath(__file__))


def capture_stack() -> traceback.StackSummary:
    # Source lines are looked up only if a warning is ever printed. Our own frames (this function,
    # the pool wrapper) are left out: the stack starts where the application asked for a connection.
    return traceback.StackSummary.extract(
        ((frame, line) for frame, line in _frames() if not frame.f_code.co_filename.startswith(_OURS)),
        lookup_lines=False,
    )


def _frames() -> Iterator[tuple[FrameType, int]]:
    """This thread's frames, innermost first, continued across greenlet switches.

    An AsyncEngine runs the pool inside a greenlet that SQLAlchemy spawned; the application code
    that asked for the connection is on the stack of the greenlet that spawned it.
    """
    yield from traceback.walk_stack(None)
    if _getcurrent is None:
        return
    parent = _getcurrent().parent
    while parent is not None:
        if parent.gr_frame is not None:
            yield from traceback.walk_stack(parent.gr_frame)
        parent = parent.parent


class LeakTracker:
    """Warns once per checkout held past `threshold`, and about connections the garbage collector reclaimed."""

    def __init__(
        self, pool: str, stats: PoolStats, threshold: float | None, fail: Callable[[str, BaseException], None]
    ) -> None:
        self.pool = pool
        self.stats = stats
        self.threshold = threshold
        self.fail = fail
        # record -> start of the checkout we warned about (a record is reused by later checkouts).
        self.warned: dict[Any, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> int:
        """Warn once for each connection held longer than the threshold; return how many."""
        threshold = self.threshold
        if threshold is None:
            return 0
        now = time.perf_counter()
        found = 0
        for record, entry in tuple(self.stats.checkouts.items()):
            held = now - entry.started
            if held < threshold or self.warned.get(record) == entry.started:
                continue
            self.warned[record] = entry.started
            found += 1
            if entry.slot is not None:
                entry.slot.held_too_long += 1
            where = "".join(entry.stack.format()) if entry.stack else "(stack not captured)\n"
            holder = entry.slot.name if entry.slot is not None else None
            # The stack ends the message for any formatter; STACK tells ours where it starts, so that a text
            # line escapes the names before it and keeps the stack's own lines below it (logs.TextFormatter).
            log.warning(
                "pool %s: connection held for %.1fs%s, longer than the leak threshold of %gs; checked out at:\n%s",
                self.pool,
                held,
                f" by {holder}" if holder else "",
                threshold,
                where,
                extra={"pool": self.pool, "held_seconds": round(held, 3), "holder": holder, STACK: where},
            )
        return found

    def returned(self, record: Any, entry: Checkout) -> None:
        """A connection came back: if we warned about it, say so."""
        if self.warned.get(record) == entry.started:
            del self.warned[record]
            log.info(
                "pool %s: connection reported as a possible leak came back after %.1fs",
                self.pool,
                time.perf_counter() - entry.started,
                extra={"pool": self.pool},
            )

    def reclaimed(self, entry: Checkout) -> None:
        """The app dropped a checked-out connection without returning it; the garbage collector did."""
        self.stats.leaked += 1
        where = "".join(entry.stack.format()) if entry.stack else ""
        log.warning(
            "pool %s: a connection was never returned and the garbage collector reclaimed it%s",
            self.pool,
            f"; it was checked out at:\n{where}" if where else "",
            extra={"pool": self.pool, STACK: where} if where else {"pool": self.pool},
        )

    # -- the watchdog ---------------------------------------------------------------------------

    def start(self) -> None:
        """Check every threshold/4 seconds (between 50 ms and 1 s) in a daemon thread."""
        if self.threshold is None or self._thread is not None:
            return
        interval = min(max(self.threshold / 4, 0.05), 1.0)
        # The thread holds the tracker weakly: a dropped engine takes its tracker and thread with it.
        self._thread = threading.Thread(
            target=_watch, args=(weakref.ref(self), self._stop, interval), name="pool-exporter-leaks", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)


def _watch(ref: weakref.ref[LeakTracker], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        tracker = ref()
        if tracker is None:
            return
        try:
            tracker.check()
        except Exception as exc:
            tracker.fail("leak_watchdog", exc)
        del tracker
