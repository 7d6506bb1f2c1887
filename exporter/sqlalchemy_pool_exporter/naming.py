"""Pool names and printable URLs that never carry a password."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url

_SECRET_WORDS = ("pass", "secret", "token", "key", "credential")
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}


def pool_name(url: URL | str) -> str:
    """`host:port/database` for server databases, `backend:/path` for file ones; never credentials."""
    u = make_url(url) if isinstance(url, str) else url
    backend = u.get_backend_name()
    if u.host:
        port = u.port or _DEFAULT_PORTS.get(backend)
        host = f"{u.host}:{port}" if port else u.host
        return f"{host}/{u.database or ''}"
    return f"{backend}:{u.database or 'memory'}"


def safe_url(url: URL | str) -> str:
    """The URL with its password masked, for logs and pages."""
    u = make_url(url) if isinstance(url, str) else url
    # Some drivers take credentials in the query string (?password=, ?sslpassword=, tokens).
    hidden = {k: "***" for k in u.query if any(w in k.lower() for w in _SECRET_WORDS)}
    if hidden:
        u = u.update_query_dict(hidden)
    return u.render_as_string(hide_password=True)


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
