"""What the web config file asks of each request: its rate limit, its bcrypt users, its response headers.

The file is re-read for every request, as the toolkit does (file.WebConfigFile parses it again
only when its bytes changed), so users, headers and the rate limit change without a restart. A file
that is broken now fails closed: every request but /healthz gets a 500 and one ERROR line a minute
says why, until it is fixed (the toolkit answers 500 as well). /healthz, as with our other auth, is
never rate limited nor asks for credentials: liveness must not depend on them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ...errors import MissingExtra, require
from ...logs import Throttle
from ..auth import EXEMPT
from .bcrypt import BcryptUsers
from .file import RateLimit, WebConfig, WebConfigError, WebConfigFile

log = logging.getLogger("sqlalchemy_pool_exporter.webconfig")

CHALLENGE = 'Basic realm="pool-exporter", charset="UTF-8"'


class TokenBucket:
    """Go's rate.Limiter as the toolkit uses it: `burst` tokens, refilled one per `interval` seconds."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._at = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(float(self.limit.burst), self._tokens + (now - self._at) / self.limit.interval)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class WebPolicy:
    """The middleware and response hook that apply the file; `tls` and `other_auth` are how the server
    started: whether the file's tls_server_config serves TLS, and whether auth_token or basic_auth_user
    is set (then the file must not bring basic_auth_users, now or after a reload)."""

    def __init__(
        self,
        source: WebConfigFile,
        *,
        tls: bool,
        other_auth: bool,
        users: BcryptUsers | None = None,
        exempt: Collection[str] = EXEMPT,
    ) -> None:
        self.source = source
        self.tls = tls
        self.other_auth = other_auth
        self.users = users if users is not None else BcryptUsers()
        self.exempt = exempt
        self._bucket: TokenBucket | None = None
        self._headers: dict[str, str] = {}
        self._broken_log = Throttle()
        self._rejected_log = Throttle()

    def current(self) -> WebConfig:
        """The file as it is now, and still one this server can follow without a restart."""
        config = self.source.current()
        if (config.tls is not None) != self.tls:
            now = "sets" if config.tls is not None else "no longer sets"
            raise WebConfigError(f"{self.source.path} {now} tls_server_config: restart to turn TLS on or off")
        if config.users and self.other_auth:
            raise WebConfigError(f"{self.source.path} sets basic_auth_users, and auth_token or basic_auth_user is set")
        if config.users:
            try:
                require("bcrypt", "sidecar", "basic_auth_users (the web config file)")
            except MissingExtra as exc:
                raise WebConfigError(f"{self.source.path}: {exc}") from None
        return config

    def install(self, app: web.Application) -> None:
        """Apply the file to every request of `app` (before any other middleware)."""
        app.middlewares.insert(0, self.middleware())
        app.on_response_prepare.append(self._add_headers)

    def middleware(self) -> Middleware:
        @web.middleware
        async def web_config(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                config = self.current()
            except WebConfigError as exc:
                self._broken(exc)
                if request.path in self.exempt:
                    return await handler(request)
                return web.Response(status=500, text="500: the web config file cannot be used; see the log\n")
            # Set on every response from now on, 401s and 404s included (as the toolkit does).
            self._headers = dict(config.headers)
            if request.path in self.exempt:
                return await handler(request)
            authorization = request.headers.get("Authorization", "")
            # A credential already checked and right costs an HMAC, no bcrypt: it is not charged to the
            # one bucket that anyone reaching the port can empty (8 clients' 404s made every scrape a 429).
            # The bucket still stands before every bcrypt check, so it keeps protecting the CPU.
            known = bool(config.users) and self.users.cached(authorization, config.users)
            if not known and not self._allow(config):
                return web.Response(status=429, text="429: too many requests\n", headers={"Retry-After": "1"})
            if config.users:
                verdict = await self.users.check(authorization, config.users, request.remote or "")
                if verdict is None:
                    return web.Response(
                        status=429, text="429: too many password checks\n", headers={"Retry-After": "1"}
                    )
                if not verdict:
                    self._log_rejection(request)
                    return web.Response(
                        status=401, text="401: credentials required\n", headers={"WWW-Authenticate": CHALLENGE}
                    )
            return await handler(request)

        return web_config

    def _allow(self, config: WebConfig) -> bool:
        if config.rate_limit is None:
            self._bucket = None
            return True
        if self._bucket is None or self._bucket.limit != config.rate_limit:
            self._bucket = TokenBucket(config.rate_limit)
        return self._bucket.allow()

    async def _add_headers(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        for name, value in self._headers.items():
            response.headers[name] = value

    def _broken(self, exc: WebConfigError) -> None:
        held = self._broken_log.ready()
        if held is not None:
            log.error("the web config file cannot be used, requests get 500: %s%s", exc, self._broken_log.note(held))

    def _log_rejection(self, request: web.Request) -> None:
        held = self._rejected_log.ready()
        if held is not None:
            what = "wrong or malformed" if "Authorization" in request.headers else "no"
            note = self._rejected_log.note(held)
            # %r: the path is the client's, decoded; it may hold newlines or escape codes.
            log.warning("401 for %r from %s: %s credentials%s", request.path, request.remote, what, note)
