"""A fast /metrics path for our pool collectors: the lines prometheus_client would write, without its objects.

Why: prometheus_client builds a Metric and a Sample per line, then formats each one through a
sorted label dict, escaping and `floatToGoString`: 8-17 µs a line, ~50 ms for 20 busy pools.
Here the text before each value (name, escaped and sorted labels) is built once per series of a
handle (a handle's pool name never changes) and a scrape only formats numbers: one `%` format
per histogram. Lines are kept as UTF-8 bytes, so that the page is one join of what the registry's
encoder wrote and our lines: no encode, no second copy of the body. Everything else in the registry
still goes through prometheus_client's encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, chain
from typing import TYPE_CHECKING, Any, NamedTuple
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.utils import floatToGoString

from .. import catalog, compat
from .._version import __version__
from ..instrumentation import samples
from ..instrumentation.reading import PoolReading
from ..instrumentation.stats import PoolStats
from ..metricnames import View
from .collector import PoolCollector

if TYPE_CHECKING:
    from ..instrumentation.reading import PoolSource

log = logging.getLogger("sqlalchemy_pool_exporter")

Encoder = Callable[[Any], bytes]

_go: Callable[[float], str] = floatToGoString
om: Any = compat.FAST_RENDER  # prometheus_client's escaping helpers, or None: then no fast path
_EOF = b"# EOF\n"
# Counts below this print as "<n>.0"; from 1e6 up floatToGoString switches to Go's exponent form.
_PLAIN_BELOW = 1000000


def _value(v: float) -> bytes:
    """floatToGoString without its branches for the usual case: a finite number below 1e6 prints as repr()."""
    return (repr(float(v)) if -1e300 < v < 1e6 else _go(v)).encode()


@dataclass(frozen=True, slots=True)
class Format:
    """Which of prometheus_client's encoders a request negotiated, and its name escaping."""

    openmetrics: bool
    escaping: str


def format_of(encoder: Encoder) -> Format | None:
    """The format `choose_encoder` picked, or None for an encoder we do not mirror."""
    func, kwargs = encoder, {}
    if isinstance(encoder, partial):
        if encoder.args:
            return None
        func, kwargs = encoder.func, encoder.keywords
    if set(kwargs) - {"escaping", "version"}:
        return None
    escaping = kwargs.get("escaping", om.UNDERSCORES if om is not None else "underscores")
    if func is text_format.generate_latest:
        return Format(False, escaping)
    if func is om_format.generate_latest:  # versions >= 2.0 differ only for native histograms, which we have none of
        return Format(True, escaping)
    return None


def _line_start(fmt: Format, name: str, labels: Iterable[tuple[str, str]]) -> bytes:
    """Everything before the value, spelled exactly as prometheus_client's encoder for `fmt` spells it."""
    return _line_start_text(fmt, name, labels).encode("utf-8")


def _line_start_text(fmt: Format, name: str, labels: Iterable[tuple[str, str]]) -> str:
    esc = fmt.escaping
    utf8 = esc == om.ALLOWUTF8
    legacy = om.is_valid_legacy_metric_name(name)
    if fmt.openmetrics:
        pairs = ",".join(
            f'{om.escape_label_name(k, esc)}="{om.escape(v, om.ALLOWUTF8, om.is_legacy_labelname_rune)}"'
            for k, v in sorted(labels)
        )
        if utf8 and not legacy:
            inner = om.escape_metric_name(name, esc) + ("," + pairs if pairs else "")
            return "{" + str(inner) + "} "
        return str(om.escape(name, esc, om.is_legacy_labelname_rune)) + ("{" + pairs + "}" if pairs else "") + " "
    pairs = ",".join(f'{om.escape_label_name(k, esc)}="{om.escape(v, om.ALLOWUTF8, False)}"' for k, v in sorted(labels))
    if not utf8 or legacy:
        return str(om.escape_metric_name(name, esc)) + ("{" + pairs + "}" if pairs else "") + " "
    return "{" + str(om.escape_metric_name(name, esc)) + ("," + pairs if pairs else "") + "} "


def _header(fmt: Format, name: str, kind: str, doc: str) -> bytes:
    """HELP and TYPE, as each encoder writes them (text: counters get `_total`, HELP escapes no quotes)."""
    esc = fmt.escaping
    if fmt.openmetrics:
        shown = om.escape_metric_name(name, esc)
        help_ = om.escape(doc, om.ALLOWUTF8, om.is_legacy_labelname_rune)
        return f"# HELP {shown} {help_}\n# TYPE {shown} {kind}\n".encode()
    shown = om.escape_metric_name(name + "_total" if kind == "counter" else name, esc)
    help_ = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {shown} {help_}\n# TYPE {shown} {kind}\n".encode()


class _Family(NamedTuple):
    key: str
    kind: str
    header: bytes
    labelnames: tuple[str, ...]
    # Sample names: one for a gauge or counter; _bucket, _count, _sum for a histogram.
    names: tuple[str, ...]


class _Hist(NamedTuple):
    """One histogram series' line starts, and the whole series as one format string."""

    les: tuple[str, ...]
    buckets: tuple[bytes, ...]
    count_start: bytes
    sum_start: bytes
    template: bytes


def _percents(s: bytes) -> bytes:
    return s.replace(b"%", b"%%")


class _Shape(NamedTuple):
    """One pool's series as the last render walked them, in parallel lists (one slot a series).

    Parallel lists rather than a list a series: at 500 pools the render is bound by memory, not
    instructions, and an unchanged series then costs pointer comparisons in a few arrays instead of
    a list object and its items array of its own to load.
    """

    keys: list[str]
    labels: list[samples.Labels]
    les: list[tuple[str, ...] | None]  # a histogram's `le` spellings (its buckets); None for the others
    starts: list[Any]  # gauges and counters: the line start; histograms: the _Hist
    values: list[Any]  # the value last printed; a histogram's counts (a copy)
    sums: list[Any]  # a histogram's sum last printed; None for the others
    lines: list[bytes]

    def prefix(self, n: int) -> _Shape:
        return _Shape(*(found[:n] for found in self))  # type: ignore[arg-type]


class _PoolLines:
    """One pool's cached series: line starts by (key, labels), and the last render's _Shape."""

    __slots__ = ("series", "shape")

    def __init__(self) -> None:
        # Gauges and counters: their line start; histograms: their _Hist.
        self.series: dict[tuple[str, samples.Labels], Any] = {}
        self.shape = _Shape([], [], [], [], [], [], [])


class _Layout:
    """The families of one catalog view in one format, and each handle's series line starts."""

    def __init__(self, view: View, fmt: Format) -> None:
        self.fmt = fmt
        self.view = view
        self.families: list[_Family] = []
        for family in view.families:
            spec, name = family.spec, family.name
            if spec.kind == "counter":
                base = name[:-6] if name.endswith("_total") else name  # as CounterMetricFamily strips it
                names: tuple[str, ...] = (base + "_total",)
            elif spec.kind == "histogram":
                base = name
                names = (name + "_bucket", name + "_count", name + "_sum")
            else:
                base = name
                names = (name,)
            header = _header(fmt, base, spec.kind, spec.help)
            self.families.append(_Family(spec.key, spec.kind, header, family.labelnames, names))
        self.by_key = {f.key: f for f in self.families}
        build = self.by_key["build_info"]
        self.build_info = _line_start(fmt, build.names[0], [("version", __version__)]) + b"1.0\n"
        self._series: WeakKeyDictionary[PoolSource, _PoolLines] = WeakKeyDictionary()

    def series(self, handle: PoolSource) -> _PoolLines:
        found = self._series.get(handle)
        if found is None:
            found = self._series[handle] = _PoolLines()
        return found

    def values(self, key: str, source: PoolSource, labels: samples.Labels) -> samples.Labels:
        return self.view.labels(self.view.by_key[key], source.name, source.db_system, labels)

    def line_start(self, key: str, source: PoolSource, labels: samples.Labels) -> bytes:
        family = self.by_key[key]
        values = self.values(key, source, labels)
        return _line_start(self.fmt, family.names[0], zip(family.labelnames, values, strict=True))

    def hist(self, key: str, source: PoolSource, labels: samples.Labels, les: tuple[str, ...]) -> _Hist:
        family = self.by_key[key]
        pairs = list(zip(family.labelnames, self.values(key, source, labels), strict=True))
        buckets = tuple(_line_start(self.fmt, family.names[0], [*pairs, ("le", le)]) for le in les)
        count = _line_start(self.fmt, family.names[1], pairs)
        sum_ = _line_start(self.fmt, family.names[2], pairs)
        # %-formatting: about 3x faster than str.format on a template this long (and than a join).
        template = b"".join(_percents(b) + b"%d.0\n" for b in (*buckets, count)) + _percents(sum_) + b"%b\n"
        return _Hist(les, buckets, count, sum_, template)


class Exposition:
    """Renders a registry like the encoder `choose_encoder` picked, with our pool collectors on the fast path.

    One per /metrics handler: it caches line starts per format and per pool (held weakly). Before a
    format's first fast render, it renders a fixed sample pool both ways and compares the bytes: if
    prometheus_client ever spells something differently, or a helper we borrow is gone, every
    render goes through prometheus_client's encoder (slower, still right), logged once and counted.
    """

    def __init__(self, registry: CollectorRegistry, collectors: Sequence[PoolCollector] = ()) -> None:
        self.registry = registry
        self.collectors = list(collectors)
        self._layouts: dict[tuple[View, Format], _Layout] = {}
        self._checked: dict[tuple[View, Format], bool] = {}
        self.fast = om is not None
        if not self.fast:
            log.warning("fast /metrics renderer off, prometheus_client renders everything: %s",
                        compat.FAST_RENDER_PROBLEM)  # fmt: skip

    def render(self, encoder: Encoder, names: Iterable[str] = ()) -> bytes:
        """What `encoder(registry)` returns (restricted to `names` if any), our families appended last."""
        wanted = frozenset(names) or None
        target: Any = self.registry.restricted_registry(wanted) if wanted else self.registry
        fmt = format_of(encoder) if self.fast else None
        ours = [c for c in self.collectors if fmt is not None and self._verified(c.view, fmt, encoder)]
        if fmt is None or not ours:
            return encoder(target)
        try:
            ours_lines: list[bytes] = []
            for collector in ours:
                _render_lines(ours_lines, self._layout(collector.view, fmt), collector.sources(), wanted)
        except Exception as exc:
            self._give_up(exc)
            return encoder(target)
        # The encoder sees the registry as it is (target_info, restrictions, every other collector);
        # our collectors yield nothing to it in this thread, since they were rendered above.
        with ExitStack() as stack:
            for collector in ours:
                stack.enter_context(collector.muted())
            rest = encoder(target)
        if fmt.openmetrics and rest.endswith(_EOF):
            rest = rest[: -len(_EOF)]
        ours_lines[:0] = (rest,)
        if fmt.openmetrics:
            ours_lines.append(_EOF)
        return b"".join(ours_lines)

    def _verified(self, view: View, fmt: Format, encoder: Encoder) -> bool:
        key = (view, fmt)
        ok = self._checked.get(key)
        if ok is None:
            try:
                ok = self._checked[key] = _self_test(view, fmt, encoder)
            except Exception as exc:
                ok = self._checked[key] = False
                log.warning("fast /metrics renderer failed its self-test (%s: %s)", type(exc).__name__, exc)
            if not ok:
                if self.fast:
                    log.warning("fast /metrics renderer failed its self-test: prometheus_client renders from now on")
                self._give_up(None)
        return ok and self.fast

    def _give_up(self, exc: BaseException | None) -> None:
        """From now on prometheus_client renders everything; say so once, count it once per pool."""
        if not self.fast:
            return
        self.fast = False
        if exc is not None:
            log.warning("fast /metrics renderer failed (%s: %s): prometheus_client renders from now on",
                        type(exc).__name__, exc)  # fmt: skip
        for collector in self.collectors:
            for source in collector.sources():
                source.stats.errors += 1

    def _layout(self, view: View, fmt: Format) -> _Layout:
        layout = self._layouts.get((view, fmt))
        if layout is None:
            layout = self._layouts[(view, fmt)] = _Layout(view, fmt)
        return layout


def _render_lines(
    out: list[bytes], layout: _Layout, sources: Iterable[PoolSource], wanted: frozenset[str] | None
) -> None:
    """Append our families' lines in `layout`'s format, for `sources`; restricted to the sample names `wanted`."""
    lines: dict[str, list[bytes]] = {f.key: [] for f in layout.families}
    appends = {key: found.append for key, found in lines.items()}
    if wanted is None or layout.by_key["build_info"].names[0] in wanted:
        lines["build_info"].append(layout.build_info)
    for source in sources:
        try:
            reading = source.read()
            if reading is None:  # engine garbage-collected: its series go with it
                continue
            if wanted is None:
                _add_pool(layout, appends, source, reading)
            else:
                _add_pool_restricted(layout, lines, source, reading, wanted)
        except Exception as exc:  # as PoolCollector.collect: count it, keep the lines already written
            source.fail("collect", exc)
    for family in layout.families:
        found = lines[family.key]
        if wanted is not None and not found:  # a restricted registry drops families left without samples
            continue
        out.append(family.header)
        out += found


class _Sample:
    """A fixed pool for the self-test: escaped characters in its name, every kind of series."""

    name = 'self-test "pool"\\n\u00e9'
    url = None
    db_system = "postgresql"

    def __init__(self) -> None:
        self.stats = PoolStats(catalog.DEFAULT_BUCKETS)
        self.stats.timeouts = 3
        self.stats.connect_errors["OperationalError"] = 2
        self.stats.wait.observe(0.003)
        self.stats.wait.observe(12.5)
        self.stats.transaction_histogram("commit").observe(0.25)
        self.stats.statement_histogram("select").observe(1234567.0)
        self.stats.statement_histogram("other").observe(0.002)  # no db.operation.name: an empty label

    def read(self) -> PoolReading:
        return PoolReading("QueuePool", 2, 1, 5, 15, 0, 30.0, 0, 0.0, 1.5)

    def fail(self, where: str, exc: BaseException) -> None:
        raise exc


def _self_test(view: View, fmt: Format, encoder: Encoder) -> bool:
    """Whether our bytes for a fixed sample pool equal prometheus_client's for `fmt`, in `view`'s names."""
    sample = _Sample()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(view, lambda: [sample]))
    theirs = encoder(registry)
    if fmt.openmetrics and theirs.endswith(_EOF):
        theirs = theirs[: -len(_EOF)]
    ours: list[bytes] = []
    _render_lines(ours, _Layout(view, fmt), [sample], None)
    return b"".join(ours) == theirs


def _add_pool(
    layout: _Layout,
    appends: dict[str, Callable[[bytes], None]],
    source: PoolSource,
    reading: PoolReading,
) -> None:
    # Each series keeps its line start and its last value and line: most series of most pools do
    # not change between two scrapes, and reusing the line skips formatting it (and the garbage).
    # The walk finds them by position in the last render's order (the samples come in the same
    # order while a pool's series stay the same): no key tuple to build and hash. From the first
    # series that differs (a new statement kind, a holder) it builds a new shape, the line starts
    # found by (key, labels). A line is written before its value: a render running alongside sees
    # a new line with an old value, at worst formats it again.
    cache = layout.series(source)
    shape = cache.shape
    keys, labels_, les, starts, values, sums, lines = shape
    known = len(keys)
    fresh: _Shape | None = None  # the new shape, once this walk departs from the last one
    i = 0
    stats = source.stats
    # An int and a float that are equal print the same ("5.0", or Go's exponent form from 1e6 on).
    for key, labels, value in chain(samples.gauges(reading), samples.counters(stats)):
        if i < known and keys[i] is key and ((old := labels_[i]) is labels or old == labels):
            if values[i] != value:
                lines[i] = _scalar(starts[i], value)
                values[i] = value
        else:
            if fresh is None:
                fresh = shape.prefix(i)
                keys, labels_, les, starts, values, sums, lines = fresh
                known = i
            found = cache.series.get((key, labels))
            if found is None:
                found = cache.series[(key, labels)] = layout.line_start(key, source, labels)
            keys.append(key)
            labels_.append(labels)
            les.append(None)
            starts.append(found)
            values.append(value)
            sums.append(None)
            lines.append(_scalar(found, value))
        appends[key](lines[i])
        i += 1
    for key, labels, hist in samples.histograms(stats):
        same = i < known and keys[i] is key and ((old := labels_[i]) is labels or old == labels)
        if not (same and les[i] is hist.les):
            if fresh is None:
                fresh = shape.prefix(i)
                keys, labels_, les, starts, values, sums, lines = fresh
                known = i
            h = cache.series.get((key, labels))
            if h is None or h.les is not hist.les:
                h = cache.series[(key, labels)] = layout.hist(key, source, labels, hist.les)
            keys.append(key)
            labels_.append(labels)
            les.append(hist.les)
            starts.append(h)
            values.append(None)
            sums.append(None)
            lines.append(b"")
        # The list compares with the kept copy in one C call; a copy (one C call too) is taken
        # only when it differs: one snapshot of the counts, as tuple() took before.
        total = hist.sum
        if hist.counts != values[i] or total != sums[i]:
            counts = hist.counts[:]
            cumulative = list(accumulate(counts))
            n = cumulative[-1]
            if n < _PLAIN_BELOW and total.__class__ is float and -1e300 < total < 1e6:
                lines[i] = starts[i].template % (*cumulative, n, repr(total).encode())  # _add_hist's usual case
            else:
                out: list[bytes] = []
                _add_hist(out, starts[i], tuple(counts), total, None)
                lines[i] = b"".join(out)
            values[i], sums[i] = counts, total
        appends[key](lines[i])
        i += 1
    if fresh is not None:
        cache.shape = fresh
    elif i != known:
        cache.shape = shape.prefix(i)


def _scalar(start: bytes, v: float) -> bytes:
    """A gauge's or counter's line: a count prints as "<n>.0", a float below 1e6 as repr() (floatToGoString does)."""
    if v.__class__ is int and -_PLAIN_BELOW < v < _PLAIN_BELOW:
        return b"%b%d.0\n" % (start, v)
    if v.__class__ is float and -1e300 < v < 1e6:  # repr(): bytes' %r (ascii()) costs ~3k Ir more a float
        return start + repr(v).encode() + b"\n"
    return start + _value(v) + b"\n"


def _add_pool_restricted(
    layout: _Layout,
    lines: dict[str, list[bytes]],
    source: PoolSource,
    reading: PoolReading,
    wanted: frozenset[str],
) -> None:
    """`?name[]=` asked for some families only: formatted afresh, the cache left as it is."""
    by_key = layout.by_key
    for key, labels, value in samples.gauges(reading):
        if by_key[key].names[0] in wanted:
            lines[key].append(layout.line_start(key, source, labels) + _value(value) + b"\n")
    stats = source.stats
    for key, labels, n in samples.counters(stats):
        if by_key[key].names[0] in wanted:
            start = layout.line_start(key, source, labels)
            plain = n.__class__ is int and n < _PLAIN_BELOW
            lines[key].append(b"%b%d.0\n" % (start, n) if plain else start + _value(n) + b"\n")
    for key, labels, hist in samples.histograms(stats):
        parts = tuple(name in wanted for name in by_key[key].names)
        if any(parts):
            h = layout.hist(key, source, labels, hist.les)
            _add_hist(lines[key], h, tuple(hist.counts), hist.sum, parts)


def _add_hist(
    out: list[bytes], h: _Hist, counts: tuple[int, ...], hist_sum: float, parts: tuple[bool, ...] | None
) -> None:
    """Append one histogram series; `parts` says which of _bucket, _count, _sum (None: all).

    `counts` is one snapshot of the bucket counts: tuple() copies the list in one C call.
    """
    cumulative = list(accumulate(counts))
    total = cumulative[-1]
    if parts is None and total < _PLAIN_BELOW and hist_sum.__class__ is float and -1e300 < hist_sum < 1e6:
        out.append(h.template % (*cumulative, total, repr(hist_sum).encode()))  # floatToGoString's usual case
        return
    buckets, count, sum_ = parts or (True, True, True)
    if buckets:
        pairs = zip(h.buckets, cumulative, strict=True)
        out += [b"%b%d.0\n" % (b, c) if c < _PLAIN_BELOW else b + _value(c) + b"\n" for b, c in pairs]
    if count:
        start = h.count_start
        out.append(b"%b%d.0\n" % (start, total) if total < _PLAIN_BELOW else start + _value(total) + b"\n")
    if sum_:
        out.append(h.sum_start + _value(hist_sum) + b"\n")
