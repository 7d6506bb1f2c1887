"""`python -m benchmarks.growth --quick` keeps working: every row is there and every number is finite.

Never a timing threshold: this machine is shared and growth is read from a full run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.growth import E2E_VARIANTS, QUICK
from benchmarks.run import finite

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postgres


def _growth(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.growth", "--quick", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _rows(markdown: str) -> list[list[str]]:
    """The table's rows (cells), header and separator left out."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    assert rows[0] == ["cost", "work", "result", "per unit", "detail"], rows[0]
    return rows[2:]


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("growth") / "growth.md"


@pytest.fixture(scope="module")
def report(output: Path) -> str:
    return _growth("--output", str(output))


def _expected() -> list[tuple[str, str]]:
    """(cost, the start of `work`) for every row of the quick plan, in order."""
    live, gone = QUICK.churn
    return [
        *(("/metrics render", f"{n} busy pool") for n in QUICK.pools),
        *(("sidecar merge", f"{n} live worker") for n in QUICK.live),
        ("sidecar merge", f"{live} live + {gone} gone: the reaping scrape"),
        ("sidecar merge", f"{live} live + {gone} gone: steady"),
        *(("app CPU per transaction", f"c={c}, {v}") for c in QUICK.concurrency for v in E2E_VARIANTS),
        *(("memory, pools (tracemalloc)", f"{n} busy pool") for n in QUICK.pools),
        *(("memory, holders (tracemalloc)", f"{n} holder name") for n in QUICK.holders),
    ]


def test_every_row_is_there(report: str) -> None:
    rows = _rows(report)
    assert len(rows) == len(_expected()), [r[:2] for r in rows]
    for row, (cost, work) in zip(rows, _expected(), strict=True):
        assert row[0] == cost and row[1].startswith(work), (row, cost, work)


def test_every_number_is_finite(report: str) -> None:
    for row in _rows(report):
        assert finite(row[2]) and finite(row[3]), row
        # Every row was measured: instruction counts too (valgrind), the e2e rows on PostgreSQL.
        assert not re.search(r"\b(nan|inf|n/a|not run|not counted)\b", " ".join(row), re.IGNORECASE), row


def test_each_group_names_its_command(report: str, output: Path) -> None:
    for group in ("render", "merge", "e2e", "memory"):
        assert f"`python -m benchmarks.growth --only {group} --quick`" in report
    assert output.read_text() + "\n" == report  # print() adds the last newline


def test_only_runs_one_group() -> None:
    rows = _rows(_growth("--only", "memory"))
    assert [row[0] for row in rows] == ["memory, pools (tracemalloc)"] * len(QUICK.pools) + [
        "memory, holders (tracemalloc)"
    ] * len(QUICK.holders)
