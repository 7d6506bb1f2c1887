"""The exceptions more than one room raises or catches, and `require()`, which raises the one for a missing extra."""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "sqlalchemy-pool-exporter"
# Import name -> the name pip knows it by, where they differ.
_PACKAGES = {"yaml": "PyYAML"}


class AlreadyInstrumented(ValueError):
    """The engine is instrumented already, with other options or by another Exporter."""


class Unavailable(Exception):
    """What a data source raises when it cannot answer now: the request gets 503 and this one-line reason."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message is one line naming the extra that brings it."""

    def __init__(self, needed_by: str, module: str, extra: str) -> None:
        self.extra = extra
        package = _PACKAGES.get(module, module)
        super().__init__(
            f"{needed_by} needs {package}, which is not installed: pip install '{DISTRIBUTION}[{extra}]'", name=module
        )


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """The module, imported; MissingExtra naming `extra` when it is not installed.

    Only the module's own absence is turned into MissingExtra: an installed module that fails to
    import (a broken wheel, a missing C library) raises what it raised, which says more.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.partition(".")[0]:
            raise
        raise MissingExtra(needed_by, module, extra) from None
