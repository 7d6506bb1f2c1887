"""`pool-exporter run -- CMD`: exec CMD with every Python process it starts instrumenting every engine.

The way opentelemetry-instrument works: our boot/ folder goes first on PYTHONPATH, so that Python
imports its sitecustomize.py at start-up in the program and in every worker it forks or spawns (uvicorn
and gunicorn workers, multiprocessing), and that calls instrument_all(). With a multiprocess directory,
created here if missing, every process writes its numbers there (PROMETHEUS_MULTIPROC_DIR, set before
prometheus_client is imported) and `pool-exporter serve` merges them. Without one, engines export to
prometheus_client's default registry in the process that made them: serve it from the program.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import startup
from .settings import SettingError, Settings

# The folder whose sitecustomize.py every process of the program imports (shipped in the package).
BOOT = Path(__file__).resolve().parent / "boot"


class ProgramError(Exception):
    """No program given, or one that cannot be started: one line, exit 2."""


def program_env(settings: Settings, environ: dict[str, str]) -> dict[str, str]:
    """The program's environment: ours on PYTHONPATH, the settings its processes read."""
    env = dict(environ)
    here = str(BOOT)
    env["PYTHONPATH"] = os.pathsep.join([here, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["POOL_EXPORTER_EVERY_ENGINE"] = "1"
    env["POOL_EXPORTER_NAMESPACE"] = settings.namespace
    env["POOL_EXPORTER_NAMES"] = settings.names
    if settings.leak_threshold is not None:
        env["POOL_EXPORTER_LEAK_THRESHOLD"] = repr(settings.leak_threshold)
    else:
        env.pop("POOL_EXPORTER_LEAK_THRESHOLD", None)
    if settings.multiproc_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(settings.multiproc_dir.resolve())
        env["POOL_EXPORTER_MULTIPROC_DIR"] = env["PROMETHEUS_MULTIPROC_DIR"]
    return env


def exec_program(settings: Settings, program: Sequence[str]) -> NoReturn:
    """Replace this process with the program; a bad setting or a program that cannot start exits 2."""
    argv = list(program[1:] if program[:1] == ["--"] else program)
    if not argv:
        raise ProgramError("run: give the program to run after --, e.g. pool-exporter run -- uvicorn app:app")
    if settings.multiproc_dir is not None:
        try:
            settings.multiproc_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SettingError("multiproc_dir", f"cannot create {settings.multiproc_dir}: {exc.strerror}") from None
        startup.check(settings)
    env = program_env(settings, dict(os.environ))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        # The name as typed may hold anything: printable characters only keep it one line.
        name = "".join(c if c.isprintable() else repr(c)[1:-1] for c in argv[0])
        raise ProgramError(f"run: cannot run '{name}': {exc.strerror}") from None
