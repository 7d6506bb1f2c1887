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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ... import validation
from .yaml import WebConfigError as WebConfigError
from .yaml import bool_, duration, list_, load_yaml, mapping, string

ClientAuth = Literal["NoClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"]

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
# The toolkit's client_auth_type values (RequireClientCert is its old name for RequireAnyClientCert).
_CLIENT_AUTH = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
# The only response headers the toolkit lets the file set, and the values allowed where it restricts them.
HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
# $2a$, $2b$, $2y$ (what htpasswd -B writes), a two-digit cost, 22 + 31 characters of salt and hash.
_BCRYPT = re.compile(rb"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")


class Inline(bytes):
    """PEM written in the file itself (`cert`, `key`, `client_ca`); never shown."""

    def __repr__(self) -> str:
        return "<inline PEM>"


# A PEM block is read from a file (relative to the web config file's directory) or given inline.
Pem = Path | Inline


@dataclass(frozen=True)
class TLSServerConfig:
    """tls_server_config, checked; names mapped to what Python's ssl takes."""

    cert: Pem
    key: Pem
    client_auth: ClientAuth = "NoClientCert"
    client_ca: Pem | None = None
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    # IANA code points of the TLS 1.0-1.2 suites, in the file's order; empty: OpenSSL's defaults.
    cipher_suites: tuple[int, ...] = ()
    # OpenSSL's name of the one curve offered; None: OpenSSL's defaults.
    curve: str | None = None
    prefer_server_cipher_suites: bool = True
    client_allowed_sans: frozenset[str] | None = None


@dataclass(frozen=True)
class RateLimit:
    """rate_limit: a token bucket of `burst` tokens, one more every `interval` seconds."""

    interval: float
    burst: int


@dataclass(frozen=True)
class WebConfig:
    """What one version of the file says."""

    tls: TLSServerConfig | None = None
    # user -> bcrypt hash; empty: no basic auth.
    users: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    http2: bool = True
    rate_limit: RateLimit | None = None
    # Where we do less than the toolkit would, one line each, for the start-up log.
    notes: tuple[str, ...] = ()


def load(path: Path) -> WebConfig:
    """Read and check the file at `path` (a small regular file); WebConfigError if it is not right."""
    return WebConfigFile(path).current()


def read(path: Path) -> bytes:
    try:
        return validation.small_file(path)
    except ValueError as exc:
        raise WebConfigError(str(exc)) from None


def parse(raw: bytes, base: Path) -> WebConfig:
    """The file's bytes, checked; relative file names are relative to `base` (as in the toolkit)."""
    doc = load_yaml(raw)
    if doc is None:
        return WebConfig()  # an empty file: plain HTTP, no auth (as in the toolkit)
    top = mapping("web config", doc, ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"))
    notes: list[str] = []
    tls = _tls(top.get("tls_server_config"), base, notes)
    http = mapping("http_server_config", top.get("http_server_config"), ("http2", "headers"))
    http2 = bool_("http_server_config.http2", http.get("http2", True))
    if http.get("http2") is True and tls is not None:
        # Only when asked for in so many words: true is the default, and clients fall back to HTTP/1.1.
        notes.append("http_server_config.http2: aiohttp serves HTTP/1.1 only; clients that offer HTTP/2 fall back")
    return WebConfig(
        tls=tls,
        users=_users(top.get("basic_auth_users")),
        headers=_headers(http.get("headers")),
        http2=http2,
        rate_limit=_rate_limit(top.get("rate_limit")),
        notes=tuple(notes),
    )


# -- tls_server_config ----------------------------------------------------------------------------

_TLS_FIELDS = (
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_ca_file",
    "client_auth_type",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
)


def _tls(value: object, base: Path, notes: list[str]) -> TLSServerConfig | None:
    section = mapping("tls_server_config", value, _TLS_FIELDS)
    text = {name: string(f"tls_server_config.{name}", section.get(name, "")) for name in _TLS_FIELDS[:7]}
    if not any(text.values()):
        # The toolkit serves plain HTTP then, and would silently drop the other fields: name them.
        if section:
            raise WebConfigError(f"tls_server_config sets {', '.join(sorted(section))} but no certificate")
        return None
    cert, key, client_ca = (_pem(text, name, base) for name in ("cert", "key", "client_ca"))
    if cert is None or key is None:
        missing = "cert" if cert is None else "key"
        raise WebConfigError(f"tls_server_config: missing one of {missing} or {missing}_file")
    client_auth = _client_auth(text["client_auth_type"], client_ca is not None, notes)
    allowed = list_("tls_server_config.client_allowed_sans", section.get("client_allowed_sans"))
    if allowed is not None and client_auth == "NoClientCert":
        # Python's ssl shows the SANs of a verified certificate only, and the SANs of an unverified
        # one prove nothing: anyone can write any name into a certificate of their own.
        raise WebConfigError(
            "tls_server_config.client_allowed_sans needs client_auth_type VerifyClientCertIfGiven or "
            "RequireAndVerifyClientCert (with client_ca_file)"
        )
    min_version = _version("min_version", section.get("min_version", "TLS12"))
    max_version = _version("max_version", section.get("max_version", "TLS13"))
    if min_version > max_version:
        raise WebConfigError("tls_server_config.min_version is above max_version: no connection could be made")
    if min_version < ssl.TLSVersion.TLSv1_2:
        # Measured with OpenSSL 3.0: the handshake fails with NO_CIPHERS_AVAILABLE below TLS 1.2.
        notes.append("tls_server_config.min_version: OpenSSL 3 offers no TLS 1.0 or 1.1 cipher at its default level")
    return TLSServerConfig(
        cert=cert,
        key=key,
        client_auth=client_auth,
        client_ca=client_ca,
        min_version=min_version,
        max_version=max_version,
        cipher_suites=_cipher_suites(section.get("cipher_suites")),
        curve=_curve(section.get("curve_preferences"), notes),
        prefer_server_cipher_suites=bool_(
            "tls_server_config.prefer_server_cipher_suites", section.get("prefer_server_cipher_suites", True)
        ),
        client_allowed_sans=frozenset(allowed) if allowed is not None else None,
    )


def _pem(text: Mapping[str, str], name: str, base: Path) -> Pem | None:
    inline, path = text[name], text[name + "_file"]
    if inline and path:
        raise WebConfigError(f"tls_server_config sets both {name} and {name}_file: give one")
    if path:
        return base / path  # an absolute path stays as it is
    return Inline(inline.encode()) if inline else None


def _client_auth(value: str, has_ca: bool, notes: list[str]) -> ClientAuth:
    name = {"": "NoClientCert", "RequireClientCert": "RequireAnyClientCert"}.get(value, value)
    if name not in _CLIENT_AUTH:
        raise WebConfigError(
            f"tls_server_config.client_auth_type: invalid {value!r}; expected {', '.join(_CLIENT_AUTH)}"
        )
    if name == "NoClientCert" and has_ca:
        raise WebConfigError("tls_server_config: client CAs are configured without a client_auth_type")
    if name == "RequireAnyClientCert":
        # Python's ssl verifies every certificate it asks for: it cannot require one without checking it.
        raise WebConfigError(
            "tls_server_config.client_auth_type RequireAnyClientCert (a certificate, never verified) cannot be "
            "served by Python's ssl; use RequireAndVerifyClientCert with client_ca_file"
        )
    if name == "RequestClientCert":
        # The toolkit asks for a certificate and lets every client in whatever it sends; Python's ssl
        # would verify what it asked for, so it does not ask: the same clients get in.
        notes.append("tls_server_config.client_auth_type RequestClientCert: no certificate is requested (none is used)")
        return "NoClientCert"
    if name == "NoClientCert":
        return "NoClientCert"
    if not has_ca:
        # Go would fall back to the system's CAs: every public CA's client certificates would be let in.
        raise WebConfigError(f"tls_server_config.client_auth_type {name} needs client_ca_file (or client_ca)")
    return "VerifyClientCertIfGiven" if name == "VerifyClientCertIfGiven" else "RequireAndVerifyClientCert"


def _version(name: str, value: object) -> ssl.TLSVersion:
    text = string(f"tls_server_config.{name}", value)
    if text not in TLS_VERSIONS:
        raise WebConfigError(
            f"tls_server_config.{name}: unknown TLS version {text!r}; expected TLS10, TLS11, TLS12 or TLS13"
        )
    return TLS_VERSIONS[text]


def _cipher_suites(value: object) -> tuple[int, ...]:
    names = list_("tls_server_config.cipher_suites", value) or []
    for name in names:
        if name not in CIPHER_SUITES:
            raise WebConfigError(
                f"tls_server_config.cipher_suites: unknown cipher {name!r} (Go's tls.CipherSuites() names)"
            )
    return tuple(dict.fromkeys(CIPHER_SUITES[n] for n in names if CIPHER_SUITES[n] not in TLS13_SUITES))


def _curve(value: object, notes: list[str]) -> str | None:
    names = list_("tls_server_config.curve_preferences", value) or []
    for name in names:
        if name not in CURVES:
            raise WebConfigError(
                f"tls_server_config.curve_preferences: unknown curve {name!r}; expected {', '.join(CURVES)}"
            )
    if len(set(names)) > 1:
        # Python's ssl sets one curve (SSLContext.set_ecdh_curve): the most preferred one keeps the
        # restriction the list asks for; Prometheus and other Go clients support all four.
        notes.append(
            f"tls_server_config.curve_preferences: Python's ssl offers one curve, {names[0]}, the first listed"
        )
    return CURVES[names[0]] if names else None


# -- basic_auth_users, http_server_config, rate_limit ---------------------------------------------


def _users(value: object) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for user, hashed in mapping("basic_auth_users", value, None).items():
        name = string("basic_auth_users key", user)
        text = string(f"basic_auth_users.{name}", hashed)
        match = _BCRYPT.fullmatch(text.encode())
        # Never the value itself in the message: it may be a password pasted in by mistake.
        if match is None or not 4 <= int(match[1]) <= 31:
            raise WebConfigError(
                f"basic_auth_users.{name}: not a bcrypt hash ($2y$10$ and 53 characters; htpasswd -nB)"
            )
        users[name] = text.encode()
    return users


def _headers(value: object) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, raw in mapping("http_server_config.headers", value, None).items():
        if name not in HEADERS:
            raise WebConfigError(
                f"http_server_config.headers: HTTP header {name!r} cannot be configured; expected {', '.join(HEADERS)}"
            )
        text = string(f"http_server_config.headers.{name}", raw)
        allowed = HEADERS[name]
        if allowed and text not in allowed:
            raise WebConfigError(
                f"http_server_config.headers.{name}: invalid value {text!r}; expected {' or '.join(allowed)}"
            )
        if not all(" " <= c <= "~" for c in text):
            raise WebConfigError(f"http_server_config.headers.{name}: only printable ASCII can go in a header")
        if text:  # "Unset if blank"
            headers[name] = text
    return headers


def _rate_limit(value: object) -> RateLimit | None:
    section = mapping("rate_limit", value, ("interval", "burst"))
    interval = duration("rate_limit.interval", section.get("interval", 0))
    burst = section.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        raise WebConfigError("rate_limit.burst must be a whole number, 0 or more")
    if interval == 0:
        return None  # the toolkit's "0 disables the rate limiter"
    # burst 0 lets nothing through, as Go's rate.Limiter does: the toolkit's own tests rely on it.
    return RateLimit(interval=interval, burst=burst)


# -- re-reading -----------------------------------------------------------------------------------


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
        raw = read(self.path)
        if raw != self._raw or self._result is None:
            try:
                self._result = self._parse(raw, self.path.parent)
            except WebConfigError as exc:
                self._result = WebConfigError(f"{self.path}: {exc}")
            self._raw = raw
        if isinstance(self._result, WebConfigError):
            raise self._result
        return self._result
