"""/metrics (and /pools) as plain WSGI apps, for sync apps: mount them in Flask, Django or any WSGI server.

A thin adapter over exposition/response.py, the response the aiohttp route and the ASGI app give: the
same bytes and headers for the same request (text or OpenMetrics by `Accept`, gzip, `name[]`, HEAD, 405
for other methods, the same bounds on what is read). `wsgi.input` is never read. The page renders on
the calling thread (the WSGI server's worker thread); nothing here needs asyncio.

No auth of its own, as metrics_app(): mounted, it answers whoever reaches the app, behind the app's own
auth. `web.start_wsgi_server()` serves the same apps on a port of their own, in a thread, with ours.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from .core import Exporter, default_exporter
from .exposition.response import METHODS, NOT_ALLOWED, MetricsPage, Reply
from .instrumentation.views import strict_json

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

JSON = "application/json; charset=utf-8"


def send(reply: Reply, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    """Answer `reply` through WSGI: its headers and Content-Length; no body for HEAD."""
    status = f"{reply.status} {HTTPStatus(reply.status).phrase}"
    start_response(status, [*reply.headers, ("Content-Length", str(len(reply.body)))])
    return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else reply.body]


class WSGIMetrics:
    """The WSGI callable `wsgi_metrics_app()` returns."""

    def __init__(self, page: MetricsPage) -> None:
        self.page = page

    def reply(self, environ: WSGIEnvironment) -> Reply:
        # WSGI servers give the raw query as latin-1 text and repeated headers joined with ",", as our
        # other adapters read them.
        plan = self.page.plan(
            environ.get("REQUEST_METHOD", "GET"),
            environ.get("QUERY_STRING", ""),
            environ.get("HTTP_ACCEPT", ""),
            environ.get("HTTP_ACCEPT_ENCODING", ""),
        )
        return plan if isinstance(plan, Reply) else self.page.render(plan)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return send(self.reply(environ), environ, start_response)


class WSGIPools:
    """The WSGI callable `wsgi_pools_app()` returns: /pools, the JSON the aiohttp server gives."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def reply(self, environ: WSGIEnvironment) -> Reply:
        if environ.get("REQUEST_METHOD", "GET") not in METHODS:
            return NOT_ALLOWED
        body = strict_json({"pools": [h.snapshot() for h in self.exporter.handles()]})
        return Reply(200, (("Content-Type", JSON),), body.encode())

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return send(self.reply(environ), environ, start_response)


def wsgi_metrics_app(exporter: Exporter | None = None, *, registry: CollectorRegistry | None = None) -> WSGIMetrics:
    """A WSGI app serving `exporter`'s registry (the default Exporter's) as /metrics, wherever it is mounted.

    `registry=` serves that registry instead (its other collectors included, as the aiohttp route does).
    """
    if exporter is None and registry is None:
        exporter = default_exporter()
    if registry is None:
        assert exporter is not None
        registry = exporter.registry
    collectors = [exporter.collector] if exporter is not None and exporter.registry is registry else []
    return WSGIMetrics(MetricsPage(registry, collectors))


def wsgi_pools_app(exporter: Exporter | None = None) -> WSGIPools:
    """A WSGI app serving /pools: each pool of `exporter` (the default Exporter) in this process, as JSON."""
    return WSGIPools(exporter if exporter is not None else default_exporter())
