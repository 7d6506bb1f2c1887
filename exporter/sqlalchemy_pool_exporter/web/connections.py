"""Client connections of our HTTP server: a deadline for each request head, a cap on open ones,
and accept() failures logged at a bounded rate.

Why: aiohttp sets no deadline for a request head, so a client that sends half a request (or nothing)
holds its descriptor for as long as it likes; once descriptors run out, scrapes wait in the listen
backlog while asyncio logs a traceback per failed accept() (up to `backlog` per loop tick).

Decided, in `Guard` (the listening socket's protocol factory):

- from opening, and from the first byte of each later request, a connection has `head_timeout`
  seconds to get a complete request head to the app, or it is aborted;
- at `max_connections`, a new connection first closes the oldest idle one (an idle Prometheus
  connection just reconnects); only when every one is busy with a request is it answered 503;
- with TLS, each connection is upgraded by `loop.start_tls()` with the TLS `Guard.tls` gives at that
  moment, so certificates reload without a restart (web/config/tls.py says why not
  `create_server(ssl=)`). A connection counts towards the cap from accept(), before its handshake,
  and the deadline covers the handshake: counted only once the handshake was done, 400 connections
  that never start one held every descriptor of a `ulimit -n 256` server (it could not read its own
  web config file). Refused at the cap, a TLS connection is just closed: a 503 in clear text means
  nothing to a TLS client, and a handshake to send it would cost what the cap is there to bound.

Any event loop: a transport is taken for what it does, not its class. uvloop's (uvicorn's default
loop whenever uvloop is installed) are not asyncio.Transport subclasses, nor even BaseTransport
ones; an isinstance check refused every connection under it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import ssl
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import HttpProcessingError
from aiohttp.web_log import AccessLogger

from .. import compat
from ..logs import Throttle

log = logging.getLogger("sqlalchemy_pool_exporter.web")

BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# What we and aiohttp's protocol call on a connection's transport.
_STREAM_METHODS = ("write", "close", "abort", "get_extra_info", "is_closing", "pause_reading", "resume_reading")


def stream_transport(transport: object) -> asyncio.Transport | None:
    """`transport` if it behaves as a stream transport, whatever its class (uvloop's are no asyncio.Transport)."""
    if all(callable(getattr(transport, method, None)) for method in _STREAM_METHODS):
        return cast(asyncio.Transport, transport)
    return None


# -- connections ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLS:
    """How a new connection's TLS handshake goes, and a check of the client's certificate after it."""

    context: ssl.SSLContext
    # Given the verified client certificate (`getpeercert()`, None if none was sent): let it in?
    accepts: Callable[[dict[str, Any] | None], bool] | None = None


class Guard:
    """The protocol factory for one listening server: head deadlines, the connection cap and TLS.

    `tls`, when given, is called for every new connection (and may raise: that connection is refused).
    """

    def __init__(
        self, *, head_timeout: float | None, max_connections: int | None, tls: Callable[[], TLS] | None = None
    ) -> None:
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self.tls = tls
        self._factory: Callable[[], asyncio.Protocol] | None = None
        self._hooked = False
        # Keyed by aiohttp's protocol (what a request knows), in accept order: oldest first.
        self._open: dict[asyncio.BaseProtocol, _Connection] = {}
        # TLS handshakes in progress: cancelled when the server stops.
        self._handshakes: set[asyncio.Task[None]] = set()
        self._stalled_log = Throttle()
        self._full_log = Throttle()
        self._tls_log = Throttle()

    def attach(self, server: Callable[[], asyncio.Protocol]) -> None:
        """Serve through aiohttp's protocol factory `server` (AppRunner.server, after setup())."""
        self._factory = server
        self._hooked = compat.wrap_request_handler(server, self._watch)
        if not self._hooked and self.head_timeout is not None:
            log.warning("this aiohttp version hides when a request head is complete: request_head_timeout is off")

    def access_log_class(self) -> type[AbstractAccessLogger]:
        """An AccessLogger that also reports "response written" (and logs only if its logger would)."""
        guard = self

        class Logger(AccessLogger):
            @property
            def enabled(self) -> bool:
                return True

            def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
                guard._finished(compat.request_protocol(request))
                if self.logger.isEnabledFor(logging.INFO):
                    super().log(request, response, time)

        return Logger

    def __call__(self) -> asyncio.Protocol:
        assert self._factory is not None, "attach() first"
        return _Connection(self, self._factory())

    def close(self) -> None:
        """Drop every pending deadline and handshake (the server is stopping; aiohttp closes the connections)."""
        for conn in self._open.values():
            conn.disarm()
        for task in self._handshakes:
            task.cancel()

    # -- called by connections and hooks --------------------------------------------------------

    def _watch(self, handler: compat.RequestHandler) -> compat.RequestHandler:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            conn = self._open.get(compat.request_protocol(request))
            if conn is not None:
                conn.started()
            return await handler(request)

        return handle

    def _finished(self, protocol: asyncio.BaseProtocol) -> None:
        conn = self._open.get(protocol)
        if conn is not None:
            conn.finished()

    def _admit(self, conn: _Connection) -> bool:
        if self.max_connections is not None and len(self._open) >= self.max_connections:
            idle = next((c for c in self._open.values() if not c.busy), None) if self._hooked else None
            if idle is None:
                self._log_full("answered a new connection 503")
                return False
            self._forget(idle)
            idle.abort()
            self._log_full("closed the oldest idle connection")
        self._open[conn.inner] = conn
        return True

    def _forget(self, conn: _Connection) -> None:
        self._open.pop(conn.inner, None)

    def _stalled(self) -> None:
        held = self._stalled_log.ready()
        if held is not None:
            log.info(
                "closed a connection that sent no complete request head within %g s%s",
                self.head_timeout,
                self._stalled_log.note(held),
            )

    def _handshake(self, conn: _Connection, transport: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(conn.handshake(transport))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _refused(self, why: str) -> None:
        held = self._tls_log.ready()
        if held is not None:
            log.warning("refused a TLS connection: %s%s", why, self._tls_log.note(held))

    def _log_full(self, what: str) -> None:
        held = self._full_log.ready()
        if held is not None:
            log.warning(
                "%d client connections open, the most allowed (max_http_connections): %s%s",
                self.max_connections,
                what,
                self._full_log.note(held),
            )


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, our deadline and busy flag around it."""

    def __init__(self, guard: Guard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.busy = False
        self._pipelined = False
        self._deadline: asyncio.TimerHandle | None = None
        # Between the end of the TLS handshake and our turn to run, the request may already arrive.
        self._handshaking = False
        self._early: list[bytes] = []
        self._early_eof = False
        # TLS bytes read before start_tls() took the transport over (uvloop reads at once, asyncio not).
        self._raw: list[bytes] = []
        self._tls_begun = False
        self._lost = False

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = stream_transport(base)
        if transport is None:  # a datagram or pipe transport: nothing an HTTP server can serve
            base.close()
            return
        self.transport = transport
        if not self.guard._admit(self):
            if self.guard.tls is None:
                transport.write(BUSY)
                transport.close()
            else:
                transport.abort()
            return
        self.arm()
        if self.guard.tls is not None:
            self._handshaking = True
            self.guard._handshake(self, transport)
            return
        self._open(transport)

    async def handshake(self, raw: asyncio.Transport) -> None:
        """TLS over `raw` with the TLS of this moment, then on as a plain connection would go."""
        assert self.guard.tls is not None
        try:
            tls = self.guard.tls()
        except Exception as exc:
            self.guard._refused(f"no usable TLS configuration: {exc}")
            self._drop(raw)
            return
        loop = asyncio.get_running_loop()
        upgrade = loop.create_task(
            loop.start_tls(raw, self, tls.context, server_side=True, ssl_handshake_timeout=self.guard.head_timeout)
        )
        # Runs right after the task's first step (call_soon is FIFO), which paused reading and made the TLS
        # protocol the transport's: before its connection_made() and the resumed reading.
        loop.call_soon(self._begun, raw)
        try:
            transport = await upgrade
        except asyncio.CancelledError:
            upgrade.cancel()
            raise
        except Exception:
            # The client's doing (no certificate, a stalled handshake...); start_tls closed it. asyncio
            # calls no connection_lost() for a connection lost mid-handshake: we forget it here.
            self._drop(raw)
            return
        transport = stream_transport(transport)
        if self._lost or transport is None:
            self._drop(raw)
            return
        if tls.accepts is not None and not tls.accepts(transport.get_extra_info("peercert")):
            self.guard._refused("the client certificate has none of client_allowed_sans")
            self.transport = transport
            self.abort()
            return
        self._handshaking = False
        self._open(transport)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)
        if self._early_eof:
            self.eof_received()

    def _begun(self, raw: asyncio.Transport) -> None:
        """From now on what reaches us is decrypted; the TLS bytes we read before go to the TLS protocol
        (its buffer keeps them for the handshake it starts next)."""
        self._tls_begun = True
        data, self._raw = b"".join(self._raw), []
        protocol = raw.get_protocol()
        if not data or protocol is self or raw.is_closing():
            return
        if isinstance(protocol, asyncio.Protocol):
            protocol.data_received(data)
            return
        view = memoryview(data)  # asyncio's and uvloop's SSLProtocol are buffered protocols
        while view:
            buffer = protocol.get_buffer(len(view))  # type: ignore[attr-defined]
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            protocol.buffer_updated(n)  # type: ignore[attr-defined]
            view = view[n:]

    def _open(self, transport: asyncio.Transport) -> None:
        """Hand the (admitted, now plain or decrypted) connection to aiohttp."""
        self.transport = transport
        self.admitted = True
        self.inner.connection_made(transport)

    def _drop(self, raw: asyncio.Transport) -> None:
        """A connection that never reached aiohttp: its slot and deadline go with it."""
        self._lost = True
        self.disarm()
        self.guard._forget(self)
        raw.abort()

    def data_received(self, data: bytes) -> None:
        if self._handshaking:
            if not self._tls_begun:  # the ClientHello, read before start_tls(): kept for it, no more read until then
                self._raw.append(data)
                if self.transport is not None:
                    self.transport.pause_reading()
                return
            self._early.append(data)
            return
        if not self.admitted:
            return
        if self.busy:
            # The next request, pipelined: its deadline starts when this one is done.
            self._pipelined = True
        elif self._deadline is None:
            self.arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._handshaking:
            self._early_eof = True
            return None
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.disarm()
        self.guard._forget(self)
        if self.admitted:
            self.inner.connection_lost(exc)

    # -- the deadline -----------------------------------------------------------------------------

    def started(self) -> None:
        self.busy = True
        self.disarm()

    def finished(self) -> None:
        self.busy = False
        if self._pipelined:
            self._pipelined = False
            self.arm()

    def arm(self) -> None:
        timeout = self.guard.head_timeout
        if timeout is None or self._deadline is not None or not self.guard._hooked:
            return
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._expired)

    def disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.busy:
            return
        self.guard._stalled()
        self.abort()

    def abort(self) -> None:
        # abort, not close: no TLS close_notify exchange to wait for, the descriptor goes now.
        self.disarm()
        if self.transport is not None:
            self.transport.abort()


# -- request errors -------------------------------------------------------------------------------

REQUEST_ERRORS = "sqlalchemy_pool_exporter.web.errors"


def request_error_logger() -> logging.Logger:
    """The logger for aiohttp's request errors (malformed requests, handler exceptions): ours, throttled.

    aiohttp logs every malformed request (a bad header byte, a cut request line) with its traceback
    at ERROR, to `aiohttp.server`: about 500 bytes of log per request any client can send. Ours
    keeps the first of each minute, traceback included, and counts the others, and never the bytes
    the client sent (ClientBytes).
    """
    logger = logging.getLogger(REQUEST_ERRORS)
    if not any(isinstance(f, Throttle) for f in logger.filters):
        logger.addFilter(Throttle())
    if not any(isinstance(f, ClientBytes) for f in logger.filters):
        logger.addFilter(ClientBytes())
    return logger


# From the first quote on, a parse error's message is the client's own bytes.
_QUOTED = re.compile(r"""\s*(?:\bb)?['"].*""", re.DOTALL)


class ClientBytes(logging.Filter):
    """A logged parse error keeps its traceback and its reason, not the request bytes it quotes.

    aiohttp's parser errors quote what they choked on: `LineTooLong` the first 100 bytes of the line
    (`b'Basic cHJvbTpz...'`, a password in base64), `BadHttpMessage` the whole header line; and
    aiohttp logs them, with their traceback, at ERROR. Chained exceptions are left out: they could
    quote the same bytes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = " ".join(_QUOTED.sub("", exc.message).split())
            cls = type(exc)
            record.exc_text = (
                "Traceback (most recent call last):\n"
                + "".join(traceback.format_tb(exc.__traceback__))
                + f"{cls.__module__}.{cls.__qualname__}: {exc.code}, {reason} (the request's bytes are not logged)"
            )
            record.exc_info = None
        return True


# -- accept() failures ----------------------------------------------------------------------------


class AcceptErrors:
    """A loop exception handler: accept() running out of descriptors or buffers is logged at most
    once a minute with a count; every other error goes on to the handler it replaced.

    asyncio reports each failed accept() through the loop's exception handler, with the traceback,
    up to `backlog` times per loop tick, for as long as the shortage lasts.
    """

    def __init__(self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None) -> None:
        self.previous = previous
        self.throttle = Throttle()
        self.users = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if "socket" in context and isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            held = self.throttle.ready()
            if held is not None:
                log.warning(
                    "cannot accept connections: %s; new ones wait in the backlog (retried every second)%s",
                    exc,
                    self.throttle.note(held),
                )
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

    @classmethod
    def install(cls, loop: asyncio.AbstractEventLoop) -> AcceptErrors:
        """Ours on `loop` (one per loop, shared by every Server on it)."""
        current = loop.get_exception_handler()
        handler = current if isinstance(current, AcceptErrors) else cls(current)
        handler.users += 1
        loop.set_exception_handler(handler)
        return handler

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        """Put the previous handler back once the last Server using this one stopped (if still ours)."""
        self.users -= 1
        if self.users <= 0 and loop.get_exception_handler() is self:
            loop.set_exception_handler(self.previous)


def _fd_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not Unix: no limit to read
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


BACKLOG = 128


def listen_backlog() -> int:
    """The listen backlog: BACKLOG, lowered to an eighth of the open-file limit if that is less.

    asyncio accepts up to `backlog` connections in one go, before any of them reaches the guard, and
    each one the guard admits at the cap aborts an idle one, whose descriptor comes back only on a
    later loop tick: at the cap, a burst holds cap + twice the backlog descriptors for a moment. With half
    the limit for the cap and an eighth for the burst, a quarter is left for the app (files, the web
    config, database connections). A quarter for the burst (128 + 64 + 64 = 256 at `ulimit -n 256`)
    ran out now and then under load: the web config file could not be opened for a TLS handshake.
    """
    soft = _fd_limit()
    return BACKLOG if soft is None else max(1, min(BACKLOG, soft // 8))


def within_fd_limit(max_connections: int | None) -> int | None:
    """`max_connections`, lowered to half the process's open-file limit if that is less.

    The cap must bite before descriptors run out; the other half is for the app (its database
    connections, the multiprocess files, the accept retry itself) and the accept burst (listen_backlog).
    """
    if max_connections is None:
        return None
    soft = _fd_limit()
    if soft is None:
        return max_connections
    if soft // 2 >= max_connections:
        return max_connections
    budget = max(1, soft // 2)
    log.info(
        "at most %d client connections, not %d: half the open-file limit (ulimit -n %d)", budget, max_connections, soft
    )
    return budget
