"""The worker side of multiprocess mode when PROMETHEUS_MULTIPROC_DIR is missing, read-only or vanishes.

Issue #9: instrument() raised (leaving a half-attached handle) for a missing or read-only directory,
and a directory removed later logged a full traceback every second. Now: in-process metrics keep
working, one WARNING, counted in exporter_errors_total, throttled afterwards; writes resume when
the directory is back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

# A real worker: its own interpreter, PROMETHEUS_MULTIPROC_DIR set before prometheus_client is
# imported, flushing every 50 ms. It prints what the app sees, one line per step.
WORKER = textwrap.dedent(
    """
    import logging, os, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s", stream=sys.stdout)
    from prometheus_client import CollectorRegistry
    from sqlalchemy import create_engine, text
    from sqlalchemy_pool_exporter import Exporter

    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    registry = CollectorRegistry()
    exporter = Exporter(registry, multiprocess_dir=directory, multiprocess_interval=0.05)
    engine = create_engine("sqlite://")
    handle = exporter.instrument(engine, name="app")   # must not raise
    def work(n):
        for _ in range(n):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    def report(step):
        value = registry.get_sample_value
        print(step, int(value("sqlalchemy_pool_checkouts_total", {"pool": "app"})),
              value("sqlalchemy_exporter_errors_total", {"pool": "app"}) > 0, flush=True)
    work(3)
    time.sleep(0.5)                                   # ~10 failed flushes
    report("broken")
    print("step", flush=True)
    sys.stdin.readline()                              # the test repairs (or breaks) the directory
    work(2)
    time.sleep(0.5)
    exporter.flush()
    report("after")
    files = sorted(p.name for p in directory.glob("*.db")) if directory.is_dir() else []
    print("files", files, flush=True)
    """
)


def _run(tmp_path: Path, directory: Path, between: str) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("step"):
                if between == "create":
                    directory.mkdir()
                elif between == "remove":
                    shutil.rmtree(directory)
                proc.stdin.write("go\n")
                proc.stdin.flush()
        assert proc.wait(timeout=60) == 0, "\n".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return lines


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """A directory nobody can write, root included: immutable (chattr +i) as root, mode 555 otherwise."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory immutable here (chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def _warnings(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("LOG WARNING")]


def test_a_missing_directory_then_created(tmp_path: Path) -> None:
    directory = tmp_path / "not-yet"
    lines = _run(tmp_path, directory, "create")
    assert "Traceback" not in "\n".join(lines)
    assert "broken 3 True" in lines  # in-process metrics work; the failures are counted
    assert "after 5 True" in lines
    warnings = _warnings(lines)
    assert len(warnings) == 2, lines
    assert warnings[0].startswith(f"LOG WARNING cannot write the multiprocess directory {directory}: No such file")
    assert warnings[1] == f"LOG WARNING multiprocess directory {directory} is writable again"
    files = next(line for line in lines if line.startswith("files"))
    assert "counter_" in files and "gauge_livesum_" in files and "histogram_" in files


def test_a_directory_removed_while_the_worker_runs(tmp_path: Path) -> None:
    directory = tmp_path / "mp"
    directory.mkdir()
    lines = _run(tmp_path, directory, "remove")
    assert "Traceback" not in "\n".join(lines)
    assert "broken 3 False" in lines
    assert "after 5 True" in lines
    warnings = _warnings(lines)
    assert len(warnings) == 1, lines  # ~10 failed flushes, one line (then at most one per 5 minutes)
    assert "No such file or directory" in warnings[0] and "in-process metrics still work" in warnings[0]


def test_a_read_only_directory(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    with read_only(directory):
        lines = _run(tmp_path, directory, "nothing")
    assert "Traceback" not in "\n".join(lines)
    assert "broken 3 True" in lines
    assert "after 5 True" in lines
    warnings = _warnings(lines)
    assert len(warnings) == 1, lines
    assert "Permission denied" in warnings[0] or "Operation not permitted" in warnings[0]
    assert "files []" in lines
