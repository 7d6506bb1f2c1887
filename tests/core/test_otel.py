"""The OTLP bridge: our numbers in an OpenTelemetry SDK reader's collections, and over OTLP/HTTP to a receiver.

Real parts: real pools, the SDK's own MeterProvider, InMemoryMetricReader, PeriodicExportingMetricReader
and OTLP/HTTP exporter, and a local receiver decoding the protobuf request with opentelemetry-proto.
Skipped when the `otel` extra is not installed; the first test needs no extra at all.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

from sqlalchemy_pool_exporter import Exporter, __version__, catalog, metricnames

from ..conftest import PgEngineFactory, orders_sqlite

HAVE_SDK = importlib.util.find_spec("opentelemetry.sdk") is not None
needs_sdk = pytest.mark.skipif(not HAVE_SDK, reason="the otel extra is not installed")
POOL = "db.client.connection.pool.name"


def test_the_package_imports_without_the_extra_and_otel_says_which_extra() -> None:
    blocked = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'opentelemetry' or name.startswith('opentelemetry.'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import sqlalchemy_pool_exporter\n"
        "from sqlalchemy_pool_exporter import instrument, Exporter, metricnames\n"
        "try:\n"
        "    import sqlalchemy_pool_exporter.otel\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("pip install 'sqlalchemy-pool-exporter[otel]'\n"), done.stdout
    assert done.stdout.startswith("sqlalchemy_pool_exporter.otel needs OpenTelemetry's SDK")


# -- helpers ----------------------------------------------------------------------------------------


def by_name(data: Any) -> dict[str, Any]:
    """Our scope's metrics in a MetricsData, by name."""
    scopes = [s for rm in data.resource_metrics for s in rm.scope_metrics if s.scope.name == "sqlalchemy_pool_exporter"]
    assert len(scopes) == 1
    return {m.name: m for m in scopes[0].metrics}


def points(metric: Any) -> dict[tuple[tuple[str, Any], ...], Any]:
    return {tuple(sorted(p.attributes.items())): p for p in metric.data.data_points}


def point(metric: Any, **attributes: str) -> Any:
    return points(metric)[tuple(sorted(attributes.items()))]


@pytest.fixture
def reader_and_provider() -> Iterator[tuple[Any, Any, Exporter]]:
    """An Exporter (names="semconv", a registry of its own) attached to an InMemoryMetricReader of a MeterProvider."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource

    from sqlalchemy_pool_exporter import otel

    exporter = Exporter(CollectorRegistry(), names="semconv")
    resource = Resource.create({"service.name": "orders-api"})
    reader = otel.attach(InMemoryMetricReader(), otel.producer(exporter, resource=resource))
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    yield reader, provider, exporter
    provider.shutdown()
    otel.detach(reader)
    exporter.close()


# -- the in-memory reader ---------------------------------------------------------------------------


@needs_sdk
def test_in_memory_reader_gets_exact_numbers_of_a_sqlite_pool(
    reader_and_provider: tuple[Any, Any, Exporter], sync_engines: list[Engine], tmp_path: Path
) -> None:
    reader, _, exporter = reader_and_provider
    engine = orders_sqlite(exporter, sync_engines, tmp_path / "a.db")
    held = [engine.connect(), engine.connect(), engine.connect()]
    with pytest.raises(PoolTimeout):
        engine.connect()
    stats = exporter.handles()[0].stats

    data = reader.get_metrics_data()
    (resource_metrics,) = data.resource_metrics  # the SDK had no metrics of its own: ours alone
    assert resource_metrics.resource.attributes["service.name"] == "orders-api"
    (scope,) = resource_metrics.scope_metrics
    assert (scope.scope.name, scope.scope.version, scope.scope.schema_url) == (
        "sqlalchemy_pool_exporter",
        __version__,
        "https://opentelemetry.io/schemas/1.44.0",
    )
    m = by_name(data)
    count = m["db.client.connection.count"]
    assert (count.unit, count.data.is_monotonic) == ("{connection}", False)
    assert point(count, **{POOL: "orders", "db.client.connection.state": "used"}).value == 3
    assert point(count, **{POOL: "orders", "db.client.connection.state": "idle"}).value == 0
    assert point(m["db.client.connection.max"], **{POOL: "orders"}).value == 3
    assert point(m["db.client.connection.idle.max"], **{POOL: "orders"}).value == 2
    assert point(m["db.client.connection.pending_requests"], **{POOL: "orders"}).value == 0
    assert "db.client.connection.idle.min" not in m  # SQLAlchemy's pools keep no minimum
    timeouts = m["db.client.connection.timeouts"]
    assert (timeouts.unit, timeouts.data.is_monotonic) == ("{timeout}", True)
    assert point(timeouts, **{POOL: "orders"}).value == 1
    commits = point(m["sqlalchemy.transactions"], **{POOL: "orders", "outcome": "commit"})
    assert commits.value == 1 + 7
    assert commits.start_time_unix_nano == stats.started_ns
    assert point(m["sqlalchemy.pool_checkouts"], **{POOL: "orders"}).value == 1 + 7 + 3
    overflow = m["sqlalchemy.pool_overflow_connections"]
    assert type(overflow.data).__name__ == "Gauge" and point(overflow, **{POOL: "orders"}).value == 1
    for name, hist in (
        ("db.client.connection.wait_time", stats.wait),
        ("db.client.connection.use_time", stats.use),
        ("db.client.connection.create_time", stats.create),
    ):
        p = point(m[name], **{POOL: "orders"})
        assert m[name].unit == "s"
        assert (p.count, list(p.bucket_counts), list(p.explicit_bounds), p.sum) == (
            hist.count,
            hist.counts,
            list(hist.bounds),
            hist.sum,
        ), name
    assert point(m["db.client.connection.wait_time"], **{POOL: "orders"}).count == 1 + 7 + 3
    duration = m["db.client.operation.duration"]
    inserts = point(duration, **{POOL: "orders", "db.system.name": "sqlite", "db.operation.name": "INSERT"})
    assert inserts.count == 7 and list(inserts.bucket_counts) == stats.statement["insert"].counts
    assert list(inserts.explicit_bounds) == list(catalog.SEMCONV_BUCKETS["statement"])
    # CREATE TABLE is no SELECT/INSERT/UPDATE/DELETE: no db.operation.name at all.
    assert point(duration, **{POOL: "orders", "db.system.name": "sqlite"}).count == 1
    assert all(type(x.data).__name__ != "Sum" or x.data.aggregation_temporality == 2 for x in m.values())

    for conn in held:
        conn.close()
    with engine.begin() as conn:
        conn.execute(text("SELECT 1"))
    again = by_name(reader.get_metrics_data())  # cumulative: the same start, counts that only grew
    commits2 = point(again["sqlalchemy.transactions"], **{POOL: "orders", "outcome": "commit"})
    assert (commits2.value, commits2.start_time_unix_nano) == (1 + 7 + 1, stats.started_ns)
    assert (
        point(again["db.client.connection.count"], **{POOL: "orders", "db.client.connection.state": "idle"}).value == 2
    )


@needs_sdk
def test_our_metrics_join_the_sdks_own_batch(
    reader_and_provider: tuple[Any, Any, Exporter], sync_engines: list[Engine], tmp_path: Path
) -> None:
    """With metrics of the app's own, one resource carries both scopes: the app's and ours."""
    reader, provider, exporter = reader_and_provider
    orders_sqlite(exporter, sync_engines, tmp_path / "a.db")
    provider.get_meter("orders.app").create_counter("orders.placed").add(5)
    data = reader.get_metrics_data()
    (resource_metrics,) = data.resource_metrics
    assert resource_metrics.resource.attributes["service.name"] == "orders-api"
    assert [s.scope.name for s in resource_metrics.scope_metrics] == ["orders.app", "sqlalchemy_pool_exporter"]
    assert point(by_name(data)["db.client.connection.timeouts"], **{POOL: "orders"}).value == 0


@needs_sdk
def test_attach_once_detach_and_no_pools(sync_engines: list[Engine], tmp_path: Path) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from sqlalchemy_pool_exporter import otel

    exporter = Exporter(CollectorRegistry())
    producer = otel.producer(exporter)
    reader = otel.attach(InMemoryMetricReader(), producer)
    provider = MeterProvider(metric_readers=[reader])
    try:
        with pytest.raises(ValueError, match="already has a PoolMetricProducer"):
            otel.attach(reader, producer)
        assert reader.get_metrics_data() is not None  # no pool yet: an empty batch, no error
        orders_sqlite(exporter, sync_engines, tmp_path / "a.db")
        assert "db.client.connection.count" in by_name(reader.get_metrics_data())
        otel.detach(reader)
        otel.detach(reader)  # idempotent
        assert reader.get_metrics_data() is None  # the SDK's own behaviour again: nothing to report
        # produce() alone: the specification's MetricProducer shape, one resource, our scope.
        (rm,) = producer.produce().resource_metrics
        assert [s.scope.name for s in rm.scope_metrics] == ["sqlalchemy_pool_exporter"]
    finally:
        provider.shutdown()
        exporter.close()


@needs_sdk
def test_a_pool_that_fails_to_read_is_counted_and_the_others_still_go(
    reader_and_provider: tuple[Any, Any, Exporter],
    sync_engines: list[Engine],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader, _, exporter = reader_and_provider
    orders_sqlite(exporter, sync_engines, tmp_path / "a.db")
    broken = create_engine(f"sqlite:///{tmp_path}/b.db", poolclass=QueuePool)
    sync_engines.append(broken)
    handle = exporter.instrument(broken, name="broken")

    def read() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(handle, "read", read)
    m = by_name(reader.get_metrics_data())
    assert {p.attributes[POOL] for p in m["db.client.connection.count"].data.data_points} == {"orders"}
    assert handle.stats.errors == 1


# -- OTLP and /metrics agree --------------------------------------------------------------------------


def translated(data: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Our OTLP metrics as the OpenTelemetry→Prometheus translation would write them: sample -> value."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for metric in by_name(data).values():
        kind = type(metric.data).__name__
        instrument = {"Gauge": "gauge", "Histogram": "histogram"}.get(kind) or (
            "counter" if metric.data.is_monotonic else "updowncounter"
        )
        name = metricnames.prometheus_name(metric.name, metric.unit, instrument)
        for p in metric.data.data_points:
            labels = {metricnames.prometheus_label(k): str(v) for k, v in p.attributes.items()}
            if instrument != "histogram":
                out[(name, tuple(sorted(labels.items())))] = p.value
                continue
            running = 0
            for le, n in zip([*p.explicit_bounds, math.inf], p.bucket_counts, strict=True):
                running += n
                bucket = {**labels, "le": "+Inf" if le == math.inf else repr(float(le))}
                out[(name + "_bucket", tuple(sorted(bucket.items())))] = running
            out[(name + "_count", tuple(sorted(labels.items())))] = p.count
            out[(name + "_sum", tuple(sorted(labels.items())))] = p.sum
    return out


def scraped(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name.endswith("_created") or s.name == "sqlalchemy_exporter_build_info":
                continue
            # Prometheus reads an empty label value as no label: so does the translation's output.
            labels = {k: v for k, v in s.labels.items() if v}
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


@needs_sdk
@pytest.mark.postgres
async def test_asyncpg_pool_over_otlp_equals_metrics_with_semconv_names(
    reader_and_provider: tuple[Any, Any, Exporter], pg_engine: PgEngineFactory
) -> None:
    """Every sample of /metrics with names="semconv" is what a Collector would make of our OTLP data."""
    reader, _, exporter = reader_and_provider
    engine, _ = pg_engine(pool_size=2, max_overflow=1, pool_timeout=0.05)
    exporter.instrument(engine, name="orders")
    for _ in range(7):
        async with engine.begin() as conn:
            await conn.execute(text("SELECT 1"))
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 2"))
        data = reader.get_metrics_data()
        ours = scraped(exporter.registry)
    otlp = translated(data)
    assert set(otlp) == set(ours)
    # The ages of the oldest checkout and waiter move between the two reads; every other value is equal.
    ages = ("sqlalchemy_pool_oldest_checkout_seconds", "sqlalchemy_pool_oldest_pending_seconds")
    assert {k: v for k, v in otlp.items() if k[0] not in ages} == {k: v for k, v in ours.items() if k[0] not in ages}
    pool = (("db_client_connection_pool_name", "orders"),)
    assert otlp[("sqlalchemy_transactions_total", (*pool, ("outcome", "commit")))] == 7
    assert otlp[("db_client_connection_count", (*pool, ("db_client_connection_state", "used")))] == 1
    assert otlp[("db_client_connection_count", (*pool, ("db_client_connection_state", "idle")))] == 0
    key = ("db_client_operation_duration_seconds_count", (("db_client_connection_pool_name", "orders"),
           ("db_operation_name", "SELECT"), ("db_system_name", "postgresql")))  # fmt: skip
    assert otlp[key] == 8


# -- OTLP/HTTP to a local receiver --------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[Any]]]:
    """An OTLP/HTTP metrics receiver on 127.0.0.1: decodes each ExportMetricsServiceRequest it gets."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
        ExportMetricsServiceResponse,
    )

    got: list[Any] = []

    async def export(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportMetricsServiceRequest()
        message.ParseFromString(await request.read())
        got.append(message)
        return web.Response(
            body=ExportMetricsServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    app = web.Application()
    app.router.add_post("/v1/metrics", export)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/v1/metrics", got
    await runner.cleanup()


@needs_sdk
async def test_otlp_http_exporter_to_a_local_receiver(
    receiver: tuple[str, list[Any]], sync_engines: list[Engine], tmp_path: Path
) -> None:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    from sqlalchemy_pool_exporter import otel

    url, got = receiver
    exporter = Exporter(CollectorRegistry(), names="semconv")
    engine = orders_sqlite(exporter, sync_engines, tmp_path / "a.db")
    resource = Resource.create({"service.name": "orders-api"})
    # No timer: the test decides when the reader collects (force_flush), so nothing depends on timing.
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=url), export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[otel.attach(reader, otel.producer(exporter, resource=resource))])
    try:
        assert await asyncio.to_thread(provider.force_flush)
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        assert await asyncio.to_thread(provider.force_flush)
    finally:
        await asyncio.to_thread(provider.shutdown)
        exporter.close()
    assert len(got) == 2  # one request per collection
    (rm,) = got[1].resource_metrics
    resource_attributes = {a.key: a.value.string_value for a in rm.resource.attributes}
    assert resource_attributes["service.name"] == "orders-api"
    (scope,) = rm.scope_metrics
    # (The scope's schema URL, set as the in-memory test shows, is sent by the OTLP encoder of recent SDKs only.)
    assert (scope.scope.name, scope.scope.version) == ("sqlalchemy_pool_exporter", __version__)
    metrics = {m.name: m for m in scope.metrics}

    def attrs(p: Any) -> dict[str, str]:
        return {a.key: a.value.string_value for a in p.attributes}

    count = {
        attrs(p)["db.client.connection.state"]: p.as_int for p in metrics["db.client.connection.count"].sum.data_points
    }
    assert count == {"used": 0, "idle": 1}
    assert metrics["db.client.connection.count"].sum.is_monotonic is False
    assert metrics["db.client.connection.count"].sum.aggregation_temporality == 2  # CUMULATIVE
    (timeouts,) = metrics["db.client.connection.timeouts"].sum.data_points
    assert (timeouts.as_int, metrics["db.client.connection.timeouts"].sum.is_monotonic) == (0, True)
    commits = [p.as_int for p in metrics["sqlalchemy.transactions"].sum.data_points if attrs(p)["outcome"] == "commit"]
    assert commits == [1 + 7 + 1]
    selects = [
        p for p in metrics["db.client.operation.duration"].histogram.data_points
        if attrs(p).get("db.operation.name") == "SELECT"
    ]  # fmt: skip
    assert [(p.count, attrs(p)["db.system.name"], p.HasField("min")) for p in selects] == [(1, "sqlite", False)]
    (wait,) = metrics["db.client.connection.wait_time"].histogram.data_points
    assert wait.count == 1 + 7 + 1 and sum(wait.bucket_counts) == wait.count
    assert metrics["db.client.connection.wait_time"].unit == "s"
    print(f"\nOTLP/HTTP request {len(got)} to {url}: {len(scope.metrics)} metrics; " + ", ".join(
        f"{name}={[p.as_int for p in metrics[name].sum.data_points]}"
        for name in ("db.client.connection.count", "db.client.connection.timeouts", "sqlalchemy.transactions")
    ) + f", db.client.connection.wait_time count={wait.count} buckets={list(wait.bucket_counts)}")  # fmt: skip
