"""Which names a view of the catalog uses: ours (`default`), or OpenTelemetry's (`semconv`).

`semconv` spells every metric of the semantic conventions (catalog.SEMCONV_VERSION) as the
OpenTelemetry→Prometheus translation spells it: dots become underscores, the unit becomes a suffix
(`s` → `_seconds`; annotations such as `{connection}` are dropped), monotonic sums end in `_total`;
attributes become labels the same way. So a Collector's Prometheus exporter, fed by the OTLP bridge
(otel.py), shows the same names as our own /metrics with names="semconv". Metrics the conventions
do not define keep our names (and the namespace), with the same label renames. The namespace never
applies to the conventions' names: they are the same for every application by design.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Literal

from . import catalog

Names = Literal["default", "semconv"]
NAMES: tuple[Names, ...] = ("default", "semconv")

# Our labels that are attributes of the conventions' registry; with names="semconv" they take its name.
ATTRIBUTES: dict[str, str] = {
    "pool": "db.client.connection.pool.name",
    "state": "db.client.connection.state",  # values used/idle: the same words
    "error": "error.type",  # the exception's class name, as the conventions allow
    "operation": "db.operation.name",
}
SYSTEM = "db.system.name"
# `operation` as db.operation.name: the keyword as SQLAlchemy writes it. `other` is no operation
# name at all: the attribute is left out (in Prometheus an empty label value is an absent label).
OPERATIONS: dict[str, str] = {"select": "SELECT", "insert": "INSERT", "update": "UPDATE", "delete": "DELETE"}

# db.system.name of SQLAlchemy's dialects (and two common third-party ones) where it differs from
# the dialect's name; a dialect named like a member of the conventions' list keeps its name; any
# other is `other_sql`. A mysql:// URL to a MariaDB server says mysql: "as the client identifies it".
_SYSTEMS: dict[str, str] = {"mssql": "microsoft.sql_server", "oracle": "oracle.db", "redshift": "aws.redshift"}
_SYSTEM_NAMES = frozenset({"postgresql", "sqlite", "mysql", "mariadb", "cockroachdb", "trino"})


def db_system(dialect_name: str) -> str:
    """`db.system.name` of a SQLAlchemy dialect (`postgresql`, `mssql` → `microsoft.sql_server`, …)."""
    name = dialect_name.lower()
    if name in _SYSTEM_NAMES:
        return name
    return _SYSTEMS.get(name, "other_sql")


# -- the OpenTelemetry→Prometheus translation (add_metric_suffixes on, underscore escaping) ----------

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")
_UNDERSCORES = re.compile(r"__+")
_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}


def prometheus_name(name: str, unit: str, instrument: catalog.Instrument) -> str:
    """How the OpenTelemetry→Prometheus translation names a metric, counters with their `_total`."""
    out = _UNDERSCORES.sub("_", _INVALID_NAME.sub("_", name))
    bare = re.sub(r"\{[^}]*\}", "", unit)  # annotations: a count of things is unitless
    if bare == "1":
        suffix = "ratio" if instrument == "gauge" else ""
    elif bare:
        if bare not in _UNITS:
            raise ValueError(f"no Prometheus spelling known for unit {unit!r}")
        suffix = _UNITS[bare]
    else:
        suffix = ""
    if suffix and not out.endswith("_" + suffix):
        out += "_" + suffix
    if instrument == "counter" and not out.endswith("_total"):
        out += "_total"
    return out


def prometheus_label(attribute: str) -> str:
    return _UNDERSCORES.sub("_", _INVALID_LABEL.sub("_", attribute))


def otel_name(spec: catalog.MetricSpec, namespace: str) -> str:
    """Our own metric's OpenTelemetry name: what translates back to `spec.name(namespace)`."""
    base = spec.suffix
    if spec.kind == "counter":
        base = base.removesuffix("_total")
    if spec.unit == "s":
        base = base.removesuffix("_seconds")
    return f"{namespace}.{base}" if namespace else base


# -- a view of the catalog ---------------------------------------------------------------------------

_INSTRUMENTS: dict[str, catalog.Instrument] = {"gauge": "gauge", "counter": "counter", "histogram": "histogram"}


@dataclass(frozen=True, slots=True)
class Family:
    """One catalog metric as a view spells it, for Prometheus and for OpenTelemetry."""

    spec: catalog.MetricSpec
    name: str  # the Prometheus family name; a counter's ends in _total, as spec.name() does
    labelnames: tuple[str, ...]  # Prometheus labels: the pool's first (if any), db.system.name's next
    otel: str  # the OpenTelemetry metric name
    unit: str
    instrument: catalog.Instrument
    attributes: tuple[str, ...]  # the OpenTelemetry attribute of each label, in the same order
    system: bool  # the pool's db.system.name follows its name
    operation: int  # index of a db.operation.name label whose values are mapped, or -1


class View:
    """The catalog under one namespace and naming; get one through `view()`."""

    def __init__(self, namespace: str, names: Names) -> None:
        self.namespace = namespace
        self.names = names
        self.families: tuple[Family, ...] = tuple(self._family(spec) for spec in catalog.CATALOG)
        self.by_key: dict[str, Family] = {f.spec.key: f for f in self.families}
        self.by_name: dict[str, Family] = {f.name: f for f in self.families}
        self.pool_label = self._label("pool")

    def __repr__(self) -> str:
        return f"View(namespace={self.namespace!r}, names={self.names!r})"

    def _label(self, label: str) -> str:
        return prometheus_label(ATTRIBUTES[label]) if self.names == "semconv" and label in ATTRIBUTES else label

    def _family(self, spec: catalog.MetricSpec) -> Family:
        ours = ("pool",) if spec.pool_label else ()
        labels = (*ours, *spec.labels)
        attributes = tuple(ATTRIBUTES.get(label, label) for label in labels)
        sc = spec.semconv
        otel, unit = otel_name(spec, self.namespace), spec.unit
        instrument = _INSTRUMENTS[spec.kind]
        system = False
        if sc is not None:
            otel, unit, instrument, system = sc.name, sc.unit, sc.instrument, sc.system
        if self.names == "semconv" and sc is not None:
            name = prometheus_name(sc.name, sc.unit, sc.instrument)
        else:
            name = spec.name(self.namespace)
        if system:
            attributes = (*attributes[:1], SYSTEM, *attributes[1:])
        labelnames = tuple(prometheus_label(a) for a in attributes) if self.names == "semconv" else labels
        operation = attributes.index(ATTRIBUTES["operation"]) if "operation" in spec.labels else -1
        return Family(spec, name, labelnames, otel, unit, instrument, attributes, system, operation)

    def labels(self, family: Family, pool: str, system: str, labels: tuple[str, ...]) -> tuple[str, ...]:
        """The label values of one series: the pool's name, its db.system.name if the family has one, the rest."""
        if self.names == "default":
            return (pool, *labels)
        values = (pool, system, *labels) if family.system else (pool, *labels)
        if family.operation >= 0:
            i = family.operation
            values = (*values[:i], OPERATIONS.get(values[i], ""), *values[i + 1 :])
        return values

    def attributes(self, family: Family, pool: str, system: str, labels: tuple[str, ...]) -> Mapping[str, str]:
        """One series' OpenTelemetry attributes (semconv spelling in every view); empty values left out."""
        values = (pool, system, *labels) if family.system else (pool, *labels)
        if family.operation >= 0:
            i = family.operation
            values = (*values[:i], OPERATIONS.get(values[i], ""), *values[i + 1 :])
        return {a: v for a, v in zip(family.attributes, values, strict=True) if v}


@cache
def view(namespace: str = catalog.DEFAULT_NAMESPACE, names: Names = "default") -> View:
    """The (shared, immutable) view of the catalog under `namespace` and `names`."""
    return View(namespace, names)
