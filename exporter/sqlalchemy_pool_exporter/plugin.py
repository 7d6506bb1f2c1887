"""Zero-code install: `create_engine("…?plugin=pool_exporter")` instruments the engine it creates.

Options come from the URL query (`pool_exporter_name`, `pool_exporter_namespace`,
`pool_exporter_leak_threshold`) and are stripped before the driver sees them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL, CreateEnginePlugin, Engine

from .instrument import instrument

_PREFIX = "pool_exporter_"
_OPTIONS = ("name", "namespace", "leak_threshold")


class PoolExporterPlugin(CreateEnginePlugin):
    """Adapts URL options to a plain instrument() call."""

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        self._options: dict[str, Any] = {}
        for option in _OPTIONS:
            value = url.query.get(_PREFIX + option)
            if isinstance(value, tuple):
                value = value[-1]
            if value is None:
                continue
            if option == "leak_threshold":
                try:
                    self._options[option] = float(value)
                except ValueError:
                    raise ValueError(f"{_PREFIX}leak_threshold must be a number of seconds, got {value!r}") from None
            else:
                self._options[option] = value

    def update_url(self, url: URL) -> URL:
        return url.difference_update_query([_PREFIX + o for o in _OPTIONS])

    def engine_created(self, engine: Engine) -> None:
        instrument(engine, **self._options)
