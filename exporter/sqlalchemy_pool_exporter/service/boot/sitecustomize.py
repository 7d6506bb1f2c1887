"""`pool-exporter run`: Python imports this at start-up, in the program and in every worker it starts.

It instruments every engine the process creates (instrument_all() on the default Exporter, which
writes PROMETHEUS_MULTIPROC_DIR when `run` set one), then runs the sitecustomize it shadows, if any,
as site would have. A failure here is one line on stderr: the program runs, uninstrumented.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

ENABLE = "POOL_EXPORTER_EVERY_ENGINE"


def _instrument() -> None:
    if os.environ.get(ENABLE) != "1":
        return
    try:
        from sqlalchemy_pool_exporter import catalog, validation
        from sqlalchemy_pool_exporter.core import default_exporter, instrument_all

        namespace = validation.namespace(os.environ.get("POOL_EXPORTER_NAMESPACE") or catalog.DEFAULT_NAMESPACE)
        names = validation.names(os.environ.get("POOL_EXPORTER_NAMES") or "default")
        leak_threshold = validation.leak_threshold(os.environ.get("POOL_EXPORTER_LEAK_THRESHOLD") or None)
        instrument_all(default_exporter(namespace, names), leak_threshold=leak_threshold)
    except Exception as exc:
        print(
            f"pool-exporter run: process {os.getpid()} does not instrument its engines: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )


def _chain() -> None:
    """Run the next sitecustomize on sys.path (a venv's, the distribution's): we only went first."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)  # its errors reach site, which reports them as it would have


_instrument()
_chain()
