"""What the database sees of each holder's connections: the pool's checkouts joined with the server's view
of their backends, by backend id (backends.py), with nothing added to any statement.

`join()` is pure: (backend id, holder) pairs and the server's rows in, numbers per holder out. The
application's poller (`ServerPoller`, `instrument(server_view=True)`) and the sidecar (from the
checkouts each worker writes) both use it.

The poller is a daemon thread per engine with a DBAPI connection of its own, opened through the
pool's creator (so the app's `do_connect` hooks, `connect_args` and credentials apply) but never
through the pool: it never waits in it, never shows in its numbers (nor in create_seconds:
dialect.uncounted), and close() ends it. An AsyncEngine's poll runs in that thread too, on an event
loop of its own (asyncpg connections belong to the loop that made them): it needs no running loop
when instrument() is called (often at import), never takes time from the app's loop, and a stuck
server cannot delay a request. Each poll is bounded (the server's statement timeout, and a deadline
on the async path); a failed poll is counted in exporter_errors_total, logged at most once a minute,
and leaves no reading (the series go away rather than go stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import compat
from . import backends, dialect, holders

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .failures import Failures
    from .stats import PoolStats

log = logging.getLogger("sqlalchemy_pool_exporter")

# The holder label of the connections the pool holds idle (checked in): one of them "idle in
# transaction" on the server is a bug of its own. No application holder can take this name (holders.py).
POOL = holders.POOL
DEFAULT_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class HolderView:
    """One holder's connections as the server saw them at one poll."""

    states: dict[str, int] = field(default_factory=dict)  # pg_stat_activity.state -> connections (> 0 only)
    lock_waiting: int = 0  # its connections waiting on a lock
    blocking: int = 0  # other backends waiting on a lock its connections hold
    oldest_transaction: float = 0.0  # age of its oldest open transaction (server's xact_start)
    idle_in_transaction: float = 0.0  # longest one of its connections has sat idle in a transaction


@dataclass(frozen=True, slots=True)
class ServerJoin:
    """One poll: numbers by holder, the server's row of each backend, and whose each backend was."""

    holders: dict[str, HolderView]
    backends: dict[int, backends.Backend]
    holder_of: dict[int, str]
    at: float  # time.time() of the poll


def join(
    held: Iterable[tuple[int, str]],
    rows: dict[int, backends.Backend],
    edges: Iterable[tuple[int, int]],
    names: Iterable[str] = (),
    at: float = 0.0,
) -> ServerJoin:
    """Join (backend id, holder) pairs with the server's rows and lock edges (waiter, blocker).

    Every holder in `names` or in `held` gets numbers (0 when it holds nothing); a backend the server
    no longer lists is counted nowhere. A waiter blocked by several of one holder's backends counts once
    for that holder.
    """
    holder_of: dict[int, str] = {}
    for pid, name in held:
        holder_of[pid] = name
    waiters: dict[str, set[int]] = {}
    for waiter, blocker in edges:
        blocker_holder = holder_of.get(blocker)
        if blocker_holder is not None and waiter != blocker:
            waiters.setdefault(blocker_holder, set()).add(waiter)
    views: dict[str, dict[str, Any]] = {n: {"states": {}} for n in names}
    for pid, name in holder_of.items():
        v = views.setdefault(name, {"states": {}})
        row = rows.get(pid)
        if row is None:
            continue
        v["states"][row.state] = v["states"].get(row.state, 0) + 1
        v["lock_waiting"] = v.get("lock_waiting", 0) + (1 if row.lock_waiting else 0)
        if row.transaction_age is not None:
            v["oldest_transaction"] = max(v.get("oldest_transaction", 0.0), row.transaction_age)
        if row.state in backends.IDLE_IN_TRANSACTION and row.state_age is not None:
            v["idle_in_transaction"] = max(v.get("idle_in_transaction", 0.0), row.state_age)
    out = {
        name: HolderView(
            v["states"],
            v.get("lock_waiting", 0),
            len(waiters.get(name, ())),
            v.get("oldest_transaction", 0.0),
            v.get("idle_in_transaction", 0.0),
        )
        for name, v in views.items()
    }
    return ServerJoin(out, {pid: rows[pid] for pid in holder_of if pid in rows}, holder_of, at)


def held_now(stats: PoolStats, pool: Any) -> list[tuple[int, str]]:
    """(backend id, holder) of each connection checked out now, then (backend id, POOL) of each idle one."""
    pids = stats.backend_pids
    out = []
    for record, entry in tuple(stats.checked_out.items()):
        pid = pids.get(record)
        if pid is not None:
            out.append((pid, entry[3].name if entry[3] is not None else holders.NONE))
    for record in compat.idle_records(pool) or ():
        pid = pids.get(record)
        if pid is not None and record.dbapi_connection is not None:
            out.append((pid, POOL))
    return out


class ServerPoller:
    """Polls the server about one engine's connections every `interval` seconds, in a thread of its own."""

    def __init__(
        self,
        engine: Engine,
        stats: PoolStats,
        fail: Failures,
        *,
        interval: float = DEFAULT_INTERVAL,
        timeout: float | None = None,
        queries: bool = False,
    ) -> None:
        self._engine = weakref.ref(engine)
        self.dialect_name = "postgresql" if engine.dialect.name == "postgresql" else "mysql"
        self.is_async = bool(engine.dialect.is_async)
        self.stats = stats
        self.fail = fail
        self.interval = interval
        self.timeout = timeout if timeout is not None else min(interval, 5.0)
        self.queries = queries
        self.polls = 0  # successful polls so far
        self.failures = 0
        self.backend_pid: int | None = None  # our own connection's, while it is open
        self._driver = engine.dialect.driver
        self._connection: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pool-exporter-server-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and close our connection; idempotent. The series go with the reading."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.timeout + 1.0)
        self.stats.server = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        dialect.uncounted.on = True  # our connection is not the app's: not in create_seconds
        loop = asyncio.new_event_loop() if self.is_async else None
        try:
            while not self._stop.is_set():
                self._poll(loop)
                if self._stop.wait(self.interval):
                    break
        finally:
            self._call(loop, self._close)
            if loop is not None:
                loop.close()
            self.stats.server = None

    def _call(self, loop: asyncio.AbstractEventLoop | None, fn: Callable[[], Any]) -> Any:
        """`fn()` here (sync driver), or in a greenlet on our loop with a deadline (async driver)."""
        if loop is None:
            return fn()
        from sqlalchemy.util import greenlet_spawn

        return loop.run_until_complete(asyncio.wait_for(greenlet_spawn(fn), self.timeout))

    def _poll(self, loop: asyncio.AbstractEventLoop | None) -> None:
        engine = self._engine()
        if engine is None:
            self._stop.set()
            return
        try:
            held = held_now(self.stats, engine.pool)
            pids = {pid for pid, _ in held}
            rows, edges = self._call(loop, lambda: self._fetch(engine, pids)) if pids else ({}, [])
            names = [slot.name for slot in self.stats.holders.all()] if holders.ATTRIBUTING[0] else []
            self.stats.server = join(held, rows, edges, names, time.time())
            self.polls += 1
        except backends.Unsupported as exc:
            self.stats.server = None
            self._stop.set()
            log.warning("pool %s: no server view: %s", self.fail.pool, exc, extra={"pool": self.fail.pool})
        except Exception as exc:
            self.stats.server = None
            self._failed(exc)
            with contextlib.suppress(Exception):
                self._call(loop, self._close)

    def _fetch(self, engine: Engine, pids: set[int]) -> tuple[dict[int, backends.Backend], list[tuple[int, int]]]:
        if self._connection is None:
            creator = compat.pool_creator(engine.pool)
            if creator is None:
                raise RuntimeError("cannot open a connection outside the pool with this SQLAlchemy version")
            connection = creator()
            try:
                backends.check_server(self.dialect_name, connection)
                cursor = connection.cursor()
                for statement in backends.session_setup(self.dialect_name, self.timeout):
                    cursor.execute(statement)
                cursor.close()
                connection.commit()
            except BaseException:
                connection.close()
                raise
            self._connection = connection
            self.backend_pid = backends.backend_pid(self._driver, connection)
        cursor = self._connection.cursor()
        try:
            return backends.fetch(self.dialect_name, cursor, pids, self.queries)
        finally:
            cursor.close()
            # pg_stat_activity is one snapshot per transaction: end it, or the next poll reads this one.
            self._connection.rollback()

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        self.backend_pid = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.stats.errors += 1
        if self.fail.due("server_view"):
            kind = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            log.warning(
                "pool %s: server view poll failed (%s); no server view until a poll works (%d failed so far)",
                self.fail.pool,
                kind,
                self.failures,
                extra={"pool": self.fail.pool},
            )
