"""The fuzzers' exposition oracle agrees with `promtool check metrics` (too slow to run per execution).

Real bodies pass both: what a real worker's files (the committed seeds) merge into, and what the
exporter serves for a pool whose name holds quotes, a backslash and a newline. Broken bodies fail
both; the oracle is also stricter than promtool where Prometheus' scrape is (a duplicate series).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_latest
from sqlalchemy import create_engine
from sqlalchemy.pool import QueuePool

from sqlalchemy_pool_exporter.core import Exporter
from sqlalchemy_pool_exporter.sidecar import mpfile

from .oracles import Violation, check_openmetrics, check_text

PROMTOOL = shutil.which("promtool")
SEEDS = sorted((Path(__file__).parent / "corpus" / "mpfile").glob("seed-*"))
KINDS = ["counter", "histogram", "summary", *(f"gauge_{m}" for m in sorted(mpfile.GAUGE_MODES))]


def promtool(body: bytes) -> int:
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60).returncode


class Families:
    def __init__(self, metrics: list[object]) -> None:
        self.metrics = metrics

    def collect(self) -> list[object]:
        return self.metrics


def merged(seed: Path, tmp_path: Path) -> CollectorRegistry:
    """A seed of fuzz_mpfile.py (`<kind byte><length><file>`...) read and merged as the sidecar does."""
    data = seed.read_bytes()
    reader, merge = mpfile.Reader(lambda *_: None), mpfile.Merge()
    pos, n = 0, 0
    while pos < len(data):
        kind = KINDS[data[pos]]
        (size,) = struct.unpack_from("<I", data, pos + 1)
        name = f"{kind}_{n}.db"
        (tmp_path / name).write_bytes(data[pos + 5 : pos + 5 + size])
        m = mpfile.FILE.fullmatch(name)
        assert m is not None
        parsed = reader.read(str(tmp_path / name), name, mpfile.MAX_SERIES)
        assert parsed is not None
        merge.add(m["kind"], m["mode"], m["ident"], parsed)
        pos, n = pos + 5 + size, n + 1
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(merge.result()))  # type: ignore[arg-type]
    return registry


@pytest.mark.parametrize("seed", SEEDS, ids=[s.name for s in SEEDS])
def test_a_real_workers_merged_files_pass_the_oracle_and_promtool(seed: Path, tmp_path: Path) -> None:
    registry = merged(seed, tmp_path)
    body = generate_latest(registry)
    assert check_text(body) > 0
    check_openmetrics(om_latest(registry))
    assert promtool(body) == 0


def test_a_pool_named_with_quotes_and_a_newline_passes_the_oracle_and_promtool() -> None:
    registry = CollectorRegistry()
    with Exporter(registry) as exporter:
        engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=1)
        exporter.instrument(engine, name='app "main"\n\\')
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        body = generate_latest(registry)
        assert 'pool="app \\"main\\"\\n\\\\"' in body.decode()
        assert check_text(body) > 10
        check_openmetrics(om_latest(registry))
        assert promtool(body) == 0
        engine.dispose()


HEAD = "# HELP a x\n# TYPE a gauge\n"


@pytest.mark.parametrize(
    "body",
    [
        HEAD + 'a{x="\\q"} 1\n',  # an escape the format has not
        HEAD + "a-b 1\n",  # a metric name outside the charset
        HEAD + 'a{1x="1"} 1\n',  # a label name outside it
        HEAD + 'a{x="1",x="2"} 1\n',  # a label twice
        HEAD + "# TYPE a gauge\na 1\n",  # a second TYPE
    ],
)
def test_what_promtool_refuses_the_oracle_refuses(body: str) -> None:
    with pytest.raises(Violation):
        check_text(body.encode())
    assert promtool(body.encode()) == 1


def test_the_oracle_refuses_a_duplicate_series_that_promtool_lets_through() -> None:
    """Prometheus' scrape drops such a sample ("duplicate sample for timestamp"); promtool does not look."""
    body = (HEAD + 'a{p="1"} 1\na{p="1"} 2\n').encode()
    with pytest.raises(Violation, match="duplicate series"):
        check_text(body)
    assert promtool(body) == 0
