"""Pool names and printable URLs that never carry a password."""

from __future__ import annotations

import re
from urllib.parse import quote_plus

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}
# Query keys whose values are shown; every other value is masked. An allowlist, because drivers
# take secrets under names no denylist foresees (?pwd=, ?odbc_connect=...;PWD=..., ?options=-c ...).
HARMLESS_QUERY_KEYS = frozenset(
    {
        "application_name",
        "charset",
        "client_encoding",
        "connect_timeout",
        "command_timeout",
        "driver",
        "encoding",
        "isolation_level",
        "prepared_statement_cache_size",
        "ssl",
        "sslmode",
        "target_session_attrs",
        "timeout",
        "mode",
        "cache",
        "uri",
        "check_same_thread",
    }
)
MASK = "***"


# How SQLAlchemy splits off the credentials (engine/url.py, _parse_url): the user runs to the first
# ':' or '/', the password to the first '@'. Anything after that is host, port, database, query.
CREDENTIALS = re.compile(r"[\w+]+://[^:/]*(?::[^@]*)?@")


def _pairs(u: URL) -> list[tuple[str, str]]:
    return [(k, v) for k, vs in u.query.items() for v in ((vs,) if isinstance(vs, str) else vs)]


def _after_last_at(drivername: str, rest: str) -> URL | None:
    """`rest` (what followed the credentials) cut to what follows its last '@', or None.

    SQLAlchemy ends the password at the first '@'. When the password itself holds an unencoded '@'
    (`user:Pa@Tail@host/db`), the rest of it lands in the host (`Tail@host`), or with a '/' or '?'
    in it, in the database or the query. A password always ends before the last '@' of the URL, so
    only what follows the last '@' is used. When a '?' comes before that '@', the '@' may be in the
    query, whose values can be secrets as well: then nothing is used. (A database name or query
    value holding an '@' so costs a URL with credentials its name: pass name= for such a pool.)
    """
    head, _, tail = rest.rpartition("@")
    if "?" in head:
        return None
    try:
        return make_url(f"{drivername}://{tail}")
    except (ArgumentError, ValueError):
        return None


def _location(url: URL | str) -> tuple[URL, URL | None]:
    """The URL, and one holding only its host, port, database and query (nothing from the
    credentials), or None when no such part can be told apart from them.

    Given the text, the '@'s are all there to see. A parsed URL has lost some: SQLAlchemy drops a
    query piece without '=' (`user:p@ss?word@host` leaves host `ss` and no query), so from a URL
    object this is only as good as what the parse kept; pass the text when you have it.
    """
    if isinstance(url, str):
        u = make_url(url)
        credentials = CREDENTIALS.match(url)
        seen = credentials is not None
        rest = url[credentials.end() :] if credentials is not None else url.partition("://")[2]
    else:
        u = url
        seen = url.username is not None or url.password is not None
        rest = f"[{u.host}]" if u.host and ":" in u.host else (u.host or "")
        rest += f":{u.port}" if u.port else ""
        rest += "" if u.database is None else "/" + u.database
        rest += "?" + "&".join(f"{k}={v}" for k, v in _pairs(u)) if u.query else ""
    if not seen and ":" not in rest.rpartition("@")[0]:
        # No credentials SQLAlchemy saw, and no ':' before an '@' that could end a password it did not:
        # a user holding a '/' (`us/er:secret@host`) leaves no user, host `us`, database `er:secret@host`.
        rest = ""
    return u, (_after_last_at(u.drivername, rest) if "@" in rest else u)


def pool_name(url: URL | str) -> str:
    """`host:port/database` for server databases (`host:port` without one), `backend:/path` for file ones;
    never credentials."""
    u, where = _location(url)
    backend = u.get_backend_name()
    if where is None:
        return backend
    if where.host:
        port = where.port or _DEFAULT_PORTS.get(backend)
        host = f"[{where.host}]" if ":" in where.host else where.host  # IPv6: `[::1]:5432`, as in a URL
        host = f"{host}:{port}" if port else host
        return f"{host}/{where.database}" if where.database else host
    return f"{backend}:{where.database or 'memory'}"


def server_labels(url: URL | str) -> tuple[str, str, str] | None:
    """(server `host:port`, database, driver) of a URL that names a server, for `pool_info`; never credentials.

    None for file and in-memory databases (SQLite): no server, no connection budget.
    """
    u, where = _location(url)
    if where is None or not where.host:
        return None
    backend = u.get_backend_name()
    port = where.port or _DEFAULT_PORTS.get(backend)
    host = f"[{where.host}]" if ":" in where.host else where.host
    return (f"{host}:{port}" if port else host), where.database or "", u.drivername


def safe_url(url: URL | str) -> str:
    """The URL with its password masked, and every query value but known harmless ones, for logs and pages."""
    u, where = _location(url)
    shown = URL.create(
        u.drivername,
        username=u.username,
        password=u.password,
        host=where.host if where is not None else None,
        port=where.port if where is not None else None,
        database=where.database if where is not None else None,
    )
    text = shown.render_as_string(hide_password=True)
    if where is None or not where.query:
        return text
    # Rendered here rather than by SQLAlchemy, which would percent-encode the mask into %2A%2A%2A.
    return (
        text
        + "?"
        + "&".join(
            f"{quote_plus(k)}={quote_plus(v) if k.lower() in HARMLESS_QUERY_KEYS else MASK}" for k, v in _pairs(where)
        )
    )


def error_class(exc: BaseException) -> str:
    """The `error` label: the exception's class, or the driver's when an adapter raised a bare `Error`.

    SQLAlchemy's async adapters (asyncpg) turn every server error they have no mapping for, such as
    InvalidCatalogNameError, CannotConnectNowError or TooManyConnectionsError, into one generic
    `Error` chained to the driver's exception; that name alone would tell an operator nothing.
    """
    name = type(exc).__name__
    cause = exc.__cause__
    if name == "Error" and cause is not None:
        return type(cause).__name__
    return name
