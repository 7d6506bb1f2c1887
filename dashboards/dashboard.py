"""The Grafana dashboard, generated from code: `python -m dashboards.dashboard` rewrites the JSON.

Panels are data (`PANELS` below); the grafana-foundation-sdk builders turn them into the current
Grafana schema. `--check` exits 1 when the checked-in JSON differs from what this file produces.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders import stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm

OUTPUT = Path(__file__).with_name("sqlalchemy-pool.json")
UID = "sqlalchemy-pool"
TITLE = "SQLAlchemy connection pools"

# Grafana template variables; tests substitute them before sending queries to Prometheus.
POOL = 'job=~"$job", instance=~"$instance", pool=~"$pool"'
HOLDER = f'{POOL}, holder=~"$holder"'
TARGET = 'job=~"$job", instance=~"$instance"'
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)

# The sidecar's PostgreSQL probe (sqlalchemy_pool_exporter/service/pgview.py): the server's own view of connections.
PG_CONNECTIONS = "sqlalchemy_server_connections"
PG_MAX_CONNECTIONS = "sqlalchemy_server_max_connections"
PG_OLDEST_XACT = "sqlalchemy_server_oldest_transaction_seconds"
PG_UP = "sqlalchemy_server_up"

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """One panel: its kind, title, unit, queries and size on the 24-column grid."""

    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str
    kind: Literal["timeseries", "stat"] = "timeseries"
    w: int = 8
    h: int = 8
    min: float | None = 0
    max: float | None = None
    # Series whose legend ends with one of these are drawn as dashed reference lines.
    reference: tuple[str, ...] = ()
    thresholds: tuple[tuple[float, str], ...] = ()
    bars: bool = False
    log: bool = False
    stacked: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def quantiles(metric: str, by: str, legend: str) -> tuple[Query, ...]:
    """p50/p95/p99 from a histogram, summing buckets across instances before the quantile."""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{POOL}}}[{RATE}])))",
            f"{legend} p{round(q * 100)}",
        )
        for q in QUANTILES
    )


def zero_for_quiet_pools(expr: str, label: str) -> str:
    """`expr` by (pool, label), or a 0 series labelled `label="none"` for pools with no such event yet.

    Error classes are labels that appear only once an error happened; a panel should say "0",
    not "No data", for a healthy pool.
    """
    quiet = f'label_replace(0 * sum by (pool) (sqlalchemy_pool_checkouts_total{{{POOL}}}), "{label}", "none", "", "")'
    return f"{expr} or on (pool) {quiet}"


TIMEOUT_LINE = Query(f"max by (pool) (sqlalchemy_pool_timeout_seconds{{{POOL}}})", "{{pool}} timeout")

STATS = Row(
    "Now",
    (
        Panel(
            "Pool utilisation (worst instance)",
            "percentunit",
            (
                Query(
                    f'max by (pool) (sqlalchemy_pool_connections{{{POOL}, state="used"}}'
                    f" / ignoring (state) sqlalchemy_pool_max_connections{{{POOL}}})",
                    "{{pool}}",
                ),
            ),
            "Checked-out connections over pool_size + max_overflow, on the busiest instance.",
            kind="stat",
            w=6,
            h=4,
            max=1,
            thresholds=((0, "green"), (0.75, "orange"), (0.9, "red")),
        ),
        Panel(
            "Callers waiting now",
            "short",
            (Query(f"sum by (pool) (sqlalchemy_pool_pending_requests{{{POOL}}})", "{{pool}}"),),
            "Callers blocked in the pool waiting for a connection.",
            kind="stat",
            w=6,
            h=4,
            thresholds=((0, "green"), (1, "orange"), (5, "red")),
        ),
        Panel(
            "Pool timeouts in range",
            "short",
            (Query(f"sum by (pool) (increase(sqlalchemy_pool_timeouts_total{{{POOL}}}[$__range]))", "{{pool}}"),),
            "Callers that gave up waiting (QueuePool limit reached) over the dashboard's time range.",
            kind="stat",
            w=6,
            h=4,
            thresholds=((0, "green"), (1, "red")),
        ),
        Panel(
            "Oldest checkout",
            "s",
            (Query(f"max by (pool) (sqlalchemy_pool_oldest_checkout_seconds{{{POOL}}})", "{{pool}}"),),
            "Age of the longest-held connection right now: a value that keeps growing is a leak.",
            kind="stat",
            w=6,
            h=4,
            thresholds=((0, "green"), (10, "orange"), (60, "red")),
        ),
    ),
)

SATURATION = Row(
    "Saturation",
    (
        Panel(
            "Connections: used, idle, max",
            "short",
            (
                Query(f'sum by (pool) (sqlalchemy_pool_connections{{{POOL}, state="used"}})', "{{pool}} used"),
                Query(f'sum by (pool) (sqlalchemy_pool_connections{{{POOL}, state="idle"}})', "{{pool}} idle"),
                Query(f"sum by (pool) (sqlalchemy_pool_max_connections{{{POOL}}})", "{{pool}} max"),
            ),
            "Connections the pools hold, summed over the selected instances, against their limit.",
            w=12,
            reference=(" max",),
        ),
        Panel(
            "Utilisation by instance",
            "percentunit",
            (
                Query(
                    f'sum by (instance, pool) (sqlalchemy_pool_connections{{{POOL}, state="used"}})'
                    f" / sum by (instance, pool) (sqlalchemy_pool_max_connections{{{POOL}}})",
                    "{{pool}} @ {{instance}}",
                ),
            ),
            "used / (pool_size + max_overflow) per instance: one hot instance hides in a sum.",
            w=12,
            max=1,
            thresholds=((0, "green"), (0.9, "red")),
        ),
        Panel(
            "Overflow connections in use",
            "short",
            (
                Query(f"sum by (pool) (sqlalchemy_pool_overflow_connections{{{POOL}}})", "{{pool}} overflow"),
                Query(f"sum by (pool) (sqlalchemy_pool_size{{{POOL}}})", "{{pool}} pool_size"),
            ),
            "Connections open beyond pool_size: they are closed again when returned to a full pool.",
            reference=(" pool_size",),
        ),
        Panel(
            "Pending requests",
            "short",
            (Query(f"sum by (pool) (sqlalchemy_pool_pending_requests{{{POOL}}})", "{{pool}}"),),
            "Callers waiting for a connection right now.",
        ),
        Panel(
            "Oldest waiter age",
            "s",
            (
                Query(f"max by (pool) (sqlalchemy_pool_oldest_pending_seconds{{{POOL}}})", "{{pool}} oldest waiter"),
                TIMEOUT_LINE,
            ),
            "How long the longest-waiting caller has waited; it fails when it reaches the pool timeout.",
            reference=(" timeout",),
        ),
    ),
)


# The fleet's connection budget per server (the recording rules of alerts.yml, inlined so the panel works
# without them): every pool's max added up over every job and instance that names the server, and the
# server's limit from the sidecar's server view. Summed over every job (the budget is everyone's), shown
# for the servers the selected pools use.
SELECTED_SERVERS = f"and on (server) max by (server) (sqlalchemy_pool_info{{{POOL}}})"
FLEET_MAX = (
    "sum by (server) (sqlalchemy_pool_max_connections * on (job, instance, pool) group_left (server)"
    f" max by (job, instance, pool, server) (sqlalchemy_pool_info)) {SELECTED_SERVERS}"
)
SERVER_LIMIT = (
    "min by (server) ((sqlalchemy_server_max_connections - sqlalchemy_server_reserved_connections)"
    f" * on (job, instance) group_left (server) sqlalchemy_server_info) {SELECTED_SERVERS}"
)

SIZING = Row(
    "Sizing",
    (
        Panel(
            "Offered load and advised size vs configured",
            "short",
            (
                Query(f"max by (pool) (sqlalchemy_pool_offered_load{{{POOL}}})", "{{pool}} offered load"),
                Query(f"max by (pool) (sqlalchemy_pool_advised_size{{{POOL}}})", "{{pool}} advised size"),
                Query(f"max by (pool) (sqlalchemy_pool_size{{{POOL}}})", "{{pool}} pool_size"),
                Query(f"max by (pool) (sqlalchemy_pool_max_connections{{{POOL}}})", "{{pool}} max"),
            ),
            "Connections busy on average over the advice window (checkout rate x mean hold) and the smallest "
            "pool Erlang C keeps under the wait target, against pool_size and pool_size + max_overflow of the "
            "busiest instance. With a sidecar, pool_size and max are its workers' sums and the advised size is "
            "per worker.",
            w=12,
            reference=(" pool_size", " max"),
        ),
        Panel(
            "Overflow churn",
            "short",
            (
                Query(
                    f"60 * sum by (pool) (rate(sqlalchemy_pool_connections_created_total{{{POOL}}}[{RATE}]))",
                    "{{pool}} opened / min",
                ),
            ),
            "Connections opened per minute: a pool_size below the steady load opens and closes overflow "
            "connections all day (raise pool_size to the advised size).",
            w=12,
        ),
        Panel(
            "Busiest worker",
            "percentunit",
            (
                Query(
                    f"max by (instance, pool) (sqlalchemy_pool_worker_utilization_max{{{POOL}}})",
                    "{{pool}} @ {{instance}}",
                ),
            ),
            "used / (pool_size + max_overflow) of the busiest live worker: a sum over workers hides one at "
            "15/15 beside an idle one. The saturation alert reads this.",
            w=12,
            max=1,
            thresholds=((0, "green"), (0.9, "red")),
        ),
        Panel(
            "Fleet connections vs server limit",
            "short",
            (
                Query(FLEET_MAX, "{{server}} pools' max, every instance"),
                Query(SERVER_LIMIT, "{{server}} limit"),
            ),
            "pool_size + max_overflow of every pool on each server, over every worker, pod and application, "
            "against max_connections minus the reserved connections (the sidecar's server view). Above the "
            "limit, a burst or a deploy fails with 'too many clients'.",
            w=12,
            reference=(" limit",),
        ),
    ),
)


def per_holder(counter: str, checkouts: str = "sqlalchemy_pool_holder_checkouts_total") -> str:
    """Mean seconds per checkout by holder: a holder counter's rate over the rate of its checkouts."""
    return (
        f"sum by (pool, holder) (rate({counter}{{{HOLDER}}}[{RATE}]))"
        f" / sum by (pool, holder) (rate({checkouts}{{{HOLDER}}}[{RATE}]))"
    )


# Who holds the pool (instrumentation/holders.py): series exist once the application named a holder (holder(),
# holder_middleware, HolderMiddleware, session_scope(holder=)); checkouts with no name are `none`.
HOLDERS = Row(
    "Who holds the pool",
    (
        Panel(
            "Connections held by holder",
            "short",
            (
                Query(
                    f"sum by (pool, holder) (sqlalchemy_pool_holder_connections{{{HOLDER}}})",
                    "{{holder}} ({{pool}})",
                ),
            ),
            "Checked-out connections by who holds them (a route template, a job), summed over instances and "
            "stacked: the stack's height is the pool's used connections.",
            w=12,
            stacked=True,
        ),
        Panel(
            "Mean hold time by holder",
            "s",
            (Query(per_holder("sqlalchemy_pool_holder_hold_seconds_total"), "{{holder}} ({{pool}})"),),
            "Seconds a holder keeps each connection, checkout to return: a holder far above the rest keeps its "
            "connection through something slow (an external call inside a transaction).",
            w=12,
        ),
        Panel(
            "Mean wait by holder",
            "s",
            (Query(per_holder("sqlalchemy_pool_holder_wait_seconds_total"), "{{holder}} ({{pool}})"),),
            "Seconds each holder's callers waited for a connection, per connection they got: who suffers when "
            "the pool is short.",
        ),
        Panel(
            "Timeouts by holder",
            "reqps",
            (
                Query(
                    f"sum by (pool, holder) (rate(sqlalchemy_pool_holder_timeouts_total{{{HOLDER}}}[{RATE}]))",
                    "{{holder}} ({{pool}})",
                ),
            ),
            "Callers that gave up waiting for a connection, by holder: the requests that failed.",
            bars=True,
        ),
        Panel(
            "Held too long by holder",
            "short",
            (
                Query(
                    f"sum by (pool, holder) (increase(sqlalchemy_pool_holder_held_too_long_total{{{HOLDER}}}[{RATE}]))",
                    "{{holder}} ({{pool}})",
                ),
            ),
            "Checkouts held longer than the exporter's leak_threshold, each counted once, by holder "
            "(only when leak_threshold is set; the log has the stack that took each).",
            bars=True,
        ),
    ),
)

LATENCY = Row(
    "Latency",
    (
        Panel(
            "Wait for a connection (p50/p95/p99)",
            "s",
            (*quantiles("sqlalchemy_pool_wait_seconds", "pool", "{{pool}}"), TIMEOUT_LINE),
            "Asking the pool for a connection to having one, creation included. Dashed: configured timeout.",
            reference=(" timeout",),
            log=True,
        ),
        Panel(
            "Connection held (p50/p95/p99)",
            "s",
            quantiles("sqlalchemy_pool_use_seconds", "pool", "{{pool}}"),
            "Checkout to return: how long the application keeps a connection.",
            log=True,
        ),
        Panel(
            "Connection creation (p50/p95/p99)",
            "s",
            quantiles("sqlalchemy_pool_create_seconds", "pool", "{{pool}}"),
            "Opening a new DBAPI connection (TCP, TLS, authentication).",
            log=True,
        ),
    ),
)

ERRORS = Row(
    "Errors",
    (
        Panel(
            "Pool timeouts",
            "reqps",
            (Query(f"sum by (pool) (rate(sqlalchemy_pool_timeouts_total{{{POOL}}}[{RATE}]))", "{{pool}}"),),
            "Callers that gave up waiting for a connection (sqlalchemy.exc.TimeoutError).",
            bars=True,
        ),
        Panel(
            "Connect errors, invalidations, disconnects",
            "ops",
            (
                Query(
                    zero_for_quiet_pools(
                        f"sum by (pool, error) (rate(sqlalchemy_pool_connect_errors_total{{{POOL}}}[{RATE}]))", "error"
                    ),
                    "{{pool}} connect error {{error}}",
                ),
                Query(
                    f"sum by (pool, kind) (rate(sqlalchemy_pool_invalidations_total{{{POOL}}}[{RATE}]))",
                    "{{pool}} invalidated ({{kind}})",
                ),
                Query(
                    f"sum by (pool) (rate(sqlalchemy_pool_disconnects_total{{{POOL}}}[{RATE}]))",
                    "{{pool}} disconnects",
                ),
            ),
            "Failures to open a connection by exception class, connections invalidated, and connections "
            "the database dropped (pre-ping included).",
        ),
        Panel(
            "Leaked connections",
            "short",
            (
                Query(
                    f"sum by (pool) (increase(sqlalchemy_pool_connections_leaked_total{{{POOL}}}[{RATE}]))",
                    "{{pool}} leaked",
                ),
            ),
            "Connections never returned, reclaimed by the garbage collector.",
            bars=True,
        ),
        Panel(
            "Statement errors by class",
            "ops",
            (
                Query(
                    zero_for_quiet_pools(
                        f"sum by (pool, error) (rate(sqlalchemy_statement_errors_total{{{POOL}}}[{RATE}]))", "error"
                    ),
                    "{{pool}} {{error}}",
                ),
            ),
            "Statements that raised, by exception class (IntegrityError, OperationalError...).",
            w=12,
        ),
        Panel(
            "Exporter self-errors",
            "ops",
            (Query(f"sum by (pool) (rate(sqlalchemy_exporter_errors_total{{{POOL}}}[{RATE}]))", "{{pool}}"),),
            "Failures inside the exporter's own listeners: never raised into the application, counted here.",
            w=12,
        ),
    ),
)

TRANSACTIONS = Row(
    "Transactions and statements",
    (
        Panel(
            "Transactions by outcome",
            "ops",
            (
                Query(
                    f"sum by (pool, outcome) (rate(sqlalchemy_transactions_total{{{POOL}}}[{RATE}]))",
                    "{{pool}} {{outcome}}",
                ),
            ),
            "Per second, Core and ORM alike: commit; rollback, the application's (rollback(), an exception out "
            "of begin()); close, ended without either (Session.close() after a read, Connection.close(), the "
            "pool's reset on return), which SQLAlchemy also ends with a ROLLBACK.",
        ),
        Panel(
            "Rollback ratio",
            "percentunit",
            (
                Query(
                    f'sum by (pool) (rate(sqlalchemy_transactions_total{{{POOL}, outcome="rollback"}}[{RATE}]))'
                    f" / sum by (pool) (rate(sqlalchemy_transactions_total{{{POOL}}}[{RATE}]))",
                    "{{pool}}",
                ),
            ),
            "Share of transactions the application rolled back. Closed transactions (ORM reads) count in the "
            "total, not as rollbacks.",
            max=1,
            thresholds=((0, "green"), (0.1, "red")),
        ),
        Panel(
            "Transaction time (p50/p95/p99)",
            "s",
            quantiles("sqlalchemy_transaction_seconds", "pool, outcome", "{{pool}} {{outcome}}"),
            "BEGIN to COMMIT, ROLLBACK or close, by outcome.",
            log=True,
        ),
        Panel(
            "Statements by operation",
            "ops",
            (
                Query(
                    f"sum by (pool, operation) (rate(sqlalchemy_statement_seconds_count{{{POOL}}}[{RATE}]))",
                    "{{pool}} {{operation}}",
                ),
            ),
            "Statements executed per second by operation.",
        ),
        Panel(
            "Statement time by operation (p50/p95/p99)",
            "s",
            quantiles("sqlalchemy_statement_seconds", "pool, operation", "{{pool}} {{operation}}"),
            "Statement execution time by operation.",
            log=True,
        ),
        Panel(
            "Savepoints and session scopes",
            "ops",
            (
                Query(
                    f"sum by (pool, outcome) (rate(sqlalchemy_savepoints_total{{{POOL}}}[{RATE}]))",
                    "{{pool}} savepoint {{outcome}}",
                ),
                Query(
                    f"sum by (pool, outcome) (rate(sqlalchemy_session_scopes_total{{{POOL}}}[{RATE}]))",
                    "{{pool}} session {{outcome}}",
                ),
            ),
            "Savepoints released or rolled back; session_scope / session_dependency exits by outcome.",
        ),
    ),
)

SERVER = Row(
    "PostgreSQL server view (sidecar probe)",
    (
        Panel(
            "Server connections by state",
            "short",
            (Query(f"sum by (datname, state) ({PG_CONNECTIONS}{{{TARGET}}})", "{{datname}} {{state}}"),),
            "pg_stat_activity by database and state: 'idle in transaction' piling up is a leak the app may not see.",
        ),
        Panel(
            "Server connections by application",
            "short",
            (Query(f"sum by (application_name) ({PG_CONNECTIONS}{{{TARGET}}})", "{{application_name}}"),),
            "pg_stat_activity by application_name: who holds the server's connections, instrumented or not.",
        ),
        Panel(
            "max_connections headroom",
            "short",
            (
                Query(
                    f"max by (instance) ({PG_MAX_CONNECTIONS}{{{TARGET}}})"
                    f" - sum by (instance) ({PG_CONNECTIONS}{{{TARGET}}})",
                    "headroom",
                ),
                Query(f"max by (instance) ({PG_MAX_CONNECTIONS}{{{TARGET}}})", "max_connections"),
            ),
            "Connections the server can still accept before 'too many clients'.",
            reference=("max_connections",),
        ),
        Panel(
            "Oldest open transaction",
            "s",
            (Query(f"max by (datname) ({PG_OLDEST_XACT}{{{TARGET}}})", "{{datname}}"),),
            "Age of the oldest open transaction per database (it holds locks and blocks vacuum).",
            w=16,
        ),
        Panel(
            "Probe up",
            "bool_yes_no",
            (Query(f"min by (instance) ({PG_UP}{{{TARGET}}})", "{{instance}}"),),
            "1 when the sidecar's last pg_stat_activity probe succeeded.",
            kind="stat",
            w=8,
            max=1,
            thresholds=((0, "red"), (1, "green")),
        ),
    ),
)

# What the database sees of each holder's connections (instrumentation/serverview.py): series exist while
# instrument(server_view=True) polls; holder="(pool)" is the pool's idle connections.
DATABASE_SEES = Row(
    "What the database sees",
    (
        Panel(
            "Connections by holder and server state",
            "short",
            (
                Query(
                    f"sum by (pool, holder, state) (sqlalchemy_pool_holder_server_connections{{{HOLDER}}})",
                    "{{holder}}: {{state}} ({{pool}})",
                ),
            ),
            "Each holder's connections by what the server says they do (pg_stat_activity.state): 'idle in "
            "transaction' is a route that holds a transaction open while it waits on something else.",
            w=12,
            stacked=True,
        ),
        Panel(
            "Idle in transaction, longest by holder",
            "s",
            (
                Query(
                    f"max by (pool, holder) (sqlalchemy_pool_holder_idle_in_transaction_seconds{{{HOLDER}}})",
                    "{{holder}} ({{pool}})",
                ),
            ),
            "Longest time one of the holder's connections has sat idle with a transaction open (it keeps its "
            "locks and its connection meanwhile); the alert fires past 30 s.",
            w=12,
            thresholds=((0, "green"), (30, "red")),
        ),
        Panel(
            "Blocking others, by holder",
            "short",
            (
                Query(
                    f"sum by (pool, holder) (sqlalchemy_pool_holder_blocking_connections{{{HOLDER}}})",
                    "{{holder}} ({{pool}})",
                ),
            ),
            "Backends (any application's) waiting on a lock this holder's connections hold.",
        ),
        Panel(
            "Waiting on a lock, by holder",
            "short",
            (
                Query(
                    f"sum by (pool, holder) (sqlalchemy_pool_holder_lock_waiting_connections{{{HOLDER}}})",
                    "{{holder}} ({{pool}})",
                ),
            ),
            "This holder's connections waiting on a lock: /pools names the pid and holder that blocks each.",
        ),
        Panel(
            "Oldest transaction by holder",
            "s",
            (
                Query(
                    f"max by (pool, holder) (sqlalchemy_pool_holder_oldest_transaction_seconds{{{HOLDER}}})",
                    "{{holder}} ({{pool}})",
                ),
            ),
            "Age of the oldest open transaction among the holder's connections, from the server's xact_start.",
        ),
    ),
)

ROWS: tuple[Row, ...] = (STATS, SATURATION, SIZING, HOLDERS, DATABASE_SEES, LATENCY, ERRORS, TRANSACTIONS, SERVER)


def _variables() -> list[Any]:
    def query_var(name: str, label: str, query: str, multi: bool) -> db.QueryVariable:
        var = (
            db.QueryVariable(name)
            .label(label)
            .datasource(DATASOURCE)
            .query({"query": query, "refId": f"{name}-variable"})
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
        )
        if multi:
            var = var.multi(True).include_all(True).all_value(".*")
        return var

    return [
        db.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        query_var("job", "Job", "label_values(sqlalchemy_exporter_build_info, job)", multi=False),
        query_var(
            "instance", "Instance", 'label_values(sqlalchemy_exporter_build_info{job=~"$job"}, instance)', multi=True
        ),
        query_var(
            "pool", "Pool", 'label_values(sqlalchemy_pool_connections{job=~"$job", instance=~"$instance"}, pool)', True
        ),
        query_var("holder", "Holder", f"label_values(sqlalchemy_pool_holder_connections{{{POOL}}}, holder)", True),
    ]


def _thresholds(steps: tuple[tuple[float, str], ...]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=None if i == 0 else v, color=c) for i, (v, c) in enumerate(steps)])
    )


def _panel(spec: Panel, panel_id: int) -> Any:
    builder: Any = timeseries.Panel() if spec.kind == "timeseries" else stat.Panel()
    builder = (
        builder.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .span(spec.w)
        .height(spec.h)
    )
    if spec.min is not None and not spec.log:  # a log axis cannot start at 0
        builder = builder.min(spec.min)
    if spec.max is not None:
        builder = builder.max(spec.max)
    if spec.thresholds:
        builder = builder.thresholds(_thresholds(spec.thresholds))
    for i, q in enumerate(spec.queries):
        target = prom.Dataquery().datasource(DATASOURCE).expr(q.expr).legend_format(q.legend).ref_id(chr(ord("A") + i))
        builder = builder.with_target(target.instant() if spec.kind == "stat" else target.range())
    if spec.kind == "stat":
        return (
            builder.color_mode(common.BigValueColorMode.BACKGROUND)
            .graph_mode(common.BigValueGraphMode.NONE)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
    builder = builder.legend(
        cb.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["mean", "max", "lastNotNull"])
    ).tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    builder = builder.fill_opacity(10).line_width(1).show_points(common.VisibilityMode.NEVER)
    if spec.bars:
        builder = builder.draw_style(common.GraphDrawStyle.BARS).fill_opacity(60)
    if spec.stacked:
        builder = builder.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(60)
    if spec.log:
        builder = builder.scale_distribution(cb.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10))
    if spec.thresholds:
        builder = builder.thresholds_style(cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
    for suffix in spec.reference:
        builder = builder.override_by_regexp(
            f".*{suffix}$",
            [
                dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
                dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
                dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
            ],
        )
    return builder


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    dashboard = (
        db.Dashboard(TITLE)
        .uid(UID)
        .description("SQLAlchemy pool saturation, waits, leaks, errors and transactions (sqlalchemy-pool-exporter).")
        .tags(["sqlalchemy", "database", "connection-pool", "postgresql"])
        .editable()
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
    )
    for var in _variables():
        dashboard = dashboard.with_variable(var)
    panel_id = 0
    for row in ROWS:
        panel_id += 1
        dashboard = dashboard.with_row(db.Row(row.title).id(panel_id))
        for spec in row.panels:
            panel_id += 1
            dashboard = dashboard.with_panel(_panel(spec, panel_id))
    encoded: dict[str, Any] = json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))
    return encoded


def render() -> str:
    """The exact text of the checked-in JSON file."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in JSON is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run `python -m dashboards.dashboard`", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
