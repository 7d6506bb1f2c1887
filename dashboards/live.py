"""A local copy of the compose stack without Docker: demo workers, the sidecar and a real Prometheus.

Used by tests/dashboards (the proof that every dashboard query returns data) and by render.py
(the PNG in docs/). Everything listens on 127.0.0.1 only; Prometheus stores into a temporary path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
JOB = "sqlalchemy-pool"
PG_SERVER = os.environ.get("POOL_EXPORTER_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
DEMO_DB = "pool_exporter_dashboards"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before serving {url}")
        with contextlib.suppress(OSError):
            if get(url, timeout=1.0)[0] == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def ensure_database(name: str = DEMO_DB) -> str:
    """A database of our own on the local PostgreSQL, so the demo's tables meet nobody else's."""
    psql = ["psql", f"{PG_SERVER}/postgres", "-tAc"]
    found = subprocess.run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"], capture_output=True)
    if found.returncode != 0:
        raise RuntimeError(f"PostgreSQL at {PG_SERVER} is not reachable: {found.stderr.decode().strip()}")
    if found.stdout.strip() != b"1":
        subprocess.run([*psql, f'CREATE DATABASE "{name}"'], check=True, capture_output=True)
    return f"{PG_SERVER}/{name}"


def substitute(expr: str, *, rate_interval: str, interval: str = "1s", range_seconds: int = 60) -> str:
    """Replace Grafana's template variables the way Grafana would, with every job/instance/pool/holder selected."""
    for name, value in (
        ("$__rate_interval", rate_interval),
        ("$__interval", interval),
        ("$__range", f"{range_seconds}s"),
        ("$job", JOB),
        ("$instance", ".*"),
        ("$pool", ".*"),
        ("$holder", ".*"),
    ):
        expr = expr.replace(name, value)
    if "$" in expr:
        raise ValueError(f"unsubstituted variable in {expr}")
    return expr


@dataclass
class Prometheus:
    """The HTTP API of a running Prometheus, and the URLs of what runs beside it."""

    url: str
    started: float
    deadline: float = 60.0
    targets: dict[str, str] = field(default_factory=dict)

    def api(self, path: str, **params: str) -> dict[str, Any]:
        status, body = get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        payload: dict[str, Any] = json.loads(body)
        payload["http_status"] = status
        return payload

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def query_range(self, expr: str, seconds: float = 60, step: str = "1s") -> dict[str, Any]:
        end = time.time()
        return self.api("query_range", query=expr, start=f"{end - seconds:.3f}", end=f"{end:.3f}", step=step)

    def wait_for(self, expr: str, timeout: float) -> dict[str, Any]:
        """Poll an instant query until it returns at least one series, or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            payload = self.query(expr)
            if payload["status"] != "success" or payload["data"]["result"] or time.monotonic() > deadline:
                return payload
            time.sleep(0.5)

    def remaining(self) -> float:
        """Seconds left of the time allowed, from Prometheus's start, for data to show up."""
        return max(0.0, self.started + self.deadline - time.monotonic())


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def stack(
    workdir: Path,
    *,
    scrape_interval: float = 1.0,
    demo_seconds: float = 600,
    workers: int = 2,
    deadline: float = 60.0,
) -> Iterator[Prometheus]:
    """Demo workers on PostgreSQL -> shared multiprocess dir -> sidecar (+ server view) <- Prometheus."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed: run scripts/ensure-services.sh")
    procs: list[subprocess.Popen[bytes]] = []
    targets: dict[str, str] = {}
    try:
        mp_dir = workdir / "multiproc"
        mp_dir.mkdir()
        app_port = free_port()
        env = {**os.environ, "POOL_EXPORTER_LOG_LEVEL": "WARNING"}
        env["POOL_EXPORTER_DATABASE_URL"] = ensure_database().replace("postgresql:", "postgresql+asyncpg:")
        args = [
            sys.executable,
            "-m",
            "sqlalchemy_pool_exporter",
            "demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(app_port),
        ]
        args += ["--duration", f"{demo_seconds:g}", "--workers", str(workers), "--multiproc-dir", str(mp_dir)]
        procs.append(_spawn(args, workdir / "demo.log", env))
        targets["app"] = f"http://127.0.0.1:{app_port}"
        wait_http(f"{targets['app']}/metrics", procs[-1])

        sidecar_port = free_port()
        env = {
            **os.environ,
            "POOL_EXPORTER_DATABASE_URL": f"{PG_SERVER}/{DEMO_DB}",
            "POOL_EXPORTER_LOG_LEVEL": "WARNING",
        }
        args = [
            sys.executable,
            "-m",
            "sqlalchemy_pool_exporter",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(sidecar_port),
        ]
        args += ["--multiproc-dir", str(mp_dir), "--probe-interval", f"{scrape_interval:g}"]
        procs.append(_spawn(args, workdir / "sidecar.log", env))
        targets["sidecar"] = f"http://127.0.0.1:{sidecar_port}"
        wait_http(f"{targets['sidecar']}/healthz", procs[-1])

        # Scrape what a deployment scrapes: the sidecar only. The demo serves the same directory
        # merged too, and scraping both would double every sum.
        port = free_port()
        config = {
            "global": {"scrape_interval": f"{scrape_interval:g}s", "evaluation_interval": "1s"},
            "rule_files": [str(REPO / "dashboards" / "alerts.yml")],
            "scrape_configs": [
                {"job_name": JOB, "static_configs": [{"targets": [targets["sidecar"].split("//", 1)[1]]}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        args = [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        procs.append(_spawn(args, workdir / "prometheus.log"))
        server = Prometheus(f"http://127.0.0.1:{port}", time.monotonic(), deadline, targets)
        wait_http(f"{server.url}/-/ready", procs[-1])
        # The first scrape comes about 5.5 s after start in Prometheus 2.42.
        if not server.wait_for(f'up{{job="{JOB}"}} == 1', timeout=30)["data"]["result"]:
            raise RuntimeError("Prometheus never scraped the sidecar")
        yield server
    finally:
        for proc in reversed(procs):
            _stop(proc)
