"""An application_name for the PostgreSQL connections an app did not name, so the server can tell apps apart.

asyncpg sends none at all, nor do libpq's drivers unless told: every app's connections showed as
`application_name=""` in pg_stat_activity and in the sidecar's server view. When the app set one (in
the URL, `connect_args`, asyncpg's `server_settings` or a DSN), it is kept, whatever it is, the empty
string included. Otherwise each new DBAPI connection gets `default()`, through the engine's dialect
`connect` (not the `do_connect` event: any dialect event costs every transaction about 1%; this wrapper
runs only when the pool opens a connection, never on checkout).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from .hooks import Hooks

# PostgreSQL keeps NAMEDATALEN - 1 bytes of it, and shows only printable ASCII (other bytes become
# `?` or `\xNN` escapes, by version): what we send is already what it will show.
MAX_BYTES = 63
# The drivers whose connect() takes `application_name` (libpq's, pg8000) or `server_settings` (asyncpg).
LIBPQ_STYLE = frozenset({"psycopg", "psycopg2", "psycopg2cffi", "pg8000"})
DRIVERS = LIBPQ_STYLE | {"asyncpg"}
# Connection strings and options where an app may have set it itself.
_STRINGS = ("dsn", "conninfo", "options")
# Frames that are not the app's own code when looking for who called instrument().
_NOT_THE_APP = frozenset(
    {"sqlalchemy_pool_exporter", "sqlalchemy", "importlib", "runpy", "asyncio", "contextlib", "functools", "threading"}
)


def clean(text: str) -> str:
    """`text` as PostgreSQL will show it: printable ASCII (`?` for anything else), at most 63 bytes."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:MAX_BYTES]


def program() -> str:
    """The program's name: `pkg` for `python -m pkg`, the script's name without `.py`, else `python`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name).removesuffix(".__main__")
    name = Path(sys.argv[0]).name.removesuffix(".py") if sys.argv and sys.argv[0] else ""
    return name if name and name != "-c" else "python"


def caller() -> str:
    """The top-level package of the code that called instrument() (or create_engine(), for the URL
    plugin): the app's own name far more often than the program's (`uvicorn`, `gunicorn`). Code
    run as a script or with -m counts as the program."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        top = str(frame.f_globals.get("__name__") or "").partition(".")[0]
        if top and top not in _NOT_THE_APP:
            return program() if top == "__main__" else top
        frame = frame.f_back
    return program()


def default(pool: str | None) -> str:
    """PGAPPNAME when set (asyncpg ignores it; libpq would use it anyway), else `package:pool` when the
    app named the pool, else `package`, where package is the caller's (see caller()); cleaned."""
    given = os.environ.get("PGAPPNAME")
    if given:
        return clean(given)
    package = caller()
    return clean(f"{package}:{pool}" if pool else package)


def named(driver: str, cargs: tuple[Any, ...], cparams: dict[str, Any], value: str) -> dict[str, Any]:
    """`cparams` with application_name `value` for `driver`, unless the app set one (then as given)."""
    if "application_name" in cparams:
        return cparams
    strings = (*cargs, *(cparams.get(key) for key in _STRINGS))
    if any(isinstance(s, str) and "application_name" in s for s in strings):
        return cparams
    if driver != "asyncpg":
        return {**cparams, "application_name": value}
    settings = cparams.get("server_settings") or {}
    if "application_name" in settings:
        return cparams
    return {**cparams, "server_settings": {**settings, "application_name": value}}


def install(dialect: Any, value: str, hooks: Hooks, fail: Callable[[str, BaseException], None]) -> bool:
    """Give new connections of a PostgreSQL dialect `value` as application_name; False for other dialects.

    Wraps whatever `dialect.connect` is now (instrument()'s timed connect), so it must come after it.
    """
    driver = dialect.driver
    if dialect.name != "postgresql" or driver not in DRIVERS:
        return False
    inner = dialect.connect
    on = hooks.on

    def named_connect(*cargs: Any, **cparams: Any) -> Any:
        if on[0]:
            try:
                cparams = named(driver, cargs, cparams, value)
            except Exception as exc:  # never into the app's connect: it goes on unnamed
                fail("connect", exc)
        return inner(*cargs, **cparams)

    hooks.patch(dialect, "connect", named_connect)
    return True
