"""Real `python -m sqlalchemy_pool_exporter` processes for the hostile-input tests.

Every child runs in its own session (no terminal to prompt on), with stdin closed and its address
space capped, so that a regression (a pass phrase prompt, reading /dev/zero) fails the test instead
of hanging it or eating the machine's memory; every child is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..conftest import clean_env as cli_env

MEMORY_CAP = 2 << 30


def _limits(nofile: int | None) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return apply


def run_cli(
    args: Sequence[str], env: dict[str, str] | None = None, *, wrapper: Sequence[str] = (), timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (killed after `timeout`: a hang is a failure, not a stuck suite).

    `wrapper` goes before the interpreter (e.g. setpriv, to run without some capabilities).
    """
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "sqlalchemy_pool_exporter", *args],
        env=env if env is not None else cli_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        preexec_fn=_limits(None),
        check=False,
    )


def assert_exit_2_one_line(result: subprocess.CompletedProcess[str], setting: str, *hidden: str) -> None:
    """Exit status 2, nothing on stdout, one line on stderr naming `setting`, none of `hidden` in it."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr[-3000:]
    assert result.stderr.startswith(f"pool-exporter: invalid setting {setting} ("), result.stderr
    assert "Traceback" not in result.stderr
    for text in hidden:
        assert text not in result.stderr, result.stderr


@dataclass
class Serving:
    """A running `pool-exporter serve`: its base URL, process and log file (stdout and stderr)."""

    base: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serving(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    nofile: int | None = None,
    listen: Sequence[str] = ("--host", "127.0.0.1", "--port", "0"),
) -> Iterator[Serving]:
    """`pool-exporter serve` on 127.0.0.1 (`listen`: a free port), over an empty multiprocess directory.

    Yields once it logged its URL; stops it with SIGTERM afterwards (SIGKILL if it does not exit).
    """
    directory = tmp_path / "mp"
    directory.mkdir(exist_ok=True)
    log = tmp_path / "serve.log"
    argv = ["serve", *listen, "--multiproc-dir", str(directory), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sqlalchemy_pool_exporter", *argv],
            env=env if env is not None else cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=_limits(nofile),
        )
    try:
        deadline = time.monotonic() + 60
        match = None
        while match is None:
            match = re.search(r"serve: (https?://127\.0\.0\.1:(\d+))", log.read_text(errors="replace"))
            if match is None:
                assert proc.poll() is None, f"serve exited {proc.returncode}: {log.read_text(errors='replace')}"
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.05)
        yield Serving(match[1], int(match[2]), proc, log)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
