"""The long-running commands behind the CLI: `serve` (the sidecar) and `demo` (app + load + exporter)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from aiohttp.web import Application
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ..core import Exporter
from ..labels import safe_url
from ..web import app as web
from ..web.auth import Auth
from ..web.readyz import Readiness
from . import demo
from .loadgen import LoadGenerator, LoadPlan
from .settings import SettingError, Settings
from .startup import Startup

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..sidecar.checkouts import Held
    from ..sidecar.merge import Sidecar

log = logging.getLogger("sqlalchemy_pool_exporter")


class StartupError(RuntimeError):
    """Something outside the settings stopped us from starting (one printable line)."""


def auth_from(settings: Settings) -> Auth:
    return Auth(
        token=settings.auth_token.get_secret_value() if settings.auth_token else None,
        user=settings.basic_auth_user,
        password=settings.basic_auth_password.get_secret_value() if settings.basic_auth_password else None,
    )


def auth_headers(auth: Auth) -> dict[str, str]:
    """What our own load generator sends to get past `auth`."""
    import base64

    if auth.token is not None:
        return {"Authorization": f"Bearer {auth.token}"}
    if auth.user is not None and auth.password is not None:
        raw = base64.b64encode(f"{auth.user}:{auth.password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}
    return {}


def apply_web_config(app: Application, startup: Startup, auth: Auth) -> None:
    """The web config file's rate limit, users and headers on every request of `app`."""
    from ..web.config.policy import WebPolicy

    if startup.web_config is None:
        return
    for note in startup.notes:
        log.warning("web config file: %s", note)
    WebPolicy(startup.web_config, tls=startup.web_tls is not None, other_auth=auth.enabled).install(app)


async def listen(app: Application, settings: Settings, startup: Startup) -> web.Server:
    """Start serving `app` (over the TLS `startup` read); a bind failure is a bad host/port setting."""
    server = web.Server(
        app,
        settings.host,
        settings.port,
        ssl_context=startup.ssl_context,
        request_head_timeout=settings.request_head_timeout,
        max_connections=settings.max_http_connections,
        tls=startup.web_tls,
    )
    try:
        await server.start()
    except socket.gaierror as exc:
        raise SettingError("host", f"cannot resolve {settings.host!r}: {exc.strerror}") from None
    except OSError as exc:
        raise SettingError("port", f"cannot listen on {settings.host}:{server.port}: {exc.strerror}") from None
    return server


async def wait_for_stop(duration: float | None) -> None:
    """Until SIGTERM/SIGINT, or `duration` seconds."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- demo ---------------------------------------------------------------------------------------


async def _prepare_database(url: URL) -> None:
    engine = demo.create_engine(url)
    try:
        await demo.create_schema(engine)
    except Exception as exc:
        raise StartupError(f"cannot reach the database {safe_url(url)}: {type(exc).__name__}: {exc}") from None
    finally:
        await engine.dispose()


def _banner(
    out: TextIO, url: URL, base: str, settings: Settings, duration: float | None, workers: int, leak_threshold: float
) -> None:
    metrics_path = settings.metrics_path
    semconv = settings.names == "semconv"
    look_for = (
        "db_client_connection_(count|timeouts)|pool_checkouts" if semconv else "pool_(connections|timeouts|checkouts)"
    )
    lines = [
        f"pool-exporter demo: {safe_url(url)} (pool_size={demo.POOL_SIZE}, max_overflow={demo.MAX_OVERFLOW}, "
        f"pool_timeout={demo.POOL_TIMEOUT}s, leak_threshold={leak_threshold:g}s, "
        f"{workers} worker{'s' if workers > 1 else ''})",
        f"  overview  {base}/",
        f"  metrics   {base}{metrics_path}",
        f"  pools     {base}/pools",
        f"  try       curl -s {base}{metrics_path} | grep -E '{look_for}'",
        f"  holders   curl -s {base}{metrics_path} | grep pool_holder_",
        "  load      commits, rollbacks, slow transactions, a burst that exhausts the pool every 5 s,"
        " a leaked connection every 15 s,",
        f"            GET /demo/report holding its connection {demo.REPORT_HOLD:g} s through a slow external call"
        " (held too long)",
        f"  stopping  {'after ' + format(duration, 'g') + ' s' if duration else 'on Ctrl-C'}",
    ]
    print("\n".join(lines), file=out, flush=True)


async def run_demo(
    settings: Settings, startup: Startup, *, duration: float | None, workers: int = 1, out: TextIO = sys.stdout
) -> int:
    """The single-process demo, or `workers` app processes writing a multiprocess directory."""
    workdir = Path(tempfile.mkdtemp(prefix="pool-exporter-demo-"))
    try:
        url = demo.async_url(settings.url(), workdir)
        await _prepare_database(url)
        if workers > 1:
            return await _run_demo_workers(settings, startup, url, workdir, duration, workers, out)
        return await _run_demo_single(settings, startup, url, duration, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _demo_exporter(settings: Settings, multiprocess_dir: Path | None) -> Exporter:
    return Exporter(
        REGISTRY,
        namespace=settings.namespace,
        names=settings.names,
        buckets=settings.bucket_bounds(),
        max_holders=settings.max_holders,
        multiprocess_dir=multiprocess_dir,
        advice_window=settings.advice_window,
        advice_wait_probability=settings.advice_wait_probability,
    )


def _leak_threshold(settings: Settings) -> float:
    """The user's leak threshold, or the demo's: the report route holds its connection past it."""
    return demo.LEAK_THRESHOLD if settings.leak_threshold is None else settings.leak_threshold


def _worker_settings(settings: Settings) -> dict[str, str]:
    """What a demo worker needs of the parent's settings (given as flags or not), as its environment."""
    env = {
        "POOL_EXPORTER_NAMESPACE": settings.namespace,
        "POOL_EXPORTER_NAMES": settings.names,
        "POOL_EXPORTER_MAX_HOLDERS": str(settings.max_holders),
    }
    if settings.buckets:
        env["POOL_EXPORTER_BUCKETS"] = json.dumps(settings.buckets)
    if settings.leak_threshold is not None:
        env["POOL_EXPORTER_LEAK_THRESHOLD"] = repr(settings.leak_threshold)
    return env


def _instrument_demo(exporter: Exporter, engine: AsyncEngine, settings: Settings) -> None:
    # On PostgreSQL the demo shows what the database sees of its routes (the report route's idle transaction).
    exporter.instrument(
        engine,
        name=demo.POOL_NAME,
        leak_threshold=_leak_threshold(settings),
        server_view=engine.dialect.name == "postgresql",
        server_view_interval=2.0,
    )


async def _run_demo_single(settings: Settings, startup: Startup, url: URL, duration: float | None, out: TextIO) -> int:
    engine = demo.create_engine(url)
    exporter = _demo_exporter(settings, None)
    _instrument_demo(exporter, engine, settings)
    auth = auth_from(settings)
    app = web.make_app(exporter, metrics_path=settings.metrics_path, auth=auth)
    demo.add_demo_routes(app, engine)
    server = await listen(app, settings, startup)
    _banner(out, url, server.url, settings, duration, 1, _leak_threshold(settings))
    load = LoadGenerator(server.url, LoadPlan(), headers=auth_headers(auth))
    task = asyncio.create_task(load.run())
    try:
        await wait_for_stop(duration)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop()
        exporter.close()
        await engine.dispose()
    print(f"pool-exporter demo: stopped; requests by route and status: {dict(sorted(load.sent.items()))}", file=out)
    return 0


async def _run_demo_workers(
    settings: Settings,
    startup: Startup,
    url: URL,
    workdir: Path,
    duration: float | None,
    workers: int,
    out: TextIO,
) -> int:
    from ..sidecar.merge import Sidecar

    own_dir = settings.multiproc_dir is None
    directory = settings.multiproc_dir or workdir / "multiproc"
    directory.mkdir(exist_ok=True)
    app_port = free_port(settings.host)
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        # Through the environment, not argv: argv is visible to every user in `ps`.
        "POOL_EXPORTER_DATABASE_URL": url.render_as_string(hide_password=False),
        "POOL_EXPORTER_MULTIPROC_DIR": str(directory),
        # Flags are not passed on: the workers read these settings from their environment.
        **_worker_settings(settings),
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "sqlalchemy_pool_exporter", "demo", "--worker-process", "--app-port", str(app_port)],
            env=env,
        )
        for _ in range(workers)
    ]
    sidecar = Sidecar(directory, namespace=settings.namespace, advice_window=settings.advice_window)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(sidecar.view)
    app = web.make_app(
        registry=registry,
        metrics_path=settings.metrics_path,
        pools=sidecar.pools,
        readiness=_readiness(sidecar),
        auth=auth_from(settings),
        offload=True,
        refresh=sidecar.refresh,
    )
    try:
        server = await listen(app, settings, startup)
    except BaseException:
        _stop_children(children)
        raise
    _banner(out, url, server.url, settings, duration, workers, _leak_threshold(settings))
    print(f"  app       http://127.0.0.1:{app_port}/demo/items  (multiprocess dir {directory})", file=out, flush=True)
    try:
        await wait_for_stop(duration)
    finally:
        sidecar.close()
        await server.stop()
        await asyncio.to_thread(_stop_children, children)
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
    print("pool-exporter demo: stopped", file=out)
    return 0


def _stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def run_demo_worker(settings: Settings, app_port: int) -> int:
    """One app process of `demo --workers N`: serves the demo app and drives some load into it."""
    url = settings.url()
    assert url is not None, "the parent passes the database URL"
    engine = demo.create_engine(url)
    # PROMETHEUS_MULTIPROC_DIR is set by the parent, before prometheus_client was imported.
    exporter = _demo_exporter(settings, settings.multiproc_dir)
    _instrument_demo(exporter, engine, settings)
    app = Application()
    demo.add_demo_routes(app, engine)
    server = web.Server(app, "127.0.0.1", app_port, reuse_port=True)
    await server.start()
    load = LoadGenerator(server.url, LoadPlan(loops=2))
    task = asyncio.create_task(load.run())
    parent = os.getppid()
    orphaned = asyncio.create_task(_until_orphaned(parent))
    try:
        stop = asyncio.create_task(wait_for_stop(None))
        await asyncio.wait({stop, orphaned}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
    finally:
        orphaned.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop()
        exporter.close()
        await engine.dispose()
    return 0


async def _until_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        await asyncio.sleep(1.0)


# -- serve --------------------------------------------------------------------------------------


async def _no_pools() -> list[dict[str, object]]:
    return []


def _readiness(sidecar: Sidecar) -> Readiness:
    """Ready when the directory merges (a shared merge), with the files it quarantined of late."""
    return Readiness(sidecar.checks, timeout=sidecar.deadline + 1.0, details=sidecar.details)


def _checkouts_of(sidecar: Sidecar) -> Callable[[], Awaitable[list[Held]]]:
    """The workers' checkouts, read on the sidecar's own thread (between merges, never on the loop)."""

    async def read() -> list[Held]:
        return await asyncio.wrap_future(sidecar.executor.submit(sidecar.checkouts))

    return read


async def run_serve(settings: Settings, startup: Startup) -> int:
    """The sidecar: merged multiprocess metrics and/or PostgreSQL's view, until SIGTERM/SIGINT."""
    from ..sidecar.merge import Sidecar
    from .pgview import ServerView

    url = settings.url()
    if settings.multiproc_dir is None and url is None:
        raise SettingError(
            "multiproc_dir",
            "not set: serve needs a multiprocess directory (or PROMETHEUS_MULTIPROC_DIR), or a database_url",
        )
    if url is not None and url.get_backend_name() != "postgresql":
        raise SettingError("database_url", f"the server view needs PostgreSQL, not {url.get_backend_name()}")
    registry = CollectorRegistry()
    sidecar = (
        Sidecar(settings.multiproc_dir, namespace=settings.namespace, advice_window=settings.advice_window)
        if settings.multiproc_dir
        else None
    )
    view = (
        ServerView(
            url,
            namespace=settings.namespace,
            interval=settings.probe_interval,
            databases=settings.server_view_databases,
            checkouts=_checkouts_of(sidecar) if sidecar is not None else None,
        )
        if url
        else None
    )
    if sidecar is not None and view is not None:
        # The server view joins the workers' checkouts itself: its holder series replace the workers'.
        sidecar.joined = view.joined
        sidecar.checkouts_now = view.checkouts_now  # /pools and /: each checkout as the server sees it
    if sidecar is not None:
        # /metrics awaits sidecar.refresh, the merge it shares with /pools, / and /readyz, then renders
        # its result: nothing merges twice, and no render waits behind a merge.
        registry.register(sidecar.view)
    if view is not None:
        registry.register(view)
        await view.start()
        if sidecar is not None:
            sidecar.server_limit = view.server_limit  # /pools: this pod's share of the server's limit
    auth = auth_from(settings)
    app = web.make_app(
        registry=registry,
        metrics_path=settings.metrics_path,
        pools=sidecar.pools if sidecar is not None else _no_pools,
        readiness=_readiness(sidecar) if sidecar is not None else Readiness(dict),
        auth=auth,
        offload=True,
        refresh=sidecar.refresh if sidecar is not None else None,
    )
    try:
        apply_web_config(app, startup, auth)
        server = await listen(app, settings, startup)
        log.info(
            "pool-exporter serve: %s%s (multiprocess dir: %s; server view: %s)",
            server.url,
            settings.metrics_path,
            settings.multiproc_dir or "none",
            safe_url(url) if url is not None else "off",
        )
        try:
            await wait_for_stop(None)
        finally:
            log.info("pool-exporter serve: stopping")
            if sidecar is not None:
                sidecar.close()  # first: a merge in flight stops, its requests get their 503 now
            await server.stop()
    finally:
        if view is not None:
            await view.stop()
        if sidecar is not None:
            sidecar.close()
    return 0
