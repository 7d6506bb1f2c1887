"""What an application pays to install us: the library's own dependencies only, and a missing extra named in one line.

The fast tests run in this venv (`.[dev]`, every extra). The fresh-venv test builds a venv with only
`pip install '.[asyncpg]'`, as a FastAPI app would, and is marked `bench`: it takes 45-60 s (pip, from
its cache), so `make test` leaves it out and `make test-bench` and CI run it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from sqlalchemy_pool_exporter.compat import aiohttp_middleware

from ..conftest import PG_URL, clean_env

ROOT = Path(__file__).resolve().parents[2]
# A bcrypt hash of a user's password, for a web config file (its format only is checked before bcrypt).
HASH = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"

# Run in a fresh interpreter: import the package, instrument a real asyncpg engine, commit once.
INSTRUMENT = """
import asyncio, json, sys
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import sqlalchemy_pool_exporter
from sqlalchemy_pool_exporter import instrument

async def main():
    engine = create_async_engine(sys.argv[1])
    handle = instrument(engine, name="lean")
    async with engine.begin() as conn:
        await conn.execute(text("SELECT 1"))
    await engine.dispose()
    return REGISTRY.get_sample_value("sqlalchemy_transactions_total", {"pool": "lean", "outcome": "commit"})

commits = asyncio.run(main())
optional = {"aiohttp", "yaml", "bcrypt", "aiosqlite", "pydantic_settings"}
loaded = sorted({m.split(".")[0] for m in sys.modules} & optional)
print(json.dumps({"commits": commits, "loaded": loaded}))
"""


def test_importing_and_instrumenting_load_no_aiohttp_nor_any_extra() -> None:
    done = subprocess.run(
        [sys.executable, "-c", INSTRUMENT, PG_URL], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"commits": 1.0, "loaded": []}


def test_our_middleware_mark_is_the_one_aiohttp_sets() -> None:
    async def theirs(request: web.Request, handler: object) -> web.StreamResponse:
        raise AssertionError

    async def ours(request: web.Request, handler: object) -> web.StreamResponse:
        raise AssertionError

    web.middleware(theirs)
    aiohttp_middleware(ours)
    marks = {k: v for k, v in vars(theirs).items() if not k.startswith("__wrapped")}
    assert marks == {"__middleware_version__": 1}
    assert vars(ours) == marks


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=clean_env())


@pytest.mark.bench
@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_a_fresh_venv_with_only_the_asyncpg_extra(tmp_path: Path) -> None:
    """`pip install '.[asyncpg]'`: no aiosqlite, PyYAML or bcrypt; the library counts a commit; each
    command that needs an extra says which, in one line, and exits 2."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "exporter", source / "exporter", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, pip = venv / "bin" / "python", ("-m", "pip", "install", "-q", "--disable-pip-version-check")
    installed = _run(python, *pip, f"{source}[asyncpg]", cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    absent = _run(
        python,
        "-c",
        "import importlib.util as u; print([u.find_spec(m) for m in ('aiosqlite', 'yaml', 'bcrypt')])",
        cwd=tmp_path,
    )
    assert absent.stdout == "[None, None, None]\n", absent.stderr

    library = _run(python, "-c", INSTRUMENT, PG_URL, cwd=tmp_path)
    assert library.returncode == 0, library.stderr
    assert json.loads(library.stdout) == {"commits": 1.0, "loaded": []}

    command = venv / "bin" / "pool-exporter"
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: {HASH}\n")
    serve = ("serve", "--port", "0", "--multiproc-dir", str(multiproc), "--web.config.file", str(config))
    demo = _run(command, "demo", "--duration", "1", cwd=tmp_path)
    no_yaml = _run(command, *serve, cwd=tmp_path)
    assert (demo.returncode, demo.stdout, demo.stderr) == (
        2,
        "",
        "pool-exporter: pool-exporter demo on SQLite (its default database) needs aiosqlite, which is not "
        "installed: pip install 'sqlalchemy-pool-exporter[demo]'\n",
    )
    assert (no_yaml.returncode, no_yaml.stdout, no_yaml.stderr) == (
        2,
        "",
        "pool-exporter: the web config file (--web.config.file) needs PyYAML, which is not installed: "
        "pip install 'sqlalchemy-pool-exporter[sidecar]'\n",
    )

    # With PyYAML but not bcrypt: a file with users is refused at start, and by a running server's policy.
    assert _run(python, *pip, "pyyaml>=6.0.1", cwd=tmp_path).returncode == 0
    no_bcrypt = _run(command, *serve, cwd=tmp_path)
    assert (no_bcrypt.returncode, no_bcrypt.stdout, no_bcrypt.stderr) == (
        2,
        "",
        "pool-exporter: basic_auth_users (the web config file) needs bcrypt, which is not installed: "
        "pip install 'sqlalchemy-pool-exporter[sidecar]'\n",
    )
    policy = _run(
        python,
        "-c",
        "import sys; from pathlib import Path; from sqlalchemy_pool_exporter.web.config import WebConfigFile, "
        "WebConfigError, WebPolicy\n"
        "try: WebPolicy(WebConfigFile(Path(sys.argv[1])), tls=False, other_auth=False).current()\n"
        "except WebConfigError as exc: print(exc)",
        str(config),
        cwd=tmp_path,
    )
    assert policy.stdout == (
        f"{config}: basic_auth_users (the web config file) needs bcrypt, which is not installed: "
        "pip install 'sqlalchemy-pool-exporter[sidecar]'\n"
    ), policy.stderr
