"""The exceptions more than one room raises or catches."""

from __future__ import annotations


class AlreadyInstrumented(ValueError):
    """The engine is instrumented already, with other options or by another Exporter."""


class Unavailable(Exception):
    """What a data source raises when it cannot answer now: the request gets 503 and this one-line reason."""
