"""Who holds the pool across workers: a FastAPI app under `uvicorn --workers 2`, merged by the sidecar.

Each worker imports the app, whose `instrument()` writes PROMETHEUS_MULTIPROC_DIR; `pool-exporter serve`
merges the directory. Requests are sent over keep-alive connections pinned to a known worker (each
connection first asks `/ping` which process answers it), so the split between workers is chosen by
the test, not left to the kernel. Requests hold their connection on a PostgreSQL advisory lock the
test holds, so "held now" is a checkpoint the server itself confirms (`pg_locks`), not a moment in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from ..conftest import Samples, samples_of
from ..conftest import metric as value
from .cli_process import Serving, cli_env, serving
from .conftest import DB, Cluster, Emitted, free_port

pytestmark = pytest.mark.reliability

LOCK = 74_110_011  # the advisory lock key the handlers of /a and /b wait on
A = "GET /a/{item_id}"  # named by HolderMiddleware after the route template
B = "b-session"  # named by session_dependency(..., holder=B), inside the middleware: the innermost wins
STORM_A = "GET /storm/a/{n}"
STORM_B = "storm-b-session"
# Requests held at the checkpoint, chosen per worker: (worker index, holder) -> count.
PLAN = {(0, A): 3, (0, B): 1, (1, A): 2, (1, B): 2}
N = sum(n for (_, who), n in PLAN.items() if who == A)  # 5
M = sum(n for (_, who), n in PLAN.items() if who == B)  # 3
STORM_PER_WORKER = 4  # requests per route and worker, at once, on a pool of one connection
STORM_HOLD = 0.5  # pg_sleep in each storm request; longer than the small pool's timeout
SMALL_TIMEOUT = 0.2

APP = textwrap.dedent(
    f'''
    """The app under test: two pools, two ways to name a holder, a 503 for a pool timeout."""
    import os

    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse
    from sqlalchemy import exc as sa_exc
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    from sqlalchemy_pool_exporter import HolderMiddleware, instrument, session_dependency

    URL = os.environ["HOLDERS_DATABASE_URL"]
    # The server tells which worker holds what: application_name carries the worker's pid.
    ARGS = {{"connect_args": {{"server_settings": {{"application_name": f"holders-{{os.getpid()}}"}}}}}}
    main = create_async_engine(URL, pool_size=10, max_overflow=0, pool_timeout=30, **ARGS)
    small = create_async_engine(URL, pool_size=1, max_overflow=0, pool_timeout={SMALL_TIMEOUT}, **ARGS)
    instrument(main, name="main")  # the default Exporter: it writes PROMETHEUS_MULTIPROC_DIR
    instrument(small, name="small")
    main_session = session_dependency(async_sessionmaker(main), holder="{B}")
    small_session = session_dependency(async_sessionmaker(small), holder="{STORM_B}")
    WAIT = text("SELECT pg_advisory_xact_lock_shared({LOCK})")  # until the test releases its lock
    SLEEP = text("SELECT pg_sleep({STORM_HOLD})")

    app = FastAPI()
    app.add_middleware(HolderMiddleware)


    @app.exception_handler(sa_exc.TimeoutError)
    async def pool_exhausted(request: Request, exc: sa_exc.TimeoutError) -> JSONResponse:
        return JSONResponse({{"error": "pool exhausted", "pid": os.getpid()}}, status_code=503)


    @app.get("/ping")
    async def ping() -> dict[str, int]:
        return {{"pid": os.getpid()}}


    @app.get("/a/{{item_id}}")
    async def a(item_id: int) -> dict[str, int]:
        async with main.begin() as conn:
            await conn.execute(WAIT)
        return {{"pid": os.getpid()}}


    @app.get("/b")
    async def b(session: AsyncSession = Depends(main_session)) -> dict[str, int]:
        await session.execute(WAIT)
        return {{"pid": os.getpid()}}


    @app.get("/storm/a/{{n}}")
    async def storm_a(n: int) -> dict[str, int]:
        async with small.begin() as conn:
            await conn.execute(SLEEP)
        return {{"pid": os.getpid()}}


    @app.get("/storm/b")
    async def storm_b(session: AsyncSession = Depends(small_session)) -> dict[str, int]:
        await session.execute(SLEEP)
        return {{"pid": os.getpid()}}
    '''
)


@dataclass
class Uvicorn:
    """`uvicorn --workers 2` serving the app: its port, worker pids and log."""

    port: int
    workers: list[int]
    log: Path
    pinned: dict[int, list[http.client.HTTPConnection]] = field(default_factory=dict)

    def connection(self, pid: int) -> http.client.HTTPConnection:
        """A keep-alive connection that worker `pid` accepted, opened before it is needed."""
        for _ in range(200):
            spare = self.pinned.get(pid)
            if spare:
                return spare.pop()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            status, body = request(conn, "/ping")
            assert status == 200, body
            self.pinned.setdefault(body["pid"], []).append(conn)
        raise AssertionError(f"200 connections and none accepted by worker {pid}")

    def close(self) -> None:
        for conns in self.pinned.values():
            for conn in conns:
                conn.close()


def request(conn: http.client.HTTPConnection, path: str) -> tuple[int, dict[str, int]]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@contextlib.contextmanager
def uvicorn(tmp_path: Path, multiproc_dir: Path, database_url: str) -> Iterator[Uvicorn]:
    """The app under `uvicorn --workers 2` on 127.0.0.1; SIGTERM (then SIGKILL) by pid afterwards."""
    (tmp_path / "holders_app.py").write_text(APP)
    port = free_port()
    log = tmp_path / "uvicorn.log"
    env = cli_env(PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir), HOLDERS_DATABASE_URL=database_url)
    argv = ["--app-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "holders_app:app", *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    server = None
    try:
        deadline = time.monotonic() + 60  # guards a hung start only
        while log.read_text(errors="replace").count("Application startup complete.") < 2:
            assert proc.poll() is None, f"uvicorn exited {proc.returncode}: {log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        pids = [int(p) for p in re.findall(r"Started server process \[(\d+)\]", log.read_text())]
        assert len(pids) == 2, log.read_text()
        server = Uvicorn(port, pids, log)
        yield server
    finally:
        if server is not None:
            server.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: uvicorn and the workers it spawned
            proc.wait()


async def scrape(sidecar: Serving, emitted: Emitted) -> Samples:
    async with aiohttp.ClientSession() as client, client.get(f"{sidecar.base}/metrics") as response:
        text = await response.text()
        assert response.status == 200, text
    emitted.add(text)
    return samples_of(text)


def by_holder(samples: Samples, name: str, pool: str) -> dict[str, float]:
    found = {}
    for (metric, labels), v in samples.items():
        named = dict(labels)
        if metric == f"sqlalchemy_pool_holder_{name}" and named.get("pool") == pool:
            found[named["holder"]] = v
    return found


async def until(sidecar: Serving, emitted: Emitted, ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until `ready(samples)` (the workers write once a second); the deadline guards a hang only."""
    deadline = time.monotonic() + 20
    while True:
        samples = await scrape(sidecar, emitted)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.1)


async def lock_waiters(admin: asyncpg.Connection) -> Counter[str]:
    """Backends waiting on the test's advisory lock, by application_name (one per worker)."""
    rows = await admin.fetch(
        "SELECT a.application_name AS app, count(*) AS n FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE l.locktype = 'advisory' AND l.objid = $1 AND NOT l.granted GROUP BY 1",
        LOCK,
    )
    return Counter({r["app"]: r["n"] for r in rows})


async def test_two_uvicorn_workers_hold_exactly_what_their_requests_hold(
    live_cluster: Cluster, tmp_path: Path, emitted: Emitted
) -> None:
    with serving(tmp_path) as sidecar, uvicorn(tmp_path, tmp_path / "mp", live_cluster.url()) as app:
        w0, w1 = app.workers
        workers = {0: w0, 1: w1}
        calls = [
            (workers[w], who, app.connection(workers[w])) for (w, who), count in PLAN.items() for _ in range(count)
        ]
        loop = asyncio.get_running_loop()
        # Advisory locks belong to a database: the app's.
        admin = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{live_cluster.port}/{DB}")
        threads = ThreadPoolExecutor(max_workers=len(calls))
        try:
            await admin.execute(f"SELECT pg_advisory_lock({LOCK})")
            sent = [
                (pid, who, loop.run_in_executor(threads, request, conn, f"/a/{i}" if who == A else "/b"))
                for i, (pid, who, conn) in enumerate(calls)
            ]
            # The checkpoint, as the server sees it: every request's backend waits on the lock.
            for _ in range(2000):
                if sum((await lock_waiters(admin)).values()) == N + M or any(f.done() for _, _, f in sent):
                    break  # all waiting, or one answered: it did not wait
                await asyncio.sleep(0.01)
            per_worker: Counter[str] = Counter()
            for (w, _), n in PLAN.items():
                per_worker[f"holders-{workers[w]}"] += n
            assert await lock_waiters(admin) == per_worker, app.log.read_text()  # 4 on each worker

            held = await until(
                sidecar,
                emitted,
                lambda s: (
                    value(s, "sqlalchemy_pool_connections", pool="main", state="used") == N + M
                    and sum(by_holder(s, "connections", "main").values()) == N + M
                ),
            )
            assert by_holder(held, "connections", "main") == {"none": 0, A: N, B: M}
            used = value(held, "sqlalchemy_pool_connections", pool="main", state="used")
            assert sum(by_holder(held, "connections", "main").values()) == used == N + M
            assert value(held, "sqlalchemy_exporter_sidecar_workers") == 2

            await admin.execute(f"SELECT pg_advisory_unlock({LOCK})")
            answers = [(pid, who, *(await future)) for pid, who, future in sent]
        finally:
            await admin.close()  # releases the lock if an assertion left it held: the requests end
            threads.shutdown()
        # Every request was answered by the worker its connection was pinned to.
        assert [(pid, status, body["pid"]) for pid, _, status, body in answers] == [
            (pid, 200, pid) for pid, _, _ in calls
        ]

        done = await until(
            sidecar,
            emitted,
            lambda s: (
                sum(by_holder(s, "checkouts_total", "main").values()) == N + M
                and value(s, "sqlalchemy_pool_connections", pool="main", state="used") == 0
            ),
        )
        assert by_holder(done, "checkouts_total", "main") == {"none": 0, A: N, B: M}
        assert by_holder(done, "connections", "main") == {"none": 0, A: 0, B: 0}
        assert by_holder(done, "timeouts_total", "main") == {"none": 0, A: 0, B: 0}
        assert value(done, "sqlalchemy_pool_checkouts_total", pool="main") == N + M
        hold = by_holder(done, "hold_seconds_total", "main")
        assert hold[A] > 0 and hold[B] > 0 and hold["none"] == 0

        # The storm: on each worker, STORM_PER_WORKER requests per route at once on a pool of one
        # connection that each holds for longer than the pool's timeout. Clients see 200 or 503.
        storm = [
            (pid, who, app.connection(pid))
            for pid in (w0, w1)
            for who in (STORM_A, STORM_B)
            for _ in range(STORM_PER_WORKER)
        ]
        with ThreadPoolExecutor(max_workers=len(storm)) as threads:
            futures = [
                (
                    pid,
                    who,
                    loop.run_in_executor(threads, request, conn, f"/storm/a/{i}" if who == STORM_A else "/storm/b"),
                )
                for i, (pid, who, conn) in enumerate(storm)
            ]
            seen: Counter[tuple[int, str, int]] = Counter()
            for pid, who, future in futures:
                status, body = await future
                assert body["pid"] == pid
                seen[(pid, who, status)] += 1
        assert {status for _, _, status in seen} == {200, 503}, seen
        for pid in (w0, w1):  # both workers timed callers out: the sidecar's numbers merge the two
            assert seen[(pid, STORM_A, 503)] + seen[(pid, STORM_B, 503)] > 0, seen
        failures = {who: sum(n for (_, w, s), n in seen.items() if w == who and s == 503) for who in (STORM_A, STORM_B)}
        served = {who: sum(n for (_, w, s), n in seen.items() if w == who and s == 200) for who in (STORM_A, STORM_B)}

        stormed = await until(
            sidecar,
            emitted,
            lambda s: (
                value(s, "sqlalchemy_pool_timeouts_total", pool="small") == sum(failures.values())
                and value(s, "sqlalchemy_pool_checkouts_total", pool="small") == sum(served.values())
            ),
        )
        assert by_holder(stormed, "timeouts_total", "small") == {"none": 0, **failures}
        assert by_holder(stormed, "checkouts_total", "small") == {"none": 0, **served}
        assert value(stormed, "sqlalchemy_pool_timeouts_total", pool="small") == sum(failures.values())
        # The first pool saw none of it.
        assert by_holder(stormed, "timeouts_total", "main") == {"none": 0, A: 0, B: 0}
    emitted.add(app.log.read_bytes())
    emitted.add(sidecar.log.read_bytes())
