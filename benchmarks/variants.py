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

from sqlalchemy_pool_exporter import Exporter, holder, holders

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


def _ours_pool_only(engine: Engine) -> None:
    """Exporter.instrument() without transaction and statement metrics: pool events only."""
    Exporter(CollectorRegistry()).instrument(engine, name=f"bench{next(_names)}", statements=False, transactions=False)


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
    Variant("ours_pool", "sqlalchemy-pool-exporter, statements=False, transactions=False", _ours_pool_only),
    Variant("ours_holders", "sqlalchemy-pool-exporter, all metrics, holder attribution on", _ours, holder="bench"),
    Variant("hand", "hand-written prometheus_client (gauge + histogram)", _handwritten),
    Variant("otel", "OpenTelemetry SQLAlchemy, metrics", lambda e: _otel(e, tracing=False)),
    Variant("otel_trace", "OpenTelemetry SQLAlchemy, metrics + tracing", lambda e: _otel(e, tracing=True)),
)
BY_NAME = {v.name: v for v in VARIANTS}


def otel_available() -> bool:
    try:
        import opentelemetry.instrumentation.sqlalchemy
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        return False
    return True


def selected(names: list[str] | None = None) -> list[Variant]:
    """The variants to run: all by default, without OpenTelemetry when the `bench` extra is missing."""
    chosen = [BY_NAME[n] for n in names] if names else list(VARIANTS)
    if not otel_available():
        chosen = [v for v in chosen if not v.name.startswith("otel")]
    return chosen
