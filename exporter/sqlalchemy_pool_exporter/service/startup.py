"""What the settings name on disk, read and checked once at start: the multiprocess directory, tls_cert
and tls_key, the web config file. The first problem is a SettingError, as a bad value is (exit 2)."""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import validation
from ..errors import require
from ..web.config.file import WebConfigError, WebConfigFile
from ..web.config.tls import EncryptedKey, TLSReloader, key_pair_problem, load_key_pair
from .settings import SettingError, Settings


@dataclass(frozen=True)
class Startup:
    """The files behind the settings, checked; what serve and demo listen with."""

    # From tls_cert and tls_key.
    ssl_context: ssl.SSLContext | None = None
    # The web config file, read here; its policy and TLS re-read it, parsing it again only when it changes.
    web_config: WebConfigFile | None = None
    # The file's TLS, built here from the file as read here.
    web_tls: TLSReloader | None = None
    # Where the file asks for more than we can do, one line each, for the start-up log.
    notes: tuple[str, ...] = ()


def check(settings: Settings) -> Startup:
    """Read and check what `settings` name on disk, each once; SettingError for the first problem
    (errors.MissingExtra when a setting needs an extra that is not installed)."""
    if settings.multiproc_dir is not None:
        _check_writable_dir(settings.multiproc_dir)
    context = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        context = _ssl_context(settings.tls_cert, settings.tls_key)
    if settings.web_config_file is None:
        return Startup(ssl_context=context)
    require("yaml", "sidecar", "the web config file (--web.config.file)")
    source = WebConfigFile(settings.web_config_file)
    try:
        config = source.current()
        web_tls = TLSReloader(source) if config.tls is not None else None
        if web_tls is not None:
            web_tls.tls_for(config)
    except WebConfigError as exc:
        raise SettingError("web_config_file", str(exc)) from None
    # TLS and auth come from the file or from our own settings, never both: which would win is no
    # choice to guess at for a security setting.
    name = settings.web_config_file
    if config.tls is not None and settings.tls_cert is not None:
        raise SettingError("web_config_file", f"{name} sets tls_server_config, and tls_cert is set too: use one")
    if config.users and (settings.auth_token is not None or settings.basic_auth_user is not None):
        other = "auth_token" if settings.auth_token is not None else "basic_auth_user"
        raise SettingError("web_config_file", f"{name} sets basic_auth_users, and {other} is set too: use one")
    if config.users:
        require("bcrypt", "sidecar", "basic_auth_users (the web config file)")
    return Startup(context, source, web_tls, tuple(config.notes))


def _ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    pem = {}
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            pem[name] = validation.small_file(path)
        except ValueError as exc:
            raise SettingError(name, str(exc)) from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        load_key_pair(context, pem["tls_cert"], pem["tls_key"])
    except EncryptedKey:
        raise SettingError("tls_key", f"{key} is encrypted: give an unencrypted key") from None
    except ssl.SSLError as exc:
        problem = key_pair_problem(exc, pem["tls_cert"], pem["tls_key"])
        raise SettingError("tls_cert", f"cannot load certificate {cert} with key {key}: {problem}") from None
    return context


def _check_writable_dir(path: Path) -> None:
    """The multiprocess directory must exist and take new files: workers write it, and the sidecar
    locks, compacts and quarantines in it (a read-only one made it fail at start with a traceback)."""
    if not path.is_dir():
        raise SettingError("multiproc_dir", f"{path} is not a directory")
    try:
        # Really creating a file catches what permission bits do not: read-only mounts, root squash.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise SettingError("multiproc_dir", f"cannot create files in {path}: {exc.strerror}") from None
