"""The per-pool views (/pools JSON, the / table, snapshot()), derived from the catalog.

In-process a row is built from the same samples the collector renders; in the sidecar, from the
merged metrics by reading the catalog's names back. Both go through `_put`, so a metric added to
the catalog with a `field` shows in every view, and a `column` adds it to the / table.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

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
    if reading is not None and reading.connects_to is not None:
        row["server"], row["database"], row["driver"] = reading.connects_to
    advice = reading.advice if reading is not None else None
    if advice is not None:
        row["advice"] = advice_fields(advice)
    row["sizing"] = sizing(row)
    row["checkouts_now"] = checkouts_now(source.stats)
    return row


def advice_fields(found: Any, *, sized: bool = True) -> dict[str, Any]:
    """A pool row's `advice`: the window's rate, mean hold and connections opened; with `sized`, also the
    offered load and advised size (the sidecar's rows take those from the merged gauges instead)."""
    fields = {"window_seconds": round(found.seconds, 3), "rate": found.rate, "mean_hold": found.mean_hold}
    if sized:
        fields["offered_load"] = found.offered_load
        fields["advised_size"] = found.advised_size
        fields["wait_probability"] = found.wait_probability
    fields["opened"] = found.opened
    return fields


def sizing(row: dict[str, Any]) -> str | None:
    """The advice in words, from a row's fields (in-process and in the sidecar); None without advice.

    In the sidecar `size` and `max` are the pod's sums over its `workers` and the advised size is the
    busiest worker's: the configuration per worker is the sum divided by the workers, when it divides.
    """
    advised, load = row.get("advised_size"), row.get("offered_load")
    # In the sidecar these come from files: anything but finite numbers says nothing.
    if not (isinstance(advised, int | float) and isinstance(load, int | float)):
        return None
    if not (math.isfinite(advised) and math.isfinite(load)):
        return None
    for key in ("size", "max", "workers"):
        value = row.get(key)
        if value is not None and not (isinstance(value, int) and value >= 0):
            return None
    advice = row.get("advice") or {}
    target = advice.get("wait_probability")
    odds = f"at most {target:.0%} of checkouts wait" if target is not None else "few checkouts wait"
    text = f"{load:.2f} connections busy on average"
    if "rate" in advice:
        text += (
            f" ({advice['rate']:.1f} checkouts/s x {advice['mean_hold'] * 1000:.0f} ms held,"
            f" over {advice['window_seconds']:.0f} s)"
        )
    n = int(advised)
    per = " per worker (the busiest)" if row.get("workers") else ""
    text += f": {n} connection{'' if n == 1 else 's'}{per} so that {odds} (Erlang C)."
    opened = advice.get("opened")
    churn = f" {opened} connection{' was' if opened == 1 else 's were'} opened in the window." if opened else ""
    size, most, workers = row.get("size"), row.get("max"), row.get("workers")
    if size is None:
        return text + churn
    if workers:
        if size % workers or (most is not None and most % workers):
            return text + f" Configured: pool_size {size} in all over {workers} workers.{churn}"
        size, most = size // workers, (most // workers if most is not None else None)
    overflow = f" + max_overflow {most - size}" if most is not None else " + unlimited overflow"
    text += f" Configured: pool_size {size}{overflow}{' per worker' if workers else ''}."
    if most is not None and advised > most:
        return text + f" Too small: callers wait; raise pool_size to {n}.{churn}"
    if advised > size:
        below = " pool_size is below the load: overflow connections open and close all day;"
        return text + f"{below} raise it to {n}.{churn}"
    return text + f" Enough.{churn}"


def budget(rows: list[dict[str, Any]], server: str, limit: int) -> dict[str, Any]:
    """This process's (or pod's) share of `server`'s connection limit: the max of every pool on it, added up."""
    on = [row for row in rows if row.get("server") == server]
    most = [row.get("max") for row in on]
    known = [m for m in most if isinstance(m, int)]
    total = sum(known)
    return {
        "server": server,
        "limit": limit,
        "pools": [row["name"] for row in on],
        "max_connections": total,
        "unlimited_pools": len(most) - len(known),  # pools with unlimited overflow: no bound to add up
        "share": total / limit if limit > 0 else None,
    }


def budget_table(rows: list[dict[str, Any]]) -> Table:
    """The server budget rows attach (the sidecar's, which sees the server)."""
    head = ("server", "server limit", "pools here", "their max connections", "share of the limit")
    seen = {}
    for row in rows:
        b = row.get("server_budget")
        if b is not None:
            seen[b["server"]] = (b["server"], b["limit"], len(b["pools"]), b["max_connections"], b["share"])
    return head, list(seen.values())


def sizing_table(rows: list[dict[str, Any]]) -> Table:
    """The advice of each pool that has some, with the numbers behind it."""
    head = ("pool", "checkouts/s", "mean hold (s)", "offered load", "advised size", "pool_size", "max",
            "opened in window", "advice")  # fmt: skip
    body = []
    for row in rows:
        if row.get("sizing") is None:
            continue
        advice = row.get("advice") or {}
        body.append(
            (
                row["name"],
                advice.get("rate"),
                advice.get("mean_hold"),
                row.get("offered_load"),
                row.get("advised_size"),
                row.get("size"),
                row.get("max"),
                advice.get("opened"),
                row["sizing"],
            )
        )
    return head, body


def checkouts_now(stats: PoolStats, top: int = CHECKOUTS_SHOWN) -> list[dict[str, Any]]:
    """The connections checked out now, oldest first: holder, age, whether a transaction is open, the
    stack that took it (when leak_threshold capture is on). In the sidecar: held_checkouts."""
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


class Held(Protocol):
    """One checkout a worker's checkouts file names (sidecar/checkouts.py's Held)."""

    @property
    def worker(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def holder(self) -> str: ...
    @property
    def age(self) -> float: ...
    @property
    def transaction(self) -> bool: ...


def held_checkouts(held: Iterable[Held], server: Any, top: int = CHECKOUTS_SHOWN) -> list[dict[str, Any]]:
    """checkouts_now's rows in the sidecar, from one pool's entries in the workers' checkouts files and the
    server join of the same poll: the same keys, plus the worker's pid. The files carry no stack and no
    client-side transaction start (transaction_age None: server_transaction_age is the server's), and
    `age` is as the worker wrote it at its last flush before the poll."""
    rows = []
    for h in sorted(held, key=lambda h: (-h.age, h.worker, h.pid))[:top]:
        row: dict[str, Any] = {
            "holder": h.holder,
            "age": round(h.age, 3),
            "in_transaction": h.transaction,
            "transaction_age": None,
            "stack": None,
            "backend_pid": h.pid,
            "worker": h.worker,
        }
        row.update(server_fields(server, h.pid))
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
    infos: dict[str, list[str]] = {}  # pool_info's name -> the pool label in each naming
    for names in NAMES:
        v = view(namespace, names)
        infos.setdefault(v.by_key["info"].name, []).append(v.pool_label)
        for family in v.families:
            spec = family.spec
            if spec.pool_label and spec.field is not None and spec.kind != "histogram":
                by_sample.setdefault(family.name, []).append((family, v.pool_label))
    rows: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        for s in metric.samples:
            label = next((p for p in infos.get(s.name, ()) if p in s.labels), None)
            if label is not None and s.value:
                # The server the pool connects to (a live worker's pool_info reads 1, a gone one's 0).
                info = rows.setdefault(s.labels[label], {"name": s.labels[label]})
                for key in ("server", "database", "driver"):
                    info[key] = s.labels.get(key, "")
                continue
            found = [(f, s.labels[label]) for f, label in by_sample.get(s.name, ()) if label in s.labels]
            if not found:
                continue
            family, pool = found[0]
            row = rows.setdefault(pool, {"name": pool})
            # No family with a field has db.system.name or mapped values: its labels follow the pool's.
            labels = tuple(s.labels.get(label, "") for label in family.labelnames[1:])
            value: float = int(s.value) if float(s.value).is_integer() else s.value
            _put(row, family.spec, labels, value)
    for row in rows.values():
        row["sizing"] = sizing(row)
    return [rows[name] for name in sorted(rows)]


def advice_counters(metrics: Iterable[Metric], namespace: str) -> dict[str, list[float]]:
    """[checkouts, seconds held, connections opened] per pool, from merged metrics in either naming.

    What the sidecar's own advice window samples (the pod's traffic, all workers summed).
    """
    # Our own metrics have the same name in both namings: the pool label tells which wrote a sample.
    wanted: dict[str, list[tuple[int, str]]] = {}
    for names in NAMES:
        v = view(namespace, names)
        for i, (key, suffix) in enumerate((("checkouts", ""), ("use", "_sum"), ("created", ""))):
            wanted.setdefault(v.by_key[key].name + suffix, []).append((i, v.pool_label))
    out: dict[str, list[float]] = {}
    for metric in metrics:
        for s in metric.samples:
            for i, label in wanted.get(s.name, ()):
                if label in s.labels:
                    out.setdefault(s.labels[label], [0.0, 0.0, 0.0])[i] += float(s.value)
                    break
    return out


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
    """The current checkouts of each pool, oldest first (in the sidecar, with a server view only)."""
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


def _finite(value: Any) -> Any:
    """`value` with every float that is not finite (NaN, ±Inf: a gauge a file says so) made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def strict_json(value: Any) -> str:
    """JSON as RFC 8259 has it (the /pools body of every server): bare NaN and Infinity, which strict
    parsers reject, are null."""
    return json.dumps(_finite(value), indent=2, default=str, allow_nan=False)
