"""Child of benchmarks.scrape.sidecar(): forked workers write real multiprocess files, then we merge them.

Usage: PROMETHEUS_MULTIPROC_DIR=DIR python -m benchmarks.sidecar_child DIR LIVE GONE REPEAT
Prints one JSON line of median milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import text

from sqlalchemy_pool_exporter import Exporter

from .memory import sqlite_engine

try:  # the sidecar's own merge, with reaping and compaction of dead workers' files
    from sqlalchemy_pool_exporter.sidecar.merge import Sidecar
except ImportError:  # pragma: no cover - before the sidecar existed
    Sidecar = None  # type: ignore[assignment,misc]


def _work() -> None:
    """A worker's life: one instrumented engine, a few transactions, numbers flushed to its files."""
    engine = sqlite_engine()
    exporter = Exporter(CollectorRegistry(), multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"])
    exporter.instrument(engine, name="app")
    for _ in range(5):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.commit()
    exporter.flush()


def _fork(then: Callable[[int, int], None]) -> tuple[int, int, int]:
    """Fork a worker that works, tells us over a pipe, then runs `then(ready_fd, wait_fd)`."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(ready_r)
            os.close(go_w)
            _work()
            then(ready_w, go_r)
        except BaseException:
            code = 1
        os._exit(code)  # no atexit: a worker that vanished, as after SIGKILL
    os.close(ready_w)
    os.close(go_r)
    return pid, ready_r, go_w


def _stay(ready: int, go: int) -> None:
    os.write(ready, b"1")
    os.read(go, 1)  # until the parent is done measuring


def _leave(ready: int, go: int) -> None:
    os.write(ready, b"1")


Worker = tuple[int, int, int]  # pid, its "ready" pipe, its "go" pipe

# Workers forked at a time while churning, as a process manager recycles them.
BATCH = 16


def start_workers(n: int) -> list[Worker]:
    """`n` workers that have written their files and stay alive until release()."""
    workers = [_fork(_stay) for _ in range(n)]
    for _, ready, _ in workers:
        os.read(ready, 1)
    return workers


def release(workers: list[Worker]) -> None:
    for pid, _ready, go in workers:
        os.write(go, b"1")
        os.waitpid(pid, 0)


def churn(gone: int) -> None:
    """`gone` workers that write their files and vanish without cleanup, BATCH at a time."""
    for start in range(0, gone, BATCH):
        batch = [_fork(_leave) for _ in range(min(BATCH, gone - start))]
        for pid, ready, go in batch:
            os.read(ready, 1)
            os.close(ready)
            os.close(go)
            os.waitpid(pid, 0)


def files(directory: str) -> int:
    return len(list(Path(directory).glob("*.db")))


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = perf_counter()
        fn()
        times.append((perf_counter() - t0) * 1000)
    return statistics.median(times)


def _raw_merge(directory: str) -> Callable[[], Any]:
    collector = MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
    return lambda: list(collector.collect())  # type: ignore[no-untyped-call]


def main(directory: str, live: int, gone: int, repeat: int) -> dict[str, Any]:
    result: dict[str, Any] = {"live": live, "gone": gone}
    workers = start_workers(live)
    if Sidecar is not None:
        result["merge"] = "sqlalchemy_pool_exporter.sidecar.Sidecar.merge()"
        sidecar = Sidecar(directory)
        sidecar.merge()  # first call: probes the pid namespace
        result["live_ms"] = median_ms(sidecar.merge, repeat)
    else:
        result["merge"] = "prometheus_client MultiProcessCollector"
        result["live_ms"] = median_ms(_raw_merge(directory), repeat)
    result["live_files"] = files(directory)
    # The directory as it was with live workers only, to compare with, interleaved, after the churn.
    before = directory + ".live"
    shutil.copytree(directory, before)
    churn(gone)  # workers that came and went
    result["churned_files"] = files(directory)
    raw = directory + ".raw"
    shutil.copytree(directory, raw)
    # What merging costs when nothing compacts: every file of every worker that ever lived.
    result["raw_after_churn_ms"] = median_ms(_raw_merge(raw), max(3, repeat // 3))
    shutil.rmtree(raw)
    if Sidecar is not None:
        t0 = perf_counter()
        sidecar.merge()  # reaps and compacts the dead workers' files
        result["first_after_churn_ms"] = (perf_counter() - t0) * 1000
        # The copy's workers map files of the original directory, not of the copy, so the reference
        # is told they are alive by their marks alone, as long as it runs: it merges all 320 files.
        reference = Sidecar(before, stale_after=1e9, same_pid_namespace=False)
        reference.merge()
        live_ms: list[float] = []
        after_ms: list[float] = []
        for _ in range(repeat):
            live_ms.append(median_ms(reference.merge, 1))
            after_ms.append(median_ms(sidecar.merge, 1))
        result["live_interleaved_ms"] = statistics.median(live_ms)
        result["after_churn_ms"] = statistics.median(after_ms)
        result["files_after_churn"] = files(directory)
        sidecar.close()
        reference.close()
    shutil.rmtree(before)
    release(workers)
    return result


if __name__ == "__main__":
    d, live_n, gone_n, rep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(main(d, live_n, gone_n, rep)))
