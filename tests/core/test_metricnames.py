"""names="semconv": the semantic conventions' metrics as the OpenTelemetry→Prometheus translation spells them."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout

from sqlalchemy_pool_exporter import Exporter, catalog, metricnames, validation
from sqlalchemy_pool_exporter.exposition.render import Exposition
from sqlalchemy_pool_exporter.metricnames import db_system, otel_name, prometheus_label, prometheus_name, view

from ..conftest import PgEngineFactory, orders_sqlite

# The pool metrics of semantic conventions 1.44.0 (model/db/metrics.yaml): name -> (instrument, unit),
# and the Prometheus name the translation gives each.
SEMCONV_1_44 = {
    "db.client.connection.count": ("updowncounter", "{connection}", "db_client_connection_count"),
    "db.client.connection.max": ("updowncounter", "{connection}", "db_client_connection_max"),
    "db.client.connection.idle.max": ("updowncounter", "{connection}", "db_client_connection_idle_max"),
    "db.client.connection.pending_requests": (
        "updowncounter",
        "{request}",
        "db_client_connection_pending_requests",
    ),
    "db.client.connection.timeouts": ("counter", "{timeout}", "db_client_connection_timeouts_total"),
    "db.client.connection.create_time": ("histogram", "s", "db_client_connection_create_time_seconds"),
    "db.client.connection.wait_time": ("histogram", "s", "db_client_connection_wait_time_seconds"),
    "db.client.connection.use_time": ("histogram", "s", "db_client_connection_use_time_seconds"),
    "db.client.operation.duration": ("histogram", "s", "db_client_operation_duration_seconds"),
}


def test_the_catalog_follows_semconv_1_44() -> None:
    assert catalog.SEMCONV_VERSION == "1.44.0"
    mapped = {spec.semconv.name: spec for spec in catalog.CATALOG if spec.semconv is not None}
    # db.client.connection.idle.min is the one left out: SQLAlchemy's pools keep no minimum.
    assert set(mapped) == set(SEMCONV_1_44)
    semconv = view(names="semconv")
    for name, (instrument, unit, prometheus) in SEMCONV_1_44.items():
        spec = mapped[name]
        assert (spec.semconv.instrument, spec.semconv.unit) == (instrument, unit), name  # type: ignore[union-attr]
        assert prometheus_name(name, unit, instrument) == prometheus == semconv.by_key[spec.key].name


def test_translation_rules() -> None:
    assert prometheus_name("system.filesystem.usage", "By", "updowncounter") == "system_filesystem_usage_bytes"
    assert prometheus_name("system.network.dropped", "{packets}", "counter") == "system_network_dropped_total"
    assert prometheus_name("system.memory.utilization", "1", "gauge") == "system_memory_utilization_ratio"
    assert prometheus_name("http.server.request.duration", "s", "histogram") == "http_server_request_duration_seconds"
    assert prometheus_name("app.wait_seconds", "s", "histogram") == "app_wait_seconds"  # the unit is there already
    assert prometheus_name("app.requests_total", "{request}", "counter") == "app_requests_total"
    assert prometheus_label("db.client.connection.pool.name") == "db_client_connection_pool_name"
    with pytest.raises(ValueError, match="unit"):
        prometheus_name("x", "km/h", "gauge")


@pytest.mark.parametrize("namespace", ["sqlalchemy", "app_db", ""])
def test_our_own_metrics_translate_back_to_our_names(namespace: str) -> None:
    """The OTLP bridge's names for our other metrics become, through a Collector, exactly our names."""
    for spec in catalog.CATALOG:
        if spec.semconv is None:
            kind = {"gauge": "gauge", "counter": "counter", "histogram": "histogram"}[spec.kind]
            assert prometheus_name(otel_name(spec, namespace), spec.unit, kind) == spec.name(namespace)  # type: ignore[arg-type]


def test_labels_and_namespace_under_each_naming() -> None:
    ours, semconv = view("app_db", "default"), view("app_db", "semconv")
    assert (ours.by_key["connections"].name, ours.by_key["connections"].labelnames) == (
        "app_db_pool_connections",
        ("pool", "state"),
    )
    assert (semconv.by_key["connections"].name, semconv.by_key["connections"].labelnames) == (
        "db_client_connection_count",
        ("db_client_connection_pool_name", "db_client_connection_state"),
    )
    # The namespace stays on our own names; the pool label is the conventions' everywhere.
    assert semconv.by_key["checkouts"].name == "app_db_pool_checkouts_total"
    assert semconv.by_key["connect_errors"].labelnames == ("db_client_connection_pool_name", "error_type")
    assert semconv.by_key["transactions"].labelnames == ("db_client_connection_pool_name", "outcome")
    assert semconv.by_key["build_info"].labelnames == ("version",)
    duration = semconv.by_key["statement_seconds"]
    assert duration.labelnames == ("db_client_connection_pool_name", "db_system_name", "db_operation_name")
    assert semconv.labels(duration, "p", "postgresql", ("select",)) == ("p", "postgresql", "SELECT")
    assert semconv.labels(duration, "p", "postgresql", ("other",)) == ("p", "postgresql", "")
    assert ours.labels(ours.by_key["statement_seconds"], "p", "postgresql", ("other",)) == ("p", "other")
    assert semconv.attributes(duration, "p", "sqlite", ("other",)) == {
        "db.client.connection.pool.name": "p",
        "db.system.name": "sqlite",
    }


def test_db_system_names() -> None:
    assert [db_system(n) for n in ("postgresql", "sqlite", "mysql", "mariadb", "mssql", "oracle", "snowflake")] == [
        "postgresql",
        "sqlite",
        "mysql",
        "mariadb",
        "microsoft.sql_server",
        "oracle.db",
        "other_sql",
    ]


def test_names_are_validated_and_semconv_takes_its_statement_buckets() -> None:
    with pytest.raises(ValueError, match="names must be one of default, semconv, got 'otel'"):
        validation.names("otel")
    with pytest.raises(ValueError, match="names must be one of"):
        Exporter(CollectorRegistry(), names="Semconv")  # type: ignore[arg-type]
    exporter = Exporter(CollectorRegistry(), names="semconv")
    assert exporter.buckets["statement"] == (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
    assert exporter.buckets["wait"] == catalog.WAIT_BUCKETS
    chosen = Exporter(CollectorRegistry(), names="semconv", buckets={"statement": [0.01, 1]})
    assert chosen.buckets["statement"] == (0.01, 1.0)
    assert Exporter(CollectorRegistry()).buckets["statement"] == catalog.STATEMENT_BUCKETS


def test_one_semconv_exporter_per_registry() -> None:
    registry = CollectorRegistry()
    Exporter(registry, names="semconv")
    with pytest.raises(ValueError, match="one Exporter with names='semconv' per registry"):
        Exporter(registry, namespace="other", names="semconv")
    # Ours and the conventions' share our own names (checkouts, build_info…): not in one registry either.
    with pytest.raises(ValueError, match="pass namespace="):
        Exporter(registry)
    Exporter(registry, namespace="other")


def test_sqlite_pool_under_semconv_names(sync_engines: list[Engine], tmp_path: Path) -> None:
    registry = CollectorRegistry()
    exporter = Exporter(registry, names="semconv")
    engine = orders_sqlite(exporter, sync_engines, tmp_path / "a.db")
    held = [engine.connect(), engine.connect(), engine.connect()]
    with pytest.raises(PoolTimeout):
        engine.connect()

    pool = {"db_client_connection_pool_name": "orders"}

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {**pool, **labels})

    assert value("db_client_connection_count", db_client_connection_state="used") == 3
    assert value("db_client_connection_count", db_client_connection_state="idle") == 0
    assert value("db_client_connection_max") == 3
    assert value("db_client_connection_idle_max") == 2
    assert value("db_client_connection_timeouts_total") == 1
    assert value("db_client_connection_wait_time_seconds_count") == 1 + 7 + 3
    assert value("db_client_connection_create_time_seconds_count") == 3
    op = {"db_system_name": "sqlite"}
    assert value("db_client_operation_duration_seconds_count", db_operation_name="INSERT", **op) == 7
    assert value("db_client_operation_duration_seconds_count", db_operation_name="", **op) == 1  # CREATE TABLE
    assert value("sqlalchemy_transactions_total", outcome="commit") == 1 + 7
    assert value("sqlalchemy_pool_overflow_connections") == 1
    assert registry.get_sample_value("db_client_connection_idle_min", pool) is None
    for conn in held:
        conn.close()
    assert value("db_client_connection_count", db_client_connection_state="idle") == 2
    # The fast /metrics writes what prometheus_client writes, under these names too.
    assert Exposition(registry, [exporter.collector]).render(generate_latest) == generate_latest(registry)
    exporter.close()


@pytest.mark.postgres
async def test_asyncpg_pool_under_semconv_names(pg_engine: PgEngineFactory) -> None:
    registry = CollectorRegistry()
    exporter = Exporter(registry, names="semconv", namespace="app_db")
    engine, _ = pg_engine(pool_size=2, max_overflow=1, pool_timeout=0.05)
    exporter.instrument(engine, name="orders")
    for _ in range(7):
        async with engine.begin() as conn:
            await conn.execute(text("SELECT 1"))
    async with engine.connect() as conn:
        pool = {"db_client_connection_pool_name": "orders"}
        op = {"db_system_name": "postgresql", "db_operation_name": "SELECT"}
        assert (
            registry.get_sample_value("db_client_connection_count", {**pool, "db_client_connection_state": "used"}) == 1
        )
        assert registry.get_sample_value("db_client_operation_duration_seconds_count", {**pool, **op}) == 7
        assert registry.get_sample_value("app_db_transactions_total", {**pool, "outcome": "commit"}) == 7
        assert registry.get_sample_value("app_db_pool_checkouts_total", pool) == 8
    body = Exposition(registry, [exporter.collector]).render(generate_latest)
    assert body == generate_latest(registry)
    assert b"\npool=" not in body and b'{pool="' not in body
    assert metricnames.view("app_db", "semconv") is exporter.view
    exporter.close()
