"""One real Prometheus server per session, scraping the running demo (and the sidecar's server view)."""

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

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `dashboards` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO))

JOB = "sqlalchemy-pool"
SCRAPE_INTERVAL = 1.0
# Grafana's $__rate_interval = max($__interval + scrape interval, 4 x scrape interval).
RATE_INTERVAL = "4s"
DATA_DEADLINE = 60.0  # seconds from Prometheus start to wait for every query to show data
DEMO_SECONDS = 240
DEMO_WORKERS = 2
PG_SERVER = os.environ.get("POOL_EXPORTER_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
DEMO_DB = "pool_exporter_dashboards"
PG_URL = f"{PG_SERVER}/{DEMO_DB}"


def ensure_database(name: str) -> str:
    """A database of our own on the local PostgreSQL, so the demo's tables meet nobody else's."""
    psql = ["psql", f"{PG_SERVER}/postgres", "-tAc"]
    found = subprocess.run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"], capture_output=True)
    assert found.returncode == 0, found.stderr.decode()
    if found.stdout.strip() != b"1":
        subprocess.run([*psql, f'CREATE DATABASE "{name}"'], check=True, capture_output=True)
    return f"{PG_SERVER}/{name}"


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


def substitute(expr: str, *, range_seconds: int = 60) -> str:
    """Replace Grafana's template variables the way Grafana would for this dashboard."""
    for name, value in (
        ("$__rate_interval", RATE_INTERVAL),
        ("$__interval", "1s"),
        ("$__range", f"{range_seconds}s"),
        ("$job", JOB),
        ("$instance", ".*"),
        ("$pool", ".*"),
    ):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


@dataclass
class Prometheus:
    url: str
    started: float
    targets: dict[str, str] = field(default_factory=dict)

    def api(self, path: str, **params: str) -> dict[str, Any]:
        status, body = get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        payload: dict[str, Any] = json.loads(body)
        payload["http_status"] = status
        return payload

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def query_range(self, expr: str, seconds: int = 60, step: str = "1s") -> dict[str, Any]:
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
        return max(0.0, self.started + DATA_DEADLINE - time.monotonic())


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


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run scripts/ensure-services.sh")
    tmp = tmp_path_factory.mktemp("prometheus")
    procs: list[subprocess.Popen[bytes]] = []
    targets: dict[str, str] = {}
    try:
        mp_dir = tmp / "multiproc"
        mp_dir.mkdir()
        app_port = free_port()
        # The compose layout: demo workers on PostgreSQL write a shared multiprocess directory,
        # the sidecar serves it merged, with the server's view from pg_stat_activity.
        env = {**os.environ, "POOL_EXPORTER_LOG_LEVEL": "WARNING"}
        env["POOL_EXPORTER_DATABASE_URL"] = ensure_database(DEMO_DB).replace("postgresql:", "postgresql+asyncpg:")
        args = [sys.executable, "-m", "exporter", "demo", "--host", "127.0.0.1", "--port", str(app_port)]
        args += ["--duration", str(DEMO_SECONDS), "--workers", str(DEMO_WORKERS), "--multiproc-dir", str(mp_dir)]
        procs.append(_spawn(args, tmp / "demo.log", env))
        targets["app"] = f"http://127.0.0.1:{app_port}"
        wait_http(f"{targets['app']}/metrics", procs[-1])

        sidecar_port = free_port()
        env = {**os.environ, "POOL_EXPORTER_DATABASE_URL": PG_URL, "POOL_EXPORTER_LOG_LEVEL": "WARNING"}
        args = [sys.executable, "-m", "exporter", "serve", "--host", "127.0.0.1", "--port", str(sidecar_port)]
        args += ["--multiproc-dir", str(mp_dir), "--probe-interval", "1"]
        procs.append(_spawn(args, tmp / "sidecar.log", env))
        targets["sidecar"] = f"http://127.0.0.1:{sidecar_port}"
        wait_http(f"{targets['sidecar']}/healthz", procs[-1])

        # Prometheus scrapes what a deployment scrapes: the sidecar only (the demo serves the same
        # directory merged too; scraping both would double every sum).
        scraped = targets["sidecar"]

        port = free_port()
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL:g}s", "evaluation_interval": "1s"},
            "rule_files": [str(REPO / "dashboards" / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [{"targets": [scraped.split("//", 1)[1]]}],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        args = [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        procs.append(_spawn(args, tmp / "prometheus.log"))
        server = Prometheus(f"http://127.0.0.1:{port}", time.monotonic(), targets)
        wait_http(f"{server.url}/-/ready", procs[-1])
        up = server.wait_for(f'up{{job="{JOB}"}} == 1', timeout=30)
        assert up["data"]["result"], "Prometheus never scraped the demo"
        yield server
    finally:
        for proc in reversed(procs):
            _stop(proc)
