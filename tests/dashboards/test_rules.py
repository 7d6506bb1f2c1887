"""The alert rules: promtool check and unit tests, and every expression evaluated by a live Prometheus."""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any

import pytest
import yaml

from .conftest import REPO, Prometheus

RULES = REPO / "dashboards" / "alerts.yml"
RULE_TESTS = REPO / "dashboards" / "tests" / "alerts_test.yml"
GROUPS: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
ALERTS = [rule for group in GROUPS for rule in group["rules"] if "alert" in rule]
RECORDS = [rule for group in GROUPS for rule in group["rules"] if "record" in rule]
PROMTOOL = shutil.which("promtool") or "promtool"


def test_promtool_check_rules() -> None:
    result = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_unit_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert tested == {rule["alert"] for rule in ALERTS}
    recorded = {case["expr"] for t in tests for case in t.get("promql_expr_test", []) if case.get("exp_samples")}
    assert recorded >= {rule["record"] for rule in RECORDS}


@pytest.mark.parametrize("rule", RECORDS, ids=[r["record"] for r in RECORDS])
def test_recording_rules_are_named_level_metric_operation(rule: dict[str, Any]) -> None:
    level, _metric, operation = rule["record"].split(":")
    assert (level, operation.split("_by_")[-1]) == ("sqlalchemy", "server")


@pytest.mark.parametrize("rule", ALERTS, ids=[r["alert"] for r in ALERTS])
def test_rule_is_mixin_style(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    assert {"summary", "description"} <= set(rule["annotations"])


@pytest.mark.prometheus
@pytest.mark.parametrize("rule", ALERTS + RECORDS, ids=[r.get("alert") or r["record"] for r in ALERTS + RECORDS])
def test_alert_expression_evaluates(prometheus: Prometheus, rule: dict[str, Any]) -> None:
    payload = prometheus.query(rule["expr"])
    assert payload["http_status"] == 200 and payload["status"] == "success", payload


@pytest.mark.prometheus
def test_rules_loaded_and_healthy(prometheus: Prometheus) -> None:
    deadline = time.monotonic() + 30
    while True:
        groups = prometheus.api("rules")["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        evaluated = all(r.get("lastEvaluation", "").startswith("20") for r in rules.values())
        if (evaluated and len(rules) == len(ALERTS) + len(RECORDS)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(rules) == {r["alert"] for r in ALERTS} | {r["record"] for r in RECORDS}
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
