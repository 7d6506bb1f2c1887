"""TLS from the web config file: a server SSLContext for each version of the file and of the files it names.

Every field reloads, as in the toolkit (Go's GetConfigForClient): an `sni_callback` could swap the
certificate but not the verify mode, versions or ciphers, so the server accepts plain TCP and upgrades
each connection with `loop.start_tls()` and the TLS of that moment (web/connections.py). The files are
re-read per connection (~30 µs, measured, against ~3 ms for a handshake) and a context is built only
when their bytes change (~2 ms); the key is loaded from the very bytes compared.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from ... import validation
from ..connections import TLS
from .file import (
    CIPHER_SUITES,
    CURVES,
    TLS13_SUITES,
    TLS_VERSIONS,
    Inline,
    TLSServerConfig,
    WebConfig,
    WebConfigError,
    WebConfigFile,
)

_VERIFY = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,  # see WebConfig.notes
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_GO_NAME = {code: name for name, code in CIPHER_SUITES.items()}
PemName = Literal["cert", "key", "client_ca"]


def read_pem(config: TLSServerConfig, field: PemName) -> bytes | None:
    """The bytes of a PEM block given inline or of the (small, regular) file that holds it."""
    pem = config.pem(field)
    if pem is None or isinstance(pem, Inline):
        return pem
    try:
        return validation.small_file(pem)
    except ValueError as exc:
        raise WebConfigError(f"tls_server_config.{field}_file: {exc}") from None


def build(config: TLSServerConfig, cert: bytes, key: bytes, client_ca: bytes | None) -> TLS:
    """The server side of one version of tls_server_config; WebConfigError if OpenSSL refuses any of it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[config.min_version]
    context.maximum_version = TLS_VERSIONS[config.max_version]
    # The TLS 1.0-1.2 suites, each once: the TLS 1.3 ones cannot be chosen (in Go either).
    suites = tuple(c for c in dict.fromkeys(CIPHER_SUITES[n] for n in config.cipher_suites) if c not in TLS13_SUITES)
    if suites:
        try:
            context.set_ciphers(":".join(openssl_ciphers(suites)))
        except ssl.SSLError:
            raise WebConfigError("tls_server_config.cipher_suites: OpenSSL accepts none of them here") from None
    if config.curve_preferences:
        context.set_ecdh_curve(CURVES[config.curve_preferences[0]])  # one curve: see WebConfig.notes
    if not config.prefer_server_cipher_suites:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_key_pair(context, config, cert, key)
    verify = _VERIFY[config.client_auth_type]
    if verify != ssl.CERT_NONE:
        assert client_ca is not None, "the web config requires a client CA for the verifying modes"
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError):
            raise WebConfigError(f"tls_server_config.{_name(config, 'client_ca')}: no PEM certificate") from None
        context.verify_mode = verify
    sans = config.client_allowed_sans
    return TLS(context, san_check(frozenset(sans)) if sans is not None else None)


@functools.cache
def _openssl_names() -> dict[int, str]:
    """IANA code point -> OpenSSL's name, for every suite this OpenSSL has."""
    every = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    every.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    # OpenSSL's cipher id is 0x0300 followed by the two-byte code point.
    return {cipher["id"] & 0xFFFF: cipher["name"] for cipher in every.get_ciphers()}


def openssl_ciphers(code_points: tuple[int, ...]) -> list[str]:
    """OpenSSL's names for TLS 1.0-1.2 suites, in order; WebConfigError naming one this OpenSSL lacks."""
    known = _openssl_names()
    for code in code_points:
        if code not in known:
            raise WebConfigError(f"tls_server_config.cipher_suites: {_GO_NAME[code]} is not in this Python's OpenSSL")
    return [known[code] for code in code_points]


def san_check(allowed: frozenset[str]) -> Callable[[dict[str, Any] | None], bool]:
    """Whether a verified client certificate has a DNS, e-mail, IP or URI SAN in `allowed` (exact match).

    IP addresses compare as addresses: Go writes `::1` where Python's ssl writes `0:0:0:0:0:0:0:1`.
    """
    ips = set()
    for entry in allowed:
        with contextlib.suppress(ValueError):
            ips.add(ipaddress.ip_address(entry))

    def accepts(peercert: dict[str, Any] | None) -> bool:
        for kind, value in (peercert or {}).get("subjectAltName", ()):
            if kind in ("DNS", "email", "URI") and value in allowed:
                return True
            if kind == "IP Address":
                with contextlib.suppress(ValueError):
                    if ipaddress.ip_address(value.strip()) in ips:
                        return True
        return False

    return accepts


def _name(config: TLSServerConfig, field: PemName) -> str:
    pem = config.pem(field)
    return field if isinstance(pem, Inline) else f"{field}_file {pem}"


class EncryptedKey(Exception):
    """The key needs a pass phrase: never asked for, a service has no one at the terminal."""


def _no_pass_phrase() -> bytes:
    raise EncryptedKey


def load_key_pair(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load a PEM certificate (chain) and its key from their bytes; ssl.SSLError, or EncryptedKey."""
    with _pem_path(cert) as cert_path, _pem_path(key) as key_path:
        context.load_cert_chain(cert_path, key_path, password=_no_pass_phrase)


def key_pair_problem(exc: ssl.SSLError, cert: bytes, key: bytes) -> str:
    """Why load_key_pair failed, in words: OpenSSL's "PEM lib" error has no reason (it printed `None`)."""
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        return "no PEM certificate in the certificate"
    if not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", key):
        return "no PEM private key in the key"
    return str(exc.reason or exc.strerror or exc)


def _load_key_pair(context: ssl.SSLContext, config: TLSServerConfig, cert: bytes, key: bytes) -> None:
    try:
        load_key_pair(context, cert, key)
    except EncryptedKey:
        raise WebConfigError(
            f"tls_server_config.{_name(config, 'key')} is encrypted: give an unencrypted key"
        ) from None
    except ssl.SSLError as exc:
        what = f"{_name(config, 'cert')} with {_name(config, 'key')}"
        raise WebConfigError(f"tls_server_config: cannot load {what}: {key_pair_problem(exc, cert, key)}") from None


@contextlib.contextmanager
def _pem_path(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read `data` from: an anonymous memory file where there are such, else a
    private temporary file; OpenSSL's load_cert_chain reads paths only."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("pool-exporter-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="pool-exporter-") as directory:  # pragma: no cover - not Linux
        path = Path(directory) / "pem"
        path.write_bytes(data)
        yield str(path)


class TLSReloader:
    """For each new connection: the TLS of the web config file as it is now (see the module docstring).

    A file that is broken now raises WebConfigError: the connection is refused (the toolkit's
    handshake fails too), and the next one tries again.
    """

    def __init__(self, source: WebConfigFile) -> None:
        self.source = source
        self._key: object = None
        self._result: TLS | WebConfigError | None = None

    def __call__(self) -> TLS:
        return self.tls_for(self.source.current())

    def tls_for(self, web_config: WebConfig) -> TLS:
        """The TLS of `web_config` (a version of the file just read), built again only if it or a PEM changed."""
        config = web_config.tls
        if config is None:
            raise WebConfigError(
                "tls_server_config is gone, but the server was started with TLS: restart to serve HTTP"
            )
        cert, key, client_ca = (read_pem(config, name) for name in ("cert", "key", "client_ca"))
        assert cert is not None and key is not None, "the web config requires both"
        state = (config, cert, key, client_ca)
        if state != self._key or self._result is None:
            try:
                self._result = build(config, cert, key, client_ca)
            except WebConfigError as exc:
                self._result = exc
            self._key = state
        if isinstance(self._result, WebConfigError):
            raise self._result
        return self._result
