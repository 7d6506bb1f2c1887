"""Fuzz the settings from the environment: each POOL_EXPORTER_* value, read and checked as at start.

Input: up to three settings, each `<setting byte><length byte><value>`; values are bytes as the
environment holds them (os.environ decodes with surrogateescape; NUL cannot be in the environment).
They are set as POOL_EXPORTER_<NAME>, then `settings.load()` and `startup.check()` run, as
`pool-exporter serve` does before it starts. Oracle: a Settings, or a SettingError whose line is one
printable line naming a setting; a password given in a URL's user info never shows in that line.

Run: python tests/fuzz/fuzz_settings.py tests/fuzz/corpus/settings -dict=tests/fuzz/settings.dict
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["sqlalchemy_pool_exporter"]):
    from sqlalchemy_pool_exporter.service import startup
    from sqlalchemy_pool_exporter.service.settings import ENV_PREFIX, SettingError, Settings, load

from oracles import absolute

NAMES = sorted(Settings.model_fields)
SECRET = "Hunter2-XyZZy"


def split(data: bytes) -> dict[str, bytes]:
    values: dict[str, bytes] = {}
    pos = 0
    while pos + 2 <= len(data) and len(values) < 3:
        name = NAMES[data[pos] % len(NAMES)]
        size = data[pos + 1]
        values[name] = data[pos + 2 : pos + 2 + size].replace(b"\0", b"")
        pos += 2 + size
    return values


def join(values: dict[str, bytes]) -> bytes:
    return b"".join(bytes([NAMES.index(k), len(v)]) + v for k, v in values.items())


def hidden(value: str) -> bool:
    """Whether every SECRET in `value` is inside a URL's password (after the user's ':')."""
    if SECRET not in value or "://" not in value:
        return False
    userinfo = value.split("://", 1)[1].rpartition("@")[0]
    # The password is what follows the user's ':' (a user name is shown, as SQLAlchemy shows it).
    password = userinfo.partition(":")[2]
    return password.count(SECRET) == value.count(SECRET)


def one_input(data: bytes) -> None:
    values = {k: os.fsdecode(v) for k, v in split(data).items()}
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX) or k == "PROMETHEUS_MULTIPROC_DIR"]:
        del os.environ[key]
    for name, value in values.items():
        os.environ[ENV_PREFIX + name.upper()] = value
    try:
        settings = load()
        startup.check(settings)
    except SettingError as exc:
        line = exc.line()
        if not line.isprintable():
            raise AssertionError(f"not one printable line: {line!r}") from None
        if exc.setting not in NAMES and exc.setting != "settings":
            raise AssertionError(f"names no setting: {line!r}") from None
        if SECRET in line and any(hidden(v) for v in values.values()):
            raise AssertionError(f"a password shown: {line!r}") from None
        return
    settings.secrets()  # what the log filter redacts
    shown = repr(settings)
    if SECRET in shown and any(hidden(v) for v in values.values()):
        raise AssertionError(f"a password shown in {shown!r}")


def main() -> None:
    argv = absolute(sys.argv)
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # seeds name files as corpus/...
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
