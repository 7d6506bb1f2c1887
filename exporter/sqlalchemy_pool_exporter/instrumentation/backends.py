"""Which server backend each DBAPI connection is, and what the server says those backends are doing.

The backend id (PostgreSQL's process id, MySQL/MariaDB's connection id) is read once, when the pool
opens a connection (PoolTap's `connect` event), from what the driver already knows: asyncpg's
`get_server_pid()`, psycopg's `info.backend_pid`, psycopg2's `get_backend_pid()`, PyMySQL's and
mysqlclient's `thread_id()` (the id of the handshake, `CONNECTION_ID()` without a round trip). No
statement is sent and nothing runs per checkout. Other drivers and databases: no id, no server view.

Tested on PostgreSQL 15 and MariaDB 10.11 (PyMySQL); a MySQL server that is not MariaDB is refused
(`check_server()`): its lock-wait table and statement timeout differ and are untested.

`fetch()` asks the server about a set of backend ids on a DBAPI cursor of our own: one snapshot of
PostgreSQL's `pg_stat_activity` and `pg_blocking_pids()`, or MariaDB's `PROCESSLIST`, `INNODB_TRX`
and `INNODB_LOCK_WAITS`, as the same `Backend` rows. The ids are ours (ints), written into the SQL
as literals: no paramstyle differs between drivers that way, and nothing else is ever interpolated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# PostgreSQL's pg_stat_activity.state values (PostgreSQL 10-17); anything else reads `unknown`, so the
# `state` label stays a fixed set whatever the server says.
STATES: tuple[str, ...] = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
    "unknown",
)
IDLE_IN_TRANSACTION = frozenset({"idle in transaction", "idle in transaction (aborted)"})
# Statement text shown (when asked for) at most this long; never in metrics or logs.
QUERY_CHARS = 200
# Rows read from the server at most per poll: a server with more waiters than this is already on fire.
MAX_ROWS = 10_000


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend as the server saw it at one poll. Ages in seconds; None where not applicable."""

    pid: int
    state: str
    wait_event_type: str
    wait_event: str
    transaction_age: float | None
    query_age: float | None
    state_age: float | None
    blocked_by: tuple[int, ...]
    query: str | None = None

    @property
    def lock_waiting(self) -> bool:
        return self.wait_event_type == "Lock"


def _driver_connection(dbapi_connection: Any) -> Any:
    # An async driver's connection sits inside SQLAlchemy's adapter (AdaptedConnection.driver_connection).
    return getattr(dbapi_connection, "driver_connection", None) or dbapi_connection


def backend_pid(driver: str, dbapi_connection: Any) -> int | None:
    """The server's id of this connection's backend, from what the driver knows; None when it cannot say."""
    raw = _driver_connection(dbapi_connection)
    value: Any = None
    if driver == "asyncpg":
        value = raw.get_server_pid()
    elif driver in ("psycopg", "psycopg_async"):
        value = raw.info.backend_pid
    elif driver in ("psycopg2", "psycopg2cffi"):
        value = raw.get_backend_pid()
    elif driver in ("pymysql", "mysqldb"):
        value = raw.thread_id()
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def supported(dialect_name: str, driver: str) -> bool:
    """Whether backend ids and the server view exist for this dialect and driver."""
    if dialect_name == "postgresql":
        return driver in ("asyncpg", "psycopg", "psycopg_async", "psycopg2", "psycopg2cffi")
    if dialect_name in ("mysql", "mariadb"):
        return driver in ("pymysql", "mysqldb")
    return False


def _ids(pids: Any) -> str:
    return ",".join(str(int(pid)) for pid in sorted(pids))


# -- PostgreSQL --------------------------------------------------------------------------------------

_PG_ACTIVITY = """
SELECT a.pid, coalesce(a.state, 'unknown'), coalesce(a.wait_event_type, ''), coalesce(a.wait_event, ''),
       extract(epoch FROM clock_timestamp() - a.xact_start)::float8,
       extract(epoch FROM clock_timestamp() - a.query_start)::float8,
       extract(epoch FROM clock_timestamp() - a.state_change)::float8,
       pg_blocking_pids(a.pid), {query}
FROM pg_stat_activity a WHERE a.pid = ANY(ARRAY[{ids}]::int[]){where}
"""
# Backends anywhere on the server waiting on a lock that one of `ids` holds (or waits ahead of them for).
_PG_BLOCKED = """
SELECT w.pid, b FROM pg_stat_activity w, unnest(pg_blocking_pids(w.pid)) AS b
WHERE w.wait_event_type = 'Lock' AND b = ANY(ARRAY[{ids}]::int[]) LIMIT {limit}
"""


def _pg(
    cursor: Any, pids: set[int], queries: bool, where: str = ""
) -> tuple[dict[int, Backend], list[tuple[int, int]]]:
    ids = _ids(pids)
    query = f"left(a.query, {QUERY_CHARS})" if queries else "NULL"
    cursor.execute(_PG_ACTIVITY.format(query=query, ids=ids, where=where))
    rows: dict[int, Backend] = {}
    for r in cursor.fetchmany(MAX_ROWS):
        state = r[1] if r[1] in STATES else "unknown"
        blocked_by = tuple(int(p) for p in (r[7] or ()))
        rows[int(r[0])] = Backend(int(r[0]), state, str(r[2]), str(r[3]), _age(r[4]), _age(r[5]), _age(r[6]),
                                  blocked_by, r[8] if queries and isinstance(r[8], str) else None)  # fmt: skip
    cursor.execute(_PG_BLOCKED.format(ids=ids, limit=MAX_ROWS))
    edges = [(int(r[0]), int(r[1])) for r in cursor.fetchmany(MAX_ROWS)]
    return rows, edges


def _age(value: Any) -> float | None:
    return max(0.0, float(value)) if value is not None else None


# -- MariaDB / MySQL (InnoDB) ------------------------------------------------------------------------

# A connection sleeping with an InnoDB transaction open is "idle in transaction": PostgreSQL's words, so
# that one dashboard and one alert serve both. trx_started has whole seconds; TIME_MS is in ms.
_MY_ACTIVITY = """
SELECT p.ID, p.COMMAND, t.trx_state,
       TIMESTAMPDIFF(MICROSECOND, t.trx_started, NOW(6)) / 1e6,
       p.TIME_MS / 1e3, {query}
FROM information_schema.PROCESSLIST p
LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID
WHERE p.ID IN ({ids})
"""
_MY_BLOCKED = """
SELECT r.trx_mysql_thread_id, b.trx_mysql_thread_id
FROM information_schema.INNODB_LOCK_WAITS w
JOIN information_schema.INNODB_TRX r ON r.trx_id = w.requesting_trx_id
JOIN information_schema.INNODB_TRX b ON b.trx_id = w.blocking_trx_id
LIMIT {limit}
"""


def _my(cursor: Any, pids: set[int], queries: bool) -> tuple[dict[int, Backend], list[tuple[int, int]]]:
    query = f"LEFT(p.INFO, {QUERY_CHARS})" if queries else "NULL"
    cursor.execute(_MY_BLOCKED.format(limit=MAX_ROWS))
    waits = [(int(r[0]), int(r[1])) for r in cursor.fetchmany(MAX_ROWS)]
    blockers: dict[int, list[int]] = {}
    for waiter, blocker in waits:
        blockers.setdefault(waiter, []).append(blocker)
    cursor.execute(_MY_ACTIVITY.format(query=query, ids=_ids(pids)))
    rows: dict[int, Backend] = {}
    for r in cursor.fetchmany(MAX_ROWS):
        pid, command, trx_state = int(r[0]), str(r[1]), r[2]
        in_transaction = trx_state is not None
        waiting = trx_state == "LOCK WAIT"
        state = ("idle in transaction" if in_transaction else "idle") if command == "Sleep" else "active"
        rows[pid] = Backend(
            pid,
            state,
            "Lock" if waiting else "",
            "innodb row lock" if waiting else "",
            _age(r[3]) if in_transaction else None,
            _age(r[4]) if command != "Sleep" else None,
            _age(r[4]),
            tuple(sorted(set(blockers.get(pid, ())))),
            r[5] if queries and isinstance(r[5], str) else None,
        )
    edges = [(waiter, blocker) for waiter, blocker in waits if blocker in pids]
    return rows, edges


def fetch(
    dialect_name: str, cursor: Any, pids: set[int], queries: bool = False, where: str = ""
) -> tuple[dict[int, Backend], list[tuple[int, int]]]:
    """The server's rows for `pids` and every (waiter, blocker) lock edge whose blocker is one of `pids`.

    `where` (PostgreSQL only, the sidecar's database scope) narrows the rows: ` AND a.datname = ...`.
    """
    if not pids:
        return {}, []
    if dialect_name == "postgresql":
        return _pg(cursor, pids, queries, where)
    return _my(cursor, pids, queries)


class Unsupported(Exception):
    """The server is one whose tables we have not checked (MySQL itself, not MariaDB): no server view."""


def check_server(dialect_name: str, connection: Any) -> None:
    """Raise Unsupported unless the server is PostgreSQL or MariaDB, the servers these queries were tested on.

    MySQL 8 has no INNODB_LOCK_WAITS (performance_schema.data_lock_waits instead) and no
    max_statement_time (max_execution_time): untested, so refused rather than guessed.
    """
    if dialect_name == "postgresql":
        return
    info = _driver_connection(connection).get_server_info()
    version = info.decode() if isinstance(info, bytes) else str(info)
    if "mariadb" not in version.lower():
        raise Unsupported(f"server {version[:40]!r} is not MariaDB")


def session_setup(dialect_name: str, timeout: float) -> list[str]:
    """Statements that make our poll connection end any statement past `timeout` and name itself."""
    if dialect_name == "postgresql":
        return [f"SET statement_timeout = {max(1, int(timeout * 1000))}", "SET application_name = 'pool-exporter'"]
    return [f"SET SESSION max_statement_time = {max(0.001, timeout):.3f}"]
