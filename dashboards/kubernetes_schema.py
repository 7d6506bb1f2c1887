"""Validate deploy/kubernetes offline against the Kubernetes and prometheus-operator schemas.

`python -m dashboards.kubernetes_schema` prints one line per resource and check, exit status 1 on any
failure:

- Kubernetes resources (Deployment, Service, ConfigMap): the strict JSON schemas of kubernetes-validate
  (PyPI; generated from each Kubernetes release's OpenAPI, unknown fields rejected), for every
  Kubernetes release the installed version ships;
- prometheus-operator resources (PodMonitor, PrometheusRule): the validators of
  @kubernetes-models/prometheus-operator (npm; generated from prometheus-operator's API types: required
  fields, types, enums, patterns), and, because those let unknown fields through, `tsc --strict` over
  the resources as object literals typed by the same package's TypeScript interfaces.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions, major_minor

from . import npm
from .kubernetes import DEPLOY

OPERATOR_API = "monitoring.coreos.com/v1"
OPERATOR_PACKAGE = "@kubernetes-models/prometheus-operator"
# kind -> the package's TypeScript interface for it.
OPERATOR_TYPES = {"PodMonitor": "IPodMonitor", "PrometheusRule": "IPrometheusRule"}


@dataclass(frozen=True)
class Resource:
    source: str  # file name in deploy/kubernetes
    doc: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.doc.get('kind')}/{self.doc.get('metadata', {}).get('name')}"


def resources(directory: Path = DEPLOY) -> list[Resource]:
    """Every resource in the directory's YAML files (kustomization.yaml is kustomize's, not a resource)."""
    found = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [Resource(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def kubernetes_versions() -> list[str]:
    """Every Kubernetes release (major.minor) whose schemas the installed kubernetes-validate ships."""
    return list(dict.fromkeys(major_minor(v) for v in all_versions()))  # each ships plain and -strict


def _span(releases: list[str], versions: list[str]) -> str:
    if releases == versions and len(versions) > 1:
        return f"{versions[0]} … {versions[-1]}"
    return ", ".join(releases)


def validate_kubernetes(items: Iterable[Resource], versions: list[str] | None = None) -> tuple[list[str], bool]:
    """Strict schema validation of the non-operator resources against each Kubernetes release."""
    versions = versions or kubernetes_versions()
    lines, ok = [], True
    for item in items:
        if item.doc.get("apiVersion") == OPERATOR_API:
            continue
        errors: dict[str, list[str]] = {}  # message -> the releases that gave it
        for release in versions:
            try:
                kubernetes_validate.validate(item.doc, release, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path) or "(top)"
                errors.setdefault(f"{where}: {exc.message}", []).append(release)
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.setdefault(str(exc), []).append(release)
        if not errors:
            lines.append(f"{item.source}: {item.name}: valid for Kubernetes {_span(versions, versions)} (strict)")
        for message, releases in errors.items():
            ok = False
            lines.append(f"{item.source}: {item.name}: invalid for Kubernetes {_span(releases, versions)}: {message}")
    return lines, ok


def _operator(items: Iterable[Resource]) -> list[Resource]:
    return [item for item in items if item.doc.get("apiVersion") == OPERATOR_API]


def validate_operator(items: Iterable[Resource]) -> tuple[list[str], bool]:
    """The prometheus-operator resources through the package's JSON-schema validators (node)."""
    payload = json.dumps([{"source": item.source, "resource": item.doc} for item in _operator(items)])
    npm.ensure()
    result = subprocess.run(
        ["node", str(npm.SCHEMA_DIR / "validate-crds.mjs")], input=payload, capture_output=True, text=True
    )
    lines = (result.stdout + result.stderr).splitlines()
    return lines, result.returncode == 0


def typecheck_operator(items: Iterable[Resource]) -> tuple[list[str], bool]:
    """The prometheus-operator resources as literals of the package's interfaces: unknown fields fail."""
    operator = _operator(items)
    imports = [
        f"import type {{ {OPERATOR_TYPES[kind]} }} from '{OPERATOR_PACKAGE}/monitoring.coreos.com/v1/{kind}';"
        for kind in sorted({item.doc["kind"] for item in operator if item.doc.get("kind") in OPERATOR_TYPES})
    ]
    lines, spans = [*imports, ""], []
    for i, item in enumerate(operator):
        interface = OPERATOR_TYPES.get(item.doc.get("kind", ""), "never")
        start = len(lines) + 1
        lines += f"export const r{i}: {interface} = {json.dumps(item.doc, indent=2)};".splitlines()
        spans.append(range(start, len(lines) + 1))
    npm.ensure()
    # Inside dashboards/schema, so the imports resolve through its node_modules and the package's exports.
    with tempfile.TemporaryDirectory(prefix=".check-", dir=npm.SCHEMA_DIR) as tmp:
        (Path(tmp) / "resources.ts").write_text("\n".join(lines) + "\n")
        config = {"extends": "../tsconfig.json", "files": ["resources.ts"]}
        (Path(tmp) / "tsconfig.json").write_text(json.dumps(config))
        result = npm.tsc(Path(tmp) / "tsconfig.json")
    errors: list[list[str]] = [[] for _ in operator]
    stray: list[str] = []
    for line in (result.stdout + result.stderr).splitlines():
        if line[:1].isspace():  # the elaboration of the error above: its first line says enough
            continue
        head = line.split("): error ", 1)
        number = int(head[0].rsplit("(", 1)[1].split(",")[0]) if len(head) == 2 else 0
        owner = next((i for i, span in enumerate(spans) if number in span), None)
        message = head[-1] if len(head[-1]) <= 200 else head[-1][:197] + "..."
        (errors[owner] if owner is not None else stray).append(message)
    out = [f"(tsc) {line}" for line in stray]
    for item, found in zip(operator, errors, strict=True):
        verdict = "; ".join(found) if found else f"no field outside {OPERATOR_TYPES.get(item.doc['kind'], '?')}"
        out.append(f"{item.source}: {item.name}: {verdict}")
    return out, result.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEPLOY, help="manifests to validate")
    args = parser.parse_args(argv)
    items = resources(args.dir)
    print(f"{os.path.relpath(args.dir)}: {len(items)} resources")
    checks = [
        (f"kubernetes-validate {dist_version('kubernetes-validate')}, strict", validate_kubernetes),
        (f"{OPERATOR_PACKAGE} {npm.version(OPERATOR_PACKAGE)}, validate()", validate_operator),
        (f"{OPERATOR_PACKAGE} {npm.version(OPERATOR_PACKAGE)}, tsc --strict", typecheck_operator),
    ]
    failed = 0
    for title, run in checks:
        lines, ok = run(items)
        print(f"  {title}: {'OK' if ok else 'FAILED'}")
        for line in lines:
            print(f"    {line}")
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
