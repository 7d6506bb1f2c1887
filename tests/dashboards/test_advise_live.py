"""`pool-exporter advise` against a real Prometheus that scraped the demo's real load through the sidecar."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from sqlalchemy_pool_exporter.instrumentation import erlang

from .conftest import Prometheus


def advise(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pool_exporter", "advise", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def value(prometheus: Prometheus, expr: str, at: float) -> float:
    result = prometheus.api("query", query=expr, time=f"{at:.3f}")["data"]["result"]
    assert len(result) == 1, result
    return float(result[0]["value"][1])


@pytest.mark.prometheus
def test_advise_reads_the_busiest_window_and_the_budget(prometheus: Prometheus) -> None:
    # The advice window takes a step (3 s) after the demo's first checkouts; the server view its first poll.
    assert prometheus.wait_for("sqlalchemy_pool_offered_load", timeout=60)["data"]["result"]
    assert prometheus.wait_for("sqlalchemy_server_info", timeout=60)["data"]["result"]
    until = time.time()
    done = advise("--prometheus", prometheus.url, "--range", "10m", "--until", f"{until:.3f}", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["range"], out["wait_probability"]) == ("10m", 0.01)
    [pool] = out["pools"]
    # What Prometheus itself says at the same instant, and Erlang C's answer for it.
    peak = value(prometheus, "max(max_over_time(sqlalchemy_pool_offered_load[10m]))", until)
    workers = int(value(prometheus, "max(max_over_time(sqlalchemy_exporter_sidecar_workers[10m]))", until))
    assert workers == 2
    assert pool["peak_load"] == peak
    assert pool["workers"] == workers
    assert pool["peak_load_per_worker"] == peak / workers
    assert pool["advised_pool_size"] == erlang.advised_size(peak / workers, 0.01)
    assert pool["advised_max_overflow"] == erlang.advised_size(peak / workers, 0.001) - pool["advised_pool_size"]
    assert (pool["pool_size"], pool["max_overflow"]) == (3, 1)  # the demo's, per worker
    assert pool["server"] == "127.0.0.1:5432"
    # The budget: 2 workers x (3 + 1) on the server, against max_connections minus the reserved ones.
    limit = value(prometheus, "sqlalchemy_server_max_connections - sqlalchemy_server_reserved_connections", until)
    [server] = out["servers"]
    assert server["server"] == "127.0.0.1:5432"
    assert server["limit"] == int(limit)
    assert server["configured"] == 8
    assert server["advised"] == 2 * (pool["advised_pool_size"] + pool["advised_max_overflow"])
    # The table says the same, for a person.
    table = advise("--prometheus", prometheus.url, "--range", "10m", "--until", f"{until:.3f}")
    assert table.returncode == 0, table.stderr
    print("\n" + table.stdout)
    assert f"127.0.0.1:5432  {int(limit)}" in table.stdout


@pytest.mark.prometheus
def test_advise_says_when_prometheus_has_no_data(prometheus: Prometheus) -> None:
    done = advise("--prometheus", prometheus.url, "--range", "1m", "--until", "1000000000")
    assert done.returncode == 1
    assert done.stderr == (
        f"pool-exporter advise: Prometheus at {prometheus.url} has no sqlalchemy_pool_offered_load in the last 1m"
        " (it scrapes no pool exporter)\n"
    )


def test_advise_says_when_prometheus_is_unreachable() -> None:
    done = advise("--prometheus", "http://user:secret@127.0.0.1:9", "--range", "1h")
    assert done.returncode == 1
    assert done.stderr.startswith("pool-exporter advise: cannot reach Prometheus at http://127.0.0.1:9: ")
    assert "secret" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--prometheus", "127.0.0.1:9090"), "--prometheus must be an http:// or https:// URL, got '127.0.0.1:9090'"),
        (("--prometheus", "http://p:9090", "--range", "7 days"), "range must be a Prometheus duration"),
        (("--prometheus", "http://p:9090", "--wait-probability", "1"), "wait_probability must be a number between"),
    ],
)
def test_advise_refuses_bad_arguments_in_one_line(args: tuple[str, ...], message: str) -> None:
    done = advise(*args)
    assert done.returncode == 2
    assert done.stderr.startswith(f"pool-exporter advise: {message}")
    assert done.stderr.count("\n") == 1
