"""prometheus_client multiprocess files, read without trusting them, and merged.

Every app worker can write the multiprocess directory, so the sidecar treats what it finds there as
untrusted input (docs/reliability.md). prometheus_client's MultiProcessCollector opens each file by
path (following a symlink, blocking forever on a FIFO), reads as many bytes as the file's header
claims (a sparse file claiming 2 GB cost 4 GB of memory), and keeps every sample of every file before
summing them: one bad file fails every scrape. Here:

- a file is opened only if it is a regular file: lstat, then open with O_NOFOLLOW|O_NONBLOCK, then
  fstat of the same inode; at most MAX_FILE_BYTES of it are read;
- its bytes are parsed strictly (framing, UTF-8, the JSON shape of every key); a bad file is rejected
  as a whole, before any of its samples counts;
- samples are summed as files are read, so memory grows with distinct series, capped at MAX_SERIES.

The file format and the merge rules are prometheus_client's (checked on 0.26.0; the format, with its
timestamps, is the same from our floor 0.20): the file starts with a 4-byte native int, the bytes in
use, and 4 bytes of padding; then entries of a 4-byte key length, the UTF-8 key (the JSON
`[metric, sample, labels, help]`), spaces up to an 8-byte boundary (at least one), and two doubles,
value and timestamp. The sums follow `MultiProcessCollector._accumulate_metrics`. No private name of
prometheus_client is used; the gauge modes are `Gauge._MULTIPROC_MODES` of 0.26.0, spelled out.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# A pool adds ~23 KB to a worker's files (measured: 20 pools, 470 KB, the histogram file 512 KiB);
# prometheus_client grows a file by doubling from 64 KiB. 64 MiB leaves room for apps with thousands
# of series of their own while bounding what one file can make us read.
MAX_FILE_BYTES = 64 << 20
# Distinct series of one merge, across all files. At worst (every series its own family, distinct
# keys) a series costs 1.1 KB and 25 µs here, measured: this bounds a merge at ~120 MB and ~2.5 s.
# Series of different workers fold into one (except `all` gauges): a real directory holds thousands.
MAX_SERIES = 100_000
# Parsed keys kept per merge: keys repeat in every worker's file, and parsing JSON is the main cost.
_KEY_CACHE = MAX_SERIES
# How often the parser asks whether the merge is out of time (entries).
_CHECK_EVERY = 4096

# How prometheus_client names a file: `<type>_<pid>.db`, gauges `gauge_<mode>_<pid>.db`.
GAUGE_MODES = frozenset(
    ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent")
)
FILE = re.compile(
    r"(?P<kind>counter|histogram|summary|gauge_(?P<mode>" + "|".join(sorted(GAUGE_MODES)) + r"))_(?P<ident>[^/]+)\.db"
)

_go: Callable[[float], str] = floatToGoString
_INT = struct.Struct("i")
_DOUBLES = struct.Struct("dd")
_TYPES = {
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "FIFO",
    stat.S_IFDIR: "directory",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}

Check = Callable[[], None]
Labels = tuple[tuple[str, str], ...]


class Rejected(Exception):
    """A file that must not be merged; the message says why, in one line."""


class Key(NamedTuple):
    """A parsed file key, with what the merge derives from its labels worked out once."""

    raw: str
    metric: str
    sample: str
    labels: Labels  # sorted
    help: str
    gauge_labels: Labels  # without `pid`: a gauge's pid label is the file's
    bucket: tuple[float, Labels] | None  # a numeric `le` and the labels without it
    bad_le: str | None  # an `le` that is not a number: fatal in a histogram only


# (key, value, timestamp)
Entry = tuple[Key, float, float]


# -- opening and reading ---------------------------------------------------------------------


def open_regular(path: Path, limit: int, seen: os.stat_result | None = None) -> tuple[int, os.stat_result]:
    """A read-only fd on `path`, a regular file of at most `limit` bytes, and its fstat.

    Never follows a symlink, never blocks; `seen` is the lstat the caller may already have.
    """
    before = seen if seen is not None else os.lstat(path)
    _regular(before, limit)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        # Swapped for a symlink or a socket since the lstat, or not ours to read: the file's doing.
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EACCES, errno.EPERM):
            raise Rejected(f"cannot be opened: {exc.strerror}") from None
        raise
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise Rejected("was replaced while being opened")
        _regular(now, limit)
    except BaseException:
        os.close(fd)
        raise
    return fd, now


def _regular(st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Rejected(f"is not a regular file but a {_TYPES.get(stat.S_IFMT(st.st_mode), 'special file')}")
    if st.st_size > limit:
        raise Rejected(f"is {st.st_size} bytes, over the {limit} a file may have")


def _pread(fd: int, size: int) -> bytearray:
    """Up to `size` bytes from the start of `fd` (fewer at end of file)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.preadv(fd, [view[got:]], got)
        if n == 0:
            break
        got += n
    view.release()
    del buf[got:]
    return buf


def read_small(path: Path, limit: int) -> bytes:
    """All of a small regular file (the compaction journal), or Rejected."""
    fd, st = open_regular(path, limit)
    try:
        data = _pread(fd, min(st.st_size, limit) + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise Rejected(f"holds more than {limit} bytes")
    return bytes(data)


def read_db(path: Path, seen: os.stat_result | None = None) -> bytearray | None:
    """The bytes in use of a metrics file; None for a file a worker has created but not yet initialised.

    prometheus_client creates the file, truncates it to 64 KiB, then writes its header: for an instant
    a reader sees 0 bytes, or a header of 0. Only the bytes the header says are in use are read; a
    writer grows the file before it raises the header, so a live file is never shorter than that.
    """
    fd, st = open_regular(path, MAX_FILE_BYTES, seen)
    try:
        head = _pread(fd, 8)
        if not head:
            return None
        if len(head) < 8:
            raise Rejected(f"is {len(head)} bytes, shorter than its header")
        used = _INT.unpack_from(head)[0]
        if used == 0:
            return None
        if used > st.st_size:
            st = os.fstat(fd)  # grown since we looked?
        if not 8 <= used <= min(st.st_size, MAX_FILE_BYTES):
            raise Rejected(f"has a header claiming {used} bytes in use, in a file of {st.st_size}")
        data = _pread(fd, used)
    finally:
        os.close(fd)
    if len(data) < used:
        raise Rejected(f"has a header claiming {used} bytes in use, but holds {len(data)}")
    return data


# -- parsing ---------------------------------------------------------------------------------


class Reader:
    """Reads and validates files for one merge or compaction, sharing parsed keys between them."""

    def __init__(self, check: Check) -> None:
        self.check = check
        self._keys: dict[str, Key] = {}

    def load(self, path: Path, room: int, seen: os.stat_result | None = None) -> list[Entry] | None:
        """Every entry of the file at `path` (None: not initialised yet); Rejected past `room` entries."""
        data = read_db(path, seen)
        return None if data is None else self.entries(data, room)

    def entries(self, data: bytearray, room: int) -> list[Entry]:
        """The entries of a file's bytes in use; Rejected for bad framing or more than `room` entries.

        The framing is checked first, without decoding anything: a file of a million entries costs
        a walk over its lengths, not a million parsed keys.
        """
        unpack_int, unpack_doubles, key = _INT.unpack_from, _DOUBLES.unpack_from, self.key
        used = len(data)
        pos, count = 8, 0
        while pos < used:
            if count % _CHECK_EVERY == 0:
                self.check()
            if count == room:
                raise Rejected(f"holds more than the {room} series a merge may still take")
            size = unpack_int(data, pos)[0] if pos + 4 <= used else 0
            at = pos + 4 + size + 8 - (size + 4) % 8
            if size <= 0 or at + 16 > used:
                raise Rejected(f"has an entry at byte {pos} that runs past the end")
            pos, count = at + 16, count + 1
        out: list[Entry] = []
        pos = 8
        while pos < used:
            if len(out) % _CHECK_EVERY == 0:
                self.check()
            size = unpack_int(data, pos)[0]
            at = pos + 4 + size + 8 - (size + 4) % 8
            try:
                raw = data[pos + 4 : pos + 4 + size].decode("utf-8")
            except UnicodeDecodeError:
                raise Rejected(f"has a key at byte {pos} that is not UTF-8") from None
            value, timestamp = unpack_doubles(data, at)
            out.append((key(raw), value, timestamp))
            pos = at + 16
        return out

    def key(self, raw: str) -> Key:
        key = self._keys.get(raw)
        if key is None:
            key = _parse_key(raw)
            if len(self._keys) < _KEY_CACHE:
                self._keys[raw] = key
        return key


def _parse_key(raw: str) -> Key:
    try:
        parts = json.loads(raw)
    except ValueError:
        raise Rejected(f"has a key that is not JSON: {raw[:80]!r}") from None
    if not (isinstance(parts, list) and len(parts) == 4):
        raise Rejected(f"has a key that is not [metric, sample, labels, help]: {raw[:80]!r}")
    metric, sample, labels, help_text = parts
    strings = [metric, sample, help_text]
    if isinstance(labels, dict):
        strings += [*labels, *labels.values()]
    if not isinstance(labels, dict) or not all(isinstance(s, str) for s in strings) or not metric or not sample:
        raise Rejected(f"has a key with a value of the wrong type: {raw[:80]!r}")
    try:
        for s in strings:
            s.encode("utf-8")  # JSON can spell an unpaired surrogate, which no encoder can write
    except UnicodeEncodeError:
        raise Rejected(f"has a key that is not valid Unicode: {raw[:80]!r}") from None
    pairs = tuple(sorted(labels.items()))
    le = labels.get("le")
    bucket = None
    if le is not None:
        with contextlib.suppress(ValueError):
            bucket = (float(le), tuple(p for p in pairs if p[0] != "le"))
    bad_le = le if le is not None and bucket is None else None
    return Key(raw, metric, sample, pairs, help_text, tuple(p for p in pairs if p[0] != "pid"), bucket, bad_le)


# -- writing (archives) ----------------------------------------------------------------------


def encode(values: dict[str, tuple[float, float]]) -> bytes:
    """A file in prometheus_client's format holding `values` (raw key -> value, timestamp)."""
    out = bytearray(8)
    for raw, (value, timestamp) in values.items():
        key = raw.encode("utf-8")
        out += _INT.pack(len(key)) + key + b" " * (8 - (len(key) + 4) % 8) + _DOUBLES.pack(value, timestamp)
    _INT.pack_into(out, 0, len(out))
    return bytes(out)


# -- merging ---------------------------------------------------------------------------------


class Merge:
    """The sums of MultiProcessCollector._accumulate_metrics, made file by file as files are read.

    One difference, for files no prometheus_client writer produces: a gauge is summed by the mode of
    each file it appears in, where prometheus_client applies the mode of the last file to all of them.
    """

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._values: dict[str, dict[tuple[str, Labels], float]] = {}
        self._buckets: dict[str, dict[Labels, dict[float, float]]] = {}
        self._newest: dict[tuple[str, Labels, str], float] = {}
        self.series = 0
        self.files = 0

    def add(self, kind: str, mode: str | None, ident: str, entries: list[Entry]) -> None:
        """Fold one file's entries in, or reject the file (nothing folded) for what no encoder could write."""
        typ = kind.split("_", 1)[0]
        metrics = self._metrics
        new: dict[str, Metric] = {}
        for key, _, _ in entries:
            metric = metrics.get(key.metric) or new.get(key.metric)
            if metric is None:
                try:
                    metric = new[key.metric] = Metric(key.metric, key.help, typ)
                except ValueError as exc:
                    raise Rejected(f"has an invalid metric name {key.metric[:80]!r}: {exc}") from None
            if key.bad_le is not None and metric.type == "histogram":
                raise Rejected(f"has a histogram bucket bound that is not a number: {key.bad_le[:40]!r}")
        for name, metric in new.items():
            metrics[name] = metric
            self._values[name] = {}
        self.files += 1
        gauge_mode = mode or "all"
        for key, value, timestamp in entries:
            metric = metrics[key.metric]
            values = self._values[key.metric]
            if metric.type == "gauge":
                self._gauge(key, values, gauge_mode, ident, value, timestamp)
            elif metric.type == "histogram" and key.bucket is not None:
                bound, labels = key.bucket
                by_bound = self._buckets.setdefault(key.metric, {}).setdefault(labels, {})
                old = by_bound.get(bound)
                self.series += old is None
                by_bound[bound] = value if old is None else old + value
            else:
                self._sum(values, (key.sample, key.labels), value)

    def _sum(self, values: dict[tuple[str, Labels], float], key: tuple[str, Labels], value: float) -> None:
        old = values.get(key)
        if old is None:
            self.series += 1
            values[key] = value
        else:
            values[key] = old + value

    def _gauge(
        self, k: Key, values: dict[tuple[str, Labels], float], mode: str, ident: str, value: float, timestamp: float
    ) -> None:
        labels = (*k.gauge_labels, ("pid", ident)) if mode in ("all", "liveall") else k.gauge_labels
        key = (k.sample, labels)
        old = values.get(key)
        if mode.endswith("mostrecent"):
            # As prometheus_client: the newest timestamp wins, and one of 0 never does.
            newest = self._newest.get((k.metric, labels, k.sample), 0.0)
            if timestamp > newest:
                self._newest[(k.metric, labels, k.sample)] = timestamp
                self.series += old is None
                values[key] = value
        elif mode.endswith("sum"):
            self._sum(values, key, value)
        elif old is None:
            self.series += 1
            values[key] = value
        elif mode.endswith("min"):
            values[key] = min(old, value)
        elif mode.endswith("max"):
            values[key] = max(old, value)
        else:  # all: one series per worker
            values[key] = value

    def result(self) -> list[Metric]:
        """The merged families; histogram buckets made cumulative, with their `_count`."""
        out = []
        for name, metric in self._metrics.items():
            values = self._values[name]
            for labels, by_bound in self._buckets.get(name, {}).items():
                total = 0.0
                for bound, value in sorted(by_bound.items()):
                    total += value
                    values[(name + "_bucket", (*labels, ("le", _go(bound))))] = total
                values[(name + "_count", labels)] = total
            merged = Metric(metric.name, metric.documentation, metric.type)
            merged.samples = [Sample(sample, dict(labels), value) for (sample, labels), value in values.items()]
            out.append(merged)
        return out
