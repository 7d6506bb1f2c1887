"""PostgreSQL's own view of its connections (pg_stat_activity), polled in the background.

It shows what no client-side pool can: connections from apps we do not instrument, and sessions
left "idle in transaction". The collector only renders the last poll, so a scrape never waits on
the database; `up` says whether that poll worked.

With a multiprocess directory (`checkouts`), each poll also joins the workers' checkouts (each one's
backend pid and holder, sidecar/checkouts.py) with the server's rows for those pids, in the same
transaction (backends.fetch: pg_stat_activity + pg_blocking_pids(), limited to the watched databases),
and exports the holder series (holder_server_connections, ...) itself, for all workers at once: a
waiter blocked by one holder's connections in two workers counts once. The sidecar then drops the
workers' own copies of those series from its merge (Sidecar.joined), so nothing is counted twice.
The same join gives the sidecar's /pools and / each checkout's server row (Sidecar.checkouts_now,
views.held_checkouts: the in-process rows' keys, through the same views.server_fields).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from .. import catalog, validation
from ..instrumentation import backends, samples, serverview, views
from ..labels import safe_url, server_labels
from ..metricnames import view as names_view
from ..sidecar.checkouts import JOINED_KEYS

if TYPE_CHECKING:
    from ..sidecar.checkouts import Held

log = logging.getLogger("sqlalchemy_pool_exporter.pgview")

APPLICATION_NAME = "pool-exporter"

# Our own probe connection is left out, so the numbers are the applications' alone. {databases} is
# one of _DATABASES: by default only the database the URL names is watched, as other databases on a
# shared server are other teams' business (and their application names, other teams' label values).
_CONNECTIONS = """
    SELECT coalesce(datname, ''), coalesce(application_name, ''), coalesce(state, 'unknown'), count(*)
    FROM pg_stat_activity
    WHERE backend_type = 'client backend' AND pid <> pg_backend_pid(){databases}
    GROUP BY 1, 2, 3
    """
_OLDEST = """
    SELECT coalesce(datname, ''), coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)::float8
    FROM pg_stat_activity
    WHERE backend_type = 'client backend' AND pid <> pg_backend_pid(){databases}
    GROUP BY 1
    """
_DATABASES = {
    "url": " AND datname = current_database()",  # the URL's database, or the server's default for its user
    "all": "",
    "named": " AND datname = ANY(:databases)",
}
_MAX = text("SELECT current_setting('max_connections')::int")
# Connections of max_connections an application cannot have: superusers' always, reserved_connections'
# (pg_use_reserved_connections members) from PostgreSQL 16; missing_ok gives NULL before 16.
_RESERVED = text(
    "SELECT current_setting('superuser_reserved_connections')::int"
    " + coalesce(current_setting('reserved_connections', true)::int, 0)"
)

# The same scopes for the join's rows (backends.fetch's `where`, literal SQL: no bind parameters there).
_JOIN_SCOPE = {"url": " AND a.datname = current_database()", "all": ""}


def _literal(name: str) -> str:
    # standard_conforming_strings is on (the default since 9.1): only a quote needs doubling.
    return "'" + name.replace("'", "''") + "'"


@dataclass(frozen=True)
class ServerReading:
    connections: dict[tuple[str, str, str], int] = field(default_factory=dict)
    oldest_transaction: dict[str, float] = field(default_factory=dict)
    max_connections: int = 0
    probe_seconds: float = 0.0
    reserved_connections: int = 0
    # The join of the workers' checkouts with the server's rows, by pool (None: no checkouts to join).
    joins: dict[str, serverview.ServerJoin] | None = None
    held: tuple[Held, ...] = ()


def probe_url(url: URL) -> URL:
    """The URL with the asyncpg driver, whatever PostgreSQL driver it named."""
    return url.set(drivername="postgresql+asyncpg")


class ServerView(Collector):
    """Polls pg_stat_activity every `interval` seconds (each poll bounded by `timeout`), for the
    `databases` named, `("*",)` for all, or by default (None) the one `url` connects to."""

    def __init__(
        self,
        url: URL,
        *,
        namespace: str = catalog.DEFAULT_NAMESPACE,
        interval: float = 15.0,
        timeout: float | None = None,
        databases: tuple[str, ...] | None = None,
        checkouts: Callable[[], Awaitable[list[Held]]] | None = None,
    ) -> None:
        self.url = probe_url(url)
        self.checkouts = checkouts
        self.databases = databases
        self._params: dict[str, list[str]] = {}
        if databases is None:
            which, self._join_scope = _DATABASES["url"], _JOIN_SCOPE["url"]
        elif databases == (validation.ALL_DATABASES,):
            which, self._join_scope = _DATABASES["all"], _JOIN_SCOPE["all"]
        else:
            which = _DATABASES["named"]
            self._join_scope = f" AND a.datname IN ({', '.join(map(_literal, databases))})"
            self._params = {"databases": list(databases)}
        self._connections = text(_CONNECTIONS.format(databases=which))
        self._oldest = text(_OLDEST.format(databases=which))
        # The server as pool_info names it (host:port), so Prometheus can set the pools' sum against its limit.
        found = server_labels(url)
        self.server = found[0] if found is not None else None
        self.namespace = namespace
        self.interval = interval
        self.timeout = timeout if timeout is not None else min(interval, 10.0)
        self.reading: ServerReading | None = None
        self._engine: AsyncEngine | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def _get_engine(self) -> AsyncEngine:
        if self._engine is None:
            # NullPool: a connection per probe, so a probe never inherits a broken one.
            self._engine = create_async_engine(
                self.url,
                poolclass=NullPool,
                connect_args={"server_settings": {"application_name": APPLICATION_NAME}, "timeout": self.timeout},
            )
        return self._engine

    async def poll(self) -> bool:
        """Probe once now; keep the reading (or None on failure). True if it worked."""
        started = time.perf_counter()
        try:
            reading = await asyncio.wait_for(self._query(), self.timeout)
        except Exception as exc:
            self.reading = None
            if not self._failing:
                log.warning("server view: probing %s failed: %s: %s", safe_url(self.url), type(exc).__name__, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("server view: probing %s works again", safe_url(self.url))
        self._failing = False
        self.reading = ServerReading(
            reading.connections,
            reading.oldest_transaction,
            reading.max_connections,
            time.perf_counter() - started,
            reading.reserved_connections,
            reading.joins,
            reading.held,
        )
        return True

    async def _query(self) -> ServerReading:
        held = await self.checkouts() if self.checkouts is not None else None
        pids = {h.pid for h in held or ()}
        found: tuple[dict[int, backends.Backend], list[tuple[int, int]]] = ({}, [])
        async with self._get_engine().connect() as conn:
            rows = (await conn.execute(self._connections, self._params)).all()
            oldest = (await conn.execute(self._oldest, self._params)).all()
            max_connections = (await conn.execute(_MAX)).scalar_one()
            reserved = (await conn.execute(_RESERVED)).scalar_one()
            if pids:
                found = await conn.run_sync(self._fetch, pids)
            await conn.rollback()
        return ServerReading(
            connections={(r[0], r[1], r[2]): int(r[3]) for r in rows},
            oldest_transaction={r[0]: float(r[1]) for r in oldest},
            max_connections=int(max_connections),
            reserved_connections=int(reserved),
            joins=join_by_pool(held, *found, time.time()) if held is not None else None,
            held=tuple(held or ()),
        )

    def _fetch(self, conn: Any, pids: set[int]) -> tuple[dict[int, backends.Backend], list[tuple[int, int]]]:
        cursor = conn.connection.cursor()
        try:
            return backends.fetch("postgresql", cursor, pids, where=self._join_scope)
        finally:
            cursor.close()

    async def start(self) -> None:
        """First poll now (so the first scrape has numbers), then every `interval` in the background."""
        await self.poll()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.poll()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    def joined(self) -> list[Metric]:
        """The holder series of the last poll's join (none when it failed or had nothing to join)."""
        reading = self.reading
        return list(holder_families(reading.joins, self.namespace)) if reading and reading.joins is not None else []

    def checkouts_now(self) -> dict[str, list[dict[str, Any]]] | None:
        """/pools' checkouts_now by pool, from the last poll's join (None when it failed or joined nothing)."""
        reading = self.reading
        if reading is None or reading.joins is None:
            return None
        return {
            pool: views.held_checkouts((h for h in reading.held if h.pool == pool), join)
            for pool, join in reading.joins.items()
        }

    def collect(self) -> Iterator[Metric]:
        specs = {spec.key: spec for spec in catalog.SERVER_CATALOG}
        ns = self.namespace

        def family(key: str) -> GaugeMetricFamily:
            spec = specs[key]
            return GaugeMetricFamily(spec.name(ns), spec.help, labels=list(spec.labels))

        reading = self.reading
        up = family("up")
        up.add_metric([], 1 if reading is not None else 0)
        yield up
        if reading is None:
            return
        connections = family("connections")
        for labels, count in sorted(reading.connections.items()):
            connections.add_metric(list(labels), count)
        yield connections
        maximum = family("max_connections")
        maximum.add_metric([], reading.max_connections)
        yield maximum
        oldest = family("oldest_transaction")
        for datname, age in sorted(reading.oldest_transaction.items()):
            oldest.add_metric([datname], age)
        yield oldest
        probe = family("probe_seconds")
        probe.add_metric([], reading.probe_seconds)
        yield probe
        reserved = family("reserved_connections")
        reserved.add_metric([], reading.reserved_connections)
        yield reserved
        if self.server is not None:
            info = family("info")
            info.add_metric([self.server], 1)
            yield info
        yield from self.joined()

    def limit(self) -> int | None:
        """Connections the server allows applications (max_connections minus the reserved); None: no reading."""
        reading = self.reading
        return None if reading is None else reading.max_connections - reading.reserved_connections

    def server_limit(self) -> tuple[str, int] | None:
        """(server, limit) for the sidecar's /pools; None without a reading or a server name."""
        limit = self.limit()
        return None if limit is None or self.server is None else (self.server, limit)


def join_by_pool(
    held: list[Held], rows: dict[int, backends.Backend], edges: list[tuple[int, int]], at: float
) -> dict[str, serverview.ServerJoin]:
    """serverview.join() for each pool the workers' checkouts name."""
    by_pool: dict[str, list[tuple[int, str]]] = {}
    for h in held:
        by_pool.setdefault(h.pool, []).append((h.pid, h.holder))
    return {pool: serverview.join(pairs, rows, edges, (), at) for pool, pairs in by_pool.items()}


def holder_families(joins: dict[str, serverview.ServerJoin], namespace: str) -> Iterator[Metric]:
    """The joined holder series, under our default names (pools_from_metrics reads them for /pools)."""
    v = names_view(namespace, "default")
    families = {
        key: GaugeMetricFamily(v.by_key[key].name, v.by_key[key].spec.help, labels=list(v.by_key[key].labelnames))
        for key in JOINED_KEYS
    }
    for pool in sorted(joins):
        for key, labels, value in samples.server_gauges(joins[pool]):
            families[key].add_metric([pool, *labels], value)
    yield from families.values()
