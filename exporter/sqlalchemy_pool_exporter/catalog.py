"""Every metric the exporter emits, defined once, as data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["gauge", "counter", "histogram"]
# OpenTelemetry's instrument kinds: the semantic conventions define pool sizes as up-down counters.
Instrument = Literal["gauge", "counter", "updowncounter", "histogram"]
# How prometheus_client's multiprocess mode merges one gauge across worker files.
MultiprocessMode = Literal["livesum", "livemax", "max"]

DEFAULT_NAMESPACE = "sqlalchemy"

# Pool waits are usually sub-millisecond; the tail that matters is the pool timeout (30 s default).
WAIT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Holding times and transactions: from a fast query to a stuck request.
USE_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Opening a connection: TCP + TLS + auth, usually a few ms, slow when the server is struggling.
CREATE_BUCKETS: tuple[float, ...] = USE_BUCKETS[:-2]
# A statement: from a point lookup to a report; past 10 s it is the +Inf bucket's business.
STATEMENT_BUCKETS: tuple[float, ...] = WAIT_BUCKETS[:-1]

# The lean profile's bounds (README "Series budget"): four or three each, for the decade that matters.
LEAN_BUCKETS: dict[str, tuple[float, ...]] = {
    "wait": (0.001, 0.01, 0.1, 1.0),
    "use": (0.01, 0.1, 1.0, 10.0),
    "create": (0.01, 0.1, 1.0),
    "statement": (0.01, 0.1, 1.0),
}

# The OpenTelemetry semantic conventions that names="semconv" and the OTLP bridge follow. The
# db.client.connection.* metrics are still "development" there and were renamed twice: up to 1.25
# db.client.connections.usage{state, pool.name} in ms; in 1.26 db.client.connection.count{db.client.
# connections.state, …} in s; since 1.27 the attributes are db.client.connection.*. Unchanged 1.27-1.44.
SEMCONV_VERSION = "1.44.0"
SEMCONV_SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

BucketSet = Literal["wait", "use", "create", "statement"]
DEFAULT_BUCKETS: dict[str, tuple[float, ...]] = {
    "wait": WAIT_BUCKETS,
    "use": USE_BUCKETS,
    "create": CREATE_BUCKETS,
    "statement": STATEMENT_BUCKETS,
}
# db.client.operation.duration "SHOULD be specified with ExplicitBucketBoundaries [...]": with
# names="semconv" these are the default, so that it aggregates with other applications' (`sum by (le)`).
# The connection-time histograms have no recommended bounds there: ours stay.
SEMCONV_BUCKETS: dict[str, tuple[float, ...]] = {"statement": (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)}


def default_buckets(names: str) -> dict[str, tuple[float, ...]]:
    """The bounds of every bucket set when none are given, for a view's `names`."""
    return {**DEFAULT_BUCKETS, **SEMCONV_BUCKETS} if names == "semconv" else dict(DEFAULT_BUCKETS)


@dataclass(frozen=True, slots=True)
class Semconv:
    """The semantic conventions' metric (SEMCONV_VERSION) that a catalog metric is: name, instrument, unit.

    `system`: the metric requires `db.system.name` (the engine's database, metricnames.db_system).
    """

    name: str
    instrument: Instrument
    unit: str
    system: bool = False


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric family: its name without namespace, type, help and labels beyond `pool`.

    `unit` is its UCUM unit for OpenTelemetry (`s`, or an annotation such as `{connection}` for a
    count); `semconv` the semantic conventions' metric it is, if any (metricnames.py spells both).
    `field` names it in a pool's row of /pools and the sidecar's pool view (None: left out); a
    labelled one becomes a mapping by label value, or, when `flat`, one field per label value.
    `column` titles it in the / table (None: not shown).
    """

    key: str
    suffix: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: BucketSet | None = None
    mp_mode: MultiprocessMode = "livesum"
    pool_label: bool = True
    field: str | None = None
    flat: bool = False
    column: str | None = None
    unit: str = ""
    semconv: Semconv | None = None

    def name(self, namespace: str) -> str:
        return f"{namespace}_{self.suffix}" if namespace else self.suffix

    @property
    def labelnames(self) -> tuple[str, ...]:
        return (("pool",) if self.pool_label else ()) + self.labels


def _gauge(
    key: str,
    suffix: str,
    help: str,
    labels: tuple[str, ...] = (),
    mp: MultiprocessMode = "livesum",
    field: str | None = None,
    column: str | None = None,
    unit: str = "{connection}",
    semconv: Semconv | None = None,
) -> MetricSpec:
    return MetricSpec(key, suffix, "gauge", help, labels, mp_mode=mp, field=field, column=column, unit=unit,
                      semconv=semconv)  # fmt: skip


def _counter(
    key: str,
    suffix: str,
    help: str,
    labels: tuple[str, ...] = (),
    field: str | None = None,
    column: str | None = None,
    unit: str = "{connection}",
    semconv: Semconv | None = None,
) -> MetricSpec:
    return MetricSpec(key, suffix, "counter", help, labels, field=field, column=column, unit=unit, semconv=semconv)


def _histogram(
    key: str, suffix: str, help: str, buckets: BucketSet, labels: tuple[str, ...] = (), semconv: Semconv | None = None
) -> MetricSpec:
    return MetricSpec(key, suffix, "histogram", help, labels, buckets=buckets, unit="s", semconv=semconv)


def _db_client(name: str, instrument: Instrument, unit: str = "{connection}", system: bool = False) -> Semconv:
    """The semantic conventions' `db.client.<name>` metric."""
    return Semconv(f"db.client.{name}", instrument, unit, system)


CATALOG: tuple[MetricSpec, ...] = (
    # State, read from the pool itself at scrape time.
    MetricSpec(
        "connections",
        "pool_connections",
        "gauge",
        "Connections held by the pool, by state (used = checked out).",
        ("state",),
        field="connections",
        flat=True,
        unit="{connection}",
        semconv=_db_client("connection.count", "updowncounter"),
    ),
    _gauge(
        "max_connections",
        "pool_max_connections",
        "Most connections the pool may open (pool_size + max_overflow).",
        field="max",
        column="max",
        semconv=_db_client("connection.max", "updowncounter"),
    ),
    _gauge(
        "size",
        "pool_size",
        "Configured pool_size: connections kept open when idle.",
        field="size",
        column="size",
        semconv=_db_client("connection.idle.max", "updowncounter"),
    ),
    _gauge(
        "overflow",
        "pool_overflow_connections",
        "Connections open beyond pool_size right now.",
        field="overflow",
        column="overflow",
    ),
    _gauge(
        "timeout",
        "pool_timeout_seconds",
        "Configured time a caller waits for a connection before failing.",
        mp="max",
        field="timeout",
        unit="s",
    ),
    _gauge(
        "pending",
        "pool_pending_requests",
        "Callers waiting for a connection right now.",
        field="pending",
        column="pending",
        unit="{request}",
        semconv=_db_client("connection.pending_requests", "updowncounter", "{request}"),
    ),
    _gauge(
        "oldest_pending",
        "pool_oldest_pending_seconds",
        "Age of the longest-waiting caller (0 when none).",
        mp="livemax",
        field="oldest_pending",
        unit="s",
    ),
    _gauge(
        "oldest_checkout",
        "pool_oldest_checkout_seconds",
        "Age of the longest-held connection (0 when none).",
        mp="livemax",
        field="oldest_checkout",
        column="oldest checkout (s)",
        unit="s",
    ),
    # The busiest worker: in multiprocess mode the gauges above are summed over workers, so one worker at
    # 15/15 beside an idle one reads 50%; these merge as the max over live workers (in-process: this one).
    _gauge(
        "worker_utilization",
        "pool_worker_utilization_max",
        "Used / (pool_size + max_overflow) of the busiest live worker (this process in-process).",
        mp="livemax",
        field="worker_utilization_max",
        unit="",  # a ratio; OpenTelemetry's "1" would add `_ratio` to the name
    ),
    _gauge(
        "worker_pending",
        "pool_worker_pending_requests_max",
        "Callers waiting for a connection right now in the busiest live worker (this process in-process).",
        mp="livemax",
        field="worker_pending_max",
        unit="{request}",
    ),
    # Sizing (instrumentation/advice.py, erlang.py): from the checkout and hold-time counters over the
    # advice window, sampled at scrape or flush, never on the hot path. Absent until the window saw a checkout.
    _gauge(
        "offered_load",
        "pool_offered_load",
        "Connections busy on average over the advice window: checkout rate x mean hold (Erlangs).",
        field="offered_load",
        column="offered load",
    ),
    _gauge(
        "advised_size",
        "pool_advised_size",
        "Smallest pool for which Erlang C gives a probability of waiting at most the advice target "
        "(the busiest worker's in multiprocess mode).",
        mp="livemax",
        field="advised_size",
        column="advised size",
    ),
    # Which server the pool connects to, so Prometheus can add up every pool's max per server (the fleet's
    # connection budget). Never the user or the password. Not for file databases (SQLite).
    MetricSpec(
        "info",
        "pool_info",
        "gauge",
        "The server (host:port), database and driver the pool connects to; always 1.",
        ("server", "database", "driver"),
        mp_mode="livemax",
    ),
    # Events.
    _counter(
        "checkouts",
        "pool_checkouts_total",
        "Connections handed out by the pool.",
        field="checkouts",
        column="checkouts",
        unit="{checkout}",
    ),
    _counter(
        "timeouts",
        "pool_timeouts_total",
        "Callers that gave up waiting for a connection (pool limit reached).",
        field="timeouts",
        column="timeouts",
        unit="{timeout}",
        semconv=_db_client("connection.timeouts", "counter", "{timeout}"),
    ),
    _counter("created", "pool_connections_created_total", "DBAPI connections opened.", field="connections_created"),
    _counter(
        "closed",
        "pool_connections_closed_total",
        "DBAPI connections closed (including detached ones).",
        field="connections_closed",
    ),
    _counter(
        "connect_errors",
        "pool_connect_errors_total",
        "Failures to get a connection, by exception class.",
        ("error",),
        field="connect_errors",
        unit="{error}",
    ),
    _counter(
        "invalidations",
        "pool_invalidations_total",
        "Connections invalidated, by kind (hard or soft).",
        ("kind",),
        field="invalidations",
    ),
    _counter(
        "disconnects",
        "pool_disconnects_total",
        "Connections the database dropped (pre-ping included).",
        field="disconnects",
    ),
    _counter(
        "leaked",
        "pool_connections_leaked_total",
        "Connections reclaimed by the garbage collector, never returned.",
        field="leaked",
        column="leaked",
    ),
    _histogram(
        "wait",
        "pool_wait_seconds",
        "Time from asking for a connection to having one, creation included.",
        "wait",
        semconv=_db_client("connection.wait_time", "histogram", "s"),
    ),
    _histogram(
        "use",
        "pool_use_seconds",
        "Time a connection was held: checkout to return.",
        "use",
        semconv=_db_client("connection.use_time", "histogram", "s"),
    ),
    _histogram(
        "create",
        "pool_create_seconds",
        "Time to open a new DBAPI connection.",
        "create",
        semconv=_db_client("connection.create_time", "histogram", "s"),
    ),
    _counter(
        "transactions",
        "transactions_total",
        "Transactions ended, by outcome: commit, rollback (by the application) or close (without either).",
        ("outcome",),
        field="transactions",
        unit="{transaction}",
    ),
    _histogram(
        "transaction_seconds",
        "transaction_seconds",
        "Transaction time from BEGIN to COMMIT, ROLLBACK or close, by outcome.",
        "use",
        ("outcome",),
    ),
    _counter(
        "savepoints",
        "savepoints_total",
        "Savepoints ended, by outcome (release or rollback).",
        ("outcome",),
        field="savepoints",
        unit="{savepoint}",
    ),
    _histogram(
        "statement_seconds",
        "statement_seconds",
        "Statement execution time, by operation.",
        "statement",
        ("operation",),
        semconv=_db_client("operation.duration", "histogram", "s", system=True),
    ),
    _counter(
        "statement_errors",
        "statement_errors_total",
        "Statements that raised, by exception class.",
        ("error",),
        field="statement_errors",
        unit="{statement}",
    ),
    _counter(
        "sessions",
        "session_scopes_total",
        "session_scope/session_dependency exits, by outcome.",
        ("outcome",),
        field="sessions",
        unit="{scope}",
    ),
    _counter(
        "errors",
        "exporter_errors_total",
        "Failures inside the exporter's own listeners (never raised to the app).",
        field="exporter_errors",
        unit="{error}",
    ),
    # Who holds the pool (instrumentation/holders.py): exported once a holder was ever set in the process. Six series
    # per holder and pool, for at most max_holders names plus `none` and `other`. Counters, not
    # histograms: mean hold time is rate(hold_seconds_total) / rate(checkouts_total).
    _gauge(
        "holder_connections",
        "pool_holder_connections",
        "Connections held now, by holder.",
        ("holder",),
        field="holder_connections",
    ),
    _counter(
        "holder_checkouts",
        "pool_holder_checkouts_total",
        "Connections handed out, by holder.",
        ("holder",),
        field="holder_checkouts",
    ),
    _counter(
        "holder_hold",
        "pool_holder_hold_seconds_total",
        "Time connections were held (checkout to return), by holder.",
        ("holder",),
        field="holder_hold_seconds",
    ),
    _counter(
        "holder_wait",
        "pool_holder_wait_seconds_total",
        "Time spent waiting for a connection, by holder.",
        ("holder",),
        field="holder_wait_seconds",
    ),
    _counter(
        "holder_timeouts",
        "pool_holder_timeouts_total",
        "Callers that gave up waiting for a connection, by holder.",
        ("holder",),
        field="holder_timeouts",
    ),
    _counter(
        "holder_held_too_long",
        "pool_holder_held_too_long_total",
        "Checkouts held longer than the leak threshold (each counted once), by holder.",
        ("holder",),
        field="holder_held_too_long",
    ),
    _counter(
        "holder_folded",
        "pool_holder_folded_checkouts_total",
        'Checkouts counted under holder="other" because the pool already had max_holders names.',
        field="holder_folded",
    ),
    # What the database sees of each holder's connections (instrumentation/serverview.py): exported while
    # server_view is on and its last poll worked. Bounded like the holder series (max_holders names, plus
    # `none`, `other` and `(pool)`, the pool's idle connections); `state` is pg_stat_activity's fixed set.
    _gauge(
        "holder_server_connections",
        "pool_holder_server_connections",
        "Checked-out connections by holder and by what the server says they do (pg_stat_activity.state); "
        'holder="(pool)": the idle ones the pool holds.',
        ("holder", "state"),
        field="holder_server_connections",
    ),
    _gauge(
        "holder_lock_waiting",
        "pool_holder_lock_waiting_connections",
        "This holder's connections waiting on a lock, as the server says.",
        ("holder",),
        field="holder_lock_waiting",
    ),
    _gauge(
        "holder_blocking",
        "pool_holder_blocking_connections",
        "Other backends waiting on a lock held by this holder's connections.",
        ("holder",),
        field="holder_blocking",
    ),
    _gauge(
        "holder_oldest_transaction",
        "pool_holder_oldest_transaction_seconds",
        "Age of the oldest open transaction among this holder's connections (server's xact_start; 0 when none).",
        ("holder",),
        mp="livemax",
        field="holder_oldest_transaction",
        unit="s",
    ),
    _gauge(
        "holder_idle_in_transaction",
        "pool_holder_idle_in_transaction_seconds",
        "Longest time one of this holder's connections has sat idle in an open transaction (0 when none).",
        ("holder",),
        mp="livemax",
        field="holder_idle_in_transaction",
        unit="s",
    ),
    MetricSpec(
        "build_info",
        "exporter_build_info",
        "gauge",
        "Exporter version; always 1.",
        ("version",),
        mp_mode="max",
        pool_label=False,
    ),
)


BY_KEY: dict[str, MetricSpec] = {spec.key: spec for spec in CATALOG}

# Values of `state` on pool_connections, each its own field of the pool views.
CONNECTION_STATES: tuple[str, ...] = ("used", "idle")
# `rollback`: the application rolled back (rollback(), or an exception left a begin() block); `close`:
# the transaction was closed without COMMIT or ROLLBACK (Session.close() after a read, Connection.close(),
# the pool's reset on return), which SQLAlchemy also ends with a ROLLBACK (instrumentation/dialect.py).
TRANSACTION_OUTCOMES: tuple[str, ...] = ("commit", "rollback", "close")

# The sidecar's PostgreSQL server view (pg_stat_activity); no `pool` label.
SERVER_CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec("up", "server_up", "gauge", "1 if the last pg_stat_activity probe worked, else 0.", pool_label=False),
    MetricSpec(
        "connections",
        "server_connections",
        "gauge",
        "Client connections the server holds, by database, application_name and state.",
        ("datname", "application_name", "state"),
        pool_label=False,
    ),
    MetricSpec("max_connections", "server_max_connections", "gauge", "The server's max_connections.", pool_label=False),
    MetricSpec(
        "reserved_connections",
        "server_reserved_connections",
        "gauge",
        "Connections of max_connections kept for superusers and reserved roles "
        "(superuser_reserved_connections + reserved_connections).",
        pool_label=False,
    ),
    MetricSpec(
        "info",
        "server_info",
        "gauge",
        "The server (host:port) the server view polls, as pool_info names it; always 1.",
        ("server",),
        pool_label=False,
    ),
    MetricSpec(
        "oldest_transaction",
        "server_oldest_transaction_seconds",
        "gauge",
        "Age of the oldest open transaction, by database (0 when none).",
        ("datname",),
        pool_label=False,
    ),
    MetricSpec("probe_seconds", "server_probe_seconds", "gauge", "How long the last probe took.", pool_label=False),
)

# The sidecar's own view of the multiprocess directory it maintains.
SIDECAR_CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec(
        "workers",
        "exporter_sidecar_workers",
        "gauge",
        "Worker processes writing the multiprocess directory.",
        pool_label=False,
    ),
    MetricSpec(
        "files",
        "exporter_sidecar_files",
        "gauge",
        "Files in the multiprocess directory after compaction.",
        pool_label=False,
    ),
    MetricSpec(
        "reaped",
        "exporter_sidecar_reaped_workers_total",
        "counter",
        "Dead workers whose files were reaped.",
        pool_label=False,
    ),
    MetricSpec(
        "errors",
        "exporter_sidecar_errors_total",
        "counter",
        "Failures while maintaining or merging the multiprocess directory (journal entries ignored included).",
        pool_label=False,
    ),
    MetricSpec(
        "quarantined",
        "exporter_sidecar_quarantined_files_total",
        "counter",
        "Files moved out of the multiprocess directory as unreadable: not regular, too large, corrupt.",
        pool_label=False,
    ),
    MetricSpec(
        "merges",
        "exporter_sidecar_merges_total",
        "counter",
        "Merges of the multiprocess directory; concurrent requests share one.",
        pool_label=False,
    ),
)
