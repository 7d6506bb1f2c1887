"""The scrape-time collector of one Exporter: every pool's stats and live reading, from the catalog."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import catalog, samples
from ._version import __version__

if TYPE_CHECKING:
    from .reading import PoolReading, PoolSource


class PoolCollector(Collector):
    """Everything the catalog defines, for the pools `sources()` returns (one Exporter's)."""

    def __init__(self, namespace: str, sources: Callable[[], Sequence[PoolSource]]) -> None:
        self.namespace = namespace
        self.sources = sources
        self._muted = threading.local()

    def describe(self) -> Iterable[Metric]:
        return [_family(spec, self.namespace) for spec in catalog.CATALOG]

    @contextmanager
    def muted(self) -> Iterator[None]:
        """In this thread, collect() yields nothing: exposition.py renders our families itself."""
        self._muted.on = True
        try:
            yield
        finally:
            self._muted.on = False

    def collect(self) -> Iterator[Metric]:
        if getattr(self._muted, "on", False):
            return
        families: dict[str, Any] = {spec.key: _family(spec, self.namespace) for spec in catalog.CATALOG}
        families["build_info"].add_metric([__version__], 1)
        for source in self.sources():
            try:
                reading = source.read()
                if reading is None:  # engine garbage-collected: its series go with it
                    continue
                _add_pool(families, source, reading)
            except Exception as exc:
                source.fail("collect", exc)
        yield from families.values()


def _family(spec: catalog.MetricSpec, namespace: str) -> Metric:
    name = spec.name(namespace)
    labels = list(spec.labelnames)
    if spec.kind == "gauge":
        return GaugeMetricFamily(name, spec.help, labels=labels)
    if spec.kind == "counter":
        return CounterMetricFamily(name, spec.help, labels=labels)
    return HistogramMetricFamily(name, spec.help, labels=labels)


def _add_pool(f: dict[str, Any], source: PoolSource, reading: PoolReading) -> None:
    p = source.name
    for key, labels, value in samples.gauges(reading):
        f[key].add_metric([p, *labels], value)
    for key, labels, count in samples.counters(source.stats):
        f[key].add_metric([p, *labels], count)
    for key, labels, hist in samples.histograms(source.stats):
        f[key].add_metric([p, *labels], *hist.cumulative())
