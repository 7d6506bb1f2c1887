"""Fuzz the web config file (web/config: the strict YAML loader, the pydantic models, TLS, auth).

Input: the bytes of the file, written to a real `web.yml` beside a real certificate, key and client CA
(trustme), the names the docs' example uses. It is read as the service reads it at start
(`WebConfigFile.current()`, then the TLS context for its `tls_server_config`), and its policy objects
are made. Oracle: the outcome is a config or a WebConfigError of one non-empty line, never another
exception; a config that loads builds its TLS context and its rate limit, and its notes are lines.

Run: python tests/fuzz/fuzz_web_config.py tests/fuzz/corpus/web_config -dict=tests/fuzz/web_config.dict
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris
import trustme

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["sqlalchemy_pool_exporter"]):
    from sqlalchemy_pool_exporter.web.config.file import WebConfigError, WebConfigFile
    from sqlalchemy_pool_exporter.web.config.policy import TokenBucket
    from sqlalchemy_pool_exporter.web.config.tls import TLSReloader

from oracles import absolute, scratch

BASE = Path(scratch("web_config"))
CONFIG = BASE / "web.yml"


def files() -> None:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(BASE / "server.crt"))
    server.private_key_pem.write_to_path(str(BASE / "server.key"))
    ca.cert_pem.write_to_path(str(BASE / "clients-ca.pem"))


def one_input(data: bytes) -> None:
    CONFIG.write_bytes(data)
    source = WebConfigFile(CONFIG)
    try:
        config = source.current()
        tls = TLSReloader(source).tls_for(config) if config.tls is not None else None
    except WebConfigError as exc:
        line = str(exc)
        if not line or "\n" in line or "\r" in line or "Traceback" in line:
            raise AssertionError(f"not one line: {line!r}") from None
        return
    if config.tls is not None:
        assert tls is not None and tls.context is not None
    if config.rate_limit is not None:
        TokenBucket(config.rate_limit).allow()
    for note in config.notes:
        assert note and "\n" not in note, note
    for name, value in config.headers.items():
        assert "\n" not in name + value and "\r" not in name + value, (name, value)
    for user, hashed in config.users.items():
        assert isinstance(user, str) and isinstance(hashed, bytes), (user, hashed)


def main() -> None:
    files()
    atheris.Setup(absolute(sys.argv), one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
