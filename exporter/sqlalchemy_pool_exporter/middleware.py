"""Name the holder after the request's route template and method: `GET /orders/{order_id}`, never the raw path.

Two thin adapters over instrumentation/holders.py: an aiohttp middleware (aiohttp routes before middlewares run,
so the template is known at once) and an ASGI middleware for Starlette and FastAPI (they route
inside the app, after the middleware: the name is resolved at the request's first checkout, from
`scope["route"]`, which FastAPI sets when it matches and Starlette since 1.7). The name is the whole
template the URL matched: the prefixes of included and nested routers (FastAPI 0.137+ keeps them out
of the route itself: compat.included_route_template) and the path of every Mount above it
(`root_path`); checked on FastAPI 0.115.0-0.165.0 and Starlette 1.7.0-1.10.0 (docs/compatibility.md).
The client chooses the method and the path, so neither may choose a name: a request no route matched
is `(unmatched)` whatever its method, and a method is named as sent only when it is a standard one or
one the matched route declares, else `OTHER`. Random paths and forged methods (WebDAV's, or any token
h11 accepts) cannot use up `max_holders`: the routes the app declares keep their own names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from .compat import aiohttp_middleware, included_route_template
from .instrumentation.holders import holder, lazy_holder

if TYPE_CHECKING:  # importing the package loads no aiohttp: an ASGI app may not have it
    from aiohttp import web

UNMATCHED = "(unmatched)"
OTHER_METHOD = "OTHER"
# aiohttp's hdrs.METH_ANY: the method of a route added for any method.
METH_ANY = "*"
# RFC 9110's methods and PATCH: a request's method outside these (and its route's) is OTHER.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@aiohttp_middleware
async def holder_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp: connections acquired while handling a request are held by `METHOD /route/{template}`."""
    route = request.match_info.route
    resource = route.resource
    if resource is None:  # 404 and 405 alike
        name = UNMATCHED
    else:
        # A route's own method is the app's; a wildcard route's ("*") is whatever the client sent.
        method = route.method
        if method == METH_ANY:
            method = request.method if request.method in METHODS else OTHER_METHOD
        name = f"{method} {resource.canonical}"
    with holder(name):
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
            route = scope.get("route")
            template = included_route_template(scope, route) or getattr(route, "path_format", None)
            if not isinstance(template, str):
                return None  # not routed yet (or never): the fallback, until it is
            # Inside a Mount the route's template is relative to it; the mount's path went to root_path.
            root_path = scope.get("root_path", "")
            mount = root_path[len(base) :] if isinstance(root_path, str) and root_path.startswith(base) else ""
            declared = getattr(route, "methods", None)  # Starlette's Route: the methods the app gave it
            known = method in METHODS or (isinstance(declared, AbstractSet) and method in declared)
            return f"{method if known else OTHER_METHOD} {mount}{template}"

        with lazy_holder(resolve, UNMATCHED):
            await self.app(scope, receive, send)
