"""Dead workers' files folded into one archive per type, crash-safe, under the directory's lock.

New archives are written beside the old ones (`counter_archive.db.new`), a journal records the swap
(the commit point), then renames and removals are replayed from it, again at the next start if we
die midway. Whoever can write the directory can also plant a journal: one is read only if it is a
small regular file, and only its entries that name our own archives and workers' files, by plain
name and as regular files, are replayed; the others are ignored (one WARNING, counted). A journal
that does not parse is quarantined. Nothing here follows a symlink or writes through one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import Unavailable
from . import mpfile
from .quarantine import Quarantine

log = logging.getLogger("sqlalchemy_pool_exporter.sidecar")

ARCHIVE = "archive"
JOURNAL = "pool_exporter_compaction.json"
LOCK = "pool_exporter_sidecar.lock"
NEW_SUFFIX = ".new"  # never matches prometheus_client's `*.db` glob
# A journal names ~6 files of ~30 bytes per dead worker, and the sidecar folds at most BATCH workers
# under one journal: a real one stays far below this.
MAX_JOURNAL_BYTES = 1 << 20
BATCH = 1000

# How a dead worker's file folds into the archive of its type; live* gauges are dropped instead,
# and `all`/`mostrecent` gauges (per-pid by design) are left alone.
FOLD: dict[str, Callable[[float, float], float]] = {
    "counter": lambda a, b: a + b,
    "histogram": lambda a, b: a + b,
    "summary": lambda a, b: a + b,
    "gauge_sum": lambda a, b: a + b,
    "gauge_max": max,
    "gauge_min": min,
}
LIVE_MODES = sorted(m for m in mpfile.GAUGE_MODES if m.startswith("live"))
# What a journal may name: the archives it replaces and the dead workers' files it removes.
_ARCHIVE_FILE = re.compile(rf"(?:{'|'.join(FOLD)})_{ARCHIVE}\.db")
_WORKER_FILE = re.compile(rf"(?:{'|'.join(FOLD)})_\d+\.db", re.ASCII)


class MergeFailed(Unavailable):
    """No merge result: the directory is unreadable, its lock is held elsewhere, or time ran out."""


class Budget:
    """What a merge checks between its steps: its deadline, and whether the sidecar is stopping."""

    def __init__(self, seconds: float, stop: threading.Event) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.stop = stop

    def __call__(self, waiting_for: str = "") -> None:
        if self.stop.is_set():
            raise MergeFailed("the sidecar is stopping")
        if time.monotonic() > self.deadline:
            why = f": {waiting_for}" if waiting_for else ""
            raise MergeFailed(f"the merge did not finish within {self.seconds:g} s{why}")


class Compaction:
    """The lock, the archives and the journal of one directory."""

    def __init__(self, directory: Path, quarantine: Quarantine) -> None:
        self.directory = directory
        self.quarantine = quarantine
        self.ignored = 0  # journal entries that named no file of ours

    @contextlib.contextmanager
    def locked(self, mode: int, budget: Budget) -> Iterator[None]:
        """flock the lock file: two sidecars on one directory must not fold the same files twice.

        Anyone who can write the directory can take the lock too: it is polled until the merge's
        deadline, never waited for.
        """
        fd = self._open_lock()
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    budget(f"{LOCK} is held by another process")
                    time.sleep(0.02)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _open_lock(self) -> int:
        path = self.directory / LOCK
        for _ in range(3):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENXIO):
                    raise
                self.quarantine.move(LOCK, f"cannot be opened as our lock: {exc.strerror}")
                continue
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
            self.quarantine.move(LOCK, "is not a regular file")
        raise MergeFailed(f"{LOCK} cannot be made a regular file")

    def clear(self, name: str) -> None:
        """Remove `name` (a symlink itself, not its target); a directory in the way is quarantined."""
        try:
            os.unlink(self.directory / name)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            self.quarantine.move(name, "is a directory")

    def drop_live(self, pid: int) -> None:
        """A dead worker's live gauges go (prometheus_client's mark_process_dead, by name)."""
        for mode in LIVE_MODES:
            self.clear(f"gauge_{mode}_{pid}.db")

    def prepare(self, dead: list[int], reader: mpfile.Reader) -> bool:
        """Write the new archives and the journal (the commit point); False when nothing is to fold."""
        replace: list[tuple[str, str]] = []
        removed: list[str] = []
        for kind, fold in FOLD.items():
            names = [f"{kind}_{pid}.db" for pid in dead if os.path.lexists(self.directory / f"{kind}_{pid}.db")]
            if not names:
                continue
            archive = f"{kind}_{ARCHIVE}.db"
            values: dict[str, tuple[float, float]] = {}
            for name in (archive, *names):
                try:
                    entries = reader.load(self.directory / name, mpfile.MAX_SERIES - len(values))
                except FileNotFoundError:
                    continue
                except mpfile.Rejected as exc:
                    self.quarantine.move(name, str(exc))
                    continue
                for key, value, ts in entries or ():
                    old = values.get(key.raw)
                    values[key.raw] = (value, ts) if old is None else (fold(old[0], value), max(old[1], ts))
                if name != archive:
                    removed.append(name)
            self._write(archive + NEW_SUFFIX, mpfile.encode(values))
            replace.append((archive + NEW_SUFFIX, archive))
        if not replace:
            return False
        tmp = JOURNAL + ".tmp"
        self._write(tmp, json.dumps({"replace": replace, "remove": removed}).encode())
        os.replace(self.directory / tmp, self.directory / JOURNAL)
        _fsync_dir(self.directory)
        return True

    def recover(self) -> None:
        """Finish a compaction the journal describes, or drop one that never reached its journal."""
        journal = self.directory / JOURNAL
        plan: Any = None
        try:
            plan = json.loads(mpfile.read_small(journal, MAX_JOURNAL_BYTES))
            if not (isinstance(plan, dict) and all(isinstance(plan.get(k), list) for k in ("replace", "remove"))):
                raise mpfile.Rejected("is not a compaction journal")
        except FileNotFoundError:
            plan = None
        except (mpfile.Rejected, ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested absurdly deep
            self.quarantine.move(JOURNAL, str(exc) if isinstance(exc, mpfile.Rejected) else "is not JSON")
            plan = None
        if plan is not None:
            self._replay(plan["replace"], plan["remove"])
            journal.unlink()
        for stray in self.directory.glob("*.db" + NEW_SUFFIX):
            with contextlib.suppress(OSError):
                stray.unlink()

    def _replay(self, replace: list[Any], remove: list[Any]) -> None:
        """Do what the journal says for the entries that name our own regular files, and only those."""
        ignored: list[Any] = []
        for item in replace:
            pair = item if isinstance(item, list) and len(item) == 2 else [None, None]
            new, archive = self._own(pair[0]), self._own(pair[1])
            if (
                archive is None
                or not _ARCHIVE_FILE.fullmatch(archive)
                or new != archive + NEW_SUFFIX
                or self._regular(new) is False
                or self._regular(archive) is False
            ):
                ignored.append(item)
            elif self._regular(new):
                os.replace(self.directory / new, self.directory / archive)
        for item in remove:
            name = self._own(item)
            if name is None or not _WORKER_FILE.fullmatch(name) or self._regular(name) is False:
                ignored.append(item)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
        _fsync_dir(self.directory)
        if ignored:
            self.ignored += len(ignored)
            shown = ", ".join(repr(i)[:120] for i in ignored[:3]) + (", ..." if len(ignored) > 3 else "")
            plural = "y" if len(ignored) == 1 else "ies"
            log.warning(
                "%s in %s: ignored %d entr%s naming no file of ours: %s",
                JOURNAL,
                self.directory,
                len(ignored),
                plural,
                shown,
            )

    def _own(self, item: object) -> str | None:
        """A plain name in the directory, or None. Earlier versions wrote `<directory>/<name>`."""
        if not isinstance(item, str):
            return None
        if os.path.dirname(item) == str(self.directory):
            item = os.path.basename(item)
        return None if "/" in item or item in ("", ".", "..") else item

    def _regular(self, name: str) -> bool | None:
        """Whether `name` is a regular file (not a symlink); None when it does not exist."""
        try:
            return stat.S_ISREG(os.lstat(self.directory / name).st_mode)
        except FileNotFoundError:
            return None

    def _write(self, name: str, data: bytes) -> None:
        """Create `name` durably: never through a symlink, never into a file a writer planted meanwhile."""
        self.clear(name)
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
