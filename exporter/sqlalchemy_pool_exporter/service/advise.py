"""`pool-exporter advise`: pool sizes and the fleet's connection budget, from a Prometheus server's history.

It reads, for a range (default 7d), each pool's busiest offered load (`sqlalchemy_pool_offered_load`, the
busiest advice window in the range), its workers (a sidecar's `sqlalchemy_exporter_sidecar_workers`),
what is configured and which server it uses, and each server's limit from a sidecar's server view. The
sizes come from Erlang C (erlang.py) for the busiest window, per worker. Prometheus' answers are
untrusted: bounded in size, checked in shape, non-finite numbers dropped.
"""

from __future__ import annotations

import base64
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..instrumentation import erlang

# Prometheus' answer to one query: more than this is not a pool exporter's.
MAX_ANSWER = 16 * 1024 * 1024
MAX_SERIES = 10_000
TIMEOUT = 30.0

Labels = tuple[tuple[str, str], ...]


class AdviseError(Exception):
    """Why no advice can be had: Prometheus unreachable, refusing the query, or without data."""


@dataclass
class PoolAdvice:
    job: str
    instance: str
    pool: str
    server: str | None
    workers: int
    peak_load: float  # the busiest advice window's offered load, all workers of the instance
    peak_load_per_worker: float
    pool_size: int | None  # configured, per worker
    max_overflow: int | None  # configured, per worker (None: unknown or unlimited)
    advised_pool_size: int
    advised_max_overflow: int
    verdict: str


@dataclass
class ServerBudget:
    server: str
    limit: int | None  # max_connections minus the reserved ones, from a server view; None: no view
    configured: int  # every pool's pool_size + max_overflow on it, all workers and instances (limited pools)
    advised: int  # the same with the advised sizes
    instances: list[str] = field(default_factory=list)
    verdict: str = ""


@dataclass
class Advice:
    prometheus: str
    range: str
    wait_probability: float
    pools: list[PoolAdvice]
    servers: list[ServerBudget]


Query = Callable[[str], list[tuple[dict[str, str], float]]]


def prometheus_query(url: str, until: float | None = None, timeout: float = TIMEOUT) -> Query:
    """An instant query against `url`'s /api/v1/query (at `until`, or now), its answer checked as untrusted input.

    User and password in the URL become basic auth; no message ever shows them.
    """
    parts = urllib.parse.urlsplit(url)
    base = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")
    headers = {}
    if parts.username is not None:
        user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def query(expr: str) -> list[tuple[dict[str, str], float]]:
        params = {"query": expr, **({"time": f"{until:.3f}"} if until is not None else {})}
        request = urllib.request.Request(base + "/api/v1/query?" + urllib.parse.urlencode(params), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                raw = resp.read(MAX_ANSWER + 1)
        except urllib.error.HTTPError as exc:
            raw = exc.read(MAX_ANSWER + 1)
            refused = _error_of(raw) or f"HTTP {exc.code}"
            raise AdviseError(f"Prometheus at {base} refused the query: {refused}") from None
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise AdviseError(f"cannot reach Prometheus at {base}: {reason}") from None
        if len(raw) > MAX_ANSWER:
            raise AdviseError(f"Prometheus at {base} answered more than {MAX_ANSWER} bytes")
        return _vector(raw, base)

    return query


def _error_of(raw: bytes) -> str | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return str(error)[:200] if error is not None else None


def _vector(raw: bytes, base: str) -> list[tuple[dict[str, str], float]]:
    try:
        body = json.loads(raw)
    except ValueError:
        raise AdviseError(f"{base} did not answer like Prometheus (not JSON)") from None
    if not isinstance(body, dict) or body.get("status") != "success":
        raise AdviseError(f"{base} did not answer like Prometheus: {_error_of(raw) or 'no success status'}")
    data = body.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise AdviseError(f"{base} did not answer like Prometheus (no instant vector)")
    out = []
    for item in data["result"][:MAX_SERIES]:
        if not isinstance(item, dict):
            continue
        labels, value = item.get("metric"), item.get("value")
        if not isinstance(labels, dict) or not isinstance(value, list) or len(value) != 2:
            continue
        try:
            number = float(value[1])
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out.append(({str(k): str(v) for k, v in labels.items()}, number))
    return out


def _key(labels: dict[str, str], *names: str) -> tuple[str, ...]:
    return tuple(labels.get(n, "") for n in names)


def advise(query: Query, prometheus: str, range_: str, wait_probability: float) -> Advice:
    """The advice for every pool Prometheus saw in `range_`; AdviseError when it saw none."""
    r = range_
    peak = query(f"max by (job, instance, pool) (max_over_time(sqlalchemy_pool_offered_load[{r}]))")
    if not peak:
        up = query("count(sqlalchemy_exporter_build_info)")
        raise AdviseError(
            f"Prometheus at {prometheus} has no sqlalchemy_pool_offered_load in the last {r}"
            + (
                " (the exporters it scrapes are older than the size advice, or saw no checkout)"
                if up
                else " (it scrapes no pool exporter)"
            )
        )
    workers = {
        _key(m, "job", "instance"): max(1, int(v))
        for m, v in query(f"max by (job, instance) (max_over_time(sqlalchemy_exporter_sidecar_workers[{r}]))")
    }
    size = {
        _key(m, "job", "instance", "pool"): v
        for m, v in query(f"max by (job, instance, pool) (last_over_time(sqlalchemy_pool_size[{r}]))")
    }
    most = {
        _key(m, "job", "instance", "pool"): v
        for m, v in query(f"max by (job, instance, pool) (last_over_time(sqlalchemy_pool_max_connections[{r}]))")
    }
    servers = {
        _key(m, "job", "instance", "pool"): m.get("server", "")
        for m, v in query(f"max by (job, instance, pool, server) (last_over_time(sqlalchemy_pool_info[{r}]))")
        if v
    }
    limits = {
        m.get("server", ""): int(v)
        for m, v in query(
            f"min by (server) ((last_over_time(sqlalchemy_server_max_connections[{r}])"
            f" - last_over_time(sqlalchemy_server_reserved_connections[{r}]))"
            f" * on (job, instance) group_left (server) last_over_time(sqlalchemy_server_info[{r}]))"
        )
    }
    pools = []
    for m, load in sorted(peak, key=lambda item: _key(item[0], "job", "instance", "pool")):
        key = _key(m, "job", "instance", "pool")
        n = workers.get(key[:2], 1)
        per_worker = max(0.0, load) / n
        pools.append(_pool(key, servers.get(key), n, load, per_worker, size.get(key), most.get(key), wait_probability))
    return Advice(prometheus, r, wait_probability, pools, _budgets(pools, limits))


def _per_worker(value: float | None, workers: int) -> int | None:
    return None if value is None else round(value / workers)


def _pool(
    key: tuple[str, ...],
    server: str | None,
    workers: int,
    load: float,
    per_worker: float,
    size: float | None,
    most: float | None,
    p: float,
) -> PoolAdvice:
    advised = erlang.advised_size(per_worker, p)
    # Bursts the busiest window averaged away: overflow up to the size that makes waiting ten times rarer.
    overflow = max(0, erlang.advised_size(per_worker, p / 10) - advised)
    configured_size = _per_worker(size, workers)
    configured_most = _per_worker(most, workers)
    configured_overflow = None
    if configured_most is not None and configured_size is not None:
        configured_overflow = configured_most - configured_size
    if configured_size is None:
        verdict = f"set pool_size={advised}, max_overflow={overflow}"
    elif configured_most is not None and configured_most < advised:
        verdict = f"too small: callers wait at the peak; set pool_size={advised}, max_overflow={overflow}"
    elif configured_size < advised:
        verdict = f"pool_size below the peak load: overflow churns; set pool_size={advised}"
    elif configured_size > 2 * advised + 2:
        verdict = f"more than needed: pool_size={advised} would do"
    else:
        verdict = "enough"
    return PoolAdvice(
        key[0], key[1], key[2], server or None, workers, load, per_worker, configured_size, configured_overflow,
        advised, overflow, verdict,
    )  # fmt: skip


def _budgets(pools: list[PoolAdvice], limits: dict[str, int]) -> list[ServerBudget]:
    by_server: dict[str, ServerBudget] = {}
    for p in pools:
        if p.server is None:
            continue
        b = by_server.setdefault(p.server, ServerBudget(p.server, limits.get(p.server), 0, 0))
        if p.pool_size is not None and p.max_overflow is not None:
            b.configured += p.workers * (p.pool_size + p.max_overflow)
        b.advised += p.workers * (p.advised_pool_size + p.advised_max_overflow)
        if p.instance not in b.instances:
            b.instances.append(p.instance)
    for b in by_server.values():
        if b.limit is None:
            b.verdict = "no server view of this server: run a sidecar with POOL_EXPORTER_DATABASE_URL on it"
        elif b.advised > b.limit:
            b.verdict = f"the advised sizes need {b.advised} of {b.limit}: use a connection pooler or fewer workers"
        elif b.configured > b.limit:
            b.verdict = f"configured {b.configured} > {b.limit}: a burst or a deploy can fail; the advised sizes fit"
        else:
            b.verdict = "fits"
    return [by_server[s] for s in sorted(by_server)]


def as_json(advice: Advice) -> str:
    return json.dumps(asdict(advice), indent=2)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    cells = [head, *(tuple(_cell(v) for v in row) for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def as_table(advice: Advice) -> str:
    lines = [
        f"Pool sizes for the busiest advice window of the last {advice.range} ({advice.prometheus}),"
        f" per worker, so that at most {advice.wait_probability:.1%} of checkouts wait (Erlang C):",
        "",
    ]
    head: tuple[str, ...] = ("instance", "pool", "workers", "peak load", "per worker", "pool_size", "max_overflow",
            "advised pool_size", "advised max_overflow", "")  # fmt: skip
    rows: list[tuple[Any, ...]] = [
        (f"{p.job}/{p.instance}", p.pool, p.workers, p.peak_load, p.peak_load_per_worker, p.pool_size,
         p.max_overflow, p.advised_pool_size, p.advised_max_overflow, p.verdict)
        for p in advice.pools
    ]  # fmt: skip
    lines += _table(head, rows)
    if advice.servers:
        lines += ["", "Connection budget per server (every pool on it, all workers and instances):", ""]
        head = ("server", "limit", "configured", "advised", "instances", "")
        rows = [(b.server, b.limit, b.configured, b.advised, len(b.instances), b.verdict) for b in advice.servers]
        lines += _table(head, rows)
    return "\n".join(lines) + "\n"
