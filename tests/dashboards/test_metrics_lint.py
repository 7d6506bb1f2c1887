"""`promtool check metrics` is clean on what Prometheus scrapes from us (classic text format)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import Prometheus, get


@pytest.mark.prometheus
@pytest.mark.parametrize("target", ["app", "sidecar"])
def test_promtool_check_metrics(prometheus: Prometheus, target: str) -> None:
    if target not in prometheus.targets:
        pytest.fail(f"{target} is not running (pool-exporter serve missing?)")
    status, body = get(f"{prometheus.targets[target]}/metrics", headers={"Accept": "text/plain; version=0.0.4"})
    assert status == 200 and b"# HELP" in body
    assert not body.startswith(b"# EOF") and b"\n# EOF" not in body, "got OpenMetrics, not the classic format"
    result = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "metrics"], input=body, capture_output=True
    )
    assert result.returncode == 0 and not result.stdout and not result.stderr, (result.stdout + result.stderr).decode()
