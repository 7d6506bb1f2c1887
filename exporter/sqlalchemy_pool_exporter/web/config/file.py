"""The exporter-toolkit web configuration file (`--web.config.file`), read strictly and re-read.

The format is prometheus/exporter-toolkit's docs/web-configuration.md; the rules below follow its
web/tls_config.go and web/handler.go (checked at commit 19a7c2d). As with the toolkit's strict YAML
decoding, an unknown or repeated key is an error, as is a value of the wrong type, and every problem
is one line naming the field; a line never repeats a password hash or an inline key. Where Python's
ssl or aiohttp cannot do what a field asks, the field is refused when the nearest thing would be less
safe, and otherwise honoured as nearly as it can be with the difference in `WebConfig.notes`, logged
at start (docs/web-config.md lists each case).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ... import validation
from .yaml import Duration, GoStr, load_yaml
from .yaml import WebConfigError as WebConfigError

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's tls.CipherSuites() (the toolkit accepts no other name) -> IANA code point. The TLS 1.3 ones are
# accepted and, as in Go, ignored: neither Go nor Python's ssl lets them be chosen.
CIPHER_SUITES: dict[str, int] = {
    "TLS_AES_128_GCM_SHA256": 0x1301,
    "TLS_AES_256_GCM_SHA384": 0x1302,
    "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": 0xC009,
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": 0xC00A,
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": 0xC013,
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": 0xC014,
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": 0xC02B,
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": 0xC02C,
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": 0xC02F,
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": 0xC030,
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": 0xCCA8,
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": 0xCCA9,
}
TLS13_SUITES = frozenset({0x1301, 0x1302, 0x1303})
# The toolkit's curve names -> OpenSSL's.
CURVES: dict[str, str] = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}
# The toolkit's client_auth_type values; "" is its default, RequireClientCert its old name for RequireAnyClientCert.
ClientAuth = Literal[
    "NoClientCert", "RequestClientCert", "RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"
]
_CLIENT_AUTH_NAMES = {"": "NoClientCert", "RequireClientCert": "RequireAnyClientCert"}
VERIFYING = ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
# The only response headers the toolkit lets the file set, and the values allowed where it restricts them.
HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
MAX_BURST = 1_000_000_000
# $2a$, $2b$, $2y$ (what htpasswd -B writes), a two-digit cost, 22 + 31 characters of salt and hash.
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")


class Inline(bytes):
    """PEM written in the file itself (`cert`, `key`, `client_ca`); never shown."""

    def __repr__(self) -> str:
        return "<inline PEM>"


# A PEM block is read from a file (relative to the web config file's directory) or given inline.
Pem = Path | Inline


def _one_of(table: Mapping[str, object], what: str, expected: str = "") -> AfterValidator:
    *names, last = table
    expected = expected or f"{', '.join(names)} or {last}"

    def check(name: str) -> str:
        if name not in table:
            raise ValueError(f"unknown {what} {name!r}; expected {expected}")
        return name

    return AfterValidator(check)


def _in_dir(value: object, info: ValidationInfo) -> object:
    """A file name in the file: relative to the file's directory, as in the toolkit ("": none)."""
    if isinstance(value, Path) or value is None:
        return value
    if not isinstance(value, str):
        raise ValueError("Input should be a valid string")
    return (info.context or {}).get("base", Path()) / value if value else None  # an absolute path stays


def _bcrypt_hash(value: object) -> bytes:
    match = _BCRYPT.fullmatch(value) if isinstance(value, str) else None
    # Never the value itself in the message: it may be a password pasted in by mistake.
    if match is None or not 4 <= int(match[1]) <= 31:
        raise ValueError("not a bcrypt hash ($2y$10$ and 53 characters; htpasswd -nB)")
    return match[0].encode()


def _user_name(name: str) -> str:
    if ":" in name:
        # Basic auth splits user and password at the first ':' (RFC 7617): this user could never log in.
        raise ValueError(f"user name {name!r} contains ':', so it could never log in (RFC 7617)")
    return name


def _headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        allowed = HEADERS.get(name)
        if allowed is None:
            raise ValueError(f"HTTP header {name!r} cannot be configured; expected {', '.join(HEADERS)}")
        if allowed and value not in allowed:
            raise ValueError(f"{name}: invalid value {value!r}; expected {' or '.join(allowed)}")
        if not all(" " <= c <= "~" for c in value):
            raise ValueError(f"{name}: only printable ASCII can go in a header")
    return {name: value for name, value in headers.items() if value}  # "Unset if blank"


FileName = Annotated[Path | None, BeforeValidator(_in_dir)]
TLSVersionName = Annotated[GoStr, _one_of(TLS_VERSIONS, "TLS version")]


class _Section(BaseModel):
    """A mapping in the file: an unknown key or a value of the wrong type is an error; null is as if absent."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: object) -> object:
        # Go's YAML decoder leaves a field given as null at its zero value.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class TLSServerConfig(_Section):
    """tls_server_config: a certificate and key, each inline or a file, and what clients must show."""

    cert: GoStr = Field("", repr=False)
    key: GoStr = Field("", repr=False)
    client_ca: GoStr = Field("", repr=False)
    cert_file: FileName = None
    key_file: FileName = None
    client_ca_file: FileName = None
    client_auth_type: Annotated[
        ClientAuth, BeforeValidator(lambda v: _CLIENT_AUTH_NAMES.get(v, v) if isinstance(v, str) else v)
    ] = "NoClientCert"
    client_allowed_sans: list[GoStr] | None = None
    min_version: TLSVersionName = "TLS12"
    max_version: TLSVersionName = "TLS13"
    cipher_suites: list[Annotated[GoStr, _one_of(CIPHER_SUITES, "cipher", "Go's tls.CipherSuites() names")]] = []
    prefer_server_cipher_suites: bool = True
    curve_preferences: list[Annotated[GoStr, _one_of(CURVES, "curve")]] = []

    def pem(self, name: Literal["cert", "key", "client_ca"]) -> Pem | None:
        """`name` or `name`_file: the PEM given inline, or the file that holds it."""
        inline: str = getattr(self, name)
        path: Path | None = getattr(self, f"{name}_file")
        return Inline(inline.encode()) if inline else path

    @model_validator(mode="after")
    def _whole(self) -> TLSServerConfig:
        given = {name for name in ("cert", "key", "client_ca") if self.pem(name) is not None}
        if not given and "client_auth_type" not in self.model_fields_set:
            if self.model_fields_set:  # the toolkit serves plain HTTP then, and silently drops the rest: name it
                raise ValueError(f"sets {', '.join(sorted(self.model_fields_set))} but no certificate")
            return self  # an empty section: no TLS
        for name in ("cert", "key", "client_ca"):
            if getattr(self, name) and getattr(self, f"{name}_file"):
                raise ValueError(f"sets both {name} and {name}_file: give one")
        for name in ("cert", "key"):
            if name not in given:
                raise ValueError(f"missing one of {name} or {name}_file")
        auth = self.client_auth_type
        if auth == "NoClientCert" and "client_ca" in given:
            raise ValueError("client CAs are configured without a client_auth_type")
        if auth == "RequireAnyClientCert":
            # Python's ssl verifies every certificate it asks for: it cannot require one without checking it.
            raise ValueError(
                "client_auth_type RequireAnyClientCert (a certificate, never verified) cannot be served by "
                "Python's ssl; use RequireAndVerifyClientCert with client_ca_file"
            )
        if auth in VERIFYING and "client_ca" not in given:
            # Go would fall back to the system's CAs: every public CA's client certificates would be let in.
            raise ValueError(f"client_auth_type {auth} needs client_ca_file (or client_ca)")
        if self.client_allowed_sans is not None and auth not in VERIFYING:
            # Python's ssl shows the SANs of a verified certificate only, and the SANs of an unverified
            # one prove nothing: anyone can write any name into a certificate of their own.
            raise ValueError(
                "client_allowed_sans needs client_auth_type VerifyClientCertIfGiven or "
                "RequireAndVerifyClientCert (with client_ca_file)"
            )
        if TLS_VERSIONS[self.min_version] > TLS_VERSIONS[self.max_version]:
            raise ValueError("min_version is above max_version: no connection could be made")
        return self


class HTTPServerConfig(_Section):
    """http_server_config."""

    http2: bool = True
    headers: Annotated[dict[GoStr, GoStr], AfterValidator(_headers)] = {}


class RateLimit(_Section):
    """rate_limit: a token bucket of `burst` tokens, one more every `interval` seconds."""

    interval: Duration = 0.0
    # 0 lets nothing through, as Go's rate.Limiter does: the toolkit's own tests rely on it. A billion
    # is no limit at all already; 10**400 was a 500 on every route, /healthz included (float overflow).
    burst: int = Field(0, ge=0, le=MAX_BURST)


class WebConfig(_Section):
    """What one version of the file says."""

    tls: TLSServerConfig | None = Field(None, alias="tls_server_config")
    http_server_config: HTTPServerConfig = HTTPServerConfig()
    # user -> bcrypt hash; empty: no basic auth.
    users: dict[Annotated[GoStr, AfterValidator(_user_name)], Annotated[bytes, BeforeValidator(_bcrypt_hash)]] = Field(
        {}, alias="basic_auth_users", repr=False
    )
    rate_limit: RateLimit | None = None

    @field_validator("tls")
    @classmethod
    def _tls(cls, tls: TLSServerConfig | None) -> TLSServerConfig | None:
        return tls if tls is not None and tls.model_fields_set else None

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, limit: RateLimit | None) -> RateLimit | None:
        return limit if limit is not None and limit.interval != 0 else None  # "0 disables the rate limiter"

    @property
    def headers(self) -> dict[str, str]:
        """The response headers to set."""
        return self.http_server_config.headers

    @property
    def notes(self) -> tuple[str, ...]:
        """Where we do less than the toolkit would, one line each, for the start-up log."""
        tls, notes = self.tls, []
        if tls is None:
            return ()
        if tls.client_auth_type == "RequestClientCert":
            # The toolkit asks for a certificate and lets every client in whatever it sends; Python's ssl
            # would verify what it asked for, so it does not ask: the same clients get in.
            notes.append(
                "tls_server_config.client_auth_type RequestClientCert: no certificate is requested (none is used)"
            )
        if TLS_VERSIONS[tls.min_version] < ssl.TLSVersion.TLSv1_2:
            # Measured with OpenSSL 3.0: the handshake fails with NO_CIPHERS_AVAILABLE below TLS 1.2.
            notes.append(
                "tls_server_config.min_version: OpenSSL 3 offers no TLS 1.0 or 1.1 cipher at its default level"
            )
        if len(set(tls.curve_preferences)) > 1:
            # Python's ssl sets one curve (SSLContext.set_ecdh_curve): the most preferred one keeps the
            # restriction the list asks for; Prometheus and other Go clients support all four.
            first = tls.curve_preferences[0]
            notes.append(
                f"tls_server_config.curve_preferences: Python's ssl offers one curve, {first}, the first listed"
            )
        if "http2" in self.http_server_config.model_fields_set and self.http_server_config.http2:
            # Only when asked for in so many words: true is the default, and clients fall back to HTTP/1.1.
            notes.append("http_server_config.http2: aiohttp serves HTTP/1.1 only; clients that offer HTTP/2 fall back")
        return tuple(notes)


def parse(raw: bytes, base: Path) -> WebConfig:
    """The file's bytes, checked; relative file names are relative to `base` (as in the toolkit)."""
    doc = load_yaml(raw)
    try:
        # An empty file: plain HTTP, no auth (as in the toolkit).
        return WebConfig.model_validate({} if doc is None else doc, context={"base": base})
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
    # A key from the file is quoted when it could break the line.
    loc = [str(part) if str(part).isprintable() else repr(part) for part in error["loc"]]
    # A mapping's key that is not right: the mapping's name, not the key (it could be anything).
    where = ".".join(loc[:-2]) + " key" if loc[-1:] == ["[key]"] else ".".join(loc) or "web config"
    problem = "Input should be a mapping" if error["type"] == "model_type" else error["msg"]
    raise WebConfigError(f"{where}: {problem.removeprefix('Value error, ')}")


class WebConfigFile:
    """The file, re-read at each use, parsed again only when its bytes change.

    The toolkit re-reads it for every request and every TLS handshake, so that rotated certificates,
    users and headers apply at once; so do we. Reading it unchanged costs ~7 µs here (measured), next
    to ~3 ms for a TLS handshake; a file that cannot be parsed is not parsed again until its bytes change.
    """

    def __init__(self, path: Path, parse: Callable[[bytes, Path], WebConfig] = parse) -> None:
        self.path = path
        self._parse = parse
        self._raw: bytes | None = None
        self._result: WebConfig | WebConfigError | None = None

    def current(self) -> WebConfig:
        """The file as it is now; WebConfigError if it cannot be read or is not right."""
        try:
            raw = validation.small_file(self.path)
        except ValueError as exc:
            raise WebConfigError(str(exc)) from None
        if raw != self._raw or self._result is None:
            try:
                self._result = self._parse(raw, self.path.parent)
            except WebConfigError as exc:
                self._result = WebConfigError(f"{self.path}: {exc}")
            self._raw = raw
        if isinstance(self._result, WebConfigError):
            raise self._result
        return self._result
