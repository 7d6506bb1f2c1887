"""The instrumentations compared, each attached to its own engine so they can run interleaved in one process."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from sqlalchemy import event
from sqlalchemy.engine import Engine

from sqlalchemy_pool_exporter import LEAN_BUCKETS, Exporter, holder
from sqlalchemy_pool_exporter.instrumentation import holders

_names = itertools.count(1)


def _none(engine: Engine) -> None:
    """Uninstrumented."""


def _noop(engine: Engine) -> None:
    """No-op listeners on the events any event-based design needs: the floor."""

    def pool_listener(*args: Any) -> None:
        pass

    def conn_listener(*args: Any) -> None:
        pass

    for name in ("checkout", "checkin"):
        event.listen(engine, name, pool_listener)
    for name in ("begin", "commit", "rollback", "before_cursor_execute", "after_cursor_execute"):
        event.listen(engine, name, conn_listener)


def _handwritten(engine: Engine) -> None:
    """What people write by hand: an in-use gauge and a holding-time histogram on checkout/checkin."""
    registry = CollectorRegistry()
    in_use = Gauge("app_db_connections_in_use", "Connections checked out.", ["pool"], registry=registry)
    held = Histogram("app_db_connection_held_seconds", "Checkout to checkin.", ["pool"], registry=registry)
    # Children cached once: a `.labels()` call per event would cost another ~2 µs.
    gauge = in_use.labels("bench")
    hist = held.labels("bench")

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        gauge.inc()
        record.info["bench_checked_out_at"] = perf_counter()

    def on_checkin(dbapi_connection: Any, record: Any) -> None:
        gauge.dec()
        started = record.info.pop("bench_checked_out_at", None)
        if started is not None:
            hist.observe(perf_counter() - started)

    event.listen(engine, "checkout", on_checkout)
    event.listen(engine, "checkin", on_checkin)


def _ours(engine: Engine) -> None:
    """Exporter.instrument() with every default metric on, into a registry of its own."""
    Exporter(CollectorRegistry()).instrument(engine, name=f"bench{next(_names)}")


def _ours_semconv(engine: Engine) -> None:
    """names="semconv": the same hot path; only the names /metrics renders differ."""
    Exporter(CollectorRegistry(), names="semconv").instrument(engine, name=f"bench{next(_names)}")


# Kept alive for the whole run: a MeterProvider whose reader collects our pools every 60 s.
_providers: list[Any] = []


def _ours_otlp(engine: Engine) -> None:
    """names="semconv" plus the OTLP bridge: an SDK PeriodicExportingMetricReader at its default 60 s interval.

    Nothing of OpenTelemetry runs on the hot path, so the cycle and end-to-end rows show the same
    costs as `ours_semconv`; what a collection costs is section 3's "OTLP collection" row. The
    exporter drops the batch (no network in a benchmark); 60 s is longer than any measured window,
    so no collection falls inside one.
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from sqlalchemy_pool_exporter import otel

    exporter = Exporter(CollectorRegistry(), names="semconv")
    exporter.instrument(engine, name=f"bench{next(_names)}")
    reader = PeriodicExportingMetricReader(dropping_exporter(), export_interval_millis=60_000)
    _providers.append(MeterProvider(metric_readers=[otel.attach(reader, otel.producer(exporter))]))


def dropping_exporter() -> Any:
    """An SDK MetricExporter that encodes each batch as OTLP protobuf (the CPU of an export) and drops it."""
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    class _Dropping(MetricExporter):
        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
            encode_otlp(metrics_data)
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            pass

    return _Dropping()


def encode_otlp(metrics_data: Any) -> bytes:
    """The ExportMetricsServiceRequest bytes an OTLP exporter would send for `metrics_data`."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    return bytes(encode_metrics(metrics_data).SerializeToString())


def _ours_pool_only(engine: Engine) -> None:
    """Exporter.instrument() without transaction and statement metrics: pool events only."""
    Exporter(CollectorRegistry()).instrument(engine, name=f"bench{next(_names)}", statements=False, transactions=False)


def _ours_lean(engine: Engine) -> None:
    """The lean profile (README "Series budget"): LEAN_BUCKETS and no statement metrics; transactions on."""
    exporter = Exporter(CollectorRegistry(), buckets=LEAN_BUCKETS)
    exporter.instrument(engine, name=f"bench{next(_names)}", statements=False)


def _otel(engine: Engine, *, tracing: bool) -> None:
    """OpenTelemetry's SQLAlchemy instrumentation on this one engine, with the SDK's providers.

    SQLAlchemyInstrumentor().instrument() patches process-wide (create_engine and the Engine.connect
    class attribute) and, on SQLAlchemy 2.1, attaches nothing unless given skip_dep_check=True. So
    that the other variants in the same process stay uninstrumented, this builds what its
    `_instrument()` builds (tracer, meter, the db.client.connections.usage up-down counter, an
    EngineTracer with its seven listeners, the span around Engine.connect) for one engine only.
    """
    from opentelemetry import trace
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer, _wrap_connect
    from opentelemetry.instrumentation.sqlalchemy.version import __version__ as otel_version
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.semconv.metrics import MetricInstruments

    meter = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter(
        "opentelemetry.instrumentation.sqlalchemy", otel_version
    )
    usage = meter.create_up_down_counter(
        name=MetricInstruments.DB_CLIENT_CONNECTIONS_USAGE,
        unit="connections",
        description="The number of connections that are currently in state described by the state attribute.",
    )
    provider: trace.TracerProvider = TracerProvider() if tracing else trace.NoOpTracerProvider()
    tracer = provider.get_tracer("opentelemetry.instrumentation.sqlalchemy", otel_version)
    EngineTracer(tracer, engine, usage)  # type: ignore[no-untyped-call]
    wrapper = _wrap_connect(tracer)  # type: ignore[no-untyped-call]
    original = engine.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, engine, args, kwargs)

    engine.connect = connect  # type: ignore[method-assign]


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    attach: Callable[[Engine], None]
    holder: str | None = None  # the cycles run inside holder(this): attribution on


@contextmanager
def inside(variant: Variant) -> Iterator[None]:
    """Run a variant's cycles with holder attribution on (its holder set) or off, as the variant says.

    Attribution is process-wide once any holder is set, so it is switched back off around every
    other variant's cycles: interleaved variants in one process must not pay for each other.
    """
    holders.ATTRIBUTING[0] = False
    try:
        if variant.holder is None:
            yield
        else:
            with holder(variant.holder):
                yield
    finally:
        holders.ATTRIBUTING[0] = False


VARIANTS: tuple[Variant, ...] = (
    Variant("none", "none (bare SQLAlchemy)", _none),
    Variant("noop", "no-op listeners (floor)", _noop),
    Variant("ours", "**sqlalchemy-pool-exporter** (all metrics)", _ours),
    Variant("ours_semconv", 'sqlalchemy-pool-exporter, `names="semconv"`', _ours_semconv),
    Variant("ours_otlp", 'sqlalchemy-pool-exporter, `names="semconv"` + OTLP bridge (60 s reader)', _ours_otlp),
    Variant("ours_pool", "sqlalchemy-pool-exporter, statements=False, transactions=False", _ours_pool_only),
    Variant("ours_lean", "sqlalchemy-pool-exporter, lean profile (`LEAN_BUCKETS`, statements=False)", _ours_lean),
    Variant("ours_holders", "sqlalchemy-pool-exporter, all metrics, holder attribution on", _ours, holder="bench"),
    Variant("hand", "hand-written prometheus_client (gauge + histogram)", _handwritten),
    Variant("otel", "OpenTelemetry SQLAlchemy, metrics", lambda e: _otel(e, tracing=False)),
    Variant("otel_trace", "OpenTelemetry SQLAlchemy, metrics + tracing", lambda e: _otel(e, tracing=True)),
)
BY_NAME = {v.name: v for v in VARIANTS}


def otel_available() -> bool:
    """OpenTelemetry's SQLAlchemy instrumentation and SDK (the `bench` extra): the `otel*` rows."""
    try:
        import opentelemetry.instrumentation.sqlalchemy
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        return False
    return True


def otlp_available() -> bool:
    """Our `otel` extra (the SDK and its OTLP encoder): the `ours_otlp` row."""
    try:
        import opentelemetry.exporter.otlp.proto.common
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        return False
    return True


def selected(names: list[str] | None = None) -> list[Variant]:
    """The variants to run: all by default, without the OpenTelemetry ones whose packages are missing."""
    chosen = [BY_NAME[n] for n in names] if names else list(VARIANTS)
    if not otel_available():
        chosen = [v for v in chosen if not v.name.startswith("otel")]
    if not otlp_available():
        chosen = [v for v in chosen if v.name != "ours_otlp"]
    return chosen
