"""Name the holder after the request's route template and method: `GET /orders/{order_id}`, never the raw path.

Two thin adapters over instrumentation/holders.py: an aiohttp middleware (aiohttp routes before middlewares run,
so the template is known at once) and an ASGI middleware for Starlette and FastAPI (they route
inside the app, after the middleware: the name is resolved at the request's first checkout, from
`scope["route"]`, which Starlette sets when it matches; checked on Starlette 1.10 / FastAPI 0.165).
A request no route matched is `GET (unmatched)`: an attacker's random paths cannot grow the series.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiohttp import web

from .instrumentation.holders import holder, lazy_holder

UNMATCHED = "(unmatched)"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@web.middleware
async def holder_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp: connections acquired while handling a request are held by `METHOD /route/{template}`."""
    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else UNMATCHED
    with holder(f"{request.method} {template}"):
        return await handler(request)


class HolderMiddleware:
    """ASGI (Starlette, FastAPI): `app.add_middleware(HolderMiddleware)`, or wrap any ASGI app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        base = scope.get("root_path", "")

        def resolve() -> str | None:
            template = getattr(scope.get("route"), "path_format", None)
            if not isinstance(template, str):
                return None  # not routed yet (or never): the fallback, until it is
            # Inside a Mount the route's template is relative to it; the mount's path went to root_path.
            root_path = scope.get("root_path", "")
            mount = root_path[len(base) :] if isinstance(root_path, str) and root_path.startswith(base) else ""
            return f"{method} {mount}{template}"

        with lazy_holder(resolve, f"{method} {UNMATCHED}"):
            await self.app(scope, receive, send)
