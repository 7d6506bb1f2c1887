"""Transaction, savepoint and statement timing through the engine's own dialect methods.

SQLAlchemy's ConnectionEvents (begin/commit/rollback, before/after_cursor_execute) would be the
documented hooks, but once any of them is registered every Connection of the engine takes its
event-dispatching code paths: +15% app CPU per ORM transaction before a listener does anything
(measured, README "Performance"). `Connection` calls `engine.dialect.do_begin/do_commit/
do_rollback/do_execute…` for each of these steps, so wrapping those methods on this engine's
dialect instance sees the same moments for the cost of one Python call each. The wrappers are
instance attributes installed through Hooks: other engines are untouched, and uninstrument() puts
back what was there (usually nothing, uncovering the class's own methods).
"""

from __future__ import annotations

import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from types import CodeType, SimpleNamespace
from typing import Any

from .. import compat
from ..labels import error_class
from .hooks import Hooks
from .stats import Histogram, PoolStats, bump
from .stats import probe as stats_probe

perf_counter = time.perf_counter

TRANSACTION_METHODS = ("do_begin", "do_commit", "do_rollback", "do_release_savepoint", "do_rollback_to_savepoint")
STATEMENT_METHODS = ("do_execute", "do_execute_no_params", "do_executemany")
_OPERATIONS = {"select": "select", "insert": "insert", "update": "update", "delete": "delete"}

Fail = Callable[[str, BaseException], None]


def operation(statement: str) -> str:
    """`select`, `insert`, `update`, `delete` or `other`, from the statement's first word."""
    # The four verbs are all six letters long: one slice, one dict lookup.
    return _OPERATIONS.get(statement[:64].lstrip()[:6].lower(), "other")


# Connection passes its pool proxy (a _ConnectionFairy), whose pool record keys the open transaction;
# a raw DBAPI connection has no record (AttributeError), nor has the ad-hoc proxy SQLAlchemy uses
# while it initialises the dialect (NotImplementedError).
_NO_RECORD = (AttributeError, NotImplementedError)


def end_transaction(stats: PoolStats, record: Any, outcome: str) -> None:
    """Record the transaction open on `record`, if any, as ended with `outcome` (the rare paths)."""
    started = stats.open_transactions.pop(record, None)
    if started is not None:
        stats.transaction_histogram(outcome).observe(perf_counter() - started)


def owner_of(obj: Any, name: str) -> Any:
    """Where a wrapper finds the method it wraps, at each call: `type(obj)`, so that a later patch of
    the class (another library's class-level wrapper, `mock.patch.object`) still applies; or, when
    someone set an instance-level wrapper before us, a stand-in that calls theirs."""
    previous = vars(obj).get(name)
    if previous is None:
        return type(obj)
    return SimpleNamespace(**{name: lambda _obj, *args, **kwargs: previous(*args, **kwargs)})


def wrap_transactions(dialect: Any, stats: PoolStats, fail: Fail, hooks: Hooks) -> None:
    """Time BEGIN → COMMIT, ROLLBACK or close, and count savepoints, on this dialect instance.

    The start of each open transaction is kept by pool record in `stats.open_transactions`. The pool's
    reset-on-return calls do_rollback on every checkin, transaction or not: when no transaction is
    open in the pool, that path is one frame and one truth test of a dict (docs/performance.md).

    SQLAlchemy sends ROLLBACK both when the application rolls back and when a transaction is closed
    without COMMIT (every ORM read ends so). Which one it is, the caller four frames up tells
    (compat.py): `rollback` for RootTransaction._do_rollback, `close` for anything else. The commit
    path pays nothing for it; a rollback or close with a transaction open pays one sys._getframe().
    """
    b, c, r = (owner_of(dialect, name) for name in ("do_begin", "do_commit", "do_rollback"))
    rs, rts = owner_of(dialect, "do_release_savepoint"), owner_of(dialect, "do_rollback_to_savepoint")
    on = hooks.on
    savepoints = stats.savepoints
    open_tx = stats.open_transactions
    commits, rollbacks = stats.transaction_histogram("commit"), stats.transaction_histogram("rollback")
    closes = stats.transaction_histogram("close")
    probe = commits.probe  # stats.bucket(), inlined (pool.py's connect() says why)
    getframe, depth, rolled_back = sys._getframe, compat.ROLLBACK_DEPTH, compat.rolled_back
    explicit, closed = compat.EXPLICIT_ROLLBACK, compat.TRANSACTION_CLOSE
    # Where the class still has DefaultDialect's own method, its one call is made here (compat.plain):
    # a frame fewer per BEGIN (whose body is empty), COMMIT and ROLLBACK.
    plain_begin, plain_commit, plain_rollback = compat.PLAIN_BEGIN, compat.PLAIN_COMMIT, compat.PLAIN_ROLLBACK

    def begin(dbapi_connection: Any) -> None:
        if on[0]:
            try:  # noqa: SIM105 - contextlib.suppress costs a context manager per BEGIN
                open_tx[dbapi_connection._connection_record] = perf_counter()  # compat.fairy_record, spelled out
            except _NO_RECORD:
                pass
        if b.do_begin is not plain_begin:
            b.do_begin(dialect, dbapi_connection)

    committing = (on, probe, commits, fail)  # fewer free variables per COMMIT: rollback() says why

    def commit(dbapi_connection: Any) -> None:
        # a failed COMMIT is followed by a ROLLBACK, recorded there
        if c.do_commit is plain_commit:
            dbapi_connection.commit()
        else:
            c.do_commit(dialect, dbapi_connection)
        if open_tx:
            try:
                started = open_tx.pop(dbapi_connection._connection_record, None)
                if started is not None:
                    on, probe, commits, _ = committing
                    if on[0]:
                        took = perf_counter() - started
                        # commits.observe(took), inlined
                        commits.counts[
                            0
                            if took <= probe[0]
                            else 1
                            if took <= probe[1]
                            else 2
                            if took <= probe[2]
                            else bisect_left(probe, took)
                        ] += 1
                        commits.sum += took
            except _NO_RECORD:
                pass
            except Exception as exc:
                committing[-1]("commit", exc)

    # A wrapper's frame copies in every free variable it closes over on each call (~18 Ir each on 3.11,
    # measured), and the pool's reset-on-return calls this one on every checkin with no transaction open:
    # what only an ended transaction needs travels in one tuple, unpacked on that path.
    ending = (on, getframe, depth, rolled_back, explicit, closed, probe, closes, rollbacks, fail)

    def rollback(dbapi_connection: Any) -> None:
        try:
            if r.do_rollback is plain_rollback and not dialect.skip_autocommit_rollback:
                dbapi_connection.rollback()
            else:
                r.do_rollback(dialect, dbapi_connection)
        finally:
            if open_tx:  # empty: no transaction open in this pool, a reset-on-return (the usual case)
                try:
                    started = open_tx.pop(dbapi_connection._connection_record, None)
                    if started is not None:
                        on, getframe, depth, rolled_back, explicit, closed, probe, closes, rollbacks, _ = ending
                        if on[0]:
                            took = perf_counter() - started
                            ended: CodeType | None
                            try:
                                ended = getframe(depth).f_code  # who ended it (compat.py): rollback() or close()
                            except ValueError:  # fewer frames than that: no Transaction asked
                                ended = None
                            closing = ended is closed or (ended is not explicit and not rolled_back(getframe(1)))
                            hist = closes if closing else rollbacks
                            # hist.observe(took), inlined
                            hist.counts[
                                0
                                if took <= probe[0]
                                else 1
                                if took <= probe[1]
                                else 2
                                if took <= probe[2]
                                else bisect_left(probe, took)
                            ] += 1
                            hist.sum += took
                except _NO_RECORD:
                    pass
                except Exception as exc:
                    ending[-1]("rollback", exc)

    def release_savepoint(connection: Any, name: str) -> None:
        rs.do_release_savepoint(dialect, connection, name)
        if on[0]:
            savepoints["release"] += 1

    def rollback_to_savepoint(connection: Any, name: str) -> None:
        rts.do_rollback_to_savepoint(dialect, connection, name)
        if on[0]:
            savepoints["rollback"] += 1

    wrappers = (begin, commit, rollback, release_savepoint, rollback_to_savepoint)
    for name, wrapper in zip(TRANSACTION_METHODS, wrappers, strict=True):
        hooks.patch(dialect, name, wrapper)


# Statement text -> its operation's histogram, so that a statement SQLAlchemy executes again (its
# compiled string is the same object, its hash cached) costs one dict lookup. Bounded: literal SQL
# that differs every time would grow it, so past this size it starts over.
_STATEMENT_CACHE = 2048
_PLAIN_STATEMENTS = {"do_execute": compat.PLAIN_EXECUTE, "do_execute_no_params": compat.PLAIN_EXECUTE_NO_PARAMS}


def wrap_statements(dialect: Any, stats: PoolStats, fail: Fail, hooks: Hooks) -> None:
    """Time each DBAPI execute on this dialect instance, by operation; count the ones that raise."""
    on = hooks.on
    by_statement: dict[str, Histogram] = {}
    probe = stats_probe(stats.bounds["statement"])  # stats.bucket(), inlined below

    def histogram_of(statement: str) -> Histogram:
        if len(by_statement) >= _STATEMENT_CACHE:
            by_statement.clear()
        hist = by_statement[statement] = stats.statement_histogram(operation(statement))
        return hist

    def timed(name: str) -> Callable[..., Any]:
        owner = owner_of(dialect, name)
        # DefaultDialect's do_execute(cursor, statement, parameters, context) and do_execute_no_params(
        # cursor, statement, context) are one cursor.execute() call each: made here while the class still
        # has them (compat.plain), a frame fewer per statement. do_executemany is called as it is.
        plain = _PLAIN_STATEMENTS.get(name)
        with_parameters = name == "do_execute"

        def execute(cursor: Any, statement: str, *args: Any) -> Any:
            if not on[0]:
                return getattr(owner, name)(dialect, cursor, statement, *args)
            started = perf_counter()
            try:
                method = getattr(owner, name)
                if method is not plain or not args:
                    result = method(dialect, cursor, statement, *args)
                elif with_parameters:
                    result = cursor.execute(statement, args[0])
                else:
                    result = cursor.execute(statement)
            except Exception as error:
                try:
                    bump(stats.statement_errors, error_class(error))
                except Exception as exc:
                    fail("statement_error", exc)
                raise
            try:
                took = perf_counter() - started
                hist = by_statement.get(statement) or histogram_of(statement)
                # hist.observe(took), inlined
                hist.counts[
                    0
                    if took <= probe[0]
                    else 1
                    if took <= probe[1]
                    else 2
                    if took <= probe[2]
                    else bisect_left(probe, took)
                ] += 1
                hist.sum += took
            except Exception as exc:
                fail("statement", exc)
            return result

        return execute

    for name in STATEMENT_METHODS:
        hooks.patch(dialect, name, timed(name))


# Set in the thread of the readiness probe, which opens a connection of its own: not the app's work.
uncounted = threading.local()


def wrap_connections(dialect: Any, stats: PoolStats, fail: Fail, hooks: Hooks) -> None:
    """Time opening DBAPI connections; count connections the database dropped.

    These replace the `do_connect` and `handle_error` dialect events: any dialect event makes every
    statement walk the dialect's (empty) dispatch lists, about 1% of app CPU per transaction.
    """
    c, d = owner_of(dialect, "connect"), owner_of(dialect, "is_disconnect")
    on = hooks.on

    def timed_connect(*cargs: Any, **cparams: Any) -> Any:
        if not on[0] or getattr(uncounted, "on", False):
            return c.connect(dialect, *cargs, **cparams)
        started = perf_counter()
        connection = c.connect(dialect, *cargs, **cparams)
        try:
            stats.create.observe(perf_counter() - started)
        except Exception as exc:
            fail("connect", exc)
        return connection

    def counted_is_disconnect(error: Any, connection: Any, cursor: Any) -> bool:
        dropped: bool = d.is_disconnect(dialect, error, connection, cursor)
        # SQLAlchemy asks with connection=None about failures to connect, which are not drops:
        # those are counted by error class where they surface, in the pool's connect().
        if connection is not None and on[0]:
            if dropped:
                stats.disconnects += 1
            # A COMMIT that raised ended its transaction (the database rolled it back), and nothing
            # else will: SQLAlchemy sends no ROLLBACK for it, and the pool's reset would count a close.
            # SQLAlchemy asks here about every DBAPI error; one without a cursor may be the COMMIT's.
            if cursor is None and stats.open_transactions and compat.commit_failed(sys._getframe(1)):
                try:
                    end_transaction(stats, compat.fairy_record(connection), "rollback")
                except _NO_RECORD:
                    pass
                except Exception as exc:
                    fail("commit", exc)
        return dropped

    hooks.patch(dialect, "connect", timed_connect)
    hooks.patch(dialect, "is_disconnect", counted_is_disconnect)
