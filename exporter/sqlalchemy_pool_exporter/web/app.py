"""The HTTP side: an aiohttp app (or routes on the user's app) serving /metrics, /healthz, /readyz, /pools and /.

/metrics is exposition/response.py's, the one response every server of ours gives (the ASGI app's
too): text/OpenMetrics negotiation, gzip, `name[]`; our pool collectors render through
exposition/render.py, in the same format as prometheus_client, at a fraction of the cost.
"""

from __future__ import annotations

import asyncio
import errno
import html
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from .. import _version, validation
from ..core import Exporter, default_exporter
from ..errors import Unavailable
from ..exposition.response import MetricsPage, Reply
from ..instrumentation import views
from ..instrumentation.views import strict_json
from .auth import Auth
from .connections import TLS, AcceptErrors, Guard, listen_backlog, request_error_logger, within_fd_limit
from .readyz import Check, Readiness, check_pool

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("sqlalchemy_pool_exporter.web")

PoolsSource = Callable[[], Awaitable[list[dict[str, Any]]]]
Refresh = Callable[[], Awaitable[object]]
Handler = Callable[[web.Request], Awaitable[web.Response]]


# -- what an exporter's routes serve ----------------------------------------------------------------


def pool_checks(exporter: Exporter) -> Callable[[], dict[str, Check]]:
    """One readiness check per pool of `exporter`: its database answers a connection of our own."""

    def checks() -> dict[str, Check]:
        return {f"pool {h.name}": (lambda h=h: check_pool(h)) for h in exporter.handles()}  # type: ignore[misc]

    return checks


def local_pools(exporter: Exporter) -> PoolsSource:
    """/pools and / for the pools of `exporter`, in this process."""

    async def pools() -> list[dict[str, Any]]:
        return [h.snapshot() for h in exporter.handles()]

    return pools


async def _no_pools() -> list[dict[str, Any]]:
    return []


# -- handlers -----------------------------------------------------------------------------------


def metrics_handler(
    registry: CollectorRegistry,
    executor: Executor | None = None,
    offload: bool = False,
    exporters: Sequence[Exporter] = (),
    refresh: Refresh | None = None,
) -> Handler:
    """/metrics as exposition/response.py answers it; in `offload` mode rendered off the event loop
    (equal scrapes meanwhile share one render). `refresh` is awaited before each render (the
    sidecar's merge, which its collector then yields)."""
    page = MetricsPage(registry, [e.collector for e in exporters if e.registry is registry])

    async def metrics(request: web.Request) -> web.Response:
        plan = page.plan(
            request.method,
            request.rel_url.raw_query_string,
            ",".join(request.headers.getall("Accept", [])),
            ",".join(request.headers.getall("Accept-Encoding", [])),
        )
        if isinstance(plan, Reply):
            reply = plan
        else:
            if refresh is not None:
                await refresh()
            reply = await page.render_shared(plan, executor) if offload else page.render(plan)
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    return metrics


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def readyz_handler(readiness: Readiness) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def readyz(request: web.Request) -> web.Response:
        ok, detail = await readiness.check()
        extra = readiness.details() if readiness.details is not None else {}
        return web.json_response({"ready": ok, "checks": detail, **extra}, status=200 if ok else 503)

    return readyz


def pools_handler(pools: PoolsSource) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def pools_json(request: web.Request) -> web.Response:
        return web.json_response({"pools": await pools()}, dumps=strict_json)

    return pools_json


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value else "0"
    return html.escape(str(value))


def _section(title: str, table: views.Table) -> str:
    head, body = table
    if not body:
        return ""
    cells = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in body)
    heads = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<h2>{html.escape(title)}</h2>\n<table><tr>{heads}</tr>{cells}</table>"


def index_handler(pools: PoolsSource, metrics_path: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def index(request: web.Request) -> web.Response:
        rows = await pools()
        head = "".join(f"<th>{html.escape(title)}</th>" for _, title in views.COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{_cell(row.get(key))}</td>" for key, _ in views.COLUMNS) + "</tr>" for row in rows
        )
        empty = "" if rows else f'<tr><td colspan="{len(views.COLUMNS)}">no instrumented pools yet</td></tr>'
        page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>SQLAlchemy pool exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}</style></head>
<body><h1>SQLAlchemy pool exporter {html.escape(_version.__version__)}</h1>
<table><tr>{head}</tr>{body}{empty}</table>
{_section("What should the pool size be?", views.sizing_table(rows))}
{_section("Connection budget", views.budget_table(rows))}
{_section("Who holds the pool", views.holder_table(rows))}
{_section("Checked out now, oldest first", views.checkout_table(rows))}
<p><a href="{html.escape(metrics_path)}">metrics</a> · <a href="/pools">pools (JSON)</a> ·
<a href="/readyz">readyz</a> · <a href="/healthz">healthz</a></p></body></html>
"""
        return web.Response(text=page, content_type="text/html")

    return index


def unavailable_as_503(handler: Handler) -> Handler:
    """A source that cannot answer now (the sidecar's merge past its deadline) is a 503 with its reason."""

    async def guarded(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except Unavailable as exc:
            return web.Response(status=503, text=f"{exc}\n")

    return guarded


# -- assembly -----------------------------------------------------------------------------------


def add_routes(
    app: web.Application,
    exporter: Exporter | None = None,
    *,
    registry: CollectorRegistry | None = None,
    metrics_path: str = "/metrics",
    pools: PoolsSource | None = None,
    readiness: Readiness | None = None,
    auth: Auth | None = None,
    offload: bool = True,
    executor: Executor | None = None,
    index: bool = True,
    refresh: Refresh | None = None,
) -> None:
    """Add the exporter's routes to an aiohttp app (yours or ours); `auth` guards all but /healthz.

    They serve `exporter`'s pools and registry (by default the default Exporter's, bound to
    prometheus_client.REGISTRY); pass `registry=` alone to serve a registry with no pools of this
    process (the sidecar), with `pools=` and `readiness=` of its own. `refresh`, awaited before each
    /metrics render, and `pools` may raise Unavailable: the request gets 503.
    """
    metrics_path = validation.metrics_path(metrics_path)
    if exporter is None and registry is None:
        exporter = default_exporter()
    if registry is None:
        assert exporter is not None
        registry = exporter.registry
    if pools is None:
        pools = local_pools(exporter) if exporter is not None else _no_pools
    if readiness is None:
        readiness = Readiness(pool_checks(exporter) if exporter is not None else dict)
    exporters = [exporter] if exporter is not None else []
    guard: Callable[[Any], Any] = auth.protect if auth is not None and auth.enabled else (lambda h: h)
    metrics = metrics_handler(registry, executor, offload, exporters, refresh)
    # Every method: the response decides (405 for all but GET and HEAD, as the ASGI app answers).
    app.router.add_route("*", metrics_path, guard(unavailable_as_503(metrics)))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", guard(readyz_handler(readiness)))
    app.router.add_get("/pools", guard(unavailable_as_503(pools_handler(pools))))
    if index:
        app.router.add_get("/", guard(unavailable_as_503(index_handler(pools, metrics_path))))


def make_app(
    exporter: Exporter | None = None,
    *,
    registry: CollectorRegistry | None = None,
    metrics_path: str = "/metrics",
    pools: PoolsSource | None = None,
    readiness: Readiness | None = None,
    auth: Auth | None = None,
    offload: bool = True,
    executor: Executor | None = None,
    refresh: Refresh | None = None,
) -> web.Application:
    """A standalone exporter app (see add_routes); with `auth`, all but /healthz (and 404s) need credentials."""
    middlewares = [auth.middleware()] if auth is not None and auth.enabled else []
    app = web.Application(middlewares=middlewares)
    add_routes(
        app,
        exporter,
        registry=registry,
        metrics_path=metrics_path,
        pools=pools,
        readiness=readiness,
        offload=offload,
        executor=executor,
        refresh=refresh,
    )
    return app


class Server:
    """Run an aiohttp app inside the current event loop: `await start()`, `await stop()`.

    Clients get `request_head_timeout` seconds to send each request head (and to finish a TLS
    handshake); at most `max_connections` connections stay open, idle ones closed first to make
    room (see connections.py). None turns either off. HTTPS with a fixed `ssl_context`, or with
    `tls`, called for each new connection (the web config file's certificates, reloaded).
    """

    def __init__(
        self,
        app: web.Application,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool | None = None,
        shutdown_timeout: float = 5.0,
        request_head_timeout: float | None = 5.0,
        max_connections: int | None = 200,
        tls: Callable[[], TLS] | None = None,
    ) -> None:
        if ssl_context is not None and tls is not None:
            raise ValueError("give ssl_context or tls, not both")
        self.app = app
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.tls = tls if ssl_context is None else (lambda: TLS(ssl_context))
        self.reuse_port = reuse_port
        self.shutdown_timeout = shutdown_timeout
        self.request_head_timeout = request_head_timeout
        self.max_connections = max_connections
        self.guard: Guard | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._accept_errors: AcceptErrors | None = None

    async def start(self) -> None:
        """Bind and serve without blocking; `port` is updated when 0 was asked."""
        loop = asyncio.get_running_loop()
        guard = Guard(
            head_timeout=self.request_head_timeout,
            max_connections=within_fd_limit(self.max_connections),
            tls=self.tls,
        )
        runner = web.AppRunner(
            self.app,
            access_log=logging.getLogger("aiohttp.access"),
            access_log_class=guard.access_log_class(),
            logger=request_error_logger(),
            shutdown_timeout=self.shutdown_timeout,
        )
        await runner.setup()
        assert runner.server is not None
        guard.attach(runner.server)
        # Our own listening socket rather than a TCPSite: every connection must go through the guard,
        # which also does TLS (per connection: see connections.py).
        try:
            server = await loop.create_server(
                guard, self.host, self.port, backlog=listen_backlog(), reuse_port=self.reuse_port
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._server, self.guard = runner, server, guard
        self._accept_errors = AcceptErrors.install(loop)
        if server.sockets:
            self.port = server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to shutdown_timeout), run cleanup hooks."""
        server, self._server = self._server, None
        runner, self._runner = self._runner, None
        accept_errors, self._accept_errors = self._accept_errors, None
        if server is not None:
            server.close()
        if self.guard is not None:
            self.guard.close()
        if runner is not None:
            await runner.cleanup()
        if accept_errors is not None:
            accept_errors.uninstall(asyncio.get_running_loop())


class PortInUse(OSError):
    """start_http_server() found its port taken: most often by another worker of the same app."""


def port_in_use(host: str, port: int) -> PortInUse:
    """The one clear error for a taken port, naming the usual cause and what to do instead."""
    return PortInUse(
        errno.EADDRINUSE,
        f"cannot serve /metrics on {host}:{port}: the address is already in use. With several workers "
        "(uvicorn --workers N, gunicorn -w N) each worker opening this port fails after the first: set "
        "PROMETHEUS_MULTIPROC_DIR and run `pool-exporter serve` beside them (the sidecar), or mount "
        "metrics_app() in the app (each worker then answers for itself only); see the README, Several workers",
    )


async def start_http_server(
    host: str = "127.0.0.1",
    port: int = 0,
    exporter: Exporter | None = None,
    *,
    metrics_path: str = "/metrics",
    auth: Auth | None = None,
    ssl_context: ssl.SSLContext | None = None,
    request_head_timeout: float | None = 5.0,
    max_connections: int | None = 200,
) -> Server:
    """The one-liner for a single-process asyncio app: serve `exporter`'s pools (default Exporter's) from its loop.

    A port already in use raises PortInUse (an OSError) with one message that says why it usually
    is (several workers each opening it) and what to do; no chained traceback.
    """
    app = make_app(exporter, metrics_path=metrics_path, auth=auth)
    server = Server(
        app,
        host,
        port,
        ssl_context=ssl_context,
        request_head_timeout=request_head_timeout,
        max_connections=max_connections,
    )
    try:
        await server.start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise port_in_use(host, port) from None
    return server
