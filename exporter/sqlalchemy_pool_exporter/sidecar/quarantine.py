"""Bad files of the multiprocess directory, moved aside into `<directory>/quarantine/`, the newest few kept.

A file the sidecar cannot merge (not a regular file, too large, corrupt) would otherwise fail or slow
every merge; deleting it would destroy what an operator needs to find out what happened. Moved aside,
it is out of every merge, logged once at WARNING and counted. Only the newest KEEP entries stay, so a
writer that keeps planting files cannot fill the disk through us. A moved file is named
`<ns since the epoch>-<pid>-<n>-<original name>`: unique, and sorted by age.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import shutil
import stat
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("sqlalchemy_pool_exporter.sidecar")

QUARANTINE = "quarantine"
KEEP = 20


class Quarantine:
    """Moves files out of `directory` into its quarantine subdirectory, never following a symlink."""

    def __init__(self, directory: Path, keep: int = KEEP) -> None:
        self.directory = directory
        self.keep = keep
        self.moved = 0
        self.recent: deque[str] = deque(maxlen=keep)  # original names, oldest first
        self._seq = itertools.count()

    def move(self, name: str, reason: str) -> None:
        """Move `name`, a plain name in the directory, aside because it `reason`s; a file already gone is not."""
        prefix = f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq)}-"
        target = prefix + os.fsdecode(os.fsencode(name)[: 250 - len(prefix)])
        try:
            fd = self._open()
        except OSError as exc:
            where = self._delete(name, f"no quarantine directory: {exc.strerror}")
        else:
            try:
                # rename() moves a symlink, FIFO or directory itself, never what it points to.
                os.rename(self.directory / name, target, dst_dir_fd=fd)
                where = f"moved to {QUARANTINE}/{target}"
                self._prune(fd)
            except FileNotFoundError:
                return
            except OSError as exc:
                where = self._delete(name, f"cannot move it: {exc.strerror}")
            finally:
                os.close(fd)
        if where is None:
            return
        self.moved += 1
        self.recent.append(name)
        log.warning("%s in %s %s: %s", name, self.directory, reason, where)

    def _open(self) -> int:
        path = self.directory / QUARANTINE
        for attempt in range(2):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                if attempt or exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                # A symlink or a file where our directory belongs: not ours, and not to be followed.
                log.warning("%s in %s is not a directory: removed, to be created again", QUARANTINE, self.directory)
                os.unlink(path)
        raise AssertionError("unreachable")

    def _prune(self, fd: int) -> None:
        for old in sorted(os.listdir(fd))[: -self.keep]:
            try:
                if stat.S_ISDIR(os.lstat(old, dir_fd=fd).st_mode):
                    shutil.rmtree(old, dir_fd=fd)
                else:
                    os.unlink(old, dir_fd=fd)
            except OSError as exc:
                log.debug("cannot prune %s/%s: %s", QUARANTINE, old, exc)

    def _delete(self, name: str, why: str) -> str | None:
        """The fallback when there is nowhere to move a file: it must not fail every merge."""
        path = self.directory / name
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s in %s can neither be quarantined (%s) nor deleted: %s", name, self.directory, why, exc)
            return None
        return f"deleted ({why})"
