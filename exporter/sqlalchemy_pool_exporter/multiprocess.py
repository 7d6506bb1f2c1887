"""Multi-worker mode: each worker pushes its pools' readings into prometheus_client's shared files.

prometheus_client's multiprocess mode cannot run custom collectors, so a reader of the directory
(the sidecar) never sees our in-process collector. Instead a writer thread in each worker copies,
every `interval` seconds, the pool's own live reading into `live*` gauges (dropped when the worker
dies) and the deltas of our plain counters into counters and histograms (summed across workers).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from . import catalog, samples
from ._version import __version__

if TYPE_CHECKING:
    from .instrument import PoolHandle

log = logging.getLogger("sqlalchemy_pool_exporter")

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_INTERVAL = 1.0
# A worker's liveness mark, touched at every flush; readers of the directory use it to reap.
ALIVE_SUFFIX = ".alive"

_WRITERS: dict[str, MultiprocessWriter] = {}
_LOCK = threading.Lock()


def multiprocess_dir() -> Path | None:
    value = os.environ.get(ENV_DIR)
    return Path(value) if value else None


def multiprocess_enabled() -> bool:
    return multiprocess_dir() is not None


def alive_path(directory: Path, pid: int) -> Path:
    return directory / f"pool_exporter_{pid}{ALIVE_SUFFIX}"


def attach_handle(handle: PoolHandle, interval: float = DEFAULT_INTERVAL) -> None:
    directory = multiprocess_dir()
    if directory is None:
        raise RuntimeError(f"multiprocess mode needs {ENV_DIR} set before prometheus_client is imported")
    with _LOCK:
        writer = _WRITERS.get(handle.namespace)
        if writer is None:
            writer = _WRITERS[handle.namespace] = MultiprocessWriter(handle, directory, interval)
        writer.add(handle)


def detach_handle(handle: PoolHandle) -> None:
    with _LOCK:
        writer = _WRITERS.get(handle.namespace)
    if writer is not None:
        writer.remove(handle)


def flush_all() -> None:
    """Write every pending number now (tests, shutdown hooks)."""
    with _LOCK:
        writers = list(_WRITERS.values())
    for writer in writers:
        writer.flush()


class MultiprocessWriter:
    """One per process and namespace: owns the prometheus_client metrics and the flush thread."""

    def __init__(self, first: PoolHandle, directory: Path, interval: float) -> None:
        self.namespace = first.namespace
        self.directory = directory
        self.interval = interval
        self._bounds = {key: first.stats.bounds[key] for key in catalog.DEFAULT_BUCKETS}
        self._metrics: dict[str, Any] = {spec.key: self._make(spec) for spec in catalog.CATALOG}
        self._metrics["build_info"].labels(__version__).set(1)
        self._handles: list[PoolHandle] = []
        # What was already written per handle: (metric key, labels) -> count or bucket counts.
        self._written: weakref.WeakKeyDictionary[PoolHandle, dict[tuple[str, tuple[str, ...]], Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start()
        atexit.register(self._at_exit)
        os.register_at_fork(after_in_child=self._after_fork)

    def _make(self, spec: catalog.MetricSpec) -> Any:
        name = spec.name(self.namespace)
        labels = list(spec.labelnames)
        if spec.kind == "gauge":
            return Gauge(name, spec.help, labels, registry=None, multiprocess_mode=spec.mp_mode)
        if spec.kind == "counter":
            return Counter(name, spec.help, labels, registry=None)
        assert spec.buckets is not None
        return Histogram(name, spec.help, labels, registry=None, buckets=self._bounds[spec.buckets])

    def _start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-exporter-mp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def add(self, handle: PoolHandle) -> None:
        for key, bounds in self._bounds.items():
            if handle.stats.bounds[key] != bounds:
                raise ValueError(
                    f"in multiprocess mode every engine of namespace {self.namespace!r} must use the same "
                    f"{key!r} buckets"
                )
        with self._lock:
            self._handles.append(handle)
        self.flush()

    def remove(self, handle: PoolHandle) -> None:
        self.flush()
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)
        # The worker lives on, so its live gauges for this pool must read as gone.
        for spec in catalog.CATALOG:
            if spec.kind == "gauge" and spec.pool_label:
                metric = self._metrics[spec.key]
                labelsets = [("used",), ("idle",)] if spec.labels else [()]
                for extra in labelsets:
                    metric.labels(handle.name, *extra).set(0)

    def flush(self) -> None:
        """Copy every handle's live reading and new counts into the shared files."""
        with self._lock:
            handles = list(self._handles)
            try:
                for handle in handles:
                    try:
                        self._write(handle)
                    except Exception as exc:
                        handle._fail("multiprocess_flush", exc)
                alive_path(self.directory, os.getpid()).touch()
            except Exception:
                log.exception("multiprocess flush failed")

    def _write(self, handle: PoolHandle) -> None:
        m = self._metrics
        p = handle.name
        reading = handle.read()
        if reading is not None:
            for key, labels, value in samples.gauges(reading):
                m[key].labels(p, *labels).set(value)
        written = self._written.setdefault(handle, {})
        for key, labels, value in samples.counters(handle.stats):
            before = written.get((key, labels), 0)
            # Create the child even at 0: as in single-process mode, a counter is exported from the
            # start, so Prometheus sees its first increase (a series born at 1 hides it from rate()).
            child = m[key].labels(p, *labels)
            if value > before:
                child.inc(value - before)
            written[(key, labels)] = value
        for key, labels, hist in samples.histograms(handle.stats):
            counts, total = list(hist.counts), hist.sum
            before_counts, before_total = written.get((key, labels), ([0] * len(counts), 0.0))
            child = m[key].labels(p, *labels)
            # prometheus_client has no public "add n observations"; its per-bucket values are
            # non-cumulative, like ours, so the deltas go straight into them.
            for i, (now_n, then_n) in enumerate(zip(counts, before_counts, strict=True)):
                if now_n > then_n:
                    child._buckets[i].inc(now_n - then_n)
            if total != before_total:
                child._sum.inc(total - before_total)
            written[(key, labels)] = (counts, total)

    def _at_exit(self) -> None:
        self._stop.set()
        self.flush()
        with contextlib.suppress(OSError):
            alive_path(self.directory, os.getpid()).unlink(missing_ok=True)

    def _after_fork(self) -> None:
        # The parent already wrote what it counted before the fork; the child starts from there.
        self._lock = threading.Lock()
        for handle in self._handles:
            written: dict[tuple[str, tuple[str, ...]], Any] = {
                (key, labels): n for key, labels, n in samples.counters(handle.stats)
            }
            for key, labels, hist in samples.histograms(handle.stats):
                written[(key, labels)] = (list(hist.counts), hist.sum)
            self._written[handle] = written
        self._start()
