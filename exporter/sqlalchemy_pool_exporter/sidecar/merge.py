"""The sidecar's view of a multiprocess directory: merge it, reap dead workers, compact what they left.

prometheus_client keeps one file per worker and metric type, and merges them all at every scrape.
Workers come and go (gunicorn max_requests, crashes, deploys), so left alone the directory grows and
scrapes slow down. At each scrape, before merging, the sidecar:

1. finds dead workers: the pid is gone from our pid namespace (when we share it with the workers),
   or its `pool_exporter_<pid>.alive` mark is stale (and the pid, if running, is not held by a
   process started after the mark: a reused pid), or the mark was removed (clean exit);
2. drops their live gauges (`mark_process_dead`);
3. folds their counter, histogram, summary and min/max/sum gauge files into one archive file per
   type (`counter_archive.db`...), so the merged totals stay exactly the same while the file count
   stays flat. The fold is crash-safe: new archives are written beside the old ones, a journal
   records the swap, then renames and removals are replayed from the journal if we die midway.

Whoever can write the directory is not trusted (docs/reliability.md): files are read by mpfile
(regular files only, bounded), a bad one is quarantined, the journal may only name our own files by
their plain names, and every merge has a deadline that it checks between steps. All of it runs in
one daemon thread (`executor`), never on the event loop, one merge at a time; callers on the loop
share the merge in flight (`refresh`) and give up on it at its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import catalog
from ..exposition.writer import ALIVE_SUFFIX, DEFAULT_INTERVAL, alive_path
from ..instrumentation import advice, views
from ..metricnames import NAMES, view
from . import checkouts, mpfile
from .compaction import BATCH, JOURNAL, Budget, Compaction, MergeFailed
from .daemon import DaemonExecutor
from .quarantine import Quarantine

__all__ = ["JOURNAL", "MergeFailed", "Sidecar"]

log = logging.getLogger("sqlalchemy_pool_exporter.sidecar")

DEFAULT_STALE_AFTER = 10 * DEFAULT_INTERVAL
# Prometheus' default scrape_timeout is 10 s: past 5 s a scrape gets a 503 and our reason, before the
# scraper gives up on us with none. A merge of 256 live workers takes ~40 ms here (docs/performance.md).
DEFAULT_DEADLINE = 5.0
# How long waiters give a merge past its deadline to report its own reason (it checks between steps).
_GRACE = 0.5
# Pools whose traffic the sidecar follows for /pools' words; more (a hostile file's names) get none.
MAX_WINDOWS = 1000

_DB_FILE = re.compile(r"^(?P<kind>counter|histogram|summary|gauge_[a-z]+)_(?P<pid>\d+)\.db$", re.ASCII)
_ALIVE_FILE = re.compile(r"^pool_exporter_(?P<pid>\d+)" + re.escape(ALIVE_SUFFIX) + "$", re.ASCII)


def _stat(pid: int) -> list[bytes] | bool | None:
    """The fields of /proc/<pid>/stat after the command name; False: no such process; None: /proc cannot tell."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        stat_line = os.read(fd, 4096)
    except OSError:  # ESRCH: it exited between the open and the read
        return False
    finally:
        os.close(fd)
    return stat_line.rpartition(b")")[2].split() or None


def _running(stat: list[bytes] | bool | None) -> bool | None:
    """Whether the process of `_stat()` runs (in our pid namespace): None when /proc cannot tell."""
    if not isinstance(stat, list):
        return stat
    # A zombie (killed, not yet waited for) is dead for our purpose.
    return stat[0] not in (b"Z", b"X")


# /proc gives a start time in clock ticks since boot, and the boot time to the second.
_START_SLACK = 1.0


@functools.cache
def _boot_time() -> float | None:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _started_after(stat: list[bytes] | bool | None, when: float) -> bool:
    """Whether the process of `_stat()` started after `when` (seconds since the epoch); False when /proc cannot tell.

    The mount namespace does not matter (unlike /proc/<pid>/maps): a sidecar in another container that
    shares the workers' pid namespace can tell too.
    """
    boot = _boot_time()
    if boot is None or not isinstance(stat, list):
        return False
    try:
        started = boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of the whole line
    except (ValueError, IndexError):
        return False
    return started > when + _START_SLACK


def _maps(pid: int, directory: str) -> bool:
    """Whether process `pid` has a file of `directory` mapped: proof that it is a writer we can see."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(directory in line for line in f)
    except OSError:
        return False


class Sidecar(Collector):
    """A prometheus_client collector over a multiprocess directory that keeps the directory small."""

    def __init__(
        self,
        directory: Path | str,
        *,
        namespace: str = catalog.DEFAULT_NAMESPACE,
        stale_after: float = DEFAULT_STALE_AFTER,
        same_pid_namespace: bool | None = None,
        deadline: float = DEFAULT_DEADLINE,
        advice_window: float = advice.DEFAULT_WINDOW,
    ) -> None:
        self.directory = Path(directory)
        self.namespace = namespace
        self.stale_after = stale_after
        self.deadline = deadline
        # None: find out (a live writer visible in our /proc); True/False: told.
        self._shared = same_pid_namespace
        self._probe_shared = same_pid_namespace is None
        self._seen_alive: set[int] = set()
        self._layouts: dict[str, mpfile.Layout] = {}  # each file's layout at the last merge (mpfile.Layout)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.executor = DaemonExecutor("pool-exporter-merge")
        self.quarantine = Quarantine(self.directory)
        self.compaction = Compaction(self.directory, self.quarantine)
        self.live_workers = 0
        self.reaped = 0
        self.errors = 0
        self.files = 0
        self.merges = 0
        self.latest: list[Metric] = []  # the last merge's result
        # The pod's traffic per pool, sampled at each merge from the merged counters (advice.py): the
        # rate, mean hold and connections opened behind the workers' advice, for /pools and /.
        self.advice_window = advice_window
        self._windows: dict[str, advice.Window] = {}
        # (server as pool_info names it, connections it allows applications), from the server view when
        # the sidecar has one: /pools then shows this pod's share of that limit.
        self.server_limit: Callable[[], tuple[str, int] | None] | None = None
        self.failure: str | None = None  # why the last merge failed, None when it worked
        self.view = LatestMerge(self)
        self._claimed = _claimed(namespace)
        # Set by `serve` when its server view joins the workers' checkouts (service/pgview.py): the holder
        # families it exports instead of the workers' copies (which this merge then drops: no double count).
        self.joined: Callable[[], list[Metric]] | None = None
        # Set by `serve` with the same server view: each pool's current checkouts as the join saw them
        # (views.held_checkouts: backend pid, server state, wait event, ages, who blocks it), for /pools and /.
        self.checkouts_now: Callable[[], dict[str, list[dict[str, Any]]] | None] | None = None
        self._joined_names = {
            view(namespace, names).by_key[key].name for names in NAMES for key in checkouts.JOINED_KEYS
        }
        self._inflight: asyncio.Future[list[Metric]] | None = None
        self._inflight_until = 0.0
        try:
            with self.compaction.locked(fcntl.LOCK_EX, self._budget()):
                self._recover()
        except MergeFailed as exc:  # the lock held elsewhere: the first maintenance recovers
            self.errors += 1
            log.warning("cannot recover %s at start: %s", self.directory, exc)

    def _budget(self) -> Budget:
        return Budget(self.deadline, self._stop)

    # -- prometheus_client Collector ------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield from self.merge()
        yield from self.own_metrics()

    def merge(self) -> list[Metric]:
        """Maintain the directory, then merge every worker's file (blocking: call from `executor`).

        Raises MergeFailed when no result can be had within the deadline.
        """
        budget = self._budget()
        try:
            if not self._lock.acquire(timeout=self.deadline):
                raise MergeFailed(f"the merge did not finish within {self.deadline:g} s: the previous one still runs")
            try:
                metrics = self._merge(budget)
            finally:
                self._lock.release()
        except MergeFailed as exc:
            self.errors += 1
            if str(exc) != self.failure:
                log.warning("merging %s failed: %s", self.directory, exc)
            self.failure = str(exc)
            raise
        if self.failure is not None:
            log.info("merging %s works again", self.directory)
        self.failure = None
        if self.joined is not None:
            metrics = [m for m in metrics if m.name not in self._joined_names]
        self.latest = metrics
        try:
            self._sample(metrics)
        except Exception:  # the files are untrusted: a value we cannot use costs the words, not the merge
            self.errors += 1
            log.exception("sampling the advice window of %s failed", self.directory)
        return metrics

    def _sample(self, metrics: list[Metric]) -> None:
        now = time.monotonic()
        counters = views.advice_counters(metrics, self.namespace)
        for gone in set(self._windows) - set(counters):
            del self._windows[gone]
        for pool, (taken, held, created) in counters.items():
            if not (math.isfinite(taken) and math.isfinite(held) and math.isfinite(created)):
                continue  # a file said NaN or Inf: no words for that pool
            window = self._windows.get(pool)
            if window is None:
                if len(self._windows) >= MAX_WINDOWS:
                    continue
                window = self._windows[pool] = advice.Window(self.advice_window)
            window.add(advice.Snapshot(now, int(taken), held, int(created)))

    def _merge(self, budget: Budget) -> list[Metric]:
        self.merges += 1
        try:
            try:
                self.maintain(budget)
            except MergeFailed:
                raise
            except Exception:
                self.errors += 1
                log.exception("maintaining %s failed; merging it as it is", self.directory)
            with self.compaction.locked(fcntl.LOCK_SH, budget):
                return self._merge_files(budget)
        except OSError as exc:  # the directory itself: gone, unreadable; out of file descriptors
            raise MergeFailed(f"cannot read {self.directory}: {exc.strerror}") from None

    def _merge_files(self, budget: Budget) -> list[Metric]:
        found: list[tuple[os.stat_result, str, re.Match[str]]] = []
        with os.scandir(self.directory) as listing:
            for entry in listing:
                m = mpfile.FILE.fullmatch(entry.name)
                if m is not None:
                    with contextlib.suppress(FileNotFoundError):
                        found.append((entry.stat(follow_symlinks=False), entry.name, m))
        # Smallest first: a worker's file is small, so the file that would take a merge past
        # MAX_SERIES (and is rejected for it) is the big one a hostile writer made.
        found.sort(key=lambda f: f[0].st_size)
        reader, merge = mpfile.Reader(budget, self._layouts), mpfile.Merge(self._claimed)
        where = os.fspath(self.directory) + os.sep
        for seen, name, m in found:
            budget()
            try:
                parsed = reader.read(where + name, name, mpfile.MAX_SERIES - merge.series, seen)
                if parsed is None:
                    self._unwritten(name, m["ident"], seen)
                else:
                    merge.add(m["kind"], m["mode"], m["ident"], parsed)
            except FileNotFoundError:  # a live gauge of a worker reaped meanwhile
                continue
            except mpfile.Rejected as exc:
                self.quarantine.move(name, str(exc))
            except (MergeFailed, OSError):
                raise
            except Exception as exc:  # a file we cannot merge for a reason we did not foresee: ours to count
                self.errors += 1
                log.exception("merging %s in %s failed", name, self.directory)
                self.quarantine.move(name, f"cannot be merged: {type(exc).__name__}")
        self.files = merge.files
        self._layouts = reader.kept
        return merge.result()

    def _unwritten(self, name: str, ident: str, seen: os.stat_result) -> None:
        """A file with no header yet: a worker between creating and initialising it, for an instant."""
        if time.time() - seen.st_mtime <= self.stale_after:
            return
        if (
            ident.isascii()
            and ident.isdigit()
            and self._shared
            and _running(_stat(int(ident)))
            and _maps(int(ident), str(self.directory.resolve()))
        ):
            return  # a live writer of ours, stopped in a debugger, say: never move a live worker's file
        raise mpfile.Rejected(f"is empty for more than {self.stale_after:g} s (its writer died before writing it)")

    def own_metrics(self) -> Iterator[Metric]:
        values = {
            "workers": self.live_workers,
            "files": self.files,
            "reaped": self.reaped,
            "errors": self.errors + self.compaction.ignored,
            "quarantined": self.quarantine.moved,
            "merges": self.merges,
        }
        for spec in catalog.SIDECAR_CATALOG:
            family = GaugeMetricFamily if spec.kind == "gauge" else CounterMetricFamily
            yield family(spec.name(self.namespace), spec.help, values[spec.key])

    # -- liveness -------------------------------------------------------------------------------

    def workers(self) -> set[int]:
        """Every pid with a file in the directory."""
        pids: set[int] = set()
        for name in os.listdir(self.directory):
            m = _DB_FILE.match(name) or _ALIVE_FILE.match(name)
            if m:
                pids.add(int(m["pid"]))
        return pids

    def dead_workers(self, pids: Iterable[int]) -> set[int]:
        now = time.time()
        marks: dict[int, float | None] = {}
        for pid in pids:
            try:
                marks[pid] = now - alive_path(self.directory, pid).lstat().st_mtime
            except FileNotFoundError:
                marks[pid] = None
        if self._probe_shared and not self._shared:
            where = str(self.directory.resolve())
            self._shared = any(
                age is not None and age <= self.stale_after and _maps(pid, where) for pid, age in marks.items()
            )
        dead: set[int] = set()
        for pid, age in marks.items():
            stat = _stat(pid) if self._shared else None
            running = _running(stat)
            if age is not None:
                self._seen_alive.add(pid)
                # A live writer we can see is never reaped, even when its flush thread lags; but a
                # process that started after the mark was last touched is not that writer: the writer
                # died, and the kernel handed its pid on.
                is_dead = running is False or (
                    age > self.stale_after and (running is not True or _started_after(stat, now - age))
                )
            else:
                # The mark is removed at a clean exit; without one ever seen, only /proc can tell.
                is_dead = pid in self._seen_alive or running is False
            if is_dead:
                dead.add(pid)
        self.live_workers = len(set(marks) - dead)
        return dead

    # -- maintenance ----------------------------------------------------------------------------

    def maintain(self, budget: Budget | None = None) -> None:
        """Reap dead workers and fold their files into the archives."""
        budget = budget or self._budget()
        if os.path.lexists(self.directory / JOURNAL):  # left by a start that could not take the lock
            with self.compaction.locked(fcntl.LOCK_EX, budget):
                self._recover()
        dead = sorted(self.dead_workers(self.workers()))
        if not dead:
            return
        reader = mpfile.Reader(budget)
        with self.compaction.locked(fcntl.LOCK_EX, budget):
            for start in range(0, len(dead), BATCH):
                batch = dead[start : start + BATCH]
                for pid in batch:
                    self.compaction.drop_live(pid)
                self._compact(batch, reader)
                for pid in batch:
                    self.compaction.clear(alive_path(self.directory, pid).name)
                    with contextlib.suppress(OSError):
                        os.unlink(checkouts.path(self.directory, pid))
                    self._seen_alive.discard(pid)
                self.reaped += len(batch)
                log.info("reaped %d dead worker(s): %s", len(batch), ", ".join(map(str, batch)))

    def _compact(self, dead: list[int], reader: mpfile.Reader) -> None:
        if self.compaction.prepare(dead, reader):
            self._recover()

    def _recover(self) -> None:
        self.compaction.recover()

    # -- for the web app ------------------------------------------------------------------------

    async def refresh(self) -> list[Metric]:
        """A merge for the caller: the one in flight, or a new one; MergeFailed (503) past its deadline.

        /metrics, /pools, / and /readyz all come here, so concurrent requests cost one merge.
        """
        if self._stop.is_set():
            raise MergeFailed("the sidecar is stopping")
        future = self._inflight
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._inflight = loop.create_future()
            self._inflight_until = time.monotonic() + self.deadline + _GRACE
            self.executor.submit(self.merge).add_done_callback(lambda done: _settle(loop, future, done))
            future.add_done_callback(self._merged)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, self._inflight_until - time.monotonic()))
        except TimeoutError:
            # The merge did not even reach a check of its budget: stuck in the kernel, say.
            reason = f"the merge did not finish within {self.deadline:g} s"
            if self.failure != reason:
                log.warning("merging %s failed: %s", self.directory, reason)
            self.failure = reason
            raise MergeFailed(reason) from None

    def _merged(self, future: asyncio.Future[list[Metric]]) -> None:
        if self._inflight is future:
            self._inflight = None
        if not future.cancelled():
            future.exception()  # retrieved, even when every waiter gave up

    async def pools(self) -> list[dict[str, Any]]:
        """Per-pool numbers from the merged metrics (and the server join's), for /pools and / in sidecar mode."""
        merged = await self.refresh()
        rows = views.pools_from_metrics([*merged, *(self.joined() if self.joined else ())], self.namespace)
        for row in rows:
            row["workers"] = self.live_workers
            window = self._windows.get(row["name"])
            found = window.latest if window is not None else None
            if found is not None:
                row["advice"] = views.advice_fields(found, sized=False)
            row["sizing"] = views.sizing(row)
        held = self.checkouts_now() if self.checkouts_now is not None else None
        if held is not None:
            for row in rows:
                row["checkouts_now"] = held.get(row["name"], [])
        found_limit = self.server_limit() if self.server_limit is not None else None
        if found_limit is not None:
            share = views.budget(rows, *found_limit)
            for row in rows:
                if row.get("server") == found_limit[0]:
                    row["server_budget"] = share
        return rows

    def checkouts(self) -> list[checkouts.Held]:
        """The live workers' checkouts (sidecar/checkouts.py), bounded; bad files quarantined. Blocking."""
        now = time.time()

        def live(pid: int) -> bool:
            try:
                return now - alive_path(self.directory, pid).lstat().st_mtime <= self.stale_after
            except OSError:
                return False

        try:
            return checkouts.read(self.directory, live, self.quarantine.move)
        except OSError as exc:  # the directory itself
            self.errors += 1
            log.warning("cannot read the checkouts in %s: %s", self.directory, exc.strerror)
            return []

    def checks(self) -> dict[str, Callable[[], Any]]:
        async def directory() -> None:
            if not os.access(self.directory, os.R_OK | os.X_OK):
                raise PermissionError(str(self.directory))

        async def merge() -> None:
            await self.refresh()

        return {"multiproc_dir": directory, "merge": merge}

    def details(self) -> dict[str, Any]:
        """For /readyz: the files moved aside most recently, oldest first."""
        return {"quarantined": list(self.quarantine.recent)}

    def close(self) -> None:
        """Stop: a merge in flight gives up at its next step, its waiters get 503, nothing waits for its thread."""
        self._stop.set()
        self.executor.shutdown(wait=False, cancel_futures=True)
        future = self._inflight
        if future is not None and not future.done():
            future.set_exception(MergeFailed("the sidecar is stopping"))


def _claimed(namespace: str) -> dict[str, str]:
    """The names our families write (theirs to write, from files) and the sidecar's own (no file's)."""
    claimed: dict[str, str] = {}
    for names in NAMES:
        for family in view(namespace, names).families:
            kind = family.spec.kind
            base = family.name.removesuffix("_total") if kind == "counter" else family.name
            for written in mpfile.claims(base, kind):
                claimed.setdefault(written, base)
    for spec in catalog.SIDECAR_CATALOG:
        name = spec.name(namespace)
        base = name.removesuffix("_total") if spec.kind == "counter" else name
        claimed.update(dict.fromkeys(mpfile.claims(base, spec.kind), mpfile.RESERVED))
    return claimed


class LatestMerge(Collector):
    """The sidecar's last merge and its own numbers, for a registry whose /metrics awaits `refresh` first."""

    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    def collect(self) -> Iterator[Metric]:
        yield from self._sidecar.latest
        yield from self._sidecar.own_metrics()


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future[list[Metric]], done: Any) -> None:
    """Hand a merge's outcome from its thread to the loop's future (unless the loop is gone)."""

    def settle() -> None:
        if future.done():
            return
        if done.cancelled():
            future.set_exception(MergeFailed("the sidecar is stopping"))
        elif done.exception() is not None:
            exc = done.exception()
            future.set_exception(exc if isinstance(exc, MergeFailed) else MergeFailed(f"the merge failed: {exc!r}"))
        else:
            future.set_result(done.result())

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle)
