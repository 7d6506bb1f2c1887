"""Real parts for the fault suite: a throwaway PostgreSQL cluster, fresh registries, a secret scan.

The cluster is this suite's own (its own data directory and port), so restarting or killing it
harms nothing else. PostgreSQL refuses to run as root: as root every server command runs as the
`postgres` user through `runuser`, in a directory that user owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import Exporter

# Re-exported (`X as X`): the reliability tests import clean_env, metric and samples_of from here.
from ..conftest import MP_WORKER, sample
from ..conftest import clean_env as clean_env
from ..conftest import metric as metric
from ..conftest import samples_of as samples_of

# Set in every scenario's URL; nothing we emit may ever contain it.
SECRET = "Hunter2-XyZZy-91c5"
USER = "app"
DB = "app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if found:
        return found[-1]
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"PostgreSQL server binary {tool!r} not installed")
    return path


@dataclass
class Cluster:
    """One throwaway PostgreSQL server on 127.0.0.1, started and stopped by the suite."""

    root: Path
    port: int
    as_postgres: bool
    starts: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)

    def init(self) -> None:
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o", opts, "start")
        self.starts += 1

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, *, app: str | None = None, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{USER}:{SECRET}@127.0.0.1:{self.port}/{DB}"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pool_name(self) -> str:
        return f"127.0.0.1:{self.port}/{DB}"

    async def admin(self, sql: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def backends(self, app: str) -> list[int]:
        rows = await self.admin(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()", app
        )
        return [r["pid"] for r in rows]

    async def terminate(self, pids: list[int]) -> None:
        """pg_terminate_backend each pid and wait until the server has really dropped them."""
        for pid in pids:
            rows = await self.admin("SELECT pg_terminate_backend($1) AS ok", pid)
            assert rows[0]["ok"] is True
        for _ in range(500):
            rows = await self.admin("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids)
            if rows[0]["n"] == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"backends {pids} still alive")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A fresh PostgreSQL cluster for the whole run, on its own port, torn down at the end."""
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="pool-exporter-pg-"))
    if as_postgres:
        shutil.chown(root, user="postgres")
    c = Cluster(root, free_port(), as_postgres)
    try:
        c.init()
        c.start()
        asyncio.run(_bootstrap(c))
        yield c
    finally:
        if c.running():
            with contextlib.suppress(Exception):
                c.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


async def _bootstrap(c: Cluster) -> None:
    conn = await asyncpg.connect(c.admin_dsn)
    try:
        await conn.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{SECRET}'")
        await conn.execute(f"CREATE DATABASE {DB} OWNER {USER}")
    finally:
        await conn.close()


@pytest.fixture
def live_cluster(cluster: Cluster) -> Cluster:
    """The cluster, started again if an earlier test left it stopped."""
    if not cluster.running():
        cluster.start()
    return cluster


# -- engines ---------------------------------------------------------------------------------------

_apps = itertools.count(1)


@pytest.fixture
async def make_engine(live_cluster: Cluster) -> AsyncIterator[Callable[..., tuple[AsyncEngine, str]]]:
    """asyncpg engines on the cluster whose connections carry a unique application_name."""
    made: list[AsyncEngine] = []

    def make(url: str | None = None, **kwargs: Any) -> tuple[AsyncEngine, str]:
        app = f"rel_{os.getpid()}_{next(_apps)}"
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault("server_settings", {})["application_name"] = app
        engine = create_async_engine(url or live_cluster.url(), connect_args=connect_args, **kwargs)
        made.append(engine)
        return engine, app

    yield make
    for engine in made:
        pool_exporter.uninstrument(engine)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(engine.dispose(), 10)


# -- what really happened --------------------------------------------------------------------------


@dataclass
class Witness:
    """A second, trivially simple listener set: SQLAlchemy's own events, counted with no logic."""

    events: Counter[str] = field(default_factory=Counter)

    def attach(self, engine: AsyncEngine) -> Witness:
        sync = engine.sync_engine
        for name in ("checkout", "checkin", "connect", "close", "close_detached", "detach", "invalidate"):
            event.listen(sync, name, self._counter(name))
        event.listen(sync, "soft_invalidate", self._counter("soft_invalidate"))
        event.listen(sync, "handle_error", self._on_error)
        return self

    def _counter(self, name: str) -> Callable[..., None]:
        def count(*args: Any) -> None:
            self.events[name] += 1

        return count

    def _on_error(self, ctx: Any) -> None:
        if ctx.is_disconnect:
            self.events["disconnect_pre_ping" if ctx.is_pre_ping else "disconnect"] += 1


@pytest.fixture
def witness() -> Callable[[AsyncEngine], Witness]:
    return lambda engine: Witness().attach(engine)


def error_class(exc: BaseException) -> str:
    """The error label an operator should see for what the app caught.

    SQLAlchemy wraps DBAPI errors after the pool (unwrap `.orig`); the asyncpg adapter raises a bare
    `Error` for server errors it has no class for, chained to the driver's own (use that one).
    """
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    if type(exc).__name__ == "Error" and exc.__cause__ is not None:
        exc = exc.__cause__
    return type(exc).__name__


@pytest.fixture
def unwrap() -> Callable[[BaseException], str]:
    return error_class


async def assert_at_rest(
    handle: pool_exporter.PoolHandle, registry: CollectorRegistry, cluster: Cluster, app: str
) -> None:
    """Nothing held, gauges at zero, and the open-connection count equal to the server's own count."""
    assert handle.stats.waiting == []
    assert handle.stats.checkouts == {}
    name = handle.name
    assert sample(registry, "sqlalchemy_pool_connections", pool=name, state="used") == 0
    assert sample(registry, "sqlalchemy_pool_pending_requests", pool=name) == 0
    assert sample(registry, "sqlalchemy_pool_oldest_pending_seconds", pool=name) == 0
    assert sample(registry, "sqlalchemy_pool_oldest_checkout_seconds", pool=name) == 0
    assert sample(registry, "sqlalchemy_pool_overflow_connections", pool=name) == 0
    idle = sample(registry, "sqlalchemy_pool_connections", pool=name, state="idle")
    created = sample(registry, "sqlalchemy_pool_connections_created_total", pool=name)
    closed = sample(registry, "sqlalchemy_pool_connections_closed_total", pool=name)
    assert created is not None and closed is not None and idle is not None
    assert created - closed == idle, (created, closed, idle)
    # The server's count is the final word on what is open.
    for _ in range(200):
        if len(await cluster.backends(app)) == idle:
            break
        await asyncio.sleep(0.01)
    assert len(await cluster.backends(app)) == idle


@pytest.fixture
def at_rest() -> Callable[..., Any]:
    return assert_at_rest


# -- secrets: every byte we emit is scanned -------------------------------------------------------


class _AllFields(logging.Formatter):
    """Render a record with every structured field and the traceback, so a secret cannot hide."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _PLAIN}
        return f"{text} {json.dumps(extras, default=repr)}"


_PLAIN = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


@dataclass
class Emitted:
    """Everything the exporter produced during one test: log lines, pages, scrapes."""

    chunks: list[bytes] = field(default_factory=list)

    def add(self, data: bytes | str) -> None:
        self.chunks.append(data.encode() if isinstance(data, str) else data)


@pytest.fixture(autouse=True)
def emitted(request: pytest.FixtureRequest) -> Iterator[Emitted]:
    """Capture the exporter's logs at DEBUG; after the test, no emitted byte may hold the password."""
    out = Emitted()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(_AllFields("%(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("sqlalchemy_pool_exporter")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    out.add(stream.getvalue())
    for handle in pool_exporter.handles():
        out.add(json.dumps(handle.snapshot(), default=repr))
        out.add(generate_latest(handle.registry))
    hits = [c for c in out.chunks if SECRET.encode() in c or SECRET.encode().hex().encode() in c]
    assert not hits, f"the database password leaked into emitted output: {hits[0][:2000]!r}"


@pytest.fixture
def secret() -> str:
    return SECRET


# -- scraping while faults happen -----------------------------------------------------------------


@dataclass
class Scrapes:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serving(exporter: Exporter, **kwargs: Any) -> AsyncIterator[str]:
    """The exporter's own aiohttp app (sqlalchemy_pool_exporter.web.app) on 127.0.0.1, a free port; yields its URL."""
    from sqlalchemy_pool_exporter.web import app as web

    server = web.Server(web.make_app(exporter, **kwargs), "127.0.0.1", 0)
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()


@pytest.fixture
def serve() -> Callable[..., Any]:
    """`async with serve(exporter, **make_app_kwargs) as base_url:`"""
    return serving


@pytest.fixture
def scrape_loop(emitted: Emitted) -> Callable[..., Any]:
    """`async with scrape_loop(exporter) as s:` serves its pools and GETs /metrics every 20 ms meanwhile."""

    @contextlib.asynccontextmanager
    async def loop(exporter: Exporter, every: float = 0.02) -> AsyncIterator[Scrapes]:
        import aiohttp

        result = Scrapes()
        stop = asyncio.Event()
        async with serving(exporter) as base, aiohttp.ClientSession() as http:

            async def run() -> None:
                while not stop.is_set():
                    try:
                        async with http.get(base + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                            body = await r.read()
                        assert r.status == 200, r.status
                        assert b"sqlalchemy_pool_connections" in body
                        result.ok += 1
                        emitted.add(body)
                    except Exception as exc:
                        result.failed += 1
                        result.errors.append(repr(exc))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), every)

            task = asyncio.create_task(run())
            try:
                yield result
            finally:
                stop.set()
                await task

    return loop


_OURS = str(Path(pool_exporter.__file__).parent)


def is_raised_by_us(exc: BaseException) -> bool:
    """Whether an exception (or one it chains) was raised inside the exporter's own code.

    Our pool wrapper re-raises what the pool raised, so the frame that matters is the innermost.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        tb = e.__traceback__
        last = None
        while tb is not None:
            last = tb
            tb = tb.tb_next
        if last is not None and last.tb_frame.f_code.co_filename.startswith(_OURS):
            return True
        todo += [e.__cause__, e.__context__]
    return False


@pytest.fixture
def raised_by_us() -> Callable[[BaseException], bool]:
    return is_raised_by_us


# -- the sidecar over a hostile multiprocess directory --------------------------------------------


@dataclass
class MpWorkers:
    """Real instrumented worker processes writing one multiprocess directory (pool `app`, SQLite)."""

    directory: Path
    tmp: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, commits: int, held: int) -> subprocess.Popen[str]:
        """A worker that commits `commits` times, then holds `held` connections: commits + held checkouts."""
        script = self.tmp / "mp_worker.py"
        script.write_text(MP_WORKER)
        proc = subprocess.Popen(
            [sys.executable, str(script), str(commits), str(held), str(self.tmp / "app.sqlite")],
            env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(self.directory)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def ready(*procs: subprocess.Popen[str]) -> None:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


@pytest.fixture
def mp_workers(tmp_path: Path) -> Iterator[MpWorkers]:
    directory = tmp_path / "mp"
    directory.mkdir()
    workers = MpWorkers(directory, tmp_path)
    yield workers
    workers.close()


# Address space for a `serve` under test: far above its needs (~0.5 GB of it), far below what a
# file that makes it read gigabytes needs, so a regression fails the test, not the shared machine.
SERVE_ADDRESS_SPACE = 2 << 30


@dataclass
class Serve:
    """A real `python -m sqlalchemy_pool_exporter serve` over a directory, on a free port of 127.0.0.1."""

    proc: subprocess.Popen[bytes]
    log: Path
    base: str = ""
    maxrss_kb: int = 0

    @classmethod
    def start(cls, directory: Path, tmp: Path, *, cwd: Path | None = None, wait: bool = True) -> Serve:
        log = tmp / f"serve-{next(_apps)}.log"

        def limit() -> None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (SERVE_ADDRESS_SPACE, SERVE_ADDRESS_SPACE))

        env = clean_env(
            PROMETHEUS_MULTIPROC_DIR=str(directory),
            POOL_EXPORTER_HOST="127.0.0.1",
            POOL_EXPORTER_PORT="0",
            POOL_EXPORTER_LOG_LEVEL="INFO",
        )
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sqlalchemy_pool_exporter", "serve"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                preexec_fn=limit,
            )
        serve = cls(proc, log)
        if wait:
            try:
                serve.wait_listening()
            except BaseException:  # a sidecar that never listened must not outlive the test
                proc.kill()
                proc.wait()
                raise
        return serve

    def wait_listening(self, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            m = re.search(r"(http://127\.0\.0\.1:\d+)/metrics", self.text())
            if m:
                self.base = m[1]
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"serve did not listen within {limit} s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def warnings(self, about: str = "") -> list[str]:
        return [line for line in self.text().splitlines() if " WARNING " in line and about in line]

    def stop(self, limit: float = 5.0) -> float:
        """SIGTERM; the seconds until it exited (its peak RSS in `maxrss_kb`); SIGKILL past `limit` + 10 s."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        while time.monotonic() - t0 < limit + 10:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.maxrss_kb = usage.ru_maxrss
                return time.monotonic() - t0
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        return float("inf")


@pytest.fixture
def serve_dir(tmp_path: Path, emitted: Emitted) -> Iterator[Callable[..., Serve]]:
    """`serve_dir(directory, **kw)` starts a Serve; whatever is left running is killed afterwards."""
    started: list[Serve] = []

    def start(directory: Path, **kwargs: Any) -> Serve:
        serve = Serve.start(directory, tmp_path, **kwargs)
        started.append(serve)
        return serve

    yield start
    for serve in started:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()
        emitted.add(serve.log.read_bytes())


async def get(base: str, path: str, timeout: float = 20.0) -> tuple[int, str]:
    """GET with a client timeout: a sidecar that hangs fails the test instead of hanging it."""
    import aiohttp

    timeouts = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=timeouts) as http, http.get(base + path) as r:
        return r.status, await r.text()
