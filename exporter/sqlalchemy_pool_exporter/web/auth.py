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
CHALLENGE_TEXT = "401: credentials required\n"


def _bytes(text: str) -> bytes:
    # aiohttp hands over header bytes that are not UTF-8 as lone surrogates (surrogateescape), and
    # os.environ does the same for secrets: this gives back the bytes that were really sent or set.
    return text.encode("utf-8", "surrogateescape")


def _split(authorization: str) -> tuple[bytes, bytes]:
    """The scheme (lowercased) and credentials of an Authorization header value, as sent; empty if unreadable."""
    try:
        scheme, _, credentials = _bytes(authorization).partition(b" ")
    except UnicodeError:
        return b"", b""
    return scheme.lower(), credentials.strip()


def basic_credentials(authorization: str) -> tuple[bytes, bytes] | None:
    """User and password of an `Authorization: Basic ...` header value; None if it is anything else.

    The one parser for both our basic_auth_user and the web config file's basic_auth_users: strict
    base64, split at the first colon, and anything malformed is None (a 401), never an exception.
    """
    scheme, credentials = _split(authorization)
    if scheme != b"basic":
        return None
    try:
        decoded = base64.b64decode(credentials, validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


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
        return self.allows_header(request.headers.get("Authorization", ""))

    def allows_header(self, header: str) -> bool:
        """Whether an Authorization header value (as aiohttp gives it: UTF-8, surrogateescape) matches."""
        scheme, credentials = _split(header)
        if self.token is not None and scheme == b"bearer":
            return hmac.compare_digest(credentials, _bytes(self.token))
        if self.user is not None and self.password is not None and scheme == b"basic":
            pair = basic_credentials(header)
            if pair is None:
                return False
            # Both comparisons always run, so timing does not tell which part was wrong.
            ok_user = hmac.compare_digest(pair[0], _bytes(self.user))
            ok_password = hmac.compare_digest(pair[1], _bytes(self.password))
            return ok_user and ok_password
        return False

    def challenge(self, request: web.Request | None = None) -> web.HTTPUnauthorized:
        """The 401 to raise; with `request`, the rejection is also logged (throttled)."""
        if request is not None:
            self.log_rejection(request.path, request.remote, "Authorization" in request.headers)
        return web.HTTPUnauthorized(text=CHALLENGE_TEXT, headers={"WWW-Authenticate": self.www_authenticate})

    @property
    def www_authenticate(self) -> str:
        """The WWW-Authenticate value of a 401: the schemes this Auth takes."""
        schemes = []
        if self.token is not None:
            schemes.append('Bearer realm="pool-exporter"')
        if self.user is not None:
            schemes.append('Basic realm="pool-exporter", charset="UTF-8"')
        return ", ".join(schemes)

    def log_rejection(self, path: str, remote: str | None, sent: bool) -> None:
        """Log a 401 (throttled); `sent`: whether the request carried an Authorization header."""
        held = self.rejected.ready()
        if held is None:
            return
        what = "wrong or malformed" if sent else "no"
        # %r: the path is the client's, decoded; it may hold newlines or escape codes.
        note = self.rejected.note(held)
        log.warning("401 for %r from %s: %s credentials%s", path, remote, what, note)

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
