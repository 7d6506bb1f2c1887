"""The per-pool views (/pools JSON, the / table, snapshot()), derived from the catalog.

In-process a row is built from the same samples the collector renders; in the sidecar, from the
merged metrics by reading the catalog's names back. Both go through `_put`, so a metric added to
the catalog with a `field` shows in every view, and a `column` adds it to the / table.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .. import catalog
from ..metricnames import NAMES, Family, view
from . import holders, samples

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .reading import PoolReading, PoolSource
    from .stats import PoolStats

# The / page and /pools list this many current checkouts per pool, the oldest first.
CHECKOUTS_SHOWN = 10

# The / table: columns that are not metrics, then every catalog metric with a `column`, in catalog order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "pool"),
    ("pool_class", "class"),
    *((state, state) for state in catalog.CONNECTION_STATES),
    *((spec.field, spec.column) for spec in catalog.CATALOG if spec.field is not None and spec.column is not None),
)


def _put(row: dict[str, Any], spec: catalog.MetricSpec, labels: samples.Labels, value: float) -> None:
    if spec.field is None:
        return
    if spec.flat and labels:
        row[labels[0]] = value
    elif labels:
        # One level per label: {holder: n}, or {holder: {state: n}} for two.
        target = row.setdefault(spec.field, {})
        for label in labels[:-1]:
            target = target.setdefault(label, {})
        target[labels[-1]] = value
    else:
        row[spec.field] = value


def pool_row(source: PoolSource, reading: PoolReading | None) -> dict[str, Any]:
    """One pool's row, in-process: its configuration, live reading and totals."""
    row: dict[str, Any] = {"name": source.name, "url": getattr(source, "url", None), "alive": reading is not None}
    if reading is not None:
        row["pool_class"] = reading.pool_class
        for key, labels, value in samples.gauges(reading):
            _put(row, catalog.BY_KEY[key], labels, value)
        # Gauges the pool class has no notion of are still keys of the row, as None.
        for spec in catalog.CATALOG:
            if spec.kind == "gauge" and spec.pool_label and spec.field is not None and not spec.labels:
                row.setdefault(spec.field, None)
        row.setdefault("idle", None)
    for key, labels, count in samples.counters(source.stats):
        _put(row, catalog.BY_KEY[key], labels, count)
    row["checkouts_now"] = checkouts_now(source.stats)
    return row


def checkouts_now(stats: PoolStats, top: int = CHECKOUTS_SHOWN) -> list[dict[str, Any]]:
    """The connections checked out now, oldest first: holder, age, whether a transaction is open, the
    stack that took it (when leak_threshold capture is on). In-process only: the files have no such list."""
    now = time.perf_counter()
    server = stats.server
    rows = []
    for record, entry in sorted(tuple(stats.checked_out.items()), key=lambda item: item[1][0])[:top]:
        started = stats.open_transactions.get(record)
        row = {
            "holder": entry[3].name if entry[3] is not None else holders.NONE,
            "age": round(now - entry[0], 3),
            "in_transaction": started is not None,
            "transaction_age": round(now - started, 3) if started is not None else None,
            "stack": "".join(entry[2].format()) if entry[2] is not None else None,
        }
        pid = stats.backend_pids.get(record)
        if pid is not None:
            row["backend_pid"] = pid
        if server is not None:
            row.update(server_fields(server, pid))
        rows.append(row)
    return rows


def server_fields(server: Any, pid: int | None) -> dict[str, Any]:
    """What the server view's last poll says of backend `pid` (serverview.ServerJoin): state, wait, ages,
    who blocks it. The statement text only when the poller was asked for it (server_view_queries)."""
    b = server.backends.get(pid) if pid is not None else None
    if b is None:
        return {"server_state": None}
    out: dict[str, Any] = {
        "server_state": b.state,
        "wait_event": f"{b.wait_event_type}:{b.wait_event}" if b.wait_event_type else None,
        "server_transaction_age": round(b.transaction_age, 3) if b.transaction_age is not None else None,
        "query_age": round(b.query_age, 3) if b.query_age is not None else None,
        "blocked_by": [{"pid": p, "holder": server.holder_of.get(p)} for p in b.blocked_by],
        "server_polled_at": server.at,
    }
    if b.query is not None:
        out["query"] = b.query
    return out


def pools_from_metrics(metrics: Iterable[Metric], namespace: str) -> list[dict[str, Any]]:
    """Rows rebuilt from merged multiprocess metrics (no URL, no pool class), by catalog name.

    Workers may write our names or the semantic conventions' (names="semconv"): both are read, so
    the sidecar needs no setting for it.
    """
    # Our own metrics have the same name in both: the pool label tells which naming wrote a sample.
    by_sample: dict[str, list[tuple[Family, str]]] = {}
    for names in NAMES:
        v = view(namespace, names)
        for family in v.families:
            spec = family.spec
            if spec.pool_label and spec.field is not None and spec.kind != "histogram":
                by_sample.setdefault(family.name, []).append((family, v.pool_label))
    rows: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        for s in metric.samples:
            found = [(f, s.labels[label]) for f, label in by_sample.get(s.name, ()) if label in s.labels]
            if not found:
                continue
            family, pool = found[0]
            row = rows.setdefault(pool, {"name": pool})
            # No family with a field has db.system.name or mapped values: its labels follow the pool's.
            labels = tuple(s.labels.get(label, "") for label in family.labelnames[1:])
            value: float = int(s.value) if float(s.value).is_integer() else s.value
            _put(row, family.spec, labels, value)
    return [rows[name] for name in sorted(rows)]


Table = tuple[tuple[str, ...], list[tuple[Any, ...]]]


def holder_table(rows: list[dict[str, Any]]) -> Table:
    """Who holds the pool, from the holder fields of each row (in-process and in the sidecar)."""
    head = ("pool", "holder", "held now", "checkouts", "mean hold (s)", "waited (s)", "timeouts", "held too long")
    body = []
    for row in rows:
        held = row.get("holder_connections") or {}
        checkouts = row.get("holder_checkouts") or {}
        hold = row.get("holder_hold_seconds") or {}
        for name in sorted(set(held) | set(checkouts), key=lambda n: (-held.get(n, 0), n)):
            n = checkouts.get(name, 0)
            body.append(
                (
                    row["name"],
                    name,
                    held.get(name, 0),
                    n,
                    hold.get(name, 0.0) / n if n else None,
                    (row.get("holder_wait_seconds") or {}).get(name, 0.0),
                    (row.get("holder_timeouts") or {}).get(name, 0),
                    (row.get("holder_held_too_long") or {}).get(name, 0),
                )
            )
    return head, body


def checkout_table(rows: list[dict[str, Any]]) -> Table:
    """The current checkouts of each pool, oldest first (in-process only)."""
    head: tuple[str, ...] = ("pool", "holder", "held (s)", "in transaction", "transaction (s)")
    server = any("server_state" in c for row in rows for c in row.get("checkouts_now") or ())
    if server:
        head += ("backend", "server state", "wait", "query (s)", "blocked by")
    body = []
    for row in rows:
        for c in row.get("checkouts_now") or ():
            line: tuple[Any, ...] = (
                row["name"], c["holder"], c["age"], "yes" if c["in_transaction"] else "no", c["transaction_age"],
            )  # fmt: skip
            if server:
                blocked = ", ".join(f"pid {b['pid']} ({b['holder'] or 'not ours'})" for b in c.get("blocked_by") or ())
                line += (c.get("backend_pid"), c.get("server_state"), c.get("wait_event"), c.get("query_age"), blocked)
            body.append(line)
    return head, body
