"""Prometheus metrics for SQLAlchemy connection pools, connections, transactions and sessions."""

from ._version import __version__
from .asgi import metrics_app
from .catalog import CATALOG, DEFAULT_NAMESPACE, LEAN_BUCKETS
from .core import Exporter, default_exporter, handle_for, handles, instrument, instrument_all, uninstrument
from .errors import AlreadyInstrumented
from .instrumentation.handle import PoolHandle
from .instrumentation.holders import holder
from .instrumentation.reading import PoolReading
from .labels import pool_name, safe_url
from .middleware import HolderMiddleware, holder_middleware
from .session import session_dependency, session_scope
from .wsgi import wsgi_metrics_app

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
    "instrument_all",
    "metrics_app",
    "pool_name",
    "safe_url",
    "session_dependency",
    "session_scope",
    "uninstrument",
    "wsgi_metrics_app",
]
