"""The pinned npm packages of dashboards/schema/ (TypeScript, Grafana's and prometheus-operator's types).

`ensure()` runs `npm ci` there when node_modules is missing or was installed from another lockfile, so
a fresh machine (CI) installs exactly the locked versions on first use, and later runs install nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

SCHEMA_DIR = Path(__file__).with_name("schema")
NODE_MODULES = SCHEMA_DIR / "node_modules"
_STAMP = NODE_MODULES / ".installed-from"


class NodeMissing(RuntimeError):
    """node or npm is not installed."""


def _lock_digest() -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((SCHEMA_DIR / name).read_bytes())
    return digest.hexdigest()


def ensure() -> Path:
    """node_modules installed from the checked-in lockfile; returns its path."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise NodeMissing("node and npm are needed for the schema checks (Debian: apt-get install nodejs npm)")
    digest = _lock_digest()
    if _STAMP.is_file() and _STAMP.read_text() == digest:
        return NODE_MODULES
    # No install scripts: these packages are types, schemas and validators, none needs to build.
    result = subprocess.run(
        ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=SCHEMA_DIR,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm ci in {SCHEMA_DIR} failed:\n{result.stdout}{result.stderr}")
    _STAMP.write_text(digest)
    return NODE_MODULES


def version(package: str) -> str:
    """The installed version of an npm package (its alias for the Grafana ones)."""
    return str(json.loads((ensure() / package / "package.json").read_text())["version"])


def tsc(project: Path) -> subprocess.CompletedProcess[str]:
    """`tsc -p project` with the pinned TypeScript; the caller reads returncode and stdout."""
    compiler = ensure() / "typescript" / "bin" / "tsc"
    return subprocess.run(
        ["node", str(compiler), "-p", str(project), "--pretty", "false"], capture_output=True, text=True
    )
