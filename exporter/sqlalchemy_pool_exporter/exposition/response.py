"""The one /metrics response of every server we offer: a request's pieces in, status, headers and body out.

The aiohttp route (web/app.py) and the ASGI app (asgi.py) are thin adapters over `MetricsPage`, so
the same request gets the same bytes and headers from either: the format negotiated from `Accept`
(prometheus_client's `choose_encoder`, made safe), gzip when `Accept-Encoding` takes it (done here,
not by a framework, so that every server compresses alike), `name[]` filters, GET and HEAD only.
What it reads is bounded as aiohttp bounds a request line and a header field (8190 bytes); a
request body is never read.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest, gzip_accepted

from .collector import PoolCollector
from .render import Exposition

# aiohttp's own limits on a request line and on one header field: a longer query or Accept header
# never reaches its handler, nor ours.
MAX_QUERY = 8190
MAX_HEADER = 8190
METHODS = ("GET", "HEAD")
# zlib's default level, what aiohttp compressed with: a 20-pool page shrinks about 12 times.
GZIP_LEVEL = 6

_VERSION = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6}){0,3}")


@dataclass(frozen=True, slots=True)
class Reply:
    """What to answer: for HEAD the adapter sends the headers (Content-Length of `body`) and no body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _plain(status: int, text: str, *extra: tuple[str, str]) -> Reply:
    return Reply(status, (("Content-Type", "text/plain; charset=utf-8"), *extra), text.encode())


NOT_ALLOWED = _plain(405, "405: Method Not Allowed", ("Allow", "GET, HEAD"))
QUERY_TOO_LONG = _plain(414, "414: query string too long")
HEADER_TOO_LONG = _plain(431, "431: Accept or Accept-Encoding header too long")


class Render(NamedTuple):
    """A negotiated render; two concurrent requests with the same `key` share one."""

    encoder: Callable[[Any], bytes]
    content_type: str
    names: tuple[str, ...]
    gzip: bool

    @property
    def key(self) -> tuple[str, tuple[str, ...], bool]:
        # Not the encoder: choose_encoder makes a new partial for each request.
        return self.content_type, self.names, self.gzip


def negotiate(accept: str) -> tuple[Callable[[Any], bytes], str]:
    """prometheus_client's `choose_encoder`, made safe for any Accept header.

    It raises on a `version=` that is not dotted numbers (`abc`, `1.x`) and copies the version it
    accepted into our Content-Type. A media range with such a version is skipped, and anything else
    going wrong means the classic text format, which is what Prometheus falls back to as well.
    """
    ranges = [r for r in accept.split(",") if _sane_media_range(r)]
    try:
        encoder, content_type = choose_encoder(",".join(ranges))
    except Exception:
        return generate_latest, CONTENT_TYPE_PLAIN_0_0_4
    if not (content_type.isascii() and content_type.isprintable()):
        return generate_latest, CONTENT_TYPE_PLAIN_0_0_4
    return encoder, content_type


def _sane_media_range(media_range: str) -> bool:
    if not (media_range.isascii() and media_range.isprintable()):
        return False
    for param in media_range.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key == "version" and not _VERSION.fullmatch(value):
            return False
    return True


def names_of(query: str) -> tuple[str, ...]:
    """The `name[]` values of a raw query string, in order (percent-decoded, `+` a space)."""
    return tuple(v for k, v in parse_qsl(query, keep_blank_values=True) if k == "name[]")


class MetricsPage:
    """/metrics for a registry: `plan()` a request, then `render()` it here or `render_shared()` off the loop.

    Off the loop, requests that arrive while an equal render is running share its result (gzip
    included), so a burst of scrapers costs one render, not one each.
    """

    def __init__(self, registry: CollectorRegistry, collectors: Sequence[PoolCollector] = ()) -> None:
        self.exposition = Exposition(registry, collectors)
        self._inflight: dict[tuple[str, tuple[str, ...], bool], asyncio.Future[Reply]] = {}

    def plan(self, method: str, query: str, accept: str, accept_encoding: str) -> Reply | Render:
        """A request's method, raw query string and Accept/Accept-Encoding values (each joined with ","):
        the Reply at once when it is refused, else what to render."""
        if method not in METHODS:
            return NOT_ALLOWED
        if len(query) > MAX_QUERY:
            return QUERY_TOO_LONG
        if len(accept) > MAX_HEADER or len(accept_encoding) > MAX_HEADER:
            return HEADER_TOO_LONG
        encoder, content_type = negotiate(accept)
        return Render(encoder, content_type, names_of(query), gzip_accepted(accept_encoding))

    def render(self, job: Render) -> Reply:
        """Render now, on this thread."""
        body = self.exposition.render(job.encoder, job.names)
        if not job.gzip:
            return Reply(200, (("Content-Type", job.content_type),), body)
        # gzip only, as prometheus_client's own servers do; mtime 0 in the header: equal pages, equal bytes.
        packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        packed = packer.compress(body) + packer.flush()
        return Reply(200, (("Content-Type", job.content_type), ("Content-Encoding", "gzip")), packed)

    async def render_shared(self, job: Render, executor: Executor | None = None) -> Reply:
        """Render in `executor` (the loop's default if None), sharing a render already running for an equal job."""
        key = job.key
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(executor, self.render, job)
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)
