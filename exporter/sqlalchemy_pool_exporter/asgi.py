"""/metrics as a plain ASGI app, to mount in a FastAPI or Starlette app: `app.mount("/metrics", metrics_app())`.

A thin adapter over exposition/response.py, the response the aiohttp route gives: the same bytes and
headers for the same request (text or OpenMetrics by `Accept`, gzip, `name[]`, HEAD, 405 for other
methods, the same bounds on what is read; the body is never read). No Starlette import: any ASGI
server or framework can call it.

No auth of its own, by decision: mounted, it answers whoever reaches the app's port, so put it behind
the app's own auth (an ASGI middleware wraps mounted apps; FastAPI route dependencies do not reach
them), or serve /metrics on a port of its own with `start_http_server(auth=...)`.

Rendering runs in a thread by default, so a scrape never holds up the app's event loop; with
several workers each worker answers for itself only (see the README: use the sidecar).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import Executor
from typing import Any

from prometheus_client import CollectorRegistry

from .core import Exporter, default_exporter
from .exposition.response import MetricsPage, Reply

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> str:
    """Every value of one header, joined with "," as aiohttp's getall() and our join read them."""
    return ",".join(v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == name)


class MetricsApp:
    """The ASGI callable `metrics_app()` returns."""

    def __init__(self, page: MetricsPage, *, offload: bool, executor: Executor | None) -> None:
        self.page = page
        self.offload = offload
        self.executor = executor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":  # served on its own: nothing to start or stop
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        method = scope.get("method", "GET")
        query = scope.get("query_string", b"")
        plan = self.page.plan(
            method,
            query.decode("latin-1") if isinstance(query, bytes) else str(query),
            _header(scope, b"accept"),
            _header(scope, b"accept-encoding"),
        )
        if isinstance(plan, Reply):
            reply = plan
        elif self.offload:
            reply = await self.page.render_shared(plan, self.executor)
        else:
            reply = self.page.render(plan)
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
        headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else reply.body})


def metrics_app(
    exporter: Exporter | None = None,
    *,
    registry: CollectorRegistry | None = None,
    offload: bool = True,
    executor: Executor | None = None,
) -> MetricsApp:
    """An ASGI app serving `exporter`'s registry (the default Exporter's) as /metrics, wherever it is mounted.

    `registry=` serves that registry instead (its other collectors included, as the aiohttp route
    does). With `offload`, the page is rendered in `executor` (the loop's default), and scrapes
    meanwhile share one render.
    """
    if exporter is None and registry is None:
        exporter = default_exporter()
    if registry is None:
        assert exporter is not None
        registry = exporter.registry
    collectors = [exporter.collector] if exporter is not None and exporter.registry is registry else []
    return MetricsApp(MetricsPage(registry, collectors), offload=offload, executor=executor)
