"""What tests/fuzz/fuzz_mpfile.py found: merges whose body an OpenMetrics parser refuses as a whole.

Each case is a real file in prometheus_client's format, read and merged as the sidecar does; the
merged families are served through prometheus_client's OpenMetrics encoder and parsed back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from sqlalchemy_pool_exporter.sidecar import mpfile

H = "app_latency_seconds"


def bucket(route: str, le: str) -> str:
    return f'["{H}", "{H}_bucket", {{"le": "{le}", "route": "{route}"}}, "Latency."]'


def total(route: str, suffix: str = "_sum") -> str:
    return f'["{H}", "{H}{suffix}", {{"route": "{route}"}}, "Latency."]'


def merge(tmp_path: Path, *files: tuple[str, dict[str, tuple[float, float]]]) -> mpfile.Merge:
    reader, merged = mpfile.Reader(lambda *_: None), mpfile.Merge()
    for n, (kind, values) in enumerate(files):
        name = f"{kind}_{n}.db"
        (tmp_path / name).write_bytes(mpfile.encode(values))
        m = mpfile.FILE.fullmatch(name)
        assert m is not None
        parsed = reader.read(str(tmp_path / name), name, mpfile.MAX_SERIES)
        assert parsed is not None
        merged.add(m["kind"], m["mode"], m["ident"], parsed)
    return merged


class Families:
    def __init__(self, merged: mpfile.Merge) -> None:
        self.metrics = merged.result()

    def collect(self):  # type: ignore[no-untyped-def]
        return self.metrics


def test_a_histograms_label_sets_are_served_each_in_one_piece(tmp_path: Path) -> None:
    """Every `_sum` first, then every set's buckets: the OpenMetrics parser refused the whole body."""
    values = {total("a"): (1.5, 0.0), total("b"): (0.25, 0.0)}
    for route, counts in (("a", (1.0, 3.0)), ("b", (2.0, 2.0))):
        values[bucket(route, "0.1")] = (counts[0], 0.0)
        values[bucket(route, "+Inf")] = (counts[1] - counts[0], 0.0)
    merged = merge(tmp_path, ("histogram", values), ("histogram", values))
    (family,) = merged.result()
    assert [(s.name, s.labels.get("route"), s.labels.get("le"), s.value) for s in family.samples] == [
        (f"{H}_bucket", "a", "0.1", 2.0),
        (f"{H}_bucket", "a", "+Inf", 6.0),
        (f"{H}_count", "a", None, 6.0),
        (f"{H}_sum", "a", None, 3.0),
        (f"{H}_bucket", "b", "0.1", 4.0),
        (f"{H}_bucket", "b", "+Inf", 4.0),
        (f"{H}_count", "b", None, 4.0),
        (f"{H}_sum", "b", None, 0.5),
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(merged))  # type: ignore[arg-type]
    (parsed,) = text_string_to_metric_families(generate_latest(registry).decode())
    assert len(parsed.samples) == 8


@pytest.mark.parametrize(
    ("kind", "values", "reason"),
    [
        (
            "histogram",
            {bucket("a", "0.1"): (1.0, 0.0), total("a"): (1.0, 0.0)},
            f"has a histogram '{H}' whose label set lacks its +Inf",
        ),
        (
            "histogram",
            {bucket("a", "0.1"): (1.0, 0.0), bucket("a", "+Inf"): (1.0, 0.0)},
            f"has a histogram '{H}' whose label set lacks its _sum",
        ),
        (
            "histogram",
            {bucket("a", "+Inf"): (1.0, 0.0), total("a"): (1.0, 0.0), total("a", "_bucket"): (1.0, 0.0)},
            f"has a histogram sample '{H}_bucket' with a bound where none belongs, or none",
        ),
        (
            "summary",
            {total("a"): (1.0, 0.0)},
            f"has a summary '{H}' whose label set lacks its _count",
        ),
        (
            "counter",
            {total("a", "_bucket"): (1.0, 0.0)},
            f"has a counter sample '{H}_bucket' that no counter writes",
        ),
        (
            "gauge_livesum",
            {total("a", "_total"): (1.0, 0.0)},
            f"has a gauge sample '{H}_total' that no gauge writes",
        ),
    ],
)
def test_a_file_no_writer_leaves_so_incomplete_is_rejected(
    tmp_path: Path, kind: str, values: dict[str, tuple[float, float]], reason: str
) -> None:
    """Served, each made the OpenMetrics parser refuse the whole body (a +Inf bucket missing, a `_sum`
    without its `_count`, a sample its family's type has no place for)."""
    with pytest.raises(mpfile.Rejected) as caught:
        merge(tmp_path, (kind, values))
    assert str(caught.value) == reason
