"""Type-check the dashboard JSON against Grafana's own TypeScript types (`@grafana/schema` on npm).

`python -m dashboards.grafana_types` writes dashboards/sqlalchemy-pool.json as a TypeScript object
literal typed by dashboards/schema/grafana-dashboard.ts and compiles it with `tsc --strict` against each
Grafana version in `GRAFANA`: a key the types do not declare, at any depth, or a value of the wrong type
fails. The only keys taken out first are listed in `VARIABLE_KEYS_NOT_IN_TYPES`, each with its reason.
Exit status 1 on a type error.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import npm
from .dashboard import OUTPUT

TYPES_FILE = npm.SCHEMA_DIR / "grafana-dashboard.ts"


@dataclass(frozen=True)
class Types:
    """Where one @grafana/schema release keeps the dashboard model and the two panel plugins we use."""

    package: str  # its alias in dashboards/schema/package.json
    index: str
    stat: str
    timeseries: str


_ESM = "dist/esm/raw/composable/{0}/panelcfg/x/{1}PanelCfg_types.gen.d.ts"  # 11.x layout
_TYPES = "dist/types/raw/composable/{0}/panelcfg/x/types.gen.d.ts"  # 12.x and later

# The dashboard targets Grafana 11.6 (the generator's grafana-foundation-sdk and docker-compose.yml run
# 11.6.0) and is checked against the newest 12.x and 13.x types too. Versions are pinned in the lockfile.
GRAFANA: dict[str, Types] = {
    "11.6": Types(
        "grafana-schema-11.6",
        "dist/esm/index.d.ts",
        _ESM.format("stat", "Stat"),
        _ESM.format("timeseries", "TimeSeries"),
    ),
    "12.4": Types("grafana-schema-12.4", "dist/types/index.d.ts", _TYPES.format("stat"), _TYPES.format("timeseries")),
    "13.2": Types("grafana-schema-13.2", "dist/types/index.d.ts", _TYPES.format("stat"), _TYPES.format("timeseries")),
}

# grafana-foundation-sdk (Grafana 11.6's CUE schema) writes these on every template variable, with
# defaults: the settings of an `interval` variable's "auto" option. @grafana/schema's classic
# `VariableModel` does not declare them in any version we check (11.6, 12.4, 13.2; Grafana's v2 schema
# has them on `IntervalVariableSpec` only), and Grafana reads them for `interval` variables only. Ours are
# `datasource` and `query` variables, so the keys are inert there: they are removed before the check
# from non-interval variables only, and the test proves the check fails on them without this list.
VARIABLE_KEYS_NOT_IN_TYPES: dict[str, str] = {
    "auto": "interval variables only: whether the 'auto' option is offered",
    "auto_count": "interval variables only: how many steps 'auto' divides the time range into",
    "auto_min": "interval variables only: the smallest interval 'auto' picks",
}


def without_untyped_keys(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of the dashboard without VARIABLE_KEYS_NOT_IN_TYPES, and the JSON paths removed."""
    out = copy.deepcopy(doc)
    removed: list[str] = []
    for i, variable in enumerate(out.get("templating", {}).get("list", [])):
        if variable.get("type") == "interval":
            continue
        for key in VARIABLE_KEYS_NOT_IN_TYPES:
            if key in variable:
                del variable[key]
                removed.append(f"templating.list[{i}].{key}")
    return out, removed


def write_project(docs: dict[str, dict[str, Any]], version: str, directory: Path) -> tuple[Path, dict[str, range]]:
    """checks.ts (one typed literal per doc) and its tsconfig.json; the tsconfig and each doc's lines."""
    types = GRAFANA[version]
    package = npm.ensure() / types.package
    lines = ["import type { GrafanaDashboard } from 'grafana-dashboard-types';", ""]
    spans: dict[str, range] = {}
    for i, (name, doc) in enumerate(docs.items()):
        literal = f"export const doc{i}: GrafanaDashboard = {json.dumps(doc, indent=2, ensure_ascii=False)};"
        start = len(lines) + 1
        lines += [f"// {name}", *literal.splitlines(), ""]
        spans[name] = range(start, len(lines) + 1)
    (directory / "checks.ts").write_text("\n".join(lines))
    config = {
        "extends": str(npm.SCHEMA_DIR / "tsconfig.json"),
        "compilerOptions": {
            "paths": {
                "grafana-dashboard-types": [str(TYPES_FILE)],
                "@grafana/schema": [str(package / types.index)],
                "grafana-panel/stat": [str(package / types.stat)],
                "grafana-panel/timeseries": [str(package / types.timeseries)],
            }
        },
        "files": ["checks.ts"],
    }
    project = directory / "tsconfig.json"
    project.write_text(json.dumps(config, indent=2))
    return project, spans


_ERROR = re.compile(r"^(?P<file>[^(]+)\((?P<line>\d+),(?P<col>\d+)\): error (?P<msg>.*)$")


def check_many(docs: dict[str, dict[str, Any]], version: str) -> dict[str, list[str]]:
    """Compile each doc (as given) against one Grafana version's types in one tsc run: its errors by name.

    Errors outside every doc (a broken install, a bad types file) are reported under "".
    """
    with tempfile.TemporaryDirectory(prefix="grafana-types-") as tmp:
        project, spans = write_project(docs, version, Path(tmp))
        result = npm.tsc(project)
        source = (Path(tmp) / "checks.ts").read_text().splitlines()
    errors: dict[str, list[str]] = {name: [] for name in ["", *docs]}
    for line in (result.stdout + result.stderr).splitlines():
        if line[:1].isspace():  # the elaboration of the error above: its first line says enough
            continue
        m = _ERROR.match(line)
        if m and m["file"].endswith("checks.ts"):
            number = int(m["line"])
            name = next((n for n, span in spans.items() if number in span), "")
            message = m["msg"] if len(m["msg"]) <= 160 else m["msg"][:157] + "..."
            errors[name].append(
                f"line {number - spans[name].start if name else number}: {message}  <- {source[number - 1].strip()}"
            )
        elif line.strip():
            errors[""].append(line)
    if result.returncode != 0 and not any(errors.values()):
        errors[""].append(f"tsc exited {result.returncode} without a message")
    return errors


def check(doc: dict[str, Any], version: str) -> list[str]:
    """The type errors of one dashboard (as given: remove the untyped keys first if wanted)."""
    errors = check_many({"dashboard": doc}, version)
    return errors[""] + errors["dashboard"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dashboard", type=Path, default=OUTPUT, help="dashboard JSON to check")
    parser.add_argument("--grafana", choices=sorted(GRAFANA), action="append", help="only these versions")
    args = parser.parse_args(argv)
    doc, removed = without_untyped_keys(json.loads(args.dashboard.read_text()))
    keys = sorted({path.rsplit(".", 1)[1] for path in removed})
    where = os.path.relpath(args.dashboard)
    print(f"{where}: {len(removed)} keys removed first ({', '.join(keys) or 'none'}, on template variables)")
    failed = 0
    for version in args.grafana or GRAFANA:
        errors = check(doc, version)
        status = f"{len(errors)} type errors" if errors else "OK"
        print(f"  Grafana {version} (@grafana/schema {npm.version(GRAFANA[version].package)}): {status}")
        for error in errors:
            print(f"    {error}")
        failed += bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
