"""Prometheus metrics for SQLAlchemy connection pools, connections, transactions and sessions."""

from ._version import __version__
from .catalog import CATALOG, DEFAULT_NAMESPACE
from .instrument import PoolHandle, handle_for, handles, instrument, uninstrument
from .naming import pool_name, safe_url
from .reading import PoolReading
from .session import session_dependency, session_scope

__all__ = [
    "CATALOG",
    "DEFAULT_NAMESPACE",
    "PoolHandle",
    "PoolReading",
    "__version__",
    "handle_for",
    "handles",
    "instrument",
    "pool_name",
    "safe_url",
    "session_dependency",
    "session_scope",
    "uninstrument",
]
