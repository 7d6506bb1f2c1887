"""Hostile files in the multiprocess directory: whoever can write it plants what the sidecar merges.

Each test runs a real `pool-exporter serve` over a directory that two real instrumented workers
write, plants a file, and scrapes over real sockets. A bad file is quarantined (moved aside, counted,
one WARNING, named in /readyz) and the workers' numbers are still served exactly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import MpWorkers, Serve, get, metric, samples_of

pytestmark = pytest.mark.reliability

LOCK = "pool_exporter_sidecar.lock"
# The workers: a commits 3 times and holds 1 connection, b commits 5 times and holds 2.
CHECKOUTS, USED = 3 + 1 + 5 + 2, 1 + 2


def _entry(key: str, value: float) -> bytes:
    raw = key.encode()
    return struct.pack("i", len(raw)) + raw + b" " * (8 - (len(raw) + 4) % 8) + struct.pack("dd", value, 0.0)


def _db(entries: list[bytes]) -> bytes:
    """A file in prometheus_client's format (4-byte length in use, 4 of padding, entries)."""
    body = b"".join(entries)
    return struct.pack("i", 8 + len(body)) + b"\0" * 4 + body


def plant(kind: str, path: Path, outside: Path, real_worker_file: Path) -> None:
    """Put a hostile `kind` of file at `path`; `outside` is a directory the sidecar must never touch."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "sparse-2gb":
        with open(path, "wb") as f:
            f.write(struct.pack("i", 2**31 - 1))
            f.truncate(2 << 30)
    elif kind == "garbage":
        data = bytearray(random.Random(9).randbytes(4096))
        data[:4] = struct.pack("i", 4096)
        path.write_bytes(data)
    elif kind == "bad-key":  # well framed, but a label value that is a number: no encoder can write it
        key = json.dumps(["sqlalchemy_pool_checkouts", "sqlalchemy_pool_checkouts_total", {"pool": 5}, "x"])
        path.write_bytes(_db([_entry(key, 1000.0)]))
    elif kind == "symlink":  # to a copy of a real worker's file, outside: its numbers must not count
        shutil.copy(real_worker_file, outside / "elsewhere.db")
        path.symlink_to(outside / "elsewhere.db")
    elif kind == "directory":
        path.mkdir()
    elif kind == "empty-for-a-minute":  # created by a worker that died before truncating it
        path.touch()
        os.utime(path, (time.time() - 60, time.time() - 60))
    elif kind == "too-many-series":  # well formed: 150,000 distinct series, more than a merge may hold
        path.write_bytes(_db([_entry(json.dumps([f"m{i}", f"m{i}", {}, ""]), 1.0) for i in range(150_000)]))
    else:
        raise AssertionError(kind)


# What prometheus_client's MmapedDict does first (open with "a+b"), then death before its truncate.
DIE_AFTER_CREATING = "import os, sys; open(f'{sys.argv[1]}/counter_{os.getpid()}.db', 'ab'); os.kill(os.getpid(), 9)"

KINDS = ["fifo", "sparse-2gb", "garbage", "bad-key", "symlink", "directory", "empty-for-a-minute", "too-many-series"]


async def test_hostile_files_are_quarantined_and_the_rest_still_served(
    tmp_path: Path, mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: next to two workers' files, a FIFO (today: every scrape hangs, and SIGTERM no longer
    stops the sidecar), a sparse file claiming 2 GB (4 GB of memory), garbage, a key no encoder can
    write, a symlink to a worker's file outside, a directory, an empty file left for a minute, a file
    of 150,000 series (today: each a 500 at every scrape, or numbers from outside the directory).

    Each is moved into quarantine/ once (counted, one WARNING naming it, listed by /readyz); every
    scrape answers 200 with exactly the workers' numbers; SIGTERM stops the sidecar within 5 s, and
    its peak memory stays under 256 MB.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    directory = mp_workers.directory
    outside = tmp_path / "outside"
    outside.mkdir()
    # Named like prometheus_client's files, with no pid: never a worker to reap, always merged.
    names = {kind: f"counter_{kind}.db" for kind in KINDS}
    for kind, name in names.items():
        plant(kind, directory / name, outside, directory / f"counter_{a.pid}.db")
    serve = serve_dir(directory)

    for _ in range(2):  # the second scrape: nothing quarantined twice, nothing warned twice
        status, body = await get(serve.base, "/metrics")
        assert status == 200, body[:500]
        s = samples_of(body)
        assert metric(s, "sqlalchemy_pool_checkouts_total", pool="app") == CHECKOUTS
        assert metric(s, "sqlalchemy_pool_connections", pool="app", state="used") == USED
        assert metric(s, "sqlalchemy_exporter_sidecar_quarantined_files_total") == len(KINDS)
        assert metric(s, "sqlalchemy_exporter_sidecar_errors_total") == 0
        assert not any(n.startswith("m1") for n, _ in s)

    assert [k for k, name in names.items() if os.path.lexists(directory / name)] == []
    moved = sorted(name.split("-", 3)[3] for name in os.listdir(directory / "quarantine"))
    assert moved == sorted(names.values())
    status, body = await get(serve.base, "/readyz")
    assert status == 200, body
    assert sorted(json.loads(body)["quarantined"]) == sorted(names.values())
    assert {k: len(serve.warnings(name)) for k, name in names.items()} == dict.fromkeys(KINDS, 1), serve.text()
    assert (outside / "elsewhere.db").read_bytes() == (directory / f"counter_{a.pid}.db").read_bytes()

    seconds = serve.stop()
    assert serve.proc.returncode == 0, serve.text()
    assert seconds < 5.0
    assert serve.maxrss_kb < 256 * 1024, serve.maxrss_kb


async def test_a_file_a_worker_is_creating_is_left_alone(
    mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: files caught in the instant between a worker creating them and writing their header
    (0 bytes; 64 KiB of zeros), as a live worker has them (today: every scrape answers 500).

    They are merged as empty, never quarantined: the workers' numbers are served exactly.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    directory = mp_workers.directory
    (directory / f"counter_{os.getpid()}.db").touch()
    (directory / f"histogram_{os.getpid()}.db").write_bytes(b"\0" * 65536)
    serve = serve_dir(directory)

    status, body = await get(serve.base, "/metrics")
    assert status == 200, body[:500]
    s = samples_of(body)
    assert metric(s, "sqlalchemy_pool_checkouts_total", pool="app") == CHECKOUTS
    assert metric(s, "sqlalchemy_exporter_sidecar_quarantined_files_total") == 0
    assert (directory / f"counter_{os.getpid()}.db").exists()
    assert (directory / f"histogram_{os.getpid()}.db").exists()
    assert serve.warnings() == []
    serve.stop()
    assert serve.proc.returncode == 0


async def test_a_worker_that_died_before_writing_its_file_is_reaped(
    mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: a real process creates its counter_<pid>.db, as prometheus_client does, and is SIGKILLed
    before writing anything into it (today: every scrape answers 500, forever).

    The dead worker is reaped like any other: its empty file goes, the others' numbers are served.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    directory = mp_workers.directory
    died = subprocess.run(
        [sys.executable, "-c", DIE_AFTER_CREATING, str(directory)],
        timeout=30,
    )
    assert died.returncode == -9
    empty = [p for p in directory.glob("counter_*.db") if p.stat().st_size == 0]
    assert len(empty) == 1
    serve = serve_dir(directory)

    status, body = await get(serve.base, "/metrics")
    assert status == 200, body[:500]
    s = samples_of(body)
    assert metric(s, "sqlalchemy_pool_checkouts_total", pool="app") == CHECKOUTS
    assert metric(s, "sqlalchemy_exporter_sidecar_reaped_workers_total") == 1
    assert metric(s, "sqlalchemy_exporter_sidecar_quarantined_files_total") == 0
    assert not empty[0].exists()
    serve.stop()
    assert serve.proc.returncode == 0


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
async def test_the_lock_file_is_never_followed(
    kind: str, tmp_path: Path, mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: the sidecar's lock file is planted as a symlink to a path outside the directory (today:
    the sidecar creates that file), or as a FIFO (today: the sidecar hangs before it listens).

    The planted lock is quarantined, a regular one takes its place, nothing outside is created, and
    the workers' numbers are served.
    """
    a = mp_workers.start(commits=3, held=1)
    mp_workers.ready(a)
    directory = mp_workers.directory
    target = tmp_path / "outside" / "created-by-the-sidecar"
    target.parent.mkdir()
    if kind == "symlink":
        (directory / LOCK).symlink_to(target)
    else:
        os.mkfifo(directory / LOCK)
    serve = serve_dir(directory)

    status, body = await get(serve.base, "/metrics")
    assert status == 200, body[:500]
    assert not os.path.lexists(target)
    s = samples_of(body)
    assert metric(s, "sqlalchemy_pool_checkouts_total", pool="app") == 4
    assert metric(s, "sqlalchemy_exporter_sidecar_quarantined_files_total") == 1
    assert (directory / LOCK).is_file() and not (directory / LOCK).is_symlink()
    assert len(serve.warnings(LOCK)) == 1, serve.text()
    serve.stop()
    assert serve.proc.returncode == 0


# -- the "not yet tried": a planted quarantine/, a file swapped mid-open, a reused pid ------


def _garbage(path: Path) -> None:
    plant("garbage", path, path.parent, path)


@pytest.mark.parametrize("planted", ["symlink", "directory"])
def test_a_planted_quarantine_is_never_followed_out_of_the_directory(planted: str, tmp_path: Path) -> None:
    """Fault: the workers' user plants `quarantine/` as a symlink to a directory outside, or as its own
    directory holding symlinks (to a file and a directory outside) and a directory with a symlink in
    it, named to be the oldest entries, the ones the sidecar prunes (the sidecar runs as root here
    when the suite does).

    A bad file is still moved aside into a real `quarantine/` directory of the multiprocess
    directory; nothing outside is written, moved or removed, through a symlink or otherwise.
    """
    from sqlalchemy_pool_exporter.sidecar.merge import Sidecar
    from sqlalchemy_pool_exporter.sidecar.quarantine import KEEP

    directory, outside = tmp_path / "mp", tmp_path / "outside"
    directory.mkdir()
    (outside / "dir").mkdir(parents=True)
    (outside / "dir" / "keep").write_text("kept")
    (outside / "file").write_text("kept")
    quarantine = directory / "quarantine"
    if planted == "symlink":
        quarantine.symlink_to(outside / "dir")
    else:
        quarantine.mkdir()
        for i in range(KEEP + 5):  # the oldest names there are: pruned first
            (quarantine / f"{i:020d}-file").symlink_to(outside / "file")
        (quarantine / f"{0:020d}-dir").symlink_to(outside / "dir")
        (quarantine / f"{1:020d}-nest").mkdir()
        (quarantine / f"{1:020d}-nest" / "link").symlink_to(outside / "dir")
        if os.geteuid() == 0:  # the workers' user owns all of it
            for path in (quarantine, *quarantine.iterdir()):
                os.lchown(path, 65534, 65534)
    _garbage(directory / "counter_garbage.db")

    sidecar = Sidecar(directory, same_pid_namespace=False)
    try:
        assert [m.name for m in sidecar.merge() if m.samples] == []
    finally:
        sidecar.close()

    assert sidecar.quarantine.moved == 1 and sidecar.errors == 0
    assert not quarantine.is_symlink() and quarantine.is_dir()
    assert [n for n in os.listdir(quarantine) if n.endswith("-counter_garbage.db")] != []
    if planted == "directory":  # pruned down to the newest KEEP: the planted links and directories went
        assert len(os.listdir(quarantine)) == KEEP
    assert sorted(p.name for p in outside.rglob("*")) == ["dir", "file", "keep"]
    assert (outside / "file").read_text() == (outside / "dir" / "keep").read_text() == "kept"


@pytest.mark.parametrize("swap", ["regular", "symlink", "fifo"])
def test_a_file_replaced_between_the_check_and_the_open_is_rejected(swap: str, tmp_path: Path) -> None:
    """Fault: a worker's file passes the sidecar's lstat, then is replaced (by rename, as a writer can)
    with another regular file, a symlink to a file outside, or a FIFO, before the sidecar opens it.

    The read is refused ("was replaced" or "cannot be opened"), never blocks, and never returns the
    replacement's numbers; the untouched file still reads.
    """
    from sqlalchemy_pool_exporter.sidecar import mpfile

    directory, outside = tmp_path / "mp", tmp_path / "outside"
    directory.mkdir()
    outside.mkdir()
    key = json.dumps(["forged", "forged_total", {}, "x"])
    real, swapped = directory / "counter_1.db", directory / "swap.tmp"
    real.write_bytes(_db([_entry(key, 1.0)]))
    (outside / "elsewhere.db").write_bytes(_db([_entry(key, 1000.0)]))
    seen = os.lstat(real)  # the sidecar's check
    if swap == "regular":
        swapped.write_bytes(_db([_entry(key, 1000.0)]))
    elif swap == "symlink":
        swapped.symlink_to(outside / "elsewhere.db")
    else:
        os.mkfifo(swapped)
    os.rename(swapped, real)  # the swap, atomic, between the check and the open

    reader = mpfile.Reader(lambda: None)
    with pytest.raises(mpfile.Rejected, match=r"was replaced while being opened|cannot be opened"):
        reader.read(str(real), real.name, 10, seen)
    if swap == "regular":
        parsed = reader.read(str(real), real.name, 10)  # checked afresh: the new file is read as what it is
        assert parsed is not None and parsed.values == (1000.0,)


async def test_a_dead_workers_pid_taken_by_another_process_is_still_reaped(
    mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: worker b (2 connections held) is SIGKILLed and its pid is taken by an unrelated process
    before the sidecar reaps it (here: b's files and stale `.alive` mark renamed to the pid of a live
    `sleep`, as if the kernel had handed b's pid on). Today /proc says that pid runs, so b is never
    reaped: its live gauges are summed forever (`used` 3 instead of 1).

    The process at that pid started after b's mark was last touched, so it is not b: b is reaped once,
    its counters folded into the archive (checkouts still exact) and its live gauges dropped.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    directory = mp_workers.directory
    b.kill()
    b.wait(30)
    other = subprocess.Popen(["sleep", "300"])
    try:
        for path in directory.iterdir():
            if f"_{b.pid}." in path.name:
                path.rename(directory / path.name.replace(f"_{b.pid}.", f"_{other.pid}."))
        mark = directory / f"pool_exporter_{other.pid}.alive"
        os.utime(mark, (time.time() - 60, time.time() - 60))
        serve = serve_dir(directory)

        for _ in range(2):
            status, body = await get(serve.base, "/metrics")
            assert status == 200, body[:500]
            s = samples_of(body)
            assert metric(s, "sqlalchemy_pool_checkouts_total", pool="app") == CHECKOUTS
            assert metric(s, "sqlalchemy_pool_connections", pool="app", state="used") == 1
            assert metric(s, "sqlalchemy_exporter_sidecar_reaped_workers_total") == 1
            assert metric(s, "sqlalchemy_exporter_sidecar_workers") == 1
        assert [p.name for p in directory.iterdir() if f"_{other.pid}." in p.name] == []
        assert other.poll() is None  # the other process is left alone
        serve.stop()
        assert serve.proc.returncode == 0, serve.text()
    finally:
        other.kill()
        other.wait(30)
