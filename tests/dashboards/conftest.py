"""One real Prometheus server per session, scraping the running demo through the sidecar."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `dashboards` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO))

from dashboards import live  # noqa: E402
from dashboards.live import Prometheus, get  # noqa: E402

__all__ = ["REPO", "Prometheus", "get", "substitute"]

SCRAPE_INTERVAL = 1.0
# Grafana's $__rate_interval = max($__interval + scrape interval, 4 x scrape interval).
RATE_INTERVAL = "4s"
DATA_DEADLINE = 60.0  # seconds from Prometheus start to wait for every query to show data


def substitute(expr: str, *, range_seconds: int = 60) -> str:
    return live.substitute(expr, rate_interval=RATE_INTERVAL, interval="1s", range_seconds=range_seconds)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("stack")
    try:
        with live.stack(workdir, scrape_interval=SCRAPE_INTERVAL, demo_seconds=300, deadline=DATA_DEADLINE) as server:
            yield server
    except RuntimeError as exc:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(workdir.glob("*.log")))
        pytest.fail(f"{exc}\n{logs}")
