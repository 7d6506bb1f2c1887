"""The per-pool views (/pools JSON, the / table, snapshot()), derived from the catalog.

In-process a row is built from the same samples the collector renders; in the sidecar, from the
merged metrics by reading the catalog's names back. Both go through `_put`, so a metric added to
the catalog with a `field` shows in every view, and a `column` adds it to the / table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import catalog, samples
from .metricnames import NAMES, Family, view

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .reading import PoolReading, PoolSource

# The / table: columns that are not metrics, then every catalog metric with a `column`, in catalog order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "pool"),
    ("pool_class", "class"),
    *((state, state) for state in catalog.CONNECTION_STATES),
    *((spec.field, spec.column) for spec in catalog.CATALOG if spec.field is not None and spec.column is not None),
)


def _put(row: dict[str, Any], spec: catalog.MetricSpec, labels: samples.Labels, value: float) -> None:
    if spec.field is None:
        return
    if spec.flat and labels:
        row[labels[0]] = value
    elif labels:
        row.setdefault(spec.field, {})[labels[0]] = value
    else:
        row[spec.field] = value


def pool_row(source: PoolSource, reading: PoolReading | None) -> dict[str, Any]:
    """One pool's row, in-process: its configuration, live reading and totals."""
    row: dict[str, Any] = {"name": source.name, "url": getattr(source, "url", None), "alive": reading is not None}
    if reading is not None:
        row["pool_class"] = reading.pool_class
        for key, labels, value in samples.gauges(reading):
            _put(row, catalog.BY_KEY[key], labels, value)
        # Gauges the pool class has no notion of are still keys of the row, as None.
        for spec in catalog.CATALOG:
            if spec.kind == "gauge" and spec.pool_label and spec.field is not None and not spec.labels:
                row.setdefault(spec.field, None)
        row.setdefault("idle", None)
    for key, labels, count in samples.counters(source.stats):
        _put(row, catalog.BY_KEY[key], labels, count)
    return row


def pools_from_metrics(metrics: Iterable[Metric], namespace: str) -> list[dict[str, Any]]:
    """Rows rebuilt from merged multiprocess metrics (no URL, no pool class), by catalog name.

    Workers may write our names or the semantic conventions' (names="semconv"): both are read, so
    the sidecar needs no setting for it.
    """
    # Our own metrics have the same name in both: the pool label tells which naming wrote a sample.
    by_sample: dict[str, list[tuple[Family, str]]] = {}
    for names in NAMES:
        v = view(namespace, names)
        for family in v.families:
            spec = family.spec
            if spec.pool_label and spec.field is not None and spec.kind != "histogram":
                by_sample.setdefault(family.name, []).append((family, v.pool_label))
    rows: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        for s in metric.samples:
            found = [(f, s.labels[label]) for f, label in by_sample.get(s.name, ()) if label in s.labels]
            if not found:
                continue
            family, pool = found[0]
            row = rows.setdefault(pool, {"name": pool})
            # No family with a field has db.system.name or mapped values: its labels follow the pool's.
            labels = tuple(s.labels.get(label, "") for label in family.labelnames[1:])
            value: float = int(s.value) if float(s.value).is_integer() else s.value
            _put(row, family.spec, labels, value)
    return [rows[name] for name in sorted(rows)]
