"""Fuzz the multiprocess file reader and merge (sidecar/mpfile.py) as the sidecar runs them.

Input: up to four files, each `<kind byte><4-byte little-endian length><bytes>` (what is left when the
length runs out). Each is written to a real file named after its kind (`counter_<n>.db`,
`gauge_livesum_<n>.db`...), read with `Reader.read` and folded with `Merge.add`, the sidecar's claimed
names in force. Oracle: each file is parsed or Rejected (the sidecar's "quarantine this file"),
never another exception; the merged result plus the sidecar's own families, rendered by
prometheus_client's text and OpenMetrics encoders as the sidecar serves them, passes the format's rules.

Run: python tests/fuzz/fuzz_mpfile.py tests/fuzz/corpus/mpfile -max_total_time=60
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as om_latest

with atheris.instrument_imports(include=["sqlalchemy_pool_exporter"]):
    from sqlalchemy_pool_exporter import catalog
    from sqlalchemy_pool_exporter.sidecar import merge as sidecar_merge
    from sqlalchemy_pool_exporter.sidecar import mpfile

from oracles import absolute, check_openmetrics, check_text, scratch

KINDS = [
    "counter",
    "histogram",
    "summary",
    *(f"gauge_{mode}" for mode in sorted(mpfile.GAUGE_MODES)),
]
CLAIMED = sidecar_merge._claimed(catalog.DEFAULT_NAMESPACE)
DIRECTORY = scratch("mpfile")


def split(data: bytes) -> list[tuple[str, bytes]]:
    """The files of one input: (kind, bytes)."""
    files = []
    pos = 0
    while pos < len(data) and len(files) < 4:
        kind = KINDS[data[pos] % len(KINDS)]
        if pos + 5 <= len(data):
            (size,) = struct.unpack_from("<I", data, pos + 1)
            body = data[pos + 5 : pos + 5 + size]
            pos += 5 + size
        else:
            body, pos = b"", len(data)
        files.append((kind, body))
    return files


def join(files: list[tuple[str, bytes]]) -> bytes:
    """The input that split() reads as `files` (for seeds)."""
    return b"".join(bytes([KINDS.index(k)]) + struct.pack("<I", len(b)) + b for k, b in files)


class Served:
    """What the sidecar's registry collects: the merge, then its own families."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics
        for spec in catalog.SIDECAR_CATALOG:
            family = GaugeMetricFamily if spec.kind == "gauge" else CounterMetricFamily
            yield family(spec.name(catalog.DEFAULT_NAMESPACE), spec.help, 1)


def one_input(data: bytes) -> None:
    reader, merge = mpfile.Reader(lambda *_: None, {}), mpfile.Merge(CLAIMED)
    for n, (kind, body) in enumerate(split(data)):
        m = mpfile.FILE.fullmatch(f"{kind}_{n}.db")
        assert m is not None
        name = m.group(0)
        path = os.path.join(DIRECTORY, name)
        with open(path, "wb") as f:
            f.write(body)
        try:
            parsed = reader.read(path, name, mpfile.MAX_SERIES - merge.series)
            if parsed is not None:
                merge.add(m["kind"], m["mode"], m["ident"], parsed)
        except mpfile.Rejected as exc:
            reason = str(exc)
            assert reason and "\n" not in reason, reason
        finally:
            os.unlink(path)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Served(merge.result()))  # type: ignore[arg-type]
    check_text(generate_latest(registry))
    check_openmetrics(om_latest(registry))


def main() -> None:
    atheris.Setup(absolute(sys.argv), one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
