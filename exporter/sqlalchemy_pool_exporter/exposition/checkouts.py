"""A worker's current checkouts, written beside its metric files for the sidecar to join with the server.

The sidecar polls pg_stat_activity itself (service/pgview.py); what it cannot know is which backend
each worker holds and for whom. Once a flush, each worker writes `pool_exporter_<pid>.checkouts`: one
JSON array a line, `[pool, backend pid, holder, age in seconds, transaction open]`, for each
connection checked out now whose backend id is known (backends.py; read when the pool opened it,
nothing per checkout). At most MAX_ENTRIES lines; written to a temporary name and renamed, so the
sidecar never reads half a file. The sidecar reads it as untrusted input (sidecar/checkouts.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..instrumentation import holders

if TYPE_CHECKING:
    from ..instrumentation.reading import PoolSource

SUFFIX = ".checkouts"
# Lines a file holds at most, and bytes: what the sidecar accepts (sidecar/checkouts.py). A worker with
# more checkouts than this writes the oldest MAX_ENTRIES: those are the ones a lock or a stuck
# transaction most likely belongs to.
MAX_ENTRIES = 1000
MAX_BYTES = 512 << 10

Entry = tuple[str, int, str, float, bool]


def checkouts_path(directory: Path, pid: int) -> Path:
    return directory / f"pool_exporter_{pid}{SUFFIX}"


def entries(sources: Iterable[PoolSource], now: float | None = None) -> list[Entry]:
    """(pool, backend pid, holder, age, transaction open) of each checkout with a known backend, oldest first."""
    now = time.perf_counter() if now is None else now
    out: list[Entry] = []
    for source in sources:
        stats = source.stats
        pids, open_transactions = stats.backend_pids, stats.open_transactions
        for record, entry in tuple(stats.checked_out.items()):
            pid = pids.get(record)
            if pid is None:
                continue
            slot = entry[3]
            holder = slot.name if slot is not None else holders.NONE
            out.append((source.name, pid, holder, max(0.0, now - entry[0]), record in open_transactions))
    out.sort(key=lambda e: -e[3])
    return out[:MAX_ENTRIES]


def _lines(found: list[Entry]) -> Iterator[str]:
    for pool, pid, holder, age, open_tx in found:
        yield json.dumps([pool, pid, holder, round(age, 3), open_tx], ensure_ascii=True, allow_nan=False)


def write(directory: Path, pid: int, found: list[Entry]) -> None:
    """Replace this worker's checkouts file atomically (a temporary file renamed over it)."""
    path = checkouts_path(directory, pid)
    data = "".join(line + "\n" for line in _lines(found)).encode("ascii")
    while len(data) > MAX_BYTES:  # only with names near their limits: keep the oldest that fit
        found = found[: len(found) // 2]
        data = "".join(line + "\n" for line in _lines(found)).encode("ascii")
    tmp = directory / f".{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove(directory: Path, pid: int) -> None:
    with contextlib.suppress(OSError):
        checkouts_path(directory, pid).unlink(missing_ok=True)
