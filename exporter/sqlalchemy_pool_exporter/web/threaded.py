"""/metrics for sync apps without asyncio: the WSGI apps of wsgi.py served from daemon threads.

`start_wsgi_server(host, port)` serves /metrics, /pools and /healthz on a port of its own, with the
aiohttp server's auth (a bearer token, basic credentials) and its request-head limits, enforced here:

- a connection gets `request_head_timeout` seconds, in all, to finish its TLS handshake and send a
  complete request head (a deadline, not a per-read timeout: a client dribbling a byte at a time is
  closed as surely as one that sends nothing), then WRITE_TIMEOUT to take the response;
- the request line and each header line are at most MAX_LINE bytes (aiohttp's 8190; beyond: 414 and
  431), the whole head MAX_HEAD and MAX_FIELDS lines (431); the body is never read;
- at most `max_connections` connections at once, one thread each (beyond: 503, or closed under TLS).

One request per connection (`Connection: close`), as prometheus_client's own wsgiref server: so no
connection sits idle holding a thread, and a scrape every 15 s pays one TCP connect. TLS takes a fixed
`ssl_context`; the web config file (reloaded certificates, bcrypt users, rate limit) is the aiohttp
server's (`pool-exporter serve`, or `start_http_server` in an asyncio app), because its bcrypt checks
and reloads are built on the event loop.
"""

from __future__ import annotations

import errno
import io
import logging
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from .. import validation
from ..core import Exporter, default_exporter
from ..exposition.response import Reply
from ..logs import Throttle
from ..wsgi import send, wsgi_metrics_app, wsgi_pools_app
from .app import port_in_use
from .auth import CHALLENGE_TEXT, EXEMPT, Auth
from .connections import BUSY, listen_backlog, within_fd_limit

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("sqlalchemy_pool_exporter.web")

MAX_LINE = 8190  # aiohttp's max_line_size and max_field_size
MAX_HEAD = 65536
MAX_FIELDS = 100  # http.client's own limit on header lines
WRITE_TIMEOUT = 30.0
# After the response: what a client still sends (a body we did not read) is read and dropped, at most
# this much for at most this long, so that closing does not reset the connection before it read the answer.
LINGER_BYTES = 65536
LINGER_SECONDS = 1.0
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_PLAIN = "text/plain; charset=utf-8"


def _plain(status: int, text: str) -> Reply:
    return Reply(status, (("Content-Type", _PLAIN),), text.encode())


BAD_REQUEST = _plain(400, "400: Bad Request")
LINE_TOO_LONG = _plain(414, "414: request line too long")
HEAD_TOO_LONG = _plain(431, "431: request header fields too large")
BAD_VERSION = _plain(505, "505: HTTP Version Not Supported")
NOT_FOUND = _plain(404, "404: Not Found")
FAILED = _plain(500, "500: Internal Server Error")
OK = _plain(200, "ok\n")


class _Refused(Exception):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply


class _Gone(Exception):
    """The client sent nothing usable in time, or left: close without an answer."""


# -- the request head ---------------------------------------------------------------------------


def read_head(sock: socket.socket, deadline: float | None) -> bytes:
    """The request head (up to its blank line, excluded), read within `deadline`; _Refused past a bound."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end])
            _check_lines(head.split(b"\r\n"))
            return head
        _check_lines(bytes(buf).split(b"\r\n"))
        if len(buf) > MAX_HEAD:
            raise _Refused(HEAD_TOO_LONG)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Gone
            sock.settimeout(left)
        try:
            chunk = sock.recv(16384)
        except (TimeoutError, OSError):
            raise _Gone from None
        if not chunk:
            raise _Gone
        buf += chunk


def _check_lines(lines: list[bytes]) -> None:
    # A line still being read counts too: a bound is a bound before its end arrives.
    if len(lines[0]) > MAX_LINE:
        raise _Refused(LINE_TOO_LONG)
    if len(lines) > MAX_FIELDS + 1 or any(len(line) > MAX_LINE for line in lines[1:]):
        raise _Refused(HEAD_TOO_LONG)


def environ_of(head: bytes, host: str, port: int, client: tuple[Any, ...], scheme: str) -> WSGIEnvironment:
    """PEP 3333's environ for a request head; _Refused when it is malformed. No body is offered."""
    request_line, *fields = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN or not parts[1].startswith(b"/"):
        raise _Refused(BAD_REQUEST)
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _Refused(BAD_VERSION if version.startswith(b"HTTP/") else BAD_REQUEST)
    if any(b < 0x21 or b == 0x7F for b in target):
        raise _Refused(BAD_REQUEST)
    path, _, query = target.partition(b"?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method.decode("ascii"),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": host,
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": version.decode("ascii"),
        "REMOTE_ADDR": str(client[0]) if client else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for field in fields:
        name, sep, value = field.partition(b":")
        # No obs-fold, no space before the colon, no control bytes in a value: each is a classic smuggling tool.
        if not sep or not name or not set(name) <= _TOKEN or any((b < 0x20 and b != 0x09) or b == 0x7F for b in value):
            raise _Refused(BAD_REQUEST)
        key = name.decode("ascii").upper().replace("-", "_")
        key = key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"
        text = value.strip(b" \t").decode("latin-1")
        # Repeated fields joined with ",", as aiohttp's getall() and other WSGI servers give them.
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    return environ


# -- the apps ------------------------------------------------------------------------------------


def routes(exporter: Exporter, metrics_path: str, auth: Auth | None) -> WSGIApplication:
    """/metrics (at `metrics_path`), /pools and /healthz as one WSGI app; `auth` guards all but /healthz."""
    table: dict[str, Any] = {
        metrics_path: wsgi_metrics_app(exporter),
        "/pools": wsgi_pools_app(exporter),
    }
    guarded = auth is not None and auth.enabled

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return send(OK, environ, start_response)
        if guarded and path not in EXEMPT:
            assert auth is not None
            # Back to the bytes sent, then as aiohttp hands a header over (UTF-8, surrogateescape).
            raw = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1")
            if not auth.allows_header(raw.decode("utf-8", "surrogateescape")):
                auth.log_rejection(path, environ.get("REMOTE_ADDR"), "HTTP_AUTHORIZATION" in environ)
                challenge = Reply(
                    401,
                    (("Content-Type", _PLAIN), ("WWW-Authenticate", auth.www_authenticate)),
                    CHALLENGE_TEXT.encode(),
                )
                return send(challenge, environ, start_response)
        target = table.get(path)
        if target is None:
            return send(NOT_FOUND, environ, start_response)
        result: Iterable[bytes] = target(environ, start_response)
        return result

    return app


# -- the server ----------------------------------------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    server: _Listener

    def handle(self) -> None:
        owner = self.server.owner
        sock: socket.socket = self.request
        timeout = owner.request_head_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if owner.ssl_context is not None:
                # The socket timeout bounds the whole handshake (CPython counts it as one deadline).
                sock.settimeout(timeout)
                sock = owner.ssl_context.wrap_socket(sock, server_side=True)
            try:
                head = read_head(sock, deadline)
                environ = environ_of(head, owner.host, owner.port, self.client_address, owner.scheme)
            except _Refused as refused:
                self._write(sock, refused.reply, sized=False)
                return
            self._write(sock, *self._call(environ))
        except _Gone:
            owner._stalled()
        except (OSError, ssl.SSLError, ValueError):
            pass  # the client's doing: a failed handshake, a reset
        finally:
            self._linger(sock)

    def _call(self, environ: WSGIEnvironment) -> tuple[Reply, bool]:
        answer: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answer[:] = [int(status.split(" ", 1)[0]), tuple(headers)]
            return lambda data: None

        try:
            result = self.server.owner.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:
            log.exception("the /metrics thread server's app failed")
            return FAILED, False
        status, headers = answer
        # The app set Content-Length (of the GET body, for HEAD too): sent as it is.
        return Reply(status, headers, body), True

    def _write(self, sock: socket.socket, reply: Reply, sized: bool) -> None:
        status = f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
        headers = list(reply.headers)
        if not sized:
            headers.append(("Content-Length", str(len(reply.body))))
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers if k.lower() != "connection")
        sock.settimeout(WRITE_TIMEOUT)  # in all: sendall's timeout is total since Python 3.5
        sock.sendall((status + lines + "Connection: close\r\n\r\n").encode("latin-1") + reply.body)

    def _linger(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(LINGER_SECONDS)
            until, left = time.monotonic() + LINGER_SECONDS, LINGER_BYTES
            while left > 0 and time.monotonic() < until:
                data = sock.recv(min(left, 16384))
                if not data:
                    break
                left -= len(data)
        except (OSError, ValueError):
            pass
        finally:
            sock.close()


class _Listener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True  # TIME_WAIT only on Linux: a port another process listens on stays refused

    def __init__(self, owner: ThreadServer, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.owner = owner
        self.address_family = family
        self.request_queue_size = listen_backlog()
        self._open = 0
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        cap = self.owner.max_connections
        with self._lock:
            full = cap is not None and self._open >= cap
            if not full:
                self._open += 1
        if full:
            self.owner._full()
            try:
                request.settimeout(0)
                if self.owner.ssl_context is None:
                    request.send(BUSY)  # a few bytes into an empty socket buffer: never blocks
                # What the client sent already, read and dropped: closing with it unread would reset the
                # connection (and may lose the 503). What comes later may still meet a reset.
                request.recv(MAX_HEAD)
            except OSError:
                pass
            request.close()
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open -= 1

    def shutdown_request(self, request: Any) -> None:
        pass  # _Handler._linger closes it (the TLS socket, not the raw one)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("the /metrics thread server failed on a connection")


class ThreadServer:
    """A WSGI app served from daemon threads (no asyncio): `start()`, `stop()`; see the module's docstring."""

    def __init__(
        self,
        app: WSGIApplication,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        request_head_timeout: float | None = 5.0,
        max_connections: int | None = 200,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.request_head_timeout = request_head_timeout
        self.max_connections = within_fd_limit(max_connections)
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None
        self._stalled_log = Throttle()
        self._full_log = Throttle()

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve from a daemon thread; `port` is updated when 0 was asked."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = _Listener(self, (self.host, self.port), family)
        self.port = listener.server_address[1]
        self._listener = listener
        self._thread = threading.Thread(target=listener.serve_forever, name="pool-exporter-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and close the listening socket (requests being answered finish in their threads)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.shutdown()
            listener.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _stalled(self) -> None:
        held = self._stalled_log.ready()
        if held is not None:
            log.info(
                "closed a connection that sent no complete request head within %g s%s",
                self.request_head_timeout,
                self._stalled_log.note(held),
            )

    def _full(self) -> None:
        held = self._full_log.ready()
        if held is not None:
            log.warning(
                "%d client connections open, the most allowed: refused a new one%s",
                self.max_connections,
                self._full_log.note(held),
            )


def start_wsgi_server(
    host: str = "127.0.0.1",
    port: int = 0,
    exporter: Exporter | None = None,
    *,
    metrics_path: str = "/metrics",
    auth: Auth | None = None,
    ssl_context: ssl.SSLContext | None = None,
    request_head_timeout: float | None = 5.0,
    max_connections: int | None = 200,
) -> ThreadServer:
    """The one-liner for a sync app: serve `exporter`'s pools (the default Exporter's) from a daemon thread.

    /metrics, /pools and /healthz; `auth` guards all but /healthz. A port already in use raises
    PortInUse, as start_http_server() does.
    """
    metrics_path = validation.metrics_path(metrics_path)
    exporter = exporter if exporter is not None else default_exporter()
    server = ThreadServer(
        routes(exporter, metrics_path, auth),
        host,
        port,
        ssl_context=ssl_context,
        request_head_timeout=request_head_timeout,
        max_connections=max_connections,
    )
    try:
        server.start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise port_in_use(host, port) from None
    return server
