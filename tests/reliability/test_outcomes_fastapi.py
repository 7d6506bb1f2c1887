"""How transactions end, in a FastAPI app under `uvicorn --loop uvloop`: commits are the successful
writes, rollbacks the requests that failed, and ORM reads only close.

The app uses the usual `get_session` dependency (`async with sessionmaker() as session: yield session`):
its reads end their transaction when the session closes, with a ROLLBACK that SQLAlchemy sends and the
exporter counts as `close`. Its failures are a duplicate insert inside `session.begin()` (409), an
exception inside `session.begin()` (500) and an explicit `rollback()` (422).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from ..conftest import Samples, metric, samples_of
from ..conftest import clean_env as cli_env
from .conftest import Cluster, free_port

pytestmark = pytest.mark.reliability

TABLE = "outcome_notes"
SEEDED = 10  # rows 1..10, which the reads find

APP = textwrap.dedent(
    f'''
    """The app under test: reads, writes and three ways to fail, on one instrumented pool."""
    import os

    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import generate_latest
    from sqlalchemy import Integer, select
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    from sqlalchemy_pool_exporter import instrument

    engine = create_async_engine(os.environ["OUTCOMES_DATABASE_URL"], pool_size=5, max_overflow=5)
    instrument(engine, name="app")
    Session = async_sessionmaker(engine, expire_on_commit=False)


    class Base(DeclarativeBase):
        pass


    class Note(Base):
        __tablename__ = "{TABLE}"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        n: Mapped[int] = mapped_column(Integer)


    async def get_session():
        async with Session() as session:
            yield session


    app = FastAPI()


    @app.exception_handler(RuntimeError)
    async def failed(request: Request, exc: RuntimeError) -> JSONResponse:
        return JSONResponse({{"error": str(exc)}}, status_code=500)


    @app.get("/notes/{{note_id}}")
    async def read(note_id: int, session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        n = await session.scalar(select(Note.n).where(Note.id == note_id))
        return {{"n": n}}


    @app.post("/notes/{{note_id}}")
    async def write(note_id: int, session: AsyncSession = Depends(get_session)) -> dict[str, int]:
        try:
            async with session.begin():
                session.add(Note(id=note_id, n=note_id))
        except sa_exc.IntegrityError:
            raise HTTPException(409, "exists") from None
        return {{"id": note_id}}


    @app.post("/notes/{{note_id}}/fail")
    async def fail(note_id: int, session: AsyncSession = Depends(get_session)) -> None:
        async with session.begin():
            (await session.get_one(Note, note_id)).n += 1
            raise RuntimeError("application error")


    @app.post("/notes/{{note_id}}/undo")
    async def undo(note_id: int, session: AsyncSession = Depends(get_session)) -> None:
        (await session.get_one(Note, note_id)).n = -1
        await session.flush()
        await session.rollback()
        raise HTTPException(422, "undone")


    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest().decode())
    '''
)


@contextlib.contextmanager
def uvicorn_uvloop(tmp_path: Path, database_url: str) -> Iterator[str]:
    """The app under `uvicorn --loop uvloop` on 127.0.0.1; its base URL. SIGTERM (then SIGKILL) by pid afterwards."""
    (tmp_path / "outcomes_app.py").write_text(APP)
    port = free_port()
    log = tmp_path / "uvicorn.log"
    argv = ["--app-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "outcomes_app:app", *argv],
            env=cli_env(OUTCOMES_DATABASE_URL=database_url),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60  # guards a hung start only
        # A single uvicorn process says "Application startup complete." before it binds its port, and
        # "Uvicorn running on" once it listens.
        while "Uvicorn running on" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"uvicorn exited {proc.returncode}: {log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def send(client: aiohttp.ClientSession, base: str, requests: list[tuple[str, str]]) -> Counter[tuple[str, int]]:
    """Send every (method, path), 16 at a time; count (route kind, status)."""
    limit = asyncio.Semaphore(16)

    async def one(method: str, path: str) -> tuple[str, int]:
        async with limit, client.request(method, base + path) as response:
            await response.read()
            return path.rsplit("/", 1)[-1] if path.endswith(("fail", "undo")) else method, response.status

    return Counter(await asyncio.gather(*(one(m, p) for m, p in requests)))


async def transactions(client: aiohttp.ClientSession, base: str) -> dict[str, float | None]:
    async with client.get(base + "/metrics") as response:
        samples: Samples = samples_of(await response.text())
    outcomes = ("commit", "rollback", "close")
    return {o: metric(samples, "sqlalchemy_transactions_total", pool="app", outcome=o) for o in outcomes}


async def test_commits_are_writes_rollbacks_are_failed_requests_reads_only_close(
    live_cluster: Cluster, tmp_path: Path
) -> None:
    url = live_cluster.url()
    setup = create_async_engine(url)
    async with setup.begin() as conn:
        await conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        await conn.execute(text(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, n int)"))
        await conn.execute(text(f"INSERT INTO {TABLE} SELECT i, i FROM generate_series(1, {SEEDED}) i"))
    try:
        with uvicorn_uvloop(tmp_path, url) as base:
            async with aiohttp.ClientSession() as client:
                # A read-heavy load without errors: 200 reads, 20 writes. Not one rollback.
                reads = [("GET", f"/notes/{1 + i % SEEDED}") for i in range(200)]
                writes = [("POST", f"/notes/{100 + i}") for i in range(20)]
                assert await send(client, base, reads + writes) == {("GET", 200): 200, ("POST", 200): 20}
                assert await transactions(client, base) == {"commit": 20, "rollback": 0, "close": 200}

                # Then 30 requests that fail, mixed with 100 more reads and 10 more writes.
                duplicates = [("POST", f"/notes/{100 + i}") for i in range(10)]
                failures = [("POST", f"/notes/{1 + i % SEEDED}/fail") for i in range(10)]
                undone = [("POST", f"/notes/{1 + i % SEEDED}/undo") for i in range(10)]
                more = [("GET", f"/notes/{1 + i % SEEDED}") for i in range(100)]
                more += [("POST", f"/notes/{200 + i}") for i in range(10)]
                statuses = await send(client, base, duplicates + failures + undone + more)
                assert statuses == {
                    ("POST", 409): 10,
                    ("fail", 500): 10,
                    ("undo", 422): 10,
                    ("GET", 200): 100,
                    ("POST", 200): 10,
                }
                assert await transactions(client, base) == {"commit": 30, "rollback": 30, "close": 300}
    finally:
        async with setup.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        await setup.dispose()
