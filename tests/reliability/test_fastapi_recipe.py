"""The README's FastAPI recipe, as written, under a real `uvicorn --loop uvloop`; and the --workers mistake.

The recipe block is read from README.md itself and put between an engine (aiosqlite, a file) and a
router included under a prefix; each request commits once, so the commit counter is exact.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import clean_env, metric, samples_of
from .conftest import free_port

pytestmark = pytest.mark.reliability

README = Path(__file__).resolve().parents[2] / "README.md"
N = 7


def recipe() -> str:
    """The python block right after the README's **FastAPI** paragraph."""
    text = README.read_text()
    after = text[text.index("**FastAPI**") :]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


ENGINE = """
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
import os
engine = create_async_engine("sqlite+aiosqlite:///" + os.environ["RECIPE_DB"])
"""
ROUTES = """
from fastapi import APIRouter
notes = APIRouter()

@notes.post("/notes/{n}")
async def add(n: int) -> dict[str, int]:
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO notes VALUES (:n)"), {"n": n})
    return {"added": n}

app.include_router(notes, prefix="/api/v1")
"""


@contextlib.contextmanager
def uvicorn(tmp_path: Path, app: str, *args: str, **env: str) -> Iterator[tuple[int, Path, subprocess.Popen[bytes]]]:
    """`python -m uvicorn recipe_app:app --loop uvloop ARGS` on a free port; SIGTERM (then SIGKILL) by pid after."""
    (tmp_path / "recipe_app.py").write_text(app)
    db = tmp_path / "notes.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (n INTEGER)")
    port = free_port()
    log = tmp_path / "uvicorn.log"
    argv = ["--app-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "recipe_app:app", *argv],
            env=clean_env(RECIPE_DB=str(db), **env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        yield port, log, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: uvicorn and any worker it spawned
            proc.wait()


def wait_for(log: Path, proc: subprocess.Popen[bytes], line: str, count: int = 1) -> str:
    deadline = time.monotonic() + 60  # guards a hung start only
    while (text := log.read_text(errors="replace")).count(line) < count:
        assert proc.poll() is None, f"uvicorn exited {proc.returncode}: {text}"
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    return text


def get(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_the_readme_recipe_under_uvicorn_with_uvloop(tmp_path: Path) -> None:
    """After N requests that each commit once, /metrics/ through the mount reads exactly N commits."""
    with uvicorn(tmp_path, ENGINE + recipe() + ROUTES, "--workers", "1") as (port, log, proc):
        wait_for(log, proc, "Application startup complete.")
        wait_for(log, proc, "Uvicorn running on")  # one process binds its port after the app's startup
        for i in range(N):
            status, _, body = get(port, "POST", f"/api/v1/notes/{i}")
            assert status == 200, body
        status, headers, body = get(port, "GET", "/metrics/")
        assert (status, headers["content-type"]) == (200, "text/plain; version=0.0.4; charset=utf-8")
        samples = samples_of(body.decode())
        assert metric(samples, "sqlalchemy_transactions_total", pool="app", outcome="commit") == float(N)
        assert metric(samples, "sqlalchemy_pool_connections_created_total", pool="app") == 1.0
        status, headers, _ = get(port, "GET", "/metrics")
        assert (status, headers["location"]) == (307, f"http://127.0.0.1:{port}/metrics/")
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text


WORKER_OPENS_PORT = """
from contextlib import asynccontextmanager
from fastapi import FastAPI
from sqlalchemy_pool_exporter.web import start_http_server
import os

@asynccontextmanager
async def lifespan(app: FastAPI):
    server = await start_http_server("127.0.0.1", int(os.environ["METRICS_PORT"]))
    yield
    await server.stop()

app = FastAPI(lifespan=lifespan)
"""


def test_workers_each_opening_the_port_fail_with_one_clear_line(tmp_path: Path) -> None:
    """The mistake the README warns of, made for real: `uvicorn --workers 2`, each worker's lifespan
    calling start_http_server() on one port. The second worker to start fails with PortInUse,
    whose message names the cause and the sidecar; the first serves /metrics."""
    metrics_port = free_port()
    app = ENGINE + WORKER_OPENS_PORT
    with uvicorn(tmp_path, app, "--workers", "2", METRICS_PORT=str(metrics_port)) as (_, log, proc):
        text = wait_for(log, proc, "PortInUse")
        status, _, body = get(metrics_port, "GET", "/metrics")
        assert status == 200 and b"sqlalchemy_exporter_build_info" in body
    [line] = set(re.findall(r"PortInUse: .*", text))
    assert line.endswith(
        f"cannot serve /metrics on 127.0.0.1:{metrics_port}: the address is already in use. With several workers "
        "(uvicorn --workers N, gunicorn -w N) each worker opening this port fails after the first: set "
        "PROMETHEUS_MULTIPROC_DIR and run `pool-exporter serve` beside them (the sidecar), or mount "
        "metrics_app() in the app (each worker then answers for itself only); see the README, Several workers"
    )
