"""The scrape-time collector: renders every handle's stats and live pool reading from the catalog."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import catalog, samples
from ._version import __version__

if TYPE_CHECKING:
    from .instrument import PoolHandle
    from .reading import PoolReading

# One collector per (registry, namespace): a registry refuses two collectors with the same names.
_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, PoolCollector]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def collector_for(registry: CollectorRegistry, namespace: str) -> PoolCollector:
    """The registry's collector for this namespace, registered on first use."""
    with _LOCK:
        by_ns = _COLLECTORS.setdefault(registry, {})
        collector = by_ns.get(namespace)
        if collector is None:
            collector = by_ns[namespace] = PoolCollector(namespace)
            registry.register(collector)
        return collector


class PoolCollector(Collector):
    """Everything the catalog defines, for all handles of one registry and namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._handles: list[PoolHandle] = []
        self._lock = threading.Lock()
        self._muted = threading.local()

    def add(self, handle: PoolHandle) -> None:
        with self._lock:
            self._handles.append(handle)

    def remove(self, handle: PoolHandle) -> None:
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)

    def handles(self) -> list[PoolHandle]:
        with self._lock:
            return list(self._handles)

    def unique_name(self, explicit: str | None, default: str) -> str:
        """An explicit name must be free; a default one gets `#2`, `#3`… when taken."""
        taken = {h.name for h in self.handles() if h.active and h.engine is not None}
        if explicit is not None:
            if not isinstance(explicit, str) or not explicit:
                raise ValueError(f"name must be a non-empty string, got {explicit!r}")
            if explicit in taken:
                raise ValueError(f"pool name {explicit!r} is already used by another instrumented engine")
            return explicit
        name, n = default, 1
        while name in taken:
            n += 1
            name = f"{default}#{n}"
        return name

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
        for handle in self.handles():
            try:
                reading = handle.read()
                if reading is None:  # engine garbage-collected: its series go with it
                    self.remove(handle)
                    continue
                _add_pool(families, handle, reading)
            except Exception as exc:
                handle._fail("collect", exc)
        yield from families.values()


def _family(spec: catalog.MetricSpec, namespace: str) -> Metric:
    name = spec.name(namespace)
    labels = list(spec.labelnames)
    if spec.kind == "gauge":
        return GaugeMetricFamily(name, spec.help, labels=labels)
    if spec.kind == "counter":
        return CounterMetricFamily(name, spec.help, labels=labels)
    return HistogramMetricFamily(name, spec.help, labels=labels)


def _add_pool(f: dict[str, Any], handle: PoolHandle, reading: PoolReading) -> None:
    p = handle.name
    for key, labels, value in samples.gauges(reading):
        f[key].add_metric([p, *labels], value)
    for key, labels, count in samples.counters(handle.stats):
        f[key].add_metric([p, *labels], count)
    for key, labels, hist in samples.histograms(handle.stats):
        f[key].add_metric([p, *labels], *hist.cumulative())
