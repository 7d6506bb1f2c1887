"""Goal 3: render /metrics for 20 instrumented pools, and the sidecar's merge of many workers' files."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from sqlalchemy import text
from sqlalchemy.engine import Engine

from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.exposition.render import Exposition

from .memory import sqlite_engine
from .variants import dropping_exporter, encode_otlp, otlp_available


def busy_engine(exporter: Exporter, name: str) -> Engine:
    """An instrumented engine whose every series exists: commits, rollbacks, all statement kinds."""
    engine = sqlite_engine()
    exporter.instrument(engine, name=name)
    busy_statements(engine)
    return engine


def busy_statements(engine: Engine) -> None:
    """Every statement kind, a commit and a rollback; run again alike."""
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
        conn.execute(text("UPDATE t SET x = 2"))
        conn.execute(text("SELECT x FROM t"))
        conn.execute(text("DELETE FROM t"))
        conn.commit()
        conn.execute(text("SELECT 1"))
        conn.rollback()


def one_transaction(engine: Engine) -> None:
    """One committed transaction, one SELECT: moves a pool's checkouts, wait, use, commit and select series."""
    with engine.begin() as conn:
        conn.execute(text("SELECT 1"))


def render(pools: int, repeat: int) -> dict[str, float]:
    """Median ms of what /metrics runs (text and OpenMetrics), and of bare generate_latest() for reference.

    The handler's Exposition is built once and reused, as the handler does; the renders are
    interleaved so machine noise hits them alike. The same pools again under names="semconv", and,
    with the `otel` extra, an OTLP collection of those (an SDK reader's collect(): our producer, the
    SDK, the OTLP protobuf encoding; no network).
    """
    registry = CollectorRegistry()
    exporter = Exporter(registry)
    engines = [busy_engine(exporter, f"db{i}") for i in range(pools)]
    exposition = Exposition(registry, [exporter.collector])
    semconv_registry = CollectorRegistry()
    semconv = Exporter(semconv_registry, names="semconv")
    engines += [busy_engine(semconv, f"db{i}") for i in range(pools)]
    semconv_exposition = Exposition(semconv_registry, [semconv.collector])
    runs: dict[str, Callable[[], object]] = {
        "ms": lambda: exposition.render(generate_latest),
        "openmetrics_ms": lambda: exposition.render(openmetrics.generate_latest),
        "generate_latest_ms": lambda: generate_latest(registry),
        "semconv_ms": lambda: semconv_exposition.render(generate_latest),
    }
    provider = None
    if otlp_available():
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from sqlalchemy_pool_exporter import otel

        reader = PeriodicExportingMetricReader(dropping_exporter(), export_interval_millis=math.inf)
        provider = MeterProvider(metric_readers=[otel.attach(reader, otel.producer(semconv))])
        runs["otlp_ms"] = reader.collect
    times: dict[str, list[float]] = {key: [] for key in runs}
    for run in runs.values():  # warm: builds the handler's cached line starts
        run()
    for _ in range(repeat):
        for key, run in runs.items():
            t0 = perf_counter()
            run()
            times[key].append((perf_counter() - t0) * 1000)
    body = exposition.render(generate_latest)
    if body != generate_latest(registry):  # the fast path must write what prometheus_client writes
        raise AssertionError("Exposition.render() differs from generate_latest()")
    semconv_body = semconv_exposition.render(generate_latest)
    if semconv_body != generate_latest(semconv_registry):
        raise AssertionError("Exposition.render() differs from generate_latest() under names='semconv'")
    result = {key: statistics.median(values) for key, values in times.items()}
    if provider is not None:
        from sqlalchemy_pool_exporter import otel

        result["otlp_bytes"] = len(encode_otlp(otel.producer(semconv).produce()))
        provider.shutdown()
    exporter.close()
    semconv.close()
    for engine in engines:
        engine.dispose()
    return {**result, "lines": body.count(b"\n"), "bytes": len(body), "semconv_lines": semconv_body.count(b"\n")}


def sidecar(live: int, gone: int, repeat: int) -> dict[str, Any]:
    """Run the multiprocess half in a child: prometheus_client picks its file mode at import time."""
    return multiprocess_child("benchmarks.sidecar_child", live, gone, repeat)


def multiprocess_child(module: str, *args: int) -> dict[str, Any]:
    """`python -m module DIR *args` with PROMETHEUS_MULTIPROC_DIR=DIR, a fresh directory: its last line, as JSON."""
    with tempfile.TemporaryDirectory(prefix="bench-mp-") as tmp:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": tmp}
        root = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(root)) if p)
        out = subprocess.run(
            [sys.executable, "-m", module, tmp, *map(str, args)],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result
