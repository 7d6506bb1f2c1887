"""Leak detection: where a connection was checked out, and a watchdog for connections held too long."""

from __future__ import annotations

import threading
import traceback
import weakref
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .instrument import PoolHandle

try:  # installed with sqlalchemy[asyncio]; sync-only installs may lack it
    from greenlet import getcurrent as _getcurrent  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    _getcurrent = None


def capture_stack() -> traceback.StackSummary:
    # Source lines are looked up only if a warning is ever printed.
    return traceback.StackSummary.extract(_frames(), lookup_lines=False)


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


class LeakWatchdog:
    """A daemon thread that checks one handle for over-held connections."""

    def __init__(self, handle: PoolHandle, interval: float) -> None:
        self._handle = weakref.ref(handle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), name="pool-exporter-leaks", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            handle = self._handle()
            if handle is None or not handle.active:
                return
            try:
                handle.check_leaks()
            except Exception as exc:
                handle._fail("leak_watchdog", exc)

    def stop(self) -> None:
        self._stop.set()
