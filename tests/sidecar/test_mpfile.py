"""The sidecar's merge equals prometheus_client's MultiProcessCollector, merge after merge.

Real processes write the files with prometheus_client itself: counters, histograms, summaries and a
gauge in every multiprocess mode, in two workers. The sidecar keeps each file's layout from one
merge to the next and reads an unchanged file with one unpack (mpfile.Layout); these tests change
values, append series, and rewrite a key in place behind its back, and compare every merge.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from sqlalchemy_pool_exporter.sidecar import mpfile
from sqlalchemy_pool_exporter.sidecar.merge import Sidecar

WRITER = """
import sys
from prometheus_client import Counter, Gauge, Histogram, Summary

MODES = ["all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent"]
requests = Counter("app_requests", "Requests.", ["route"])
latency = Histogram("app_latency_seconds", "Latency.", ["route"], buckets=(0.1, 1.0))
size = Summary("app_size_bytes", "Sizes.", ["route"])
gauges = {m: Gauge(f"app_gauge_{m}", f"A {m} gauge.", ["route"], multiprocess_mode=m) for m in MODES}
base = float(sys.argv[1])


def write(route, step):
    requests.labels(route).inc(base + step)
    latency.labels(route).observe(0.05 * (base + step))
    size.labels(route).observe(base * 10 + step)
    for g in gauges.values():
        g.labels(route).set(base * 100 + step)


for line in sys.stdin:
    route, step = line.split()
    write(route, int(step))
    print("done", flush=True)
"""


class Writers:
    def __init__(self, directory: Path, script: Path) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(base)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for base in (1, 2)
        ]

    def write(self, route: str, step: int) -> None:
        for proc in self.procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{route} {step}\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "done\n"

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Writers, Sidecar]]:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writers = Writers(directory, script)
    sidecar = Sidecar(directory, stale_after=1e9)
    yield directory, writers, sidecar
    sidecar.close()
    writers.close()


Samples = set[tuple[str, str, str, frozenset[tuple[str, str]], float]]


def ours(sidecar: Sidecar) -> Samples:
    return {(m.name, m.type, s.name, frozenset(s.labels.items()), s.value) for m in sidecar.merge() for s in m.samples}


def theirs(directory: Path) -> Samples:
    collector = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]
    return {
        (m.name, m.type, s.name, frozenset(s.labels.items()), s.value)
        for m in collector.collect()  # type: ignore[no-untyped-call]
        for s in m.samples
    }


def test_every_merge_equals_prometheus_clients_as_values_change_and_series_are_added(
    setup: tuple[Path, Writers, Sidecar],
) -> None:
    directory, writers, sidecar = setup
    writers.write("a", 0)
    first = ours(sidecar)
    assert first == theirs(directory)
    # Exact values, not only agreement: two workers of base 1 and 2.
    assert ("app_requests", "counter", "app_requests_total", frozenset({("route", "a")}), 3.0) in first
    assert ("app_gauge_sum", "gauge", "app_gauge_sum", frozenset({("route", "a")}), 300.0) in first
    assert ("app_gauge_max", "gauge", "app_gauge_max", frozenset({("route", "a")}), 200.0) in first
    assert ("app_latency_seconds", "histogram", "app_latency_seconds_count", frozenset({("route", "a")}), 2.0) in first
    layouts = dict(sidecar._layouts)
    assert len(layouts) == sidecar.files == 2 * 13  # counter, histogram, summary, 10 gauge files each

    writers.write("a", 5)  # values only: every file keeps its layout
    assert ours(sidecar) == theirs(directory)
    assert all(sidecar._layouts[name] is layout for name, layout in layouts.items())
    assert ("app_requests", "counter", "app_requests_total", frozenset({("route", "a")}), 16.0) in ours(sidecar)

    writers.write("b", 1)  # a new series in every file: every layout is read anew
    merged = ours(sidecar)
    assert merged == theirs(directory)
    assert not any(sidecar._layouts[name] is layout for name, layout in layouts.items())
    assert ("app_requests", "counter", "app_requests_total", frozenset({("route", "b")}), 5.0) in merged


def test_a_key_rewritten_in_place_is_read_anew_not_trusted_from_the_layout(
    setup: tuple[Path, Writers, Sidecar],
) -> None:
    directory, writers, sidecar = setup
    writers.write("aa", 0)
    writers.write("bb", 0)
    ours(sidecar)
    counter = next(p for p in directory.glob("counter_*.db"))
    data = counter.read_bytes()
    # Another writer of the directory renames a series without moving a byte of the framing.
    assert data.count(b'"route": "bb"') == 1
    counter.write_bytes(data.replace(b'"route": "bb"', b'"route": "cc"'))
    merged = ours(sidecar)
    assert merged == theirs(directory)
    routes = {dict(labels)["route"] for name, _, _, labels, _ in merged if name == "app_requests"}
    assert routes == {"aa", "bb", "cc"}


def test_a_family_named_by_two_kinds_of_file_keeps_the_first_kind_and_quarantines_the_other(tmp_path: Path) -> None:
    """Files no prometheus_client writer produces: a counter file and a gauge file name one family.

    Folded into the counter, the gauge's samples (`app_x`, not `app_x_total`) would be lines no parser
    of the format takes in a counter family (found by tests/fuzz/fuzz_mpfile.py): the second file is
    quarantined instead, as is a counter file whose sample is not `_total`.
    """
    directory = tmp_path / "multiproc"
    directory.mkdir()
    key = '["app_x", "app_x_total", {"route": "a"}, "X."]'
    gauge = '["app_x", "app_x", {"route": "a"}, "X."]'
    other = '["app_x", "app_x", {"route": "b"}, "X."]'
    (directory / "counter_1.db").write_bytes(mpfile.encode({key: (2.0, 0.0)}))
    (directory / "gauge_livesum_2.db").write_bytes(mpfile.encode({gauge: (2.0, 0.0), other: (1.0, 0.0)}))
    (directory / "counter_3.db").write_bytes(mpfile.encode({gauge: (5.0, 0.0), other: (5.0, 0.0), key: (5.0, 0.0)}))
    sidecar = Sidecar(directory, stale_after=1e9, same_pid_namespace=False)
    try:
        for _ in range(2):
            (family,) = sidecar.merge()
            assert family.type == "counter"  # counter_1.db is read first: the smallest file
            assert [(s.name, s.labels, s.value) for s in family.samples] == [("app_x_total", {"route": "a"}, 2.0)]
        assert sidecar.quarantine.moved == 2
        assert sorted(sidecar.quarantine.recent) == ["counter_3.db", "gauge_livesum_2.db"]
    finally:
        sidecar.close()


def test_layouts_past_the_bound_are_not_kept_and_the_merge_stays_exact(
    setup: tuple[Path, Writers, Sidecar], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory of more entries than MAX_KEPT: the files past it are parsed at every merge instead."""
    directory, writers, sidecar = setup
    writers.write("a", 0)
    monkeypatch.setattr(mpfile, "MAX_KEPT", 10)
    for step in (1, 2):
        writers.write("a", step)
        assert ours(sidecar) == theirs(directory)
        kept = sum(len(layout.keys) for layout in sidecar._layouts.values())
        assert 0 < kept <= 10
        assert len(sidecar._layouts) < sidecar.files == 26
