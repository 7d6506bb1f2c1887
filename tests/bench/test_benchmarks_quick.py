"""`python -m benchmarks --quick` keeps working: every row is there and every number is finite.

Never a timing threshold: this machine is shared and the goals are judged from a full run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import finite
from benchmarks.variants import otel_available, otlp_available, selected

ROOT = Path(__file__).resolve().parents[2]
BLANK = "\N{EN DASH}"

pytestmark = pytest.mark.postgres


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """Section title -> table rows (cells), header and separator left out."""
    tables: dict[str, list[list[str]]] = {}
    section = ""
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:]
            tables[section] = []
        elif line.startswith("| ") and section:
            tables[section].append([c.strip() for c in line.strip("|").split(" | ")])
    return {name: rows[2:] for name, rows in tables.items()}


@pytest.fixture(scope="module")
def report() -> str:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_section_and_goal_is_reported(report: str) -> None:
    tables = _tables(report)
    titles = list(tables)
    assert [t.split(":")[0].split(".")[0] for t in titles] == ["1", "2", "3", "4", "Goals"]
    goals = [row[0] for row in tables["Goals"]]
    # The pool cycle in Ir and in µs, a transaction at c=1 and c=16 (the lean rows only where ours_lean is
    # counted: not in quick mode), render, merge, churn, memory.
    assert len(goals) == 8, goals
    assert all(row[3] in ("yes", "**no**") for row in tables["Goals"])


def test_every_variant_has_finite_timings(report: str) -> None:
    tables = _tables(report)
    labels = [v.label for v in selected()]
    assert len(labels) == 8 + otlp_available() + 2 * otel_available()
    cycle = next(rows for title, rows in tables.items() if title.startswith("1."))
    e2e = next(rows for title, rows in tables.items() if title.startswith("2."))
    assert [row[0] for row in cycle] == labels
    assert [row[0] for row in e2e] == labels
    for row in cycle:
        timed = [row[1], row[2], row[3], row[6], row[7], row[8]]
        assert all(finite(cell) for cell in timed), row
    for row in e2e:
        # Instruction counts are taken for `none` and `ours` only in quick mode; a dash marks the rest.
        assert all(finite(cell) or cell == BLANK for cell in row[1:]), row
        # c=1 and c=16: CPU µs, the added µs with its noise, the two ratios.
        assert sum(finite(cell) for cell in row[1:]) >= 8, row
    by_label = {row[0]: row for row in e2e}
    for variant in ("none", "ours"):
        label = next(v.label for v in selected() if v.name == variant)
        assert all(finite(cell) for cell in by_label[label][1:]), by_label[label]


def test_instruction_counts_for_bare_and_ours(report: str) -> None:
    cycle = next(rows for title, rows in _tables(report).items() if title.startswith("1."))
    by_label = {row[0]: row for row in cycle}
    for variant in ("none", "ours"):
        label = next(v.label for v in selected() if v.name == variant)
        assert finite(by_label[label][4]) and finite(by_label[label][5]), by_label[label]


def test_scrape_and_memory_numbers_are_finite(report: str) -> None:
    tables = _tables(report)
    scrape = next(rows for title, rows in tables.items() if title.startswith("3."))
    memory = next(rows for title, rows in tables.items() if title.startswith("4."))
    # Our /metrics in both formats, prometheus_client's generate_latest as the reference, the render under
    # the semantic conventions' names, an OTLP collection (with the `otel` extra), and the sidecar's four
    # merge measurements.
    assert [row[0].split(",")[0].split(" (")[0] for row in scrape] == [
        "/metrics render",
        "/metrics render",
        "generate_latest() alone",
        "/metrics render",
        *(["OTLP collection"] if otlp_available() else []),
        "merge",
        "merge",
        "first sidecar scrape after the churn",
        "sidecar merge",
    ]
    assert all(finite(row[1]) for row in scrape), scrape
    assert all(finite(row[1]) for row in memory[:2]), memory
