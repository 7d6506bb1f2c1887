"""The pool side of one instrumented engine: each pool's connect() and recreate(), and the pool events.

This is the hot path: every checkout and return of the application runs through `connect()` and
`on_return()` below. They are closures over plain locals, with Histogram.observe() inlined and no
method calls on the way, because here a Python-level call costs as much as the update it makes
(docs/performance.md). Keep them flat; the slow, rare work (timeouts, leaks, dispose) is elsewhere.
"""

from __future__ import annotations

import logging
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

from .. import compat
from ..labels import error_class
from . import backends, dialect, holders
from .hooks import Hooks
from .leaks import LeakTracker, capture_stack
from .stats import Checkout, PoolStats, bump

log = logging.getLogger("sqlalchemy_pool_exporter")
perf_counter = time.perf_counter

Fail = Callable[[str, BaseException], None]


class PoolTap:
    """Wraps every pool the engine uses (dispose() makes new ones) and listens to its pool events."""

    def __init__(
        self,
        stats: PoolStats,
        hooks: Hooks,
        fail: Fail,
        leaks: LeakTracker,
        on_timeout: Callable[[], None],
    ) -> None:
        self.stats = stats
        self.hooks = hooks
        self.fail = fail
        self.leaks = leaks
        self.on_timeout = on_timeout
        self._wrapped: weakref.WeakSet[Pool] = weakref.WeakSet()
        # Per wrapped pool, two flags: [1] set once dispose() swapped it out (its waiters still get
        # served); [0] set when a checkout needs more than the plain tuple: [1], or leak stacks on.
        self._replaced: weakref.WeakKeyDictionary[Pool, list[bool]] = weakref.WeakKeyDictionary()
        # Records checked out of a pool that dispose() replaced: SQLAlchemy parks them in the dead
        # pool on return and they close when it is garbage-collected, with no `close` event.
        self._orphans: weakref.WeakKeyDictionary[Any, weakref.finalize[Any, Any] | None] = weakref.WeakKeyDictionary()
        # Checkouts counted when dispose() last ran (None: never): a name may be reused once the
        # engine was disposed and not used since (core.py).
        self.disposed_at: int | None = None
        # Whether checkouts capture their stack (leak warnings on).
        self._capture = leaks.threshold is not None
        # Set once dispose() ran: from then on a return may be a record of a dead pool (orphans).
        self._disposed = [False]
        # The driver whose connections tell their backend id (backends.py); None: not one we know.
        self._driver: str | None = None

    def install(self, engine: Engine) -> None:
        listen = self.hooks.listen
        if backends.supported(engine.dialect.name, engine.dialect.driver):
            self._driver = engine.dialect.driver
        # Pool events registered on the Engine follow it to the pool that dispose() creates. Returns
        # are seen through pool._return_conn (below), not the `checkin` event.
        listen(engine, "detach", self._on_detach)
        listen(engine, "connect", self._on_connect)
        listen(engine, "close", self._on_close)
        listen(engine, "close_detached", self._on_close_detached)
        listen(engine, "invalidate", self._on_invalidate)
        listen(engine, "soft_invalidate", self._on_soft_invalidate)
        # No event fires when a caller starts waiting, so the pool's one entry point is wrapped.
        self._wrap_pool(engine.pool)

    @property
    def disposed_idle(self) -> bool:
        """dispose() ran and nothing was checked out since: the engine is done with."""
        return self.disposed_at is not None and self.disposed_at == self.stats.wait.count and not self.stats.checked_out

    # -- wrappers -------------------------------------------------------------------------------

    def _wrap_pool(self, pool: Pool) -> None:
        if pool in self._wrapped:
            return
        self.hooks.patch(pool, "connect", self._make_connect(pool))
        self.hooks.patch(pool, compat.RETURN_CONN, self._make_return_conn(pool))
        # engine.dispose() swaps the pool for pool.recreate(): hooked here rather than through the
        # engine_disposed event, because any ConnectionEvents listener makes every Connection join
        # the engine's dispatch, +15% app CPU per transaction (docs/performance.md).
        self.hooks.patch(pool, "recreate", self._make_recreate(pool))
        self._wrapped.add(pool)

    def _make_recreate(self, pool: Pool) -> Callable[[], Pool]:
        owner = dialect.owner_of(pool, "recreate")
        on = self.hooks.on

        def recreate() -> Pool:
            new: Pool = owner.recreate(pool)
            if on[0]:
                try:
                    self._on_pool_replaced(pool, new)
                except Exception as exc:
                    self.fail("pool_replaced", exc)
            return new

        return recreate

    def _make_connect(self, pool: Pool) -> Callable[[], Any]:
        # Looked up on `owner` at each call, not bound once: a later patch of the pool class still
        # applies (owner is the class, or a stand-in for a wrapper someone installed before us).
        owner = dialect.owner_of(pool, "connect")
        on = self.hooks.on
        stats = self.stats
        # Start times of the callers waiting now: a list, not a dict by token. Two waiters that
        # started at the same instant are interchangeable for "how many" and "since when".
        waiting = stats.waiting
        add_waiter, drop_waiter = waiting.append, waiting.remove
        checkouts = stats.checked_out
        wait = stats.wait
        # The frame copies in each free variable on every call (~18 Ir each on 3.11, measured): what only
        # the rare paths use (a failed checkout, leak stacks, a replaced pool) is read through `tap`.
        tap = self
        # Histogram.observe() inlined; the counts list is never replaced, so it can be held.
        wait_counts = wait.counts
        # Most waits fall in the first three buckets: float comparisons before a bisect (stats.bucket()).
        wait_probe = wait.probe
        # [0]: this checkout needs more than the usual tuple (leak stacks on, or the pool was replaced); [1]: replaced.
        unusual = self._replaced_flag(pool)
        # Holder attribution (holders.py): off until a holder is ever set, then one ContextVar read
        # and one dict lookup per checkout; the slot travels with the checkout to its return.
        attributing = holders.ATTRIBUTING
        current = holders.CURRENT.get
        slots = stats.holders.slots
        slot_of = stats.holders.slot
        # Pool.connect's one call made here while the class still has it (compat.plain): a frame fewer.
        plain, fairies = compat.PLAIN_CONNECT, compat.FAIRY

        def connect() -> Any:
            if not on[0]:  # uninstrumented while another layer still calls us: pass through
                return owner.connect(pool)
            t0 = perf_counter()
            add_waiter(t0)
            try:
                fairy = fairies._checkout(pool) if owner.connect is plain else owner.connect(pool)
            except sa_exc.TimeoutError:
                drop_waiter(t0)
                tap.on_timeout()
                raise
            except Exception as exc:
                drop_waiter(t0)
                tap._on_connect_error(exc)
                raise
            except BaseException:  # cancelled while waiting: not an error of the pool
                drop_waiter(t0)
                raise
            try:
                drop_waiter(t0)
                t1 = perf_counter()
                waited = t1 - t0
                # stats.bucket(wait_probe, waited), inlined
                wait_counts[
                    0
                    if waited <= wait_probe[0]
                    else 1
                    if waited <= wait_probe[1]
                    else 2
                    if waited <= wait_probe[2]
                    else bisect_left(wait_probe, waited)
                ] += 1
                wait.sum += waited
                record = fairy._connection_record  # compat.fairy_record, spelled out: compat.py says why
                # SQLAlchemy's own weak reference to the proxy (no new one): dead at return means
                # the app dropped the connection and the garbage collector returned it.
                if attributing[0] or unusual[0]:
                    if attributing[0]:
                        name = current()
                        if name is not None and name.__class__ is not str:
                            name = name.name()  # type: ignore[union-attr]  # a LazyHolder
                        slot = slots.get(name) or slot_of(name)
                        slot.checkouts += 1
                        slot.wait += waited
                    else:
                        slot = None
                    checkouts[record] = (t1, record.fairy_ref, capture_stack() if tap._capture else None, slot)
                    if unusual[1]:
                        tap._orphans.setdefault(record, None)
                else:
                    checkouts[record] = (t1, record.fairy_ref, None, None)
            except Exception as exc:
                tap.fail("checkout", exc)
            return fairy

        return connect

    def _replaced_flag(self, pool: Pool) -> list[bool]:
        flag = self._replaced[pool] = [self._capture, False]
        return flag

    def _make_return_conn(self, pool: Pool) -> Callable[[Any], None]:
        """`pool._return_conn(record)`, which every checkin ends in: the connection is no longer held.

        Wrapped rather than listened to: a `checkin` listener makes SQLAlchemy dispatch the event on
        every return, +4.6k instructions per checkout before a listener does anything; this wrapper
        costs +0.7k (docs/performance.md). Our part runs first: once the record is back in the pool,
        another thread may check it out again.
        """
        owner = dialect.owner_of(pool, "_return_conn")
        on = self.hooks.on
        checkouts = self.stats.checked_out
        use = self.stats.use
        use_counts = use.counts
        use_probe = use.probe  # stats.bucket(), inlined as in connect()
        leak_warned = self.leaks.warned
        disposed = self._disposed  # a list flag: a WeakKeyDictionary's len() would be a Python call
        tap = self  # the rare paths' methods, read as attributes: fewer free variables (connect() says why)
        plain = compat.PLAIN_RETURN_CONN  # Pool._return_conn's one call made here (compat.plain): a frame fewer

        def return_conn(record: Any) -> None:
            if on[0]:
                try:
                    entry = checkouts.pop(record, None)
                    if entry is not None:
                        held = perf_counter() - entry[0]
                        # use.observe(held), inlined
                        use_counts[
                            0
                            if held <= use_probe[0]
                            else 1
                            if held <= use_probe[1]
                            else 2
                            if held <= use_probe[2]
                            else bisect_left(use_probe, held)
                        ] += 1
                        use.sum += held
                        slot = entry[3]
                        if slot is not None:
                            slot.hold += held
                        if leak_warned or disposed[0] or entry[1]() is None:
                            tap._returned_late(record, entry, orphans=True)
                except Exception as exc:
                    tap.fail("checkin", exc)
            if owner._return_conn is plain:
                pool._do_return_conn(record)
            else:
                owner._return_conn(pool, record)

        return return_conn

    def _on_detach(self, dbapi_connection: Any, record: Any) -> None:
        """A detached connection is no longer held either; it is closed through close_detached."""
        try:
            entry = self.stats.checked_out.pop(record, None)
            if entry is None:
                return
            held = perf_counter() - entry[0]
            self.stats.use.observe(held)
            if entry[3] is not None:
                entry[3].hold += held
            self._returned_late(record, entry, orphans=False)
        except Exception as exc:
            self.fail("detach", exc)

    def _returned_late(self, record: Any, entry: Any, *, orphans: bool) -> None:
        """The rare cases of a return: reclaimed by the garbage collector, warned about, from a dead pool."""
        fairy_ref = entry[1]
        if fairy_ref is not None and fairy_ref() is None:
            self.leaks.reclaimed(Checkout._make(entry))
        if self.leaks.warned:
            self.leaks.returned(record, Checkout._make(entry))
        if orphans and self._orphans and record in self._orphans:
            self._orphan_returned(record)

    # -- pool events ----------------------------------------------------------------------------

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self.stats.created += 1
        # Once per new DBAPI connection, never per checkout: what the driver already knows, no round trip.
        if self._driver is not None:
            try:
                pid = backends.backend_pid(self._driver, dbapi_connection)
                if pid is not None:
                    self.stats.backend_pids[record] = pid
            except Exception as exc:
                self.fail("backend_pid", exc)

    def _on_close(self, dbapi_connection: Any, record: Any) -> None:
        self.stats.closed += 1
        self.stats.backend_pids.pop(record, None)
        if self._orphans:
            finalizer = self._orphans.pop(record, None)
            if finalizer is not None:
                finalizer.detach()

    def _orphan_returned(self, record: Any) -> None:
        # Count the close when the record dies with its dead pool, unless a `close` event comes first.
        # A waiter of the dead pool may check the same record out and in again: one count per record.
        previous = self._orphans.get(record)
        if previous is not None:
            previous.detach()
        finalizer = weakref.finalize(record, _count_close, self.stats)
        finalizer.atexit = False
        self._orphans[record] = finalizer

    def _on_close_detached(self, dbapi_connection: Any) -> None:
        self.stats.closed += 1

    def _on_invalidate(self, dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        self.stats.invalidations["hard"] += 1
        try:
            # No ROLLBACK is sent on a connection being thrown away; the server rolls it back. A rollback,
            # not a close: a transaction lost to a disconnect or a cancelled task failed with its request.
            dialect.end_transaction(self.stats, record, "rollback")
        except Exception as exc:
            self.fail("invalidate", exc)

    def _on_soft_invalidate(self, dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        self.stats.invalidations["soft"] += 1

    def _on_pool_replaced(self, old: Pool, new: Pool) -> None:
        """engine.dispose() made `new` to replace `old` (it becomes engine.pool right after)."""
        self.disposed_at = self.stats.wait.count
        self._disposed[0] = True
        # The new pool has handed nothing out yet: every checkout now is from a replaced pool.
        for record in tuple(self.stats.checked_out):
            self._orphans.setdefault(record, None)
        for pool, flag in list(self._replaced.items()):
            if pool is not new:
                flag[0] = flag[1] = True
        self._wrap_pool(new)

    def _on_connect_error(self, error: BaseException) -> None:
        try:
            bump(self.stats.connect_errors, error_class(error))
        except Exception as exc:
            self.fail("connect_error", exc)


def _count_close(stats: PoolStats) -> None:
    stats.closed += 1
