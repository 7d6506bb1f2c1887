"""Run the library and service tests against the declared dependency floors and the latest releases.

The tests are tests/core, instrumentation, exposition, sidecar, web and service (TESTS); the `asgi-*`
combinations run HolderMiddleware's tests (ASGI_TESTS) on the FastAPI and Starlette range (ASGI_FLOORS).

One venv per combination under .matrix/, built from the project's wheel and pinned requirements;
the floors are read from pyproject.toml, so a declared floor is always a tested one.
Prints a Markdown table (docs/compatibility.md keeps the latest one) and exits 1 if any combination
failed. A Python that this machine does not have is reported as skipped, not failed.

    python3 scripts/matrix.py [--jobs 2] [--only 'sa-*'] [--fresh] [--list]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".matrix"
# The framework adapters' tests (FastAPI/uvicorn, Flask, Celery, PyMySQL: none a dependency of ours) are left
# out of these cells; `make test` runs them on the latest releases, and the asgi-* cells run HolderMiddleware's
# on the FastAPI and Starlette floors. test_wsgi and test_threaded share test_asgi's requests (uvicorn).
FRAMEWORK_TESTS = (
    "tests/core/test_asgi.py",
    "tests/core/test_wsgi.py",
    "tests/core/test_flask.py",
    "tests/core/test_celery.py",
    "tests/core/test_middleware.py",
    "tests/web/test_threaded.py",
    "tests/instrumentation/test_serverview_mariadb.py",
)
TESTS = [
    *(f"tests/{room}" for room in ("core", "instrumentation", "exposition", "sidecar", "web", "service")),
    *(f"--ignore={path}" for path in FRAMEWORK_TESTS),
]
# HolderMiddleware's supported range starts here (docs/compatibility.md): neither is a dependency of
# ours, so the floors live here rather than in pyproject.toml. Starlette records its matched route in
# scope["route"] from 1.7.0; FastAPI 0.115.0 needs a Starlette below 0.39, so each floor is a cell of its own.
ASGI_FLOORS = {"fastapi": "0.115.0", "starlette": "1.7.0"}
ASGI_TESTS = ["tests/core/test_middleware.py"]
# What those tests import beyond the package (the rest of the dev extra is lint,
# type checking and the dashboard tools, which `make test` covers on the latest set).
TEST_DEPS = (
    *("pytest", "pytest-asyncio", "pytest-timeout", "trustme"),
    *("asyncpg", "aiosqlite", "psycopg", "psycopg2-binary", "uvloop"),
)
# Shown in the table, in this order.
SHOWN = (
    "sqlalchemy",
    "prometheus-client",
    "aiohttp",
    "pydantic-settings",
    "pydantic",
    "asyncpg",
    "aiosqlite",
    "pyyaml",
    "bcrypt",
    "opentelemetry-sdk",
    "fastapi",
    "starlette",
)
# pip's own --only-binary: no compiler in the loop, and a release without a wheel for this Python is
# a failed install, not a silent source build.
PIP = ("-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary=:all:")
CELL_TIMEOUT = 20 * 60
# Run inside a cell's venv: what it actually resolved to.
# A package a cell does not install (fastapi outside the asgi-* cells) is left out of its row.
VERSIONS = """
import importlib.metadata as m, json, platform, sys
found = {'python': platform.python_version()}
for name in sys.argv[1:]:
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps(found))
"""


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _extras(requirement: str) -> str:
    match = re.match(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])", requirement)
    return match.group(1) if match else ""


def _floor(requirement: str) -> str | None:
    match = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Declared:
    """The requirements pyproject.toml declares: name -> requirement string."""

    runtime: dict[str, str]
    tests: dict[str, str]

    @classmethod
    def read(cls) -> Declared:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        runtime = {_name(r): r for r in project["dependencies"]}
        # Optional extras count as declared floors too (asyncpg is the `asyncpg` extra, aiosqlite the `demo`
        # one, PyYAML and bcrypt the `sidecar` one; tests/core/test_otel.py needs the `otel` one, and would
        # skip without it).
        for extra in ("asyncpg", "demo", "sidecar", "otel"):
            for r in project["optional-dependencies"].get(extra, []):
                runtime.setdefault(_name(r), r)
        dev = {_name(r): r for r in project["optional-dependencies"]["dev"]}
        return cls(runtime, {n: dev.get(n, n) for n in TEST_DEPS})

    def floor(self, name: str) -> str:
        found = _floor(self.runtime[name])
        if found is None:
            raise SystemExit(f"pyproject.toml declares no >= floor for {name}: {self.runtime[name]!r}")
        return found

    def pinned(self, name: str, spec: str) -> str:
        """`name` with its declared extras and the given version spec, e.g. sqlalchemy[asyncio]==2.0.38."""
        return f"{name}{_extras(self.runtime.get(name, name))}{spec}"


@dataclass
class Cell:
    """One combination: a Python and the version spec of each dependency that differs from the declared one."""

    name: str
    python: str
    specs: dict[str, str]
    requirements: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=lambda: list(TESTS))
    interpreter: Path | None = None
    result: str = "not run"
    versions: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    install_seconds: float = 0.0
    test_seconds: float = 0.0

    @property
    def venv(self) -> Path:
        return CACHE / self.name

    @property
    def log(self) -> Path:
        return CACHE / "logs" / f"{self.name}.log"


def cells(declared: Declared) -> list[Cell]:
    """SQLAlchemy {floor, latest 2.0, latest 2.1} x prometheus-client {floor, latest}, all floors, newer Pythons."""
    sqlalchemy = {
        "floor": f"=={declared.floor('sqlalchemy')}",
        "2.0": f">={declared.floor('sqlalchemy')},<2.1",
        "2.1": ">=2.1,<2.2",
    }
    prometheus = {"floor": f"=={declared.floor('prometheus-client')}", "latest": ""}
    found = [
        Cell(f"sa-{sa}_pc-{pc}", "3.11", {"sqlalchemy": sqlalchemy[sa], "prometheus-client": prometheus[pc]})
        for pc in prometheus
        for sa in sqlalchemy
    ]
    floors = {name: f"=={declared.floor(name)}" for name in declared.runtime}
    found.append(Cell("all-floors", "3.11", floors))
    found += [Cell(f"py{v}_latest", v, {"sqlalchemy": sqlalchemy["2.1"]}) for v in ("3.12", "3.13")]
    # No floors on 3.13: aiohttp 3.9.0, pydantic-core 2.18.1 and asyncpg 0.29.0 have no wheels for it,
    # and --only-binary will not compile them.
    found.append(Cell("py3.12_floors", "3.12", floors))
    for cell in found:
        wanted = {**declared.runtime, **declared.tests}
        cell.requirements = sorted(declared.pinned(n, cell.specs[n]) if n in cell.specs else wanted[n] for n in wanted)
    # HolderMiddleware on FastAPI's floor (with the Starlette it resolves), Starlette's floor (with the
    # latest FastAPI), and both latest: its tests only, on the latest of everything else.
    asgi = {
        "asgi-fastapi-floor": {"fastapi": f"=={ASGI_FLOORS['fastapi']}", "starlette": ""},
        "asgi-starlette-floor": {"fastapi": "", "starlette": f"=={ASGI_FLOORS['starlette']}"},
        "asgi-latest": {"fastapi": "", "starlette": ""},
    }
    for name, specs in asgi.items():
        wanted = {**declared.runtime, **declared.tests}
        requirements = [wanted[n] for n in wanted] + [f"{n}{spec}" for n, spec in specs.items()] + ["uvicorn"]
        found.append(Cell(name, "3.11", specs, sorted(requirements), list(ASGI_TESTS)))
    return found


def find_python(version: str) -> Path | None:
    """An interpreter for `version` ("3.12"): on PATH, Debian's, or a pyenv build (this image has several)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))

    def release(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", path.parents[1].name))

    builds = sorted(pyenv.glob(f"versions/{version}.*/bin/python{version}"), key=release, reverse=True)
    candidates: list[str | Path | None] = [shutil.which(f"python{version}"), f"/usr/bin/python{version}", *builds]
    for candidate in candidates:
        if candidate is None or not os.access(candidate, os.X_OK):
            continue
        # A pyenv shim for a version that is not selected exists on PATH but fails; ask the interpreter itself.
        probe = subprocess.run(
            [str(candidate), "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return Path(candidate)
    return None


def build_wheel() -> Path:
    """The project's wheel, built once per run so every venv tests the same, current code."""
    dist = CACHE / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-w", str(dist), "."],
        cwd=ROOT,
        check=True,
    )
    (wheel,) = dist.glob("*.whl")
    return wheel


def _run(args: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=True, cwd=ROOT)


def install(cell: Cell, wheel: Path, fresh: bool) -> None:
    """Create or reuse the cell's venv; install the wheel and the pinned requirements (upgrading the unpinned)."""
    assert cell.interpreter is not None
    started = time.monotonic()
    cell.log.parent.mkdir(parents=True, exist_ok=True)
    cell.log.write_text(f"# {cell.name}: Python {cell.interpreter}\n")
    stamp = cell.venv / "matrix-requirements.txt"
    wanted = "\n".join([str(cell.interpreter), *cell.requirements]) + "\n"
    if fresh or not stamp.exists() or stamp.read_text() != wanted:
        shutil.rmtree(cell.venv, ignore_errors=True)
        _run([str(cell.interpreter), "-m", "venv", str(cell.venv)], cell.log)
    python = str(cell.venv / "bin" / "python")
    # -U: a reused venv still gets today's latest for every spec that is not pinned.
    _run([python, *PIP, "-U", str(wheel), *cell.requirements], cell.log)
    # Same version number, new code: pip would keep the old wheel without this.
    _run([python, *PIP, "--no-deps", "--force-reinstall", str(wheel)], cell.log)
    stamp.write_text(wanted)
    report = subprocess.run(
        [python, "-c", VERSIONS, *SHOWN],
        capture_output=True,
        text=True,
        check=True,
    )
    cell.versions = json.loads(report.stdout)
    cell.install_seconds = time.monotonic() - started


def run_tests(cell: Cell) -> None:
    python = str(cell.venv / "bin" / "python")
    started = time.monotonic()
    with cell.log.open("a") as out:
        out.write(f"$ {python} -m pytest {' '.join(cell.tests)} -q\n")
        out.flush()
        try:
            code = subprocess.run(
                [python, "-m", "pytest", *cell.tests, "-q", "-p", "no:cacheprovider"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                timeout=CELL_TIMEOUT,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    cell.test_seconds = time.monotonic() - started
    tail = cell.log.read_text().splitlines()[-1:]
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", tail[0] if tail else ""):
        cell.counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    # pytest's exit 5 (no test collected) is a failure here too.
    cell.result = "passed" if code == 0 else ("timed out" if code == -1 else "FAILED")


def table(found: list[Cell]) -> str:
    head = ["combination", "Python", *SHOWN, "result", "tests", "install s", "tests s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in found:
        tests = ", ".join(f"{n} {w}" for w, n in c.counts.items())
        versions = [c.versions.get(n, "") for n in SHOWN]
        python = c.versions.get("python", c.python)
        rows.append(
            "| "
            + " | ".join(
                [c.name, python, *versions, c.result, tests, f"{c.install_seconds:.0f}", f"{c.test_seconds:.0f}"]
            )
            + " |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="venvs built at once (tests run one combination at a time)")
    parser.add_argument("--only", action="append", help="run combinations whose name matches this glob")
    parser.add_argument("--fresh", action="store_true", help="rebuild every venv from scratch")
    parser.add_argument("--list", action="store_true", help="print the combinations and their requirements")
    args = parser.parse_args()

    found = cells(Declared.read())
    if args.only:
        found = [c for c in found if any(fnmatch.fnmatch(c.name, pattern) for pattern in args.only)]
    if args.list:
        for c in found:
            print(f"{c.name} (Python {c.python}): {' '.join(c.requirements)}")
        return 0

    started = time.monotonic()
    for c in found:
        c.interpreter = find_python(c.python)
        if c.interpreter is None:
            c.result = f"skipped: no Python {c.python} here"
            print(
                f"matrix: {c.name}: no Python {c.python} on this machine (not on PATH, not Debian's, no pyenv build)",
                flush=True,
            )
    runnable = [c for c in found if c.interpreter is not None]
    wheel = build_wheel()
    # Tests run one combination at a time (they share the one PostgreSQL and 2 cores, and some of them
    # time things); the next venvs are built meanwhile.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        builds: list[tuple[Cell, Future[None]]] = [(c, pool.submit(install, c, wheel, args.fresh)) for c in runnable]
        for c, build in builds:
            try:
                build.result()
            except subprocess.CalledProcessError as exc:
                c.result = "install FAILED"
                print(f"matrix: {c.name}: install failed (exit {exc.returncode}), see {c.log}", flush=True)
                continue
            print(f"matrix: {c.name}: testing {' '.join(f'{n}=={v}' for n, v in c.versions.items())}", flush=True)
            run_tests(c)
            print(f"matrix: {c.name}: {c.result} {c.counts} in {c.test_seconds:.0f} s", flush=True)
            if c.result != "passed":
                print("".join(f"    {line}\n" for line in c.log.read_text().splitlines()[-40:]), flush=True)

    summary = table(found)
    (CACHE / "summary.md").write_text(summary + "\n")
    print(f"\n{summary}\n")
    failed = [c for c in runnable if c.result != "passed"]
    skipped = len(found) - len(runnable)
    print(
        f"matrix: {len(runnable) - len(failed)} of {len(runnable)} combinations passed"
        + (f", {skipped} skipped (no interpreter)" if skipped else "")
        + f", {time.monotonic() - started:.0f} s in all"
    )
    passed = sum(c.counts.get("passed", 0) for c in found)
    broken = sum(c.counts.get("failed", 0) + c.counts.get("error", 0) for c in found)
    print(f"matrix: {passed} passed, {broken} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
