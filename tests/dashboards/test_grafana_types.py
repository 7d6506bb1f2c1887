"""The dashboard JSON type-checks against Grafana's own TypeScript types (@grafana/schema), strictly.

One tsc run per Grafana version compiles the dashboard together with mutated copies: the dashboard
must pass, each mutation must fail on its own line, and the keys removed before the check
(VARIABLE_KEYS_NOT_IN_TYPES) must each fail when left in, so the list is neither stale nor too long.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from dashboards import grafana_types
from dashboards.dashboard import OUTPUT

RAW: dict[str, Any] = json.loads(OUTPUT.read_text())
DOC, REMOVED = grafana_types.without_untyped_keys(RAW)


def _panel(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in doc["panels"] if p["type"] == kind)


# The mutations break a small copy (one panel of each type, two variables): tsc is quicker on it.
SMALL = {
    **DOC,
    "panels": [_panel(DOC, kind) for kind in ("row", "stat", "timeseries")],
    "templating": {"list": DOC["templating"]["list"][:2]},
}


# Each breaks the dashboard in one place, at a different depth; the check must say so.
MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "misspelled top-level key": lambda d: d.update(refersh="30s"),
    "misspelled panel key": lambda d: _panel(d, "timeseries").update(descripton="x"),
    "misspelled row key": lambda d: _panel(d, "row").update(collapsd=False),
    "misspelled timeseries legend option": lambda d: _panel(d, "timeseries")["options"]["legend"].update(showLegnd=1),
    "misspelled timeseries custom field config": lambda d: _panel(d, "timeseries")["fieldConfig"]["defaults"][
        "custom"
    ].update(lineWidht=1),
    "custom field config on a stat panel": lambda d: _panel(d, "stat")["fieldConfig"]["defaults"].update(custom={}),
    "stat option outside its enum": lambda d: _panel(d, "stat")["options"].update(colorMode="backgroud"),
    "threshold mode outside its enum": lambda d: _panel(d, "stat")["fieldConfig"]["defaults"]["thresholds"].update(
        mode="absolut"
    ),
    "grid width as a string": lambda d: _panel(d, "timeseries")["gridPos"].update(w="8"),
    "misspelled override matcher key": lambda d: _panel(d, "timeseries")["fieldConfig"]["overrides"].append(
        {"matcher": {"id": "byName", "option": "x"}, "properties": []}
    ),
    "misspelled variable key": lambda d: d["templating"]["list"][1].update(multii=True),
    "panel type without types": lambda d: _panel(d, "timeseries").update(type="graph"),
}


def _mutated(mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    mutate(doc)
    return doc


def _one_variable_with(key: str) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc["templating"]["list"] = [{**RAW["templating"]["list"][1]}]
    for other in grafana_types.VARIABLE_KEYS_NOT_IN_TYPES.keys() - {key}:
        del doc["templating"]["list"][0][other]
    return doc


@pytest.fixture(scope="module", params=sorted(grafana_types.GRAFANA))
def compiled(request: pytest.FixtureRequest) -> dict[str, list[str]]:
    docs = {"dashboard": DOC, "small": SMALL}
    docs |= {f"untyped {key}": _one_variable_with(key) for key in grafana_types.VARIABLE_KEYS_NOT_IN_TYPES}
    docs |= {name: _mutated(mutate) for name, mutate in MUTATIONS.items()}
    return grafana_types.check_many(docs, request.param)


def test_dashboard_type_checks(compiled: dict[str, list[str]]) -> None:
    assert compiled[""] == [], "tsc failed outside the checked literals"
    assert compiled["dashboard"] == []
    assert compiled["small"] == []  # so each mutation below fails because of the mutation


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_broken_dashboard_fails(compiled: dict[str, list[str]], name: str) -> None:
    assert compiled[name], f"{name}: the type check let it through"


@pytest.mark.parametrize("key", list(grafana_types.VARIABLE_KEYS_NOT_IN_TYPES))
def test_each_removed_key_is_unknown_to_the_types(compiled: dict[str, list[str]], key: str) -> None:
    assert len(compiled[f"untyped {key}"]) == 1 and f"'\"{key}\"' does not exist" in compiled[f"untyped {key}"][0]


def test_removed_keys_are_only_the_generators_variable_defaults() -> None:
    variables = RAW["templating"]["list"]
    assert {v["type"] for v in variables} == {"datasource", "query"}  # no interval variable: the keys are inert
    expected = [
        f"templating.list[{i}].{k}" for i in range(len(variables)) for k in grafana_types.VARIABLE_KEYS_NOT_IN_TYPES
    ]
    assert expected == REMOVED
    assert grafana_types.without_untyped_keys(DOC) == (DOC, [])


def test_cli_reports_each_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert grafana_types.main(["--grafana", "13.2"]) == 0
    out = capsys.readouterr().out
    assert "Grafana 13.2 (@grafana/schema 13.2.3): OK" in out
