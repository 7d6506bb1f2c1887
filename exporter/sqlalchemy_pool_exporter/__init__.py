"""Prometheus metrics for SQLAlchemy connection pools, connections, transactions and sessions."""

from ._version import __version__
from .catalog import CATALOG, DEFAULT_NAMESPACE, LEAN_BUCKETS
from .core import (
    AlreadyInstrumented,
    Exporter,
    default_exporter,
    handle_for,
    handles,
    instrument,
    uninstrument,
)
from .handle import PoolHandle
from .holders import holder
from .middleware import HolderMiddleware, holder_middleware
from .naming import pool_name, safe_url
from .reading import PoolReading
from .session import session_dependency, session_scope

__all__ = [
    "CATALOG",
    "DEFAULT_NAMESPACE",
    "LEAN_BUCKETS",
    "AlreadyInstrumented",
    "Exporter",
    "HolderMiddleware",
    "PoolHandle",
    "PoolReading",
    "__version__",
    "default_exporter",
    "handle_for",
    "handles",
    "holder",
    "holder_middleware",
    "instrument",
    "pool_name",
    "safe_url",
    "session_dependency",
    "session_scope",
    "uninstrument",
]
