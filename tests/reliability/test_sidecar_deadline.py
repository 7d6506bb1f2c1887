"""A merge that cannot finish: the sidecar answers 503 at its deadline and stops on SIGTERM regardless.

Whoever can write the multiprocess directory can also open and flock the sidecar's lock file, and a
thread can be stuck in the kernel (a hung network filesystem): neither may hang a scrape or keep a
stopped sidecar alive.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import MpWorkers, Serve, clean_env, get, metric, samples_of

pytestmark = pytest.mark.reliability

LOCK = "pool_exporter_sidecar.lock"
CHECKOUTS = 3 + 1 + 5 + 2
HELD = f"the merge did not finish within 5 s: {LOCK} is held by another process"

# A hostile writer of the directory: it takes the sidecar's lock and keeps it until its stdin closes.
HOLD_LOCK = """
import fcntl, sys
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def hold_lock(mp_workers: MpWorkers) -> Iterator[Callable[[], Callable[[], None]]]:
    """`release = hold_lock()`: a real process holds the directory's lock until `release()` or the end."""
    holders: list[subprocess.Popen[str]] = []

    def release(proc: subprocess.Popen[str]) -> None:
        assert proc.stdin is not None
        if not proc.stdin.closed:
            proc.stdin.close()
        proc.wait(10)

    def hold() -> Callable[[], None]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(mp_workers.directory / LOCK)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        return lambda: release(proc)

    yield hold
    for proc in holders:
        release(proc)


async def test_a_held_lock_gives_503_at_the_deadline_and_readyz_says_why(
    mp_workers: MpWorkers, serve_dir: Callable[..., Serve], hold_lock: Callable[[], Callable[[], None]]
) -> None:
    """Fault: another process holds the sidecar's lock file (today: every scrape, /pools and / hang
    forever, and /readyz says ready).

    /metrics, /pools and / answer 503 with the reason in one line at the 5 s deadline; /readyz
    answers 503 naming it; the four requests, sent together, cost one merge. Once the lock is
    released, everything answers 200 with the workers' numbers.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    serve = serve_dir(mp_workers.directory)
    assert (await get(serve.base, "/metrics"))[0] == 200

    release = hold_lock()
    paths = ("/metrics", "/pools", "/", "/readyz")
    answers = dict(zip(paths, await asyncio.gather(*(get(serve.base, p) for p in paths)), strict=True))
    for path in ("/metrics", "/pools", "/"):
        assert answers[path] == (503, HELD + "\n"), path
    status, body = answers["/readyz"]
    assert status == 503
    assert json.loads(body) == {
        "ready": False,
        "checks": {"multiproc_dir": "ok", "merge": f"failing: {HELD}"},
        "quarantined": [],
    }
    assert len(serve.warnings(HELD)) == 1, serve.text()

    release()
    status, body = await get(serve.base, "/metrics")
    assert status == 200, body
    s = samples_of(body)
    assert metric(s, "sqlalchemy_pool_checkouts_total", pool="app") == CHECKOUTS
    # One merge before, one shared by the four requests (it failed), this one.
    assert metric(s, "sqlalchemy_exporter_sidecar_merges_total") == 3
    assert metric(s, "sqlalchemy_exporter_sidecar_errors_total") == 1
    for _ in range(50):  # /readyz reuses a result for 1 s
        status, body = await get(serve.base, "/readyz")
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert json.loads(body)["ready"] is True
    serve.stop()
    assert serve.proc.returncode == 0


async def test_sigterm_stops_serve_within_5_s_while_a_merge_waits(
    mp_workers: MpWorkers, serve_dir: Callable[..., Serve], hold_lock: Callable[[], Callable[[], None]]
) -> None:
    """Fault: SIGTERM while a scrape waits on a merge that cannot take the lock (today: the sidecar
    never exits: it joins its merge thread).

    The waiting scrape gets a 503 saying the sidecar stops, and the process exits with 0 within 5 s.
    """
    a = mp_workers.start(commits=3, held=1)
    mp_workers.ready(a)
    serve = serve_dir(mp_workers.directory)
    assert (await get(serve.base, "/metrics"))[0] == 200
    hold_lock()
    waiting = asyncio.create_task(get(serve.base, "/metrics"))
    await asyncio.sleep(1.0)  # the merge now polls the lock
    seconds = await asyncio.to_thread(serve.stop)
    assert serve.proc.returncode == 0, serve.text()
    assert seconds < 5.0
    assert await waiting == (503, "the sidecar is stopping\n")


STUCK = """
import sys, time
from sqlalchemy_pool_exporter.sidecar.merge import Sidecar

sidecar = Sidecar(sys.argv[1])
# A merge stuck in the kernel, as on a hung network filesystem: open() of a FIFO no one writes.
stuck = sidecar.executor.submit(open, sys.argv[2], "rb")
while not stuck.running():
    time.sleep(0.01)
time.sleep(0.2)
sidecar.close()
print(time.monotonic(), flush=True)  # CLOCK_MONOTONIC: the same clock in the test's process
"""


def test_a_merge_thread_stuck_in_the_kernel_does_not_keep_a_stopped_sidecar_alive(tmp_path: Path) -> None:
    """Fault: the sidecar's merge thread is blocked in a system call that never returns (today: close()
    waits for it, and so would interpreter exit).

    close() returns at once and the process exits with 0 within 5 s, the thread abandoned.
    """
    directory = tmp_path / "mp"
    directory.mkdir()
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, str(directory), str(fifo)], env=clean_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the process did not exit within 20 s") from None
    exited = time.monotonic()
    assert proc.returncode == 0
    assert exited - float(out) < 5.0  # from close() to the end of the process
