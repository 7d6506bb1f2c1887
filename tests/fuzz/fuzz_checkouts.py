"""Fuzz the workers' checkouts files (sidecar/checkouts.py) as the sidecar reads them for the server join.

Input: `<max_holders byte><live mask byte><repeat byte>` then up to 8 files separated by `\\0\\0`. File n
is planted as `pool_exporter_<n + 1>.checkouts` (its bytes repeated 2 or 1,024 times for some repeat
bytes, so the line and byte caps are reachable under -max_len), its worker live when bit n of the mask
is set, in a real directory that also holds a worker's metrics file, `.alive` marks, a stray `.tmp`,
and a live worker's checkouts file that is a symlink to a file outside. `checkouts.read()` reads them
with the sidecar's real quarantine. Oracle: no exception; each live worker's file is either read (and
stays where it was, unchanged) or quarantined whole (moved into `quarantine/` with its bytes, a reason
of one line); a dead worker's file and every other file stay as they were; every entry returned is
within every bound (pools <= MAX_POOLS, holder names per pool <= max_holders, each field of its type
and range, pool and holder valid label values, no pid twice) and is a line of its own worker's file,
its holder that line's or `other`; only a pid claimed twice or a pool past the cap drops a line; every
rename, removal and write (a `sys.addaudithook` hook) stays inside the directory, the file outside
keeps its bytes.

Run: python tests/fuzz/fuzz_checkouts.py tests/fuzz/corpus/checkouts -dict=tests/fuzz/checkouts.dict -max_total_time=60
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["sqlalchemy_pool_exporter"]):
    from sqlalchemy_pool_exporter import validation
    from sqlalchemy_pool_exporter.instrumentation import holders
    from sqlalchemy_pool_exporter.sidecar import checkouts
    from sqlalchemy_pool_exporter.sidecar.quarantine import QUARANTINE, Quarantine

from oracles import absolute, scratch

ROOT = Path(scratch("checkouts"))
DIRECTORY = ROOT / "mp"
OUTSIDE = ROOT / "outside"
SEPARATOR = b"\0\0"
MAX_FILES = 8
REPEATS = {0xFE: 2, 0xFF: 1024}
SYMLINK = 77  # a live worker whose checkouts file is a symlink to OUTSIDE
OTHERS = {  # the directory's other files: never touched
    "counter_1.db": b"\x10\0\0\0metrics",
    ".pool_exporter_1.checkouts.tmp": b'["p",1,"h",0,false]\n',
    "pool_exporter_1.checkouts.bak": b'["p",1,"h",0,false]\n',
}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MAX_PID = 2**31 - 1

touched: list[tuple[str, str, int | None]] = []  # (event, path, dir_fd)
watching = False


def audit(event: str, args: tuple[Any, ...]) -> None:
    if not watching:
        return
    if event in ("os.rename", "os.replace"):  # (src, dst, src_dir_fd, dst_dir_fd)
        touched.append((event, os.fsdecode(args[0]), args[2]))
        touched.append((event, os.fsdecode(args[1]), args[3]))
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.truncate", "os.chmod"):
        touched.append((event, os.fsdecode(args[0]), args[-1] if isinstance(args[-1], int) else None))
    elif event == "shutil.rmtree":
        touched.append((event, os.fsdecode(args[0]), args[1] if len(args) > 1 else None))
    elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        flags = args[2] if isinstance(args[2], int) else 0
        mode = args[1] if isinstance(args[1], str) else ""
        if flags & WRITE or any(c in mode for c in "wax+"):
            touched.append((event, os.fsdecode(args[0]), None))


def inside(path: str, dir_fd: int | None) -> bool:
    """Whether `path` (relative to `dir_fd`, our quarantine directory, when given) stays in DIRECTORY."""
    if dir_fd is not None and dir_fd >= 0:  # CPython passes AT_FDCWD (-100) or -1 for "none"
        return "/" not in path and path not in ("", ".", "..")
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
    return os.path.dirname(full) in (str(DIRECTORY), str(DIRECTORY / QUARANTINE)) and os.path.basename(full) not in (
        "",
        ".",
        "..",
    )


def split(data: bytes) -> tuple[int, int, list[bytes]]:
    """max_holders, the live mask and the files of one input."""
    head = data[:3].ljust(3, b"\0")
    files = data[3:].split(SEPARATOR, MAX_FILES - 1) if len(data) > 3 else []
    if files:
        files[0] *= REPEATS.get(head[2], 1)
    return 1 + head[0] % 64, head[1], files


def join(max_holders: int, live: int, files: list[bytes], repeat: int = 0) -> bytes:
    """The input that split() reads as these (for seeds)."""
    return bytes([max_holders - 1, live, repeat]) + SEPARATOR.join(files)


def reset() -> None:
    for path in (DIRECTORY, OUTSIDE):  # not ROOT: it is our working directory
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
    (OUTSIDE / "victim").write_bytes(b'["p",1,"outside",0,false]\n')
    for name, body in OTHERS.items():
        (DIRECTORY / name).write_bytes(body)
    checkouts.path(DIRECTORY, SYMLINK).symlink_to(OUTSIDE / "victim")


def snapshot(path: Path) -> tuple[str, bytes]:
    if path.is_symlink():
        return "symlink", os.fsencode(os.readlink(path))
    return "file", path.read_bytes()


def line_entries(body: bytes) -> list[Any]:
    """The JSON lines of a file the reader accepted (read here independently)."""
    return [json.loads(line) for line in body.decode("ascii").split("\n") if line]


def one_input(data: bytes) -> None:
    global watching
    max_holders, mask, files = split(data)
    reset()
    planted: dict[str, tuple[int, bytes, bool]] = {}  # name: (worker, bytes, live)
    for n, body in enumerate(files):
        path = checkouts.path(DIRECTORY, n + 1)
        path.write_bytes(body)
        live = bool(mask >> n & 1)
        planted[path.name] = (n + 1, body, live)
    live_workers = {w for w, _, live in planted.values() if live} | {SYMLINK}
    before = {name: snapshot(DIRECTORY / name) for name in os.listdir(DIRECTORY)}
    reasons: dict[str, str] = {}
    quarantine = Quarantine(DIRECTORY)
    real_move = quarantine.move

    def move(name: str, reason: str) -> None:
        reasons[name] = reason
        real_move(name, reason)

    touched.clear()
    watching = True
    try:
        found = checkouts.read(DIRECTORY, live_workers.__contains__, move, max_holders)
    finally:
        watching = False

    outside = [(event, path) for event, path, fd in touched if not inside(path, fd)]
    assert not outside, f"touched paths outside the directory: {outside}"
    assert os.listdir(OUTSIDE) == ["victim"] and (OUTSIDE / "victim").read_bytes() == b'["p",1,"outside",0,false]\n'

    # Quarantined: exactly the live workers' bad files, each moved whole with a reason of one line.
    symlink = checkouts.path(DIRECTORY, SYMLINK).name
    assert symlink in reasons, "a symlinked checkouts file was read"
    for name, reason in reasons.items():
        assert reason and "\n" not in reason and reason.isprintable(), (name, reason)
        assert name == symlink or (name in planted and planted[name][2]), f"{name} quarantined"
    moved = sorted(os.listdir(DIRECTORY / QUARANTINE))
    assert len(moved) == len(reasons), (moved, reasons)
    for target in moved:
        name = target.split("-", 3)[3]
        assert name in reasons, target
        assert snapshot(DIRECTORY / QUARANTINE / target) == before[name], f"{name} changed on its way aside"
    after = {name: snapshot(DIRECTORY / name) for name in os.listdir(DIRECTORY) if name != QUARANTINE}
    assert after == {k: v for k, v in before.items() if k not in reasons}, "a file was changed or removed"

    # What was read: within every bound, each entry a line of its own worker's accepted file.
    accepted = {w: line_entries(body) for name, (w, body, live) in planted.items() if live and name not in reasons}
    pools: dict[str, set[str]] = {}
    pids: set[int] = set()
    for held in found:
        assert held.worker in accepted, f"an entry of worker {held.worker}, whose file was not accepted"
        assert isinstance(held.pool, str) and validation.pool_name(held.pool) == held.pool and held.pool.isprintable()
        assert isinstance(held.holder, str) and validation.holder_name(held.holder) == held.holder
        assert held.holder.isprintable() and held.holder != holders.POOL, held.holder
        assert type(held.pid) is int and 0 < held.pid <= _MAX_PID, held.pid
        assert held.pid not in pids, f"pid {held.pid} twice"
        pids.add(held.pid)
        assert type(held.age) is float and math.isfinite(held.age) and held.age >= 0, held.age
        assert type(held.transaction) is bool, held.transaction
        line = next((e for e in accepted[held.worker] if e[1] == held.pid and e[0] == held.pool), None)
        assert line is not None, f"{held} is no line of its worker's file"
        assert float(line[3]) == held.age and line[4] is held.transaction, (held, line)
        assert held.holder in (line[2], holders.OTHER), (held, line)
        if held.holder not in (holders.NONE, holders.OTHER):
            pools.setdefault(held.pool, set()).add(held.holder)
        else:
            pools.setdefault(held.pool, set())
    assert len(pools) <= checkouts.MAX_POOLS, len(pools)
    assert all(len(names) <= max_holders for names in pools.values()), max_holders
    # Nothing dropped but a pid claimed twice or a pool past the cap.
    lines = [e for w in sorted(accepted) for e in accepted[w]]
    claims: dict[int, int] = {}
    for e in lines:
        claims[e[1]] = claims.get(e[1], 0) + 1
    kept_pools: list[str] = []
    expected = 0
    for e in lines:
        if claims[e[1]] > 1:
            continue
        if e[0] not in kept_pools:
            if len(kept_pools) >= checkouts.MAX_POOLS:
                continue
            kept_pools.append(e[0])
        expected += 1
    assert len(found) == expected, (len(found), expected)


def main() -> None:
    argv = absolute(sys.argv)
    logging.disable(logging.CRITICAL)  # a WARNING per file quarantined, at every run
    reset()
    os.chdir(ROOT)  # relative names resolve from ROOT, outside the directory
    sys.addaudithook(audit)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
