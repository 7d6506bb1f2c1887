"""The scrape-time collector of one Exporter: every pool's stats and live reading, from the catalog view."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .._version import __version__
from ..instrumentation import samples
from ..metricnames import Family, View

if TYPE_CHECKING:
    from ..instrumentation.reading import PoolReading, PoolSource


class PoolCollector(Collector):
    """Everything the catalog defines, named as `view` names it, for the pools `sources()` returns (one Exporter's)."""

    def __init__(self, view: View, sources: Callable[[], Sequence[PoolSource]]) -> None:
        self.view = view
        self.namespace = view.namespace
        self.sources = sources
        self._muted = threading.local()

    def describe(self) -> Iterable[Metric]:
        return [_family(f) for f in self.view.families]

    @contextmanager
    def muted(self) -> Iterator[None]:
        """In this thread, collect() yields nothing: render.py renders our families itself."""
        self._muted.on = True
        try:
            yield
        finally:
            self._muted.on = False

    def collect(self) -> Iterator[Metric]:
        if getattr(self._muted, "on", False):
            return
        families: dict[str, Any] = {f.spec.key: _family(f) for f in self.view.families}
        families["build_info"].add_metric([__version__], 1)
        for source in self.sources():
            try:
                reading = source.read()
                if reading is None:  # engine garbage-collected: its series go with it
                    continue
                _add_pool(self.view, families, source, reading)
            except Exception as exc:
                source.fail("collect", exc)
        yield from families.values()


def _family(family: Family) -> Metric:
    spec, labels = family.spec, list(family.labelnames)
    if spec.kind == "gauge":
        return GaugeMetricFamily(family.name, spec.help, labels=labels)
    if spec.kind == "counter":
        return CounterMetricFamily(family.name, spec.help, labels=labels)
    return HistogramMetricFamily(family.name, spec.help, labels=labels)


def _add_pool(view: View, f: dict[str, Any], source: PoolSource, reading: PoolReading) -> None:
    p, system, by_key = source.name, source.db_system, view.by_key
    for key, labels, value in samples.gauges(reading):
        f[key].add_metric(view.labels(by_key[key], p, system, labels), value)
    for key, labels, count in samples.counters(source.stats):
        f[key].add_metric(view.labels(by_key[key], p, system, labels), count)
    for key, labels, hist in samples.histograms(source.stats):
        f[key].add_metric(view.labels(by_key[key], p, system, labels), *hist.cumulative())
