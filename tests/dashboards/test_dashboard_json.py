"""The checked-in dashboard JSON is what the generator produces, and is structurally sound."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from dashboards import dashboard

JSON_PATH = dashboard.OUTPUT
DOC: dict[str, Any] = json.loads(JSON_PATH.read_text())
PANELS: list[dict[str, Any]] = DOC["panels"]
GRAPHS = [p for p in PANELS if p["type"] != "row"]


def test_checked_in_json_is_generated_output() -> None:
    assert JSON_PATH.read_text() == dashboard.render(), "run `python -m dashboards.dashboard` and commit the JSON"
    assert dashboard.main(["--check"]) == 0


def test_check_mode_detects_stale_json(tmp_path: Path) -> None:
    stale = tmp_path / "dashboard.json"
    stale.write_text(JSON_PATH.read_text().replace("Pending requests", "Pending"))
    assert dashboard.main(["--check", "--output", str(stale)]) == 1


def test_panel_ids_unique() -> None:
    ids = [p["id"] for p in PANELS]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_grid_positions_valid_and_not_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in PANELS:
        g = p["gridPos"]
        assert set(g) == {"h", "w", "x", "y"}, p["title"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} overflows the 24-column grid"
        for cell in itertools.product(range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])):
            assert cell not in cells, f"{p['title']} overlaps {cells[cell]}"
            cells[cell] = p["title"]


def test_rows_are_expanded_and_panels_sit_at_top_level() -> None:
    # An expanded row with nested panels hides them in Grafana; only collapsed rows nest.
    for row in (p for p in PANELS if p["type"] == "row"):
        assert row["collapsed"] is False and row["panels"] == []


@pytest.mark.parametrize("panel", GRAPHS, ids=[p["title"] for p in GRAPHS])
def test_panel_has_datasource_targets_and_unit(panel: dict[str, Any]) -> None:
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert panel["targets"], "no query"
    for target in panel["targets"]:
        assert target["expr"].strip() and target["refId"] and target["legendFormat"]
        assert target.get("datasource", panel["datasource"]) == panel["datasource"]
    assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    assert panel["fieldConfig"]["defaults"].get("unit"), "unit not set"
    assert panel["title"] and panel.get("description")


def test_histogram_quantiles_sum_by_le_first() -> None:
    exprs = [t["expr"] for p in GRAPHS for t in p["targets"] if "histogram_quantile" in t["expr"]]
    assert len(exprs) == 15
    for expr in exprs:
        assert "sum by (le, " in expr and "_bucket{" in expr and "rate(" in expr, expr


def test_variables() -> None:
    variables = {v["name"]: v for v in DOC["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "pool", "holder"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "pool", "holder"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    assert variables["pool"]["multi"] is True and variables["pool"]["includeAll"] is True
    assert variables["instance"]["multi"] is True and variables["instance"]["includeAll"] is True
    assert variables["holder"]["multi"] is True and variables["holder"]["includeAll"] is True
    assert variables["holder"]["query"]["query"].startswith("label_values(sqlalchemy_pool_holder_connections{")


def test_every_pool_query_filters_by_the_variables() -> None:
    for p in GRAPHS:
        for t in p["targets"]:
            for metric in ("sqlalchemy_pool_", "sqlalchemy_transaction", "sqlalchemy_statement"):
                if metric in t["expr"]:
                    assert 'pool=~"$pool"' in t["expr"] and 'job=~"$job"' in t["expr"], t["expr"]


def test_every_holder_query_filters_by_holder() -> None:
    exprs = [t["expr"] for p in GRAPHS for t in p["targets"] if "sqlalchemy_pool_holder_" in t["expr"]]
    assert len(exprs) == 10  # five of "who holds the pool", five of "what the database sees"
    for expr in exprs:
        assert expr.count('holder=~"$holder"') == expr.count("sqlalchemy_pool_holder_"), expr


def test_connections_by_holder_are_stacked() -> None:
    held = next(p for p in GRAPHS if p["title"] == "Connections held by holder")
    assert held["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"


def test_timeout_reference_line_on_wait_panel() -> None:
    wait = next(p for p in GRAPHS if p["title"].startswith("Wait for a connection"))
    assert any("sqlalchemy_pool_timeout_seconds" in t["expr"] for t in wait["targets"])
    assert wait["fieldConfig"]["overrides"], "timeout line is not styled as a reference"
