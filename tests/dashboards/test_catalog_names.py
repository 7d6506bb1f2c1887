"""Every metric name the dashboard, the alert rules and the README use is in the catalog, and the README
lists every catalog metric. Static and fast: no Prometheus, no demo."""

from __future__ import annotations

import re

from sqlalchemy_pool_exporter import catalog

from .conftest import REPO

NAMESPACE = catalog.DEFAULT_NAMESPACE
# Our import name, sqlalchemy_pool_exporter, is not a metric.
_NAME = re.compile(rf"\b{NAMESPACE}_(?!pool_exporter\b)[a-z0-9_]+")


def families() -> dict[str, catalog.MetricSpec]:
    specs = (*catalog.CATALOG, *catalog.SERVER_CATALOG, *catalog.SIDECAR_CATALOG)
    return {spec.name(NAMESPACE): spec for spec in specs}


def sample_names() -> set[str]:
    """Every name a query may use: the families, and _bucket/_count/_sum of the histograms."""
    names = set()
    for name, spec in families().items():
        names.add(name)
        if spec.kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


def used_in(text: str) -> set[str]:
    return set(_NAME.findall(text))


def test_dashboard_queries_use_catalog_names_only() -> None:
    used = used_in((REPO / "dashboards" / "sqlalchemy-pool.json").read_text())
    used |= used_in((REPO / "dashboards" / "dashboard.py").read_text())
    assert used, "no metric names found: the pattern is wrong"
    assert used - sample_names() == set()


def test_alert_rules_use_catalog_names_only() -> None:
    used = used_in((REPO / "dashboards" / "alerts.yml").read_text())
    assert used
    assert used - sample_names() == set()


def test_readme_metric_tables_match_the_catalog() -> None:
    readme = (REPO / "README.md").read_text()
    rows = re.findall(rf"^\| `({NAMESPACE}_[a-z0-9_]+)` \|", readme, re.MULTILINE)
    assert len(rows) == len(set(rows)), "a metric is listed twice"
    assert set(rows) == set(families()), "README metric tables and the catalog differ"
    # Everything else the README names (samples, queries) is a catalog name too.
    assert used_in(readme) - sample_names() == set()
