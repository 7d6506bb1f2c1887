"""`pool-exporter run -- CMD`: real programs, their engines made the early-import way, instrumented without code.

A plain script (one process, a sync and an async engine, the default registry read by the script
itself), and a FastAPI app under `uvicorn --workers 2` whose commits the sidecar merges from the
multiprocess directory `run` set up: N committed writes are N commits, summed over the workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from ..conftest import PG_DSN, PG_URL, samples_of
from ..conftest import metric as value
from .cli_process import cli_env, run_cli, serving
from .conftest import free_port

pytestmark = pytest.mark.reliability

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from sqlalchemy import create_engine, text  # imported before anything is instrumented
    from sqlalchemy.ext.asyncio import create_async_engine
    from prometheus_client import REGISTRY

    sync = create_engine("sqlite:///sync.sqlite", pool_size=2)
    aio = create_async_engine("sqlite+aiosqlite:///async.sqlite", pool_size=2)
    for _ in range(3):
        with sync.begin() as conn:
            conn.execute(text("SELECT 1"))

    async def main() -> None:
        for _ in range(5):
            async with aio.begin() as conn:
                await conn.execute(text("SELECT 1"))
        await aio.dispose()

    asyncio.run(main())
    commits = {
        s.labels["pool"]: s.value
        for m in REGISTRY.collect()
        for s in m.samples
        if s.name == "x_transactions_total" and s.labels["outcome"] == "commit"
    }
    print(json.dumps(commits))
    sys.exit(3)
    """
)


def test_a_plain_script_has_both_engines_instrumented_and_its_exit_status_kept(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pool_exporter", "run", "--namespace", "x", "--", sys.executable, "app.py"],
        cwd=tmp_path,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3, result.stderr  # exec: the program's own status
    assert json.loads(result.stdout) == {"sqlite:sync.sqlite": 3, "sqlite:async.sqlite": 5}
    assert result.stderr == ""


def test_without_a_program_or_with_one_that_does_not_exist_it_exits_2_with_one_line() -> None:
    for args, line in [
        (["run"], "pool-exporter: run: give the program to run after --, e.g. pool-exporter run -- uvicorn app:app\n"),
        (["run", "--", "no-such-program-\x1b"], "pool-exporter: run: cannot run 'no-such-program-\\x1b': "),
    ]:
        result = run_cli(args)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.startswith(line) and result.stderr.count("\n") == 1, result.stderr


APP = textwrap.dedent(
    """
    import os
    from fastapi import APIRouter, FastAPI
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(os.environ["RUN_DATABASE_URL"], pool_size=2, max_overflow=0)
    notes = APIRouter()

    @notes.post("/notes")
    async def add() -> dict[str, int]:
        async with engine.begin() as conn:
            await conn.execute(text(f"INSERT INTO {os.environ['RUN_TABLE']} (pid) VALUES (:pid)"), {"pid": os.getpid()})
        return {"pid": os.getpid()}

    app = FastAPI()
    app.include_router(notes, prefix="/api/v1")
    """
)
N = 24


async def test_uvicorn_workers_are_instrumented_and_the_sidecar_sums_their_commits(tmp_path: Path) -> None:
    table = f"run_notes_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_DSN)
    await admin.execute(f"CREATE TABLE {table} (pid integer)")
    (tmp_path / "notes_app.py").write_text(APP)
    mp = tmp_path / "mp"  # `run` creates it
    port = free_port()
    log = tmp_path / "uvicorn.log"
    env = cli_env(RUN_DATABASE_URL=PG_URL, RUN_TABLE=table)
    argv = ["run", "--multiproc-dir", str(mp), "--", sys.executable, "-m", "uvicorn", "notes_app:app"]
    argv += ["--app-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sqlalchemy_pool_exporter", *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60  # guards a hung start only
        while log.read_text(errors="replace").count("Application startup complete.") < 2:
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            await asyncio.sleep(0.05)
        pids = {int(p) for p in re.findall(r"Started server process \[(\d+)\]", log.read_text())}
        # Fresh connections, so that the kernel spreads them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
            answered = []
            for _ in range(N):
                async with client.post(f"http://127.0.0.1:{port}/api/v1/notes") as response:
                    assert response.status == 200, await response.text()
                    answered.append((await response.json())["pid"])
        rows = await admin.fetch(f"SELECT pid, count(*) AS n FROM {table} GROUP BY pid")
        written = {r["pid"]: r["n"] for r in rows}
        assert sum(written.values()) == N and set(written) <= pids

        with serving(tmp_path) as sidecar:  # over the same directory, tmp_path / "mp"
            async with aiohttp.ClientSession() as client:
                for _ in range(200):  # the workers write once a second
                    async with client.get(f"{sidecar.base}/metrics") as response:
                        samples = samples_of(await response.text())
                    pool = f"127.0.0.1:5432/{PG_URL.rsplit('/', 1)[1]}"
                    commits = value(samples, "sqlalchemy_transactions_total", pool=pool, outcome="commit")
                    if commits == N:
                        break
                    await asyncio.sleep(0.1)
        assert commits == N, log.read_text()
        assert value(samples, "sqlalchemy_pool_checkouts_total", pool=pool) == N
        assert value(samples, "sqlalchemy_exporter_sidecar_workers") == len(set(answered))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()
