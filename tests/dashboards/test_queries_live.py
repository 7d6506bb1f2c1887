"""Every dashboard query and variable query returns series from a real Prometheus scraping the demo."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from dashboards import dashboard

from .conftest import Prometheus, substitute

DOC: dict[str, Any] = json.loads(dashboard.OUTPUT.read_text())
TARGETS = [(panel, target) for panel in DOC["panels"] if panel["type"] != "row" for target in panel["targets"]]
VARIABLES = [v for v in DOC["templating"]["list"] if v["type"] == "query"]


def _run(prometheus: Prometheus, panel: dict[str, Any], expr: str) -> dict[str, Any]:
    if panel["type"] == "stat":
        return prometheus.query(expr)
    return prometheus.query_range(expr, seconds=30)


@pytest.mark.prometheus
@pytest.mark.parametrize(("panel", "target"), TARGETS, ids=[f"{p['id']}-{p['title']}-{t['refId']}" for p, t in TARGETS])
def test_panel_query_returns_series(prometheus: Prometheus, panel: dict[str, Any], target: dict[str, Any]) -> None:
    expr = substitute(target["expr"])
    while True:
        payload = _run(prometheus, panel, expr)
        assert payload["http_status"] == 200 and payload["status"] == "success", payload
        if payload["data"]["result"] or prometheus.remaining() == 0:
            break
        time.sleep(1.0)
    assert payload["data"]["result"], f"no series for {expr}"


@pytest.mark.prometheus
@pytest.mark.parametrize("variable", VARIABLES, ids=[v["name"] for v in VARIABLES])
def test_variable_query_has_values(prometheus: Prometheus, variable: dict[str, Any]) -> None:
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
    assert match, variable["query"]
    selector, label = match.groups()
    payload = prometheus.wait_for(substitute(f"count by ({label}) ({selector})"), prometheus.remaining())
    assert payload["status"] == "success", payload
    values = {series["metric"].get(label) for series in payload["data"]["result"]}
    assert values and None not in values, f"{variable['name']}: no values for {label}"


@pytest.mark.prometheus
@pytest.mark.parametrize(
    "expr",
    [
        'sqlalchemy_transactions_total{outcome="commit"}',
        'sqlalchemy_transactions_total{outcome="rollback"}',
        "sqlalchemy_pool_timeouts_total",
        "sqlalchemy_pool_connections_leaked_total",
        "sqlalchemy_pool_checkouts_total",
        'sqlalchemy_pool_holder_held_too_long_total{holder="GET /demo/report"}',
        'sqlalchemy_pool_holder_checkouts_total{holder="GET /demo/items"}',
    ],
)
def test_demo_traffic_reaches_prometheus(prometheus: Prometheus, expr: str) -> None:
    """The panels show the demo's real events (commits, rollbacks, timeouts, leaks, the report route held
    past the leak threshold), not just zeros."""
    payload = prometheus.wait_for(f"sum({expr}) > 0", max(prometheus.remaining(), 20.0))
    assert payload["data"]["result"], f"{expr} stayed at 0"


@pytest.mark.prometheus
def test_server_view_sees_the_demo(prometheus: Prometheus) -> None:
    expr = 'sum(sqlalchemy_server_connections{datname="pool_exporter_dashboards"}) > 0'
    assert prometheus.wait_for(expr, max(prometheus.remaining(), 20.0))["data"]["result"]
