"""Our numbers for an OpenTelemetry SDK reader, made when the reader collects: the OTLP path without Prometheus.

    pip install 'sqlalchemy-pool-exporter[otel]'

    reader = otel.attach(PeriodicExportingMetricReader(OTLPMetricExporter()), otel.producer(exporter))
    MeterProvider(metric_readers=[reader])

Nothing here runs on the hot path: the listeners keep counting plain integers (an SDK instrument's
record costs ~11 µs), and when the reader collects, `PoolMetricProducer.produce()` reads every pool's
stats and live reading, as /metrics does, into cumulative OpenTelemetry data: sums, gauges and
explicit-bucket histograms with our bounds. The SDK has no asynchronous histogram, so observable
instruments could not carry the wait/use/create/statement histograms; the specification's
MetricProducer could, and `produce()` has its shape, but the Python SDK's readers do not take one
yet: `attach()` hands them ours through compat.hook_metric_reader.

Names and attributes are the semantic conventions' (catalog.SEMCONV_VERSION) where they define the
metric (db.client.connection.count{db.client.connection.state, db.client.connection.pool.name}…);
our other metrics are `<namespace>.<name>` with UCUM units, named so that the OpenTelemetry→Prometheus
translation gives back exactly the names of /metrics with names="semconv" (metricnames.py). The
instrumentation scope is this package and its version, with the conventions' schema URL.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        f"sqlalchemy_pool_exporter.otel needs OpenTelemetry's SDK ({exc}): pip install 'sqlalchemy-pool-exporter[otel]'"
    ) from exc

from . import catalog, compat, core
from ._version import __version__
from .instrumentation import samples
from .logs import Throttle
from .metricnames import Family, View, view

if TYPE_CHECKING:
    from .instrumentation.reading import PoolSource

log = logging.getLogger("sqlalchemy_pool_exporter")

SCOPE = "sqlalchemy_pool_exporter"
CUMULATIVE = AggregationTemporality.CUMULATIVE
# Our histograms keep no minimum or maximum: OTLP's optional fields stay unset.
_UNSET: Any = None


class PoolMetricProducer:
    """Every pool of an Exporter (or of the default Exporters) as OpenTelemetry metric data, when asked.

    `produce()` is the specification's MetricProducer.Produce: a batch of cumulative metrics under
    `resource`. Through attach() our metrics join the SDK's own batch and its resource instead, and
    `resource` is used only when the SDK has none: give the MeterProvider's if you set one.
    """

    def __init__(self, exporter: core.Exporter | None = None, *, resource: Resource | None = None) -> None:
        self.exporter = exporter
        self.resource = resource if resource is not None else Resource.create()
        self.scope = InstrumentationScope(SCOPE, __version__, catalog.SEMCONV_SCHEMA_URL)
        self._throttle = Throttle()

    def exporters(self) -> list[core.Exporter]:
        return [self.exporter] if self.exporter is not None else core.default_exporters()

    def produce(self, timeout_millis: float = 10_000) -> MetricsData:
        """Our metrics as one batch: one ResourceMetrics with one ScopeMetrics."""
        scope = self.scope_metrics()
        return MetricsData([ResourceMetrics(self.resource, [scope] if scope.metrics else [], self.resource.schema_url)])

    def scope_metrics(self) -> ScopeMetrics:
        """Every pool's metrics now, under our instrumentation scope. Never raises: a pool that fails is counted."""
        now = time.time_ns()
        points: dict[str, tuple[Family, list[Any]]] = {}
        for exporter in self.exporters():
            # Always the conventions' names: this path has no earlier names of ours to stay compatible with.
            v = view(exporter.namespace, "semconv")
            for source in exporter.handles():
                try:
                    _add_pool(v, points, source, now)
                except Exception as exc:
                    source.fail("otel", exc)
        metrics = [_metric(family, found) for family, found in points.values()]
        return ScopeMetrics(self.scope, metrics, catalog.SEMCONV_SCHEMA_URL)

    def add_to(self, batch: MetricsData | None, timeout_millis: float = 10_000) -> MetricsData:
        """`batch` (the SDK's, possibly None) with our metrics added to its first resource's scopes."""
        try:
            ours = self.scope_metrics()
        except Exception as exc:  # never break the SDK's own export: a bug here loses our metrics only
            held = self._throttle.ready()
            if held is not None:
                log.warning("pool metrics left out of an OpenTelemetry collection: %s: %s%s",
                            type(exc).__name__, exc, self._throttle.note(held))  # fmt: skip
            return batch if batch is not None else MetricsData([])
        if not ours.metrics:
            return batch if batch is not None else MetricsData([])
        if batch is None or not batch.resource_metrics:
            return MetricsData([ResourceMetrics(self.resource, [ours], self.resource.schema_url)])
        first, *rest = batch.resource_metrics
        merged = ResourceMetrics(first.resource, [*first.scope_metrics, ours], first.schema_url)
        return MetricsData([merged, *rest])


def producer(exporter: core.Exporter | None = None, *, resource: Resource | None = None) -> PoolMetricProducer:
    """A producer of `exporter`'s pools (default: the module-level instrument()'s) for attach()."""
    return PoolMetricProducer(exporter, resource=resource)


_attached: weakref.WeakKeyDictionary[Any, Callable[[], None]] = weakref.WeakKeyDictionary()
_attached_lock = threading.Lock()


def attach(reader: Any, metrics: PoolMetricProducer) -> Any:
    """Add `metrics` to every collection of an SDK MetricReader (periodic, in-memory…); returns the reader.

    Register the reader with a MeterProvider as usual. Collections with no SDK metrics of their own
    still carry ours. One producer per reader: detach() first to change it.
    """
    with _attached_lock:
        if reader in _attached:
            raise ValueError("this reader already has a PoolMetricProducer: detach() it first")
        _attached[reader] = compat.hook_metric_reader(reader, metrics.add_to)
    return reader


def detach(reader: Any) -> None:
    """Undo attach(); a no-op for a reader without ours."""
    with _attached_lock:
        undo = _attached.pop(reader, None)
    if undo is not None:
        undo()


# -- data points --------------------------------------------------------------------------------------


def _add_pool(v: View, points: dict[str, tuple[Family, list[Any]]], source: PoolSource, now: int) -> None:
    reading = source.read()
    if reading is None:  # engine garbage-collected: its series go with it
        return
    pool, system, stats = source.name, source.db_system, source.stats
    start = stats.started_ns
    by_key = v.by_key

    def add(family: Family, point: Any) -> None:
        # By OpenTelemetry name: Exporters of other namespaces share the conventions' metrics.
        points.setdefault(family.otel, (family, []))[1].append(point)

    for key, labels, value in samples.gauges(reading):
        family = by_key[key]
        # Gauges have no start; up-down counters (the conventions' pool sizes) are cumulative sums.
        began = start if family.instrument == "updowncounter" else _UNSET
        add(family, NumberDataPoint(v.attributes(family, pool, system, labels), began, now, value))
    for key, labels, count in samples.counters(stats):
        family = by_key[key]
        add(family, NumberDataPoint(v.attributes(family, pool, system, labels), start, now, count))
    for key, labels, hist in samples.histograms(stats):
        family = by_key[key]
        counts, total = list(hist.counts), hist.sum  # one copy, as cumulative() takes it
        attributes = v.attributes(family, pool, system, labels)
        add(family, HistogramDataPoint(attributes, start, now, sum(counts), total, counts, hist.bounds, _UNSET, _UNSET))


def _metric(family: Family, points: Iterable[Any]) -> Metric:
    data: Any
    if family.instrument == "histogram":
        data = Histogram(list(points), CUMULATIVE)
    elif family.instrument == "gauge":
        data = Gauge(list(points))
    else:
        data = Sum(list(points), CUMULATIVE, is_monotonic=family.instrument == "counter")
    return Metric(family.otel, family.spec.help, family.unit, data)
