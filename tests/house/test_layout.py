"""The house: the public import paths users write keep working, and every import points down the data path."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import sqlalchemy_pool_exporter

PACKAGE = Path(sqlalchemy_pool_exporter.__file__).parent

# Bottom to top. The top level holds two rooms: the shared vocabulary (any module may import it) and
# the public face (Exporter and its adapters), which sits above what it assembles and below what serves it.
VOCABULARY = {"catalog", "metricnames", "labels", "validation", "compat", "logs", "errors", "_version"}
ROOMS = ["vocabulary", "instrumentation", "exposition", "sidecar", "face", "web", "service"]


def room(module: str) -> str:
    """`web.config.tls` -> web; `core` -> face; `catalog` -> vocabulary."""
    first = module.split(".")[0]
    if module == "__main__":  # `python -m sqlalchemy_pool_exporter` is the command
        return "service"
    if "." not in module and first not in ROOMS:
        return "vocabulary" if first in VOCABULARY else "face"
    return first


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] or ["__init__"]
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """The package's modules that `module` imports (relative imports resolved; `from . import x` names x)."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if module != "__init__" else []
    base_parts = here if is_package else here[:-1]
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = base_parts[: len(base_parts) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names:
                candidate = ".".join([*target, alias.name])
                found.add(candidate if candidate in known else ".".join(target) or "__init__")
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                if name and name.startswith("sqlalchemy_pool_exporter."):
                    found.add(name.removeprefix("sqlalchemy_pool_exporter."))
    return found


def test_the_top_level_holds_the_public_face_and_the_vocabulary_only() -> None:
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= 19, top
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert folders == ["exposition", "instrumentation", "service", "sidecar", "web"]
    assert (PACKAGE / "web" / "config" / "__init__.py").exists()


def test_every_import_points_down_the_data_path() -> None:
    wrong = []
    for module, path in modules().items():
        mine = ROOMS.index(room(module))
        for target in imports_of(module, path):
            theirs = ROOMS.index(room(target))
            if theirs > mine or (mine == 0 and theirs != 0):
                wrong.append(f"{module} ({room(module)}) imports {target} ({room(target)})")
    assert wrong == []


def test_subpackage_modules_import_concrete_modules_not_facades() -> None:
    """Facades are for users: inside the package an import names the module, so no import cycle can form."""
    facades = {m for m, p in modules().items() if p.name == "__init__.py"}
    wrong = [
        f"{module} imports the facade {target}"
        for module, path in modules().items()
        if path.name != "__init__.py" and module.count(".")
        for target in imports_of(module, path) & facades
    ]
    assert wrong == []


PUBLIC = {
    "sqlalchemy_pool_exporter": sqlalchemy_pool_exporter.__all__,
    # Named as well as through __all__: the README's FastAPI recipe imports it from the top level.
    "sqlalchemy_pool_exporter.asgi": ["metrics_app", "MetricsApp"],
    "sqlalchemy_pool_exporter.wsgi": ["wsgi_metrics_app", "wsgi_pools_app", "WSGIMetrics", "WSGIPools"],
    "sqlalchemy_pool_exporter.web": ["make_app", "add_routes", "start_http_server", "Server", "PortInUse"],
    "sqlalchemy_pool_exporter.otel": ["PoolMetricProducer", "producer"],
    "sqlalchemy_pool_exporter.flask": ["PoolExporter", "rule_holder"],
    "sqlalchemy_pool_exporter.celery": ["instrument_celery", "uninstrument_celery", "task_holder"],
    "sqlalchemy_pool_exporter.plugin": ["PoolExporterPlugin"],
    "sqlalchemy_pool_exporter.instrumentation": ["PoolHandle", "PoolReading", "PoolStats", "holder"],
    "sqlalchemy_pool_exporter.exposition": ["PoolCollector", "Exposition", "MultiprocessWriter"],
    "sqlalchemy_pool_exporter.sidecar": ["Sidecar"],
    "sqlalchemy_pool_exporter.web.config": ["WebConfigFile", "WebConfigError", "WebPolicy", "TLSReloader"],
    "sqlalchemy_pool_exporter.service": ["main", "Settings"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_import_paths_keep_working(module: str) -> None:
    imported = importlib.import_module(module)
    assert [name for name in PUBLIC[module] if not hasattr(imported, name)] == []


def test_the_package_imports_without_the_frameworks_its_adapters_serve() -> None:
    """flask and celery are optional: only their own adapters import them."""
    blocked = "import sys; sys.modules.update(flask=None, celery=None, flask_sqlalchemy=None); "
    done = subprocess.run(
        [sys.executable, "-c", blocked + "import sqlalchemy_pool_exporter, sqlalchemy_pool_exporter.web; print('ok')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_the_top_level_names_what_the_readme_imports_from_it() -> None:
    wanted = {"instrument", "Exporter", "HolderMiddleware", "session_scope", "metrics_app"}
    assert wanted - set(sqlalchemy_pool_exporter.__all__) == set()


def test_the_command_the_module_and_the_url_plugin_are_where_they_were() -> None:
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="pool-exporter")
    assert script.load() is sqlalchemy_pool_exporter.service.cli.main
    (plugin,) = entry_points(group="sqlalchemy.plugins", name="pool_exporter")
    assert plugin.load().__name__ == "PoolExporterPlugin"
    done = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pool_exporter", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert done.stdout.strip().endswith(sqlalchemy_pool_exporter.__version__)
