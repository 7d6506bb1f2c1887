"""Fuzz the compaction journal (sidecar/compaction.py) as the sidecar replays it at start.

Input: the bytes of `pool_exporter_compaction.json` (`@DIR@` and `@OUT@` in them stand for the
directory and the one beside it), planted in a real directory that holds our archives, workers'
files, a stray `.new`, and symlinks to files outside. `Compaction.recover()`
replays it. Oracle: every rename, removal and write it makes (seen by a `sys.addaudithook` hook,
the real calls) names a path inside the directory; the files outside keep their content; no
exception but the OSError of a directory we broke ourselves.

Run: python tests/fuzz/fuzz_journal.py tests/fuzz/corpus/journal -dict=tests/fuzz/journal.dict -max_total_time=60
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["sqlalchemy_pool_exporter"]):
    from sqlalchemy_pool_exporter.sidecar.compaction import JOURNAL, Compaction
    from sqlalchemy_pool_exporter.sidecar.quarantine import QUARANTINE, Quarantine

from oracles import absolute, scratch

# Its own place (tmpfs: the replay fsyncs): two runs at once must not share a directory. An input
# names it as @DIR@ (and the directory beside it, outside, as @OUT@): the seeds and the dictionary do.
ROOT = Path(scratch("journal"))
DIRECTORY = ROOT / "mp"
OUTSIDE = ROOT / "outside"
FILES = ["counter_archive.db", "counter_archive.db.new", "counter_1.db", "histogram_2.db", "gauge_max_3.db"]
OUTSIDE_FILES = ["victim", "victim.new", "counter_archive.db", "counter_archive.db.new", "counter_4.db"]
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

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


def reset() -> None:
    for path in (DIRECTORY, OUTSIDE):  # not ROOT: it is our working directory
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
    for name in FILES:
        (DIRECTORY / name).write_bytes(name.encode())
    for name in OUTSIDE_FILES:
        (OUTSIDE / name).write_bytes(b"outside")
    (DIRECTORY / "counter_9.db").symlink_to(OUTSIDE / "victim")
    (DIRECTORY / "counter_8.db").symlink_to(OUTSIDE / "counter_4.db")


def one_input(data: bytes) -> None:
    global watching
    reset()
    data = data.replace(b"@DIR@", os.fsencode(DIRECTORY)).replace(b"@OUT@", os.fsencode(OUTSIDE))
    (DIRECTORY / JOURNAL).write_bytes(data)
    touched.clear()
    watching = True
    try:
        Compaction(DIRECTORY, Quarantine(DIRECTORY)).recover()
    finally:
        watching = False
    outside = [(event, path) for event, path, fd in touched if not inside(path, fd)]
    if outside:
        raise AssertionError(f"the journal made us touch paths outside the directory: {outside}")
    for name in os.listdir(OUTSIDE):
        if (OUTSIDE / name).read_bytes() != b"outside":
            raise AssertionError(f"{OUTSIDE / name} changed")
    if sorted(os.listdir(OUTSIDE)) != sorted(OUTSIDE_FILES):
        raise AssertionError(f"a file outside is gone: {sorted(os.listdir(OUTSIDE))}")
    if os.path.lexists(DIRECTORY / JOURNAL):
        listing = (
            sorted(os.listdir(DIRECTORY)),
            sorted(os.listdir(DIRECTORY / QUARANTINE)) if os.path.isdir(DIRECTORY / QUARANTINE) else None,
        )
        raise AssertionError(f"the journal is still there after recover(): {listing}, {touched}")


def main() -> None:
    argv = absolute(sys.argv)
    logging.disable(logging.CRITICAL)  # a WARNING per ignored entry, at every run
    reset()
    os.chdir(ROOT)  # relative names resolve from ROOT, outside the directory
    sys.addaudithook(audit)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
