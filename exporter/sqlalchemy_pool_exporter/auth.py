"""Optional access control for the exporter's routes: a bearer token and/or HTTP basic auth."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Collection
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

# Liveness must answer even when credentials are wrong or rotated.
EXEMPT: frozenset[str] = frozenset({"/healthz"})


@dataclass(frozen=True, slots=True)
class Auth:
    """Accept a request carrying the token or the user/password; either, when both are set."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.user is not None

    def allows(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if self.token is not None and scheme == "bearer":
            return hmac.compare_digest(credentials.encode(), self.token.encode())
        if self.user is not None and self.password is not None and scheme == "basic":
            try:
                user, sep, password = base64.b64decode(credentials, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            # Both comparisons always run, so timing does not tell which part was wrong.
            ok_user = hmac.compare_digest(user.encode(), self.user.encode())
            ok_password = hmac.compare_digest(password.encode(), self.password.encode())
            return bool(sep) and ok_user and ok_password
        return False

    def challenge(self) -> web.HTTPUnauthorized:
        schemes = []
        if self.token is not None:
            schemes.append('Bearer realm="pool-exporter"')
        if self.user is not None:
            schemes.append('Basic realm="pool-exporter", charset="UTF-8"')
        return web.HTTPUnauthorized(
            text="401: credentials required\n", headers={"WWW-Authenticate": ", ".join(schemes)}
        )

    def middleware(self, exempt: Collection[str] = EXEMPT) -> Middleware:
        """For an app of our own: every path but `exempt` needs credentials."""

        @web.middleware
        async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in exempt or self.allows(request):
                return await handler(request)
            raise self.challenge()

        return auth_middleware

    def protect(self, handler: Handler) -> Handler:
        """For routes added to someone else's app: guard just this handler."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.allows(request):
                raise self.challenge()
            return await handler(request)

        return guarded
