"""Optional access control for the exporter's routes: a bearer token and/or HTTP basic auth."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .. import validation
from ..logs import Throttle

log = logging.getLogger("sqlalchemy_pool_exporter.auth")

# Liveness must answer even when credentials are wrong or rotated.
EXEMPT: frozenset[str] = frozenset({"/healthz"})


def _bytes(text: str) -> bytes:
    # aiohttp hands over header bytes that are not UTF-8 as lone surrogates (surrogateescape), and
    # os.environ does the same for secrets: this gives back the bytes that were really sent or set.
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Auth:
    """Accept a request carrying the token or the user/password; either, when both are set.

    Nothing set means no auth. An empty token or password, or half of a user/password pair, is a
    ValueError: each would otherwise let everyone in or lock everyone out without a word.
    """

    token: str | None = None
    user: str | None = None
    password: str | None = None
    # Rejections are logged, at most once a minute with a count: any client can trigger them.
    rejected: Throttle = field(default_factory=Throttle, compare=False, repr=False)

    def __post_init__(self) -> None:
        validation.token(self.token)
        validation.basic_auth(self.user, self.password)

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.user is not None

    def allows(self, request: web.Request) -> bool:
        """Whether the request's credentials match; anything malformed is simply no match."""
        try:
            header = _bytes(request.headers.get("Authorization", ""))
        except UnicodeError:
            return False
        scheme, _, credentials = header.partition(b" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if self.token is not None and scheme == b"bearer":
            return hmac.compare_digest(credentials, _bytes(self.token))
        if self.user is not None and self.password is not None and scheme == b"basic":
            try:
                decoded = base64.b64decode(credentials, validate=True)
            except (binascii.Error, ValueError):
                return False
            user, sep, password = decoded.partition(b":")
            # Both comparisons always run, so timing does not tell which part was wrong.
            ok_user = hmac.compare_digest(user, _bytes(self.user))
            ok_password = hmac.compare_digest(password, _bytes(self.password))
            return bool(sep) and ok_user and ok_password
        return False

    def challenge(self, request: web.Request | None = None) -> web.HTTPUnauthorized:
        """The 401 to raise; with `request`, the rejection is also logged (throttled)."""
        if request is not None:
            self._log_rejection(request)
        schemes = []
        if self.token is not None:
            schemes.append('Bearer realm="pool-exporter"')
        if self.user is not None:
            schemes.append('Basic realm="pool-exporter", charset="UTF-8"')
        return web.HTTPUnauthorized(
            text="401: credentials required\n", headers={"WWW-Authenticate": ", ".join(schemes)}
        )

    def _log_rejection(self, request: web.Request) -> None:
        held = self.rejected.ready()
        if held is None:
            return
        what = "wrong or malformed" if "Authorization" in request.headers else "no"
        # %r: the path is the client's, decoded; it may hold newlines or escape codes.
        note = self.rejected.note(held)
        log.warning("401 for %r from %s: %s credentials%s", request.path, request.remote, what, note)

    def middleware(self, exempt: Collection[str] = EXEMPT) -> Middleware:
        """For an app of our own: every path but `exempt` needs credentials."""

        @web.middleware
        async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in exempt or self.allows(request):
                return await handler(request)
            raise self.challenge(request)

        return auth_middleware

    def protect(self, handler: Handler) -> Handler:
        """For routes added to someone else's app: guard just this handler."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.allows(request):
                raise self.challenge(request)
            return await handler(request)

        return guarded
