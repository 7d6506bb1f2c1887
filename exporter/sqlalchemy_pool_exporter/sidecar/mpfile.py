"""prometheus_client multiprocess files, read without trusting them, and merged.

Every app worker can write the multiprocess directory, so the sidecar treats what it finds there as
untrusted input (docs/reliability.md). prometheus_client's MultiProcessCollector opens each file by
path (following a symlink, blocking forever on a FIFO), reads as many bytes as the file's header
claims (a sparse file claiming 2 GB cost 4 GB of memory), and keeps every sample of every file before
summing them: one bad file fails every scrape. Here:

- a file is opened only if it is a regular file: lstat, then open with O_NOFOLLOW|O_NONBLOCK, then
  fstat of the same inode; at most MAX_FILE_BYTES of it are read;
- its bytes are parsed strictly (framing, UTF-8, the JSON shape of every key, its size and depth
  checked before it is decoded, and the names in it as the exposition format spells them); a bad
  file is rejected as a whole, before any of its samples counts;
- samples are summed as files are read, so memory grows with distinct series, capped at MAX_SERIES.

The file format and the merge rules are prometheus_client's (checked on 0.26.0 and on our floor 0.23.1:
the same format, with its timestamps, in both): the file starts with a 4-byte native int, the bytes in
use, and 4 bytes of padding; then entries of a 4-byte key length, the UTF-8 key (the JSON
`[metric, sample, labels, help]`), spaces up to an 8-byte boundary (at least one), and two doubles,
value and timestamp. The sums follow `MultiProcessCollector._accumulate_metrics`. No private name of
prometheus_client is used; the gauge modes are `Gauge._MULTIPROC_MODES` (the same in 0.23.1 and 0.26.0),
spelled out.
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
# Entries whose layout is kept from one merge to the next, ~210 bytes each (measured: 64 workers of
# one pool, 124 entries a worker). 1,000 live workers of one pool hold ~124,000; past the bound,
# files are parsed at every merge as before.
MAX_KEPT = 500_000
# How often the parser asks whether the merge is out of time (entries).
_CHECK_EVERY = 4096
# The longest key a file may hold. prometheus_client's keys are a metric's name, help and labels:
# ours are under 300 bytes; 64 KiB is absurd for any app, and bounds what one key costs to decode.
MAX_KEY_BYTES = 64 << 10

# What the exposition format allows (and prometheus_client's writer with legacy names can write): a
# name outside these poisons the whole scrape for Prometheus, not just its own series. UTF-8 names
# (prometheus_client >= 0.22 without PROMETHEUS_LEGACY_NAME_VALIDATION) are refused too: escaped for
# the classic format, `a.b` and `a_b` would become one name, two families, and an invalid body.
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# A sample is its metric's name with one of these: what prometheus_client writes for a counter
# (_total, _created), gauge (none), summary (_count, _sum, _created) and histogram (_bucket, _sum...).
_SAMPLE_SUFFIXES = frozenset(("", "_total", "_created", "_count", "_sum", "_bucket"))
# A JSON string; what is left of a key without them is its structure: `[,,{:,:},]`.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')

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


def open_regular(path: Path | str, limit: int, seen: os.stat_result | None = None) -> tuple[int, os.stat_result]:
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


def read_db(path: Path | str, seen: os.stat_result | None = None, hint: int = 0) -> bytearray | None:
    """The bytes in use of a metrics file; None for a file a worker has created but not yet initialised.

    prometheus_client creates the file, truncates it to 64 KiB, then writes its header: for an instant
    a reader sees 0 bytes, or a header of 0. Only the bytes the header says are in use are read; a
    writer grows the file before it raises the header, so a live file is never shorter than that.
    `hint`: the bytes in use last time, read with the header in one call when the header has not moved.
    """
    fd, st = open_regular(path, MAX_FILE_BYTES, seen)
    try:
        head = _pread(fd, min(max(hint, 8), st.st_size, MAX_FILE_BYTES) if hint else 8)
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
        if used <= len(head):
            del head[used:]
            data = head
        else:
            data = _pread(fd, used)
    finally:
        os.close(fd)
    if len(data) < used:
        raise Rejected(f"has a header claiming {used} bytes in use, but holds {len(data)}")
    return data


# -- parsing ---------------------------------------------------------------------------------


class Layout:
    """Where a file's entries are, and which keys they hold, as found at an earlier merge.

    prometheus_client only ever appends to a file and rewrites values in place, so the file a worker
    wrote at the last merge usually has the same keys at the same offsets now. One struct unpack of
    the whole file then yields every entry's framing and key bytes (`chunks`) and its two doubles;
    the file is read this way only if those bytes equal the ones parsed before, so a file whose
    keys changed in any way is parsed again from scratch, never trusted from the cache.
    """

    __slots__ = ("_struct", "chunks", "keys", "plan", "used")

    def __init__(self, used: int, chunks: tuple[bytes, ...], keys: tuple[Key, ...]) -> None:
        self.used = used
        self.chunks = chunks
        self.keys = keys
        self.plan: Plan | None = None  # how Merge folds this file, worked out at its first fold
        self._struct: struct.Struct | None = None

    def reread(self, data: bytearray) -> Parsed | None:
        """The entries of `data` if it still has this layout (same size, same framing and key bytes); else None."""
        if len(data) != self.used:
            return None
        if self._struct is None:
            self._struct = struct.Struct("=8x" + "".join(f"{len(c)}sdd" for c in self.chunks))
        flat = self._struct.unpack(data)
        if flat[0::3] != self.chunks:
            return None
        return Parsed(self, flat[1::3], flat[2::3])


class Parsed(NamedTuple):
    """A file's entries: keys, values and timestamps side by side, and the layout they came from."""

    layout: Layout
    values: tuple[float, ...]
    timestamps: tuple[float, ...]


class Reader:
    """Reads and validates files for one merge or compaction, sharing parsed keys between them.

    `layouts`, when given, is the table of the last merge (file name -> Layout) that read() consults;
    `kept` is this merge's, for the next one: the files read this time, up to MAX_KEPT entries in all.
    """

    def __init__(self, check: Check, layouts: dict[str, Layout] | None = None) -> None:
        self.check = check
        self.layouts = layouts
        self.kept: dict[str, Layout] = {}
        self._kept_entries = 0
        self._keys: dict[str, Key] = {}
        self._chunks: dict[bytes, bytes] = {}  # one copy of each entry's framing and key bytes

    def load(self, path: Path, room: int, seen: os.stat_result | None = None) -> list[Entry] | None:
        """Every entry of the file at `path` (None: not initialised yet); Rejected past `room` entries."""
        data = read_db(path, seen)
        if data is None:
            return None
        parsed = self.entries(data, room)
        return list(zip(parsed.layout.keys, parsed.values, parsed.timestamps, strict=True))

    def read(self, path: str, name: str, room: int, seen: os.stat_result | None = None) -> Parsed | None:
        """As load(), by way of the layout of `name` found at an earlier merge when it still holds."""
        layouts = self.layouts
        layout = layouts.get(name) if layouts is not None else None
        data = read_db(path, seen, layout.used if layout is not None else 0)
        if data is None:
            return None
        parsed = layout.reread(data) if layout is not None and len(layout.keys) <= room else None
        if parsed is None:
            parsed = self.entries(data, room)
        if layouts is not None and self._kept_entries + len(parsed.values) <= MAX_KEPT:
            self.kept[name] = parsed.layout
            self._kept_entries += len(parsed.values)
        return parsed

    def entries(self, data: bytearray, room: int) -> Parsed:
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
            if size > MAX_KEY_BYTES:
                raise Rejected(f"has a key of {size} bytes at byte {pos}, over the {MAX_KEY_BYTES} a key may have")
            pos, count = at + 16, count + 1
        chunks: list[bytes] = []
        keys: list[Key] = []
        values: list[float] = []
        timestamps: list[float] = []
        shared = self._chunks
        pos = 8
        while pos < used:
            if len(keys) % _CHECK_EVERY == 0:
                self.check()
            size = unpack_int(data, pos)[0]
            at = pos + 4 + size + 8 - (size + 4) % 8
            try:
                raw = data[pos + 4 : pos + 4 + size].decode("utf-8")
            except UnicodeDecodeError:
                raise Rejected(f"has a key at byte {pos} that is not UTF-8") from None
            try:
                keys.append(key(raw))
            except Rejected:
                raise
            except Exception as exc:  # whatever a decoder may raise on a key no writer produced
                raise Rejected(f"has a key at byte {pos} that cannot be decoded: {type(exc).__name__}") from None
            chunk = bytes(data[pos:at])
            chunks.append(shared.setdefault(chunk, chunk) if len(shared) < _KEY_CACHE else chunk)
            value, timestamp = unpack_doubles(data, at)
            values.append(value)
            timestamps.append(timestamp)
            pos = at + 16
        return Parsed(Layout(used, tuple(chunks), tuple(keys)), tuple(values), tuple(timestamps))

    def key(self, raw: str) -> Key:
        key = self._keys.get(raw)
        if key is None:
            key = _parse_key(raw)
            if len(self._keys) < _KEY_CACHE:
                self._keys[raw] = key
        return key


# Names already found valid: a name repeats in many keys. Bounded, as anything a writer can grow.
_VALID_NAMES: set[str] = set()
_VALID_LABELS: set[str] = set()
_VALID_MAX = 10_000


def _valid(name: str, names: set[str] = _VALID_NAMES) -> None:
    if len(names) < _VALID_MAX:
        names.add(name)


class _Repeated(ValueError):
    pass


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose names are all different: json.loads would keep the last of a repeated one."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _Repeated
    return found


def _parse_key(raw: str) -> Key:
    # The checks below cost ~1.7 µs a key over the 8.3 µs it took before them (measured, CPU time, a
    # histogram bucket's key); a key is parsed once per merge, and not at all in a file whose layout held.
    # [metric, sample, {labels}, help] nests two deep; a deeper key makes the decoder recurse (1,000
    # levels: RecursionError), so it is refused on its brackets outside strings, before decoding.
    if raw.count("[") + raw.count("{") > 2 and sum(map(_JSON_STRING.sub("", raw).count, "[{")) > 2:
        raise Rejected(f"has a key nested deeper than [metric, sample, labels, help]: {raw[:80]!r}")
    try:
        parts = json.loads(raw)
        # A repeated label name needs a colon more than the labels decoded; only then is the key
        # decoded again, checking each object (the hook makes decoding ~3x slower).
        labels = parts[2] if isinstance(parts, list) and len(parts) == 4 else None
        if isinstance(labels, dict) and raw.count(":") > len(labels):
            json.loads(raw, object_pairs_hook=_unique)
    except _Repeated:
        raise Rejected(f"has a key that repeats a label name: {raw[:80]!r}") from None
    except (ValueError, RecursionError):
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
    if metric not in _VALID_NAMES:
        if not _METRIC_NAME.fullmatch(metric):
            raise Rejected(f"has a key with an invalid metric name: {raw[:80]!r}")
        _valid(metric)
    if sample[len(metric) :] not in _SAMPLE_SUFFIXES or not sample.startswith(metric):
        raise Rejected(f"has a key whose sample is not of its metric: {raw[:80]!r}")
    for name in labels:
        if name not in _VALID_LABELS:
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise Rejected(f"has a key with an invalid label name: {raw[:80]!r}")
            _valid(name, _VALID_LABELS)
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


# A sum's place in a merge: (metric, sample, labels); a histogram bucket's: (metric, labels, bound).
Target = tuple[str, str, Labels] | tuple[str, Labels, float]


class Plan(NamedTuple):
    """How one file's entries fold into a merge, worked out once per layout."""

    typ: str
    metrics: tuple[tuple[str, str], ...]  # (name, help) of each family, in order of first entry
    targets: tuple[Target, ...] | None  # each entry's place; None: folded entry by entry (min, max, mostrecent)
    assign: bool  # `all` gauges: one series per worker, set rather than summed
    bad_le: tuple[tuple[str, str], ...]  # (metric, le) of the entries whose `le` is not a number


# The names a family of each type puts in the text format: its HELP/TYPE name and its samples'.
_EMITS = {
    "counter": ("", "_total", "_created"),
    "gauge": ("",),
    "histogram": ("", "_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}
# The owner of a name that no file's family may use (the sidecar's own metrics).
RESERVED = ""


def claims(name: str, typ: str) -> tuple[str, ...]:
    """Every name family `name` of type `typ` may write in the text format."""
    return tuple(name + suffix for suffix in _EMITS.get(typ, ("",)))


class Merge:
    """The sums of MultiProcessCollector._accumulate_metrics, made file by file as files are read.

    Every sum lives in one table keyed by its place (Target), so folding a file whose layout was seen
    before is one loop over precomputed places and values, with no parsing and no per-entry branches.
    One difference, for files no prometheus_client writer produces: a gauge is summed by the mode of
    each file it appears in, where prometheus_client applies the mode of the last file to all of them.
    """

    def __init__(self, claimed: dict[str, str] | None = None) -> None:
        self._metrics: dict[str, Metric] = {}
        # Name in the text format -> the family that writes it: two families writing one name (a
        # counter `x` and a gauge `x_total`; a file's `..._sidecar_merges`) make the whole body
        # invalid, so the file that would bring the second one is rejected. `claimed`: names known
        # beforehand (our catalog's, owned by their family; the sidecar's own, RESERVED).
        self._claimed: dict[str, str] = dict(claimed) if claimed else {}
        self._sums: dict[Target, float] = {}
        self._newest: dict[tuple[str, Labels, str], float] = {}
        self.files = 0

    @property
    def series(self) -> int:
        return len(self._sums)

    def add(self, kind: str, mode: str | None, ident: str, parsed: Parsed) -> None:
        """Fold one file's entries in, or reject the file (nothing folded) for what no encoder could write."""
        layout = parsed.layout
        plan = layout.plan
        if plan is None:
            plan = layout.plan = _plan(kind, mode, ident, layout.keys)
        metrics = self._metrics
        new: dict[str, Metric] = {}
        pending: dict[str, str] = {}  # the names the new families write, claimed once the file is taken
        for name, help_text in plan.metrics:
            metric = metrics.get(name)
            if metric is None:
                try:
                    metric = new[name] = Metric(name, help_text, plan.typ)
                except ValueError as exc:
                    raise Rejected(f"has an invalid metric name {name[:80]!r}: {exc}") from None
                for written in claims(name, plan.typ):
                    if pending.get(written, self._claimed.get(written, name)) != name:
                        raise Rejected(f"has a metric {name[:80]!r} whose {written[:80]!r} another family writes")
                    pending[written] = name
            elif metric.type != plan.typ:
                # Folded as the other type, its samples would be invalid lines in that family.
                raise Rejected(f"has a {plan.typ} {name[:80]!r} that another file holds as a {metric.type}")
        for name, bad_le in plan.bad_le:  # what prometheus_client would fail on, in a histogram only
            if (metrics.get(name) or new[name]).type == "histogram":
                raise Rejected(f"has a histogram bucket bound that is not a number: {bad_le[:40]!r}")
        self._claimed.update(pending)
        metrics.update(new)
        self.files += 1
        sums = self._sums
        if plan.targets is not None:
            if plan.assign:
                sums.update(zip(plan.targets, parsed.values, strict=True))
            else:
                get = sums.get
                for target, value in zip(plan.targets, parsed.values, strict=True):
                    sums[target] = get(target, 0.0) + value
            return
        gauge_mode = mode or "all"
        for key, value, timestamp in zip(layout.keys, parsed.values, parsed.timestamps, strict=True):
            typ = metrics[key.metric].type
            if typ == "gauge":
                self._gauge(key, gauge_mode, ident, value, timestamp)
            elif typ == "histogram" and key.bucket is not None:
                bound, labels = key.bucket
                self._sum((key.metric, labels, bound), value)
            else:
                self._sum((key.metric, key.sample, key.labels), value)

    def _sum(self, target: Target, value: float) -> None:
        sums = self._sums
        sums[target] = sums.get(target, 0.0) + value

    def _gauge(self, k: Key, mode: str, ident: str, value: float, timestamp: float) -> None:
        labels = _gauge_labels(k, mode, ident)
        target = (k.metric, k.sample, labels)
        sums = self._sums
        old = sums.get(target)
        if mode.endswith("mostrecent"):
            # As prometheus_client: the newest timestamp wins, and one of 0 never does.
            newest = self._newest.get((k.metric, labels, k.sample), 0.0)
            if timestamp > newest:
                self._newest[(k.metric, labels, k.sample)] = timestamp
                sums[target] = value
        elif mode.endswith("sum"):
            sums[target] = value if old is None else old + value
        elif old is None:
            sums[target] = value
        elif mode.endswith("min"):
            sums[target] = min(old, value)
        elif mode.endswith("max"):
            sums[target] = max(old, value)
        else:  # all: one series per worker
            sums[target] = value

    def result(self) -> list[Metric]:
        """The merged families; histogram buckets made cumulative, with their `_count`."""
        values: dict[str, dict[tuple[str, Labels], float]] = {name: {} for name in self._metrics}
        buckets: dict[str, dict[Labels, list[tuple[float, float]]]] = {}
        for target, value in self._sums.items():
            if type(target[2]) is float:
                name, labels, bound = target
                buckets.setdefault(name, {}).setdefault(labels, []).append((bound, value))
            else:
                values[target[0]][(target[1], target[2])] = value  # type: ignore[index]
        out = []
        for name, metric in self._metrics.items():
            by_name = values[name]
            grouped = buckets.get(name)
            if grouped:
                # A histogram's samples of one label set must be contiguous (OpenMetrics; its parser rejects
                # interleaving): each set's buckets, _count, then its _sum, then anything else.
                rest, by_name = by_name, {}
                for labels, by_bound in grouped.items():
                    total = 0.0
                    for bound, value in sorted(by_bound):
                        total += value
                        by_name[(name + "_bucket", (*labels, ("le", _go(bound))))] = total
                    by_name[(name + "_count", labels)] = total
                    for suffix in ("_sum", "_created"):
                        if (name + suffix, labels) in rest:
                            by_name[(name + suffix, labels)] = rest.pop((name + suffix, labels))
                by_name.update(rest)
            merged = Metric(metric.name, metric.documentation, metric.type)
            merged.samples = [Sample(sample, dict(labels), value) for (sample, labels), value in by_name.items()]
            out.append(merged)
        return out


def _gauge_labels(k: Key, mode: str, ident: str) -> Labels:
    return (*k.gauge_labels, ("pid", ident)) if mode in ("all", "liveall") else k.gauge_labels


# The samples each type of file holds (prometheus_client's writers), by suffix after the metric's name.
_WRITES = {
    "counter": frozenset(("_total", "_created")),
    "gauge": frozenset(("",)),
    "histogram": frozenset(("_bucket", "_sum", "_count", "_created")),
    "summary": frozenset(("_count", "_sum", "_created")),
}


def _check_shape(typ: str, keys: tuple[Key, ...]) -> None:
    """Reject samples a family of `typ` cannot carry, and histograms and summaries no writer leaves incomplete.

    Served as they are, they break the whole body for an OpenMetrics parser: a `_bucket` in a counter,
    a histogram's label set without its +Inf bucket or its `_sum`, a summary's `_sum` without `_count`.
    """
    allowed = _WRITES.get(typ, _WRITES["gauge"])
    groups: dict[tuple[str, Labels], set[str]] = {}
    for k in keys:
        suffix = k.sample[len(k.metric) :]
        if suffix not in allowed:
            raise Rejected(f"has a {typ} sample {k.sample[:80]!r} that no {typ} writes")
        if typ == "histogram" and k.bad_le is None:  # a bound that is no number has its own reason, in add()
            if (suffix == "_bucket") != (k.bucket is not None):
                raise Rejected(f"has a histogram sample {k.sample[:80]!r} with a bound where none belongs, or none")
            group = (k.metric, k.bucket[1] if k.bucket is not None else k.labels)
            if k.bucket is not None and k.bucket[0] == float("inf"):
                suffix = "+Inf"
            groups.setdefault(group, set()).add(suffix)
        elif typ == "summary" and suffix != "_created":
            groups.setdefault((k.metric, k.labels), set()).add(suffix)
    needs = {"histogram": {"+Inf", "_sum"}, "summary": {"_count", "_sum"}}.get(typ, set())
    for (metric, _), found in groups.items():
        if not needs <= found:
            missing = " and ".join(sorted(needs - found))
            raise Rejected(f"has a {typ} {metric[:80]!r} whose label set lacks its {missing}")


def _plan(kind: str, mode: str | None, ident: str, keys: tuple[Key, ...]) -> Plan:
    typ = kind.split("_", 1)[0]
    _check_shape(typ, keys)
    metrics: dict[str, str] = {}
    for key in keys:
        metrics.setdefault(key.metric, key.help)
    gauge_mode = mode or "all"
    targets: tuple[Target, ...] | None
    if typ == "gauge":
        if gauge_mode.endswith(("sum", "all")):
            targets = tuple((k.metric, k.sample, _gauge_labels(k, gauge_mode, ident)) for k in keys)
        else:
            targets = None
    else:
        targets = tuple(
            (k.metric, k.bucket[1], k.bucket[0])
            if typ == "histogram" and k.bucket is not None
            else (k.metric, k.sample, k.labels)
            for k in keys
        )
    assign = typ == "gauge" and gauge_mode.endswith("all")
    bad_le = tuple((k.metric, k.bad_le) for k in keys if k.bad_le is not None)
    return Plan(typ, tuple(metrics.items()), targets, assign, bad_le)
