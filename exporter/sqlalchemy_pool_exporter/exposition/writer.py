"""Multi-worker mode: each worker pushes its pools' readings into prometheus_client's shared files.

prometheus_client's multiprocess mode cannot run custom collectors, so a reader of the directory
(the sidecar) never sees our in-process collector. Instead an Exporter's writer thread copies, every
`interval` seconds, each pool's own live reading into `live*` gauges (dropped when the worker dies)
and the deltas of our plain counters into counters and histograms (summed across workers).

prometheus_client decides at import time, from PROMETHEUS_MULTIPROC_DIR, whether its values live in
files, and writes them to that directory: the writer checks both before it writes anything. A
directory that is missing, read-only or vanishes never reaches the application: in-process metrics
go on, the failure is counted in `exporter_errors_total` and logged once, then at most every
LOG_EVERY seconds.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from .. import catalog, compat
from .._version import __version__
from ..instrumentation import samples
from . import checkouts

if TYPE_CHECKING:
    from ..instrumentation.reading import PoolSource
    from ..metricnames import Family, View

log = logging.getLogger("sqlalchemy_pool_exporter")

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_INTERVAL = 1.0
# A worker's liveness mark, touched at every flush; readers of the directory use it to reap.
ALIVE_SUFFIX = ".alive"
LOG_EVERY = 300.0

Written = dict[tuple[str, samples.Labels], Any]


def alive_path(directory: Path, pid: int) -> Path:
    return directory / f"pool_exporter_{pid}{ALIVE_SUFFIX}"


def environment_dir() -> Path | None:
    value = os.environ.get(ENV_DIR)
    return Path(value) if value else None


class MultiprocessWriter:
    """One per Exporter: owns its prometheus_client metrics, the flush thread and the process hooks."""

    def __init__(
        self,
        view: View,
        directory: Path,
        buckets: Mapping[str, Sequence[float]],
        sources: Callable[[], Sequence[PoolSource]],
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.view = view
        self.namespace = view.namespace
        self.directory = directory
        self.interval = interval
        self.bounds = {key: tuple(buckets[key]) for key in catalog.DEFAULT_BUCKETS}
        self._sources = sources
        self._metrics: dict[str, Any] = {f.spec.key: self._make(f) for f in view.families}
        # What was already written per pool: (metric key, labels) -> count, or (bucket counts, sum).
        self._written: weakref.WeakKeyDictionary[Any, Written] = weakref.WeakKeyDictionary()
        self._names: set[str] = set()
        # Gauge series written per pool (all their labels, as this naming spells them): what must read 0
        # once the pool leaves a worker that lives on.
        self._live: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None
        self._failures = 0
        self._logged_at = -LOG_EVERY
        self._wrote_checkouts = False
        self.closed = False
        self._problem = self._check_mode()

    def _check_mode(self) -> str | None:
        """Why prometheus_client cannot write this directory for us, or None when it can."""
        if not compat.multiprocess_values():
            return f"prometheus_client is not in multiprocess mode ({ENV_DIR} was not set when it was imported)"
        actual = environment_dir()
        if actual is None or os.path.abspath(actual) != os.path.abspath(self.directory):
            return f"prometheus_client writes {ENV_DIR}={actual}, not {self.directory}"
        return None

    def _make(self, family: Family) -> Any:
        spec, name, labels = family.spec, family.name, list(family.labelnames)
        if spec.kind == "gauge":
            return Gauge(name, spec.help, labels, registry=None, multiprocess_mode=spec.mp_mode)
        if spec.kind == "counter":
            return Counter(name, spec.help, labels, registry=None)
        assert spec.buckets is not None
        return Histogram(name, spec.help, labels, registry=None, buckets=self.bounds[spec.buckets])

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Flush now and every `interval` seconds; flush at exit; restart in a forked child."""
        self.flush()
        self._start_thread()
        atexit.register(self._at_exit)
        _FORK_WRITERS.add(self)
        _install_fork_hook()

    def _start_thread(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_run, args=(weakref.ref(self), self._stop, self.interval),
                                        name="pool-exporter-mp", daemon=True)  # fmt: skip
        self._thread.start()

    def close(self) -> None:
        """Final flush; stop the thread; remove the exit and fork hooks and the liveness mark."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        atexit.unregister(self._at_exit)
        _FORK_WRITERS.discard(self)
        with contextlib.suppress(OSError):
            alive_path(self.directory, os.getpid()).unlink(missing_ok=True)
        checkouts.remove(self.directory, os.getpid())

    def _at_exit(self) -> None:
        self._stop.set()
        self.flush()
        with contextlib.suppress(OSError):
            alive_path(self.directory, os.getpid()).unlink(missing_ok=True)
        checkouts.remove(self.directory, os.getpid())

    def after_fork(self) -> None:
        # The parent already wrote what it counted before the fork; the child starts from there.
        self._lock = threading.Lock()
        for source in self._sources():
            written: Written = {(key, labels): n for key, labels, n in samples.counters(source.stats)}
            for key, labels, hist in samples.histograms(source.stats):
                written[(key, labels)] = (list(hist.counts), hist.sum)
            self._written[source] = written
        self._wrote_checkouts = False  # the parent's file is the parent's
        if not self.closed:
            self._start_thread()

    # -- writing --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Copy every pool's live reading and new counts into the shared files."""
        if self.closed:
            return
        with self._lock:
            sources = [s for s in self._sources() if _same(s, self.bounds)]
            try:
                if self._problem is not None:
                    raise RuntimeError(self._problem)
                alive_path(self.directory, os.getpid()).touch()
                self._metrics["build_info"].labels(__version__).set(1)
                names = set()
                for source in sources:
                    names.add(source.name)
                    try:
                        self._write(source)
                    except OSError:
                        raise
                    except Exception as exc:
                        source.fail("multiprocess_flush", exc)
                for gone in self._names - names:
                    self._zero_live(gone)
                self._names = names
                self._write_checkouts(sources)
            except (OSError, RuntimeError) as exc:
                self._environment_failed(exc, sources)
                return
        if self._failing_since is not None:
            log.warning("multiprocess directory %s is writable again", self.directory)
            self._failing_since = None

    def _write_checkouts(self, sources: list[PoolSource]) -> None:
        """This worker's checkouts with their backend ids, for the sidecar's join (exposition/checkouts.py)."""
        try:
            found = checkouts.entries(sources)
        except Exception as exc:  # ours: counted on the first pool, never raised into the flush
            if sources:
                sources[0].fail("multiprocess_flush", exc)
            return
        if found or self._wrote_checkouts:
            checkouts.write(self.directory, os.getpid(), found)
            self._wrote_checkouts = bool(found)

    def _environment_failed(self, exc: BaseException, sources: list[PoolSource]) -> None:
        """The directory (not our code) failed: count it on every pool, log once, then throttled."""
        for source in sources:
            source.stats.errors += 1
        self._failures += 1
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._logged_at < LOG_EVERY:
            return
        self._logged_at = now
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.warning(
            "cannot write the multiprocess directory %s: %s (in-process metrics still work; "
            "the sidecar sees nothing from this worker; %d failed flushes so far)",
            self.directory,
            reason,
            self._failures,
        )

    def forget(self, name: str) -> None:
        """A pool left this worker, which lives on: its live gauges must read as gone."""
        with self._lock:
            if self._problem is None and name in self._names:
                with contextlib.suppress(OSError):
                    self._zero_live(name)
                self._names.discard(name)

    def _zero_live(self, name: str) -> None:
        for key, labels in self._live.pop(name, ()):
            self._metrics[key].labels(*labels).set(0)

    def _write(self, source: PoolSource) -> None:
        m, view = self._metrics, self.view
        p, system, by_key = source.name, source.db_system, view.by_key
        reading = source.read()
        if reading is not None:
            live: set[tuple[str, tuple[str, ...]]] = set()
            for key, labels, value in samples.gauges(reading):
                full = tuple(view.labels(by_key[key], p, system, labels))
                m[key].labels(*full).set(value)
                live.add((key, full))
            # A series this flush no longer has (a server state the holder left, a failed server-view poll)
            # reads 0: the files cannot drop a series, and its last value would otherwise stay forever.
            for key, full in self._live.get(p, set()) - live:
                m[key].labels(*full).set(0)
            self._live[p] = live
        written = self._written.setdefault(source, {})
        for key, labels, value in samples.counters(source.stats):
            before = written.get((key, labels), 0)
            # Create the child even at 0: as in single-process mode, a counter is exported from the
            # start, so Prometheus sees its first increase (a series born at 1 hides it from rate()).
            child = m[key].labels(*view.labels(by_key[key], p, system, labels))
            if value > before:
                child.inc(value - before)
            written[(key, labels)] = value
        for key, labels, hist in samples.histograms(source.stats):
            counts, total = list(hist.counts), hist.sum
            before_counts, before_total = written.get((key, labels), ([0] * len(counts), 0.0))
            deltas = [(i, now - then) for i, (now, then) in enumerate(zip(counts, before_counts, strict=True))]
            child = m[key].labels(*view.labels(by_key[key], p, system, labels))
            compat.add_to_histogram(child, [(i, d) for i, d in deltas if d > 0], total - before_total)
            written[(key, labels)] = (counts, total)


def _same(source: PoolSource, bounds: dict[str, tuple[float, ...]]) -> bool:
    return all(tuple(source.stats.bounds[key]) == b for key, b in bounds.items())


def _run(ref: weakref.ref[MultiprocessWriter], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        writer = ref()
        if writer is None:
            return
        writer.flush()
        del writer


# os.register_at_fork has no unregister: one hook per process, which restarts the writers still open.
_FORK_WRITERS: weakref.WeakSet[MultiprocessWriter] = weakref.WeakSet()
_fork_hook = [False]


def _install_fork_hook() -> None:
    if not _fork_hook[0]:
        _fork_hook[0] = True
        os.register_at_fork(after_in_child=_after_fork)


def _after_fork() -> None:
    for writer in list(_FORK_WRITERS):
        writer.after_fork()
