"""Zero-code install: `create_engine("…?plugin=pool_exporter")` instruments the engine it creates.

Options come from the URL query (`pool_exporter_name`, `pool_exporter_namespace`,
`pool_exporter_names`, `pool_exporter_leak_threshold`, `pool_exporter_server_view`=`true`|`false`,
`pool_exporter_server_view_interval`) and are stripped before the driver sees them. This path never
raises into create_engine(): a bad option or a failure to instrument is logged (the URL's password
never is) and the engine works, uninstrumented or with that option left out.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.engine import URL, CreateEnginePlugin, Engine

from . import catalog, validation
from .core import default_exporter
from .labels import safe_url

log = logging.getLogger("sqlalchemy_pool_exporter")

_PREFIX = "pool_exporter_"
_OPTIONS = ("name", "namespace", "names", "leak_threshold", "server_view", "server_view_interval")
_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


class PoolExporterPlugin(CreateEnginePlugin):
    """Adapts URL options to a plain Exporter.instrument() call on the default Exporter."""

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        self._url = url
        self._options: dict[str, Any] = {}
        for option in _OPTIONS:
            value = url.query.get(_PREFIX + option)
            if isinstance(value, tuple):
                value = value[-1]
            if value is None:
                continue
            try:
                if option == "leak_threshold":
                    self._options[option] = validation.leak_threshold(value)
                elif option == "namespace":
                    self._options[option] = validation.namespace(value)
                elif option == "names":
                    self._options[option] = validation.names(value)
                elif option == "server_view":
                    if str(value).lower() not in _BOOLEANS:
                        raise ValueError(f"must be true or false, got {value!r}")
                    self._options[option] = _BOOLEANS[str(value).lower()]
                elif option == "server_view_interval":
                    self._options[option] = validation.seconds(option, value)
                else:
                    self._options[option] = validation.pool_name(value)
            except ValueError as exc:
                log.error("%s%s ignored: %s (engine %s)", _PREFIX, option, exc, safe_url(url))

    def update_url(self, url: URL) -> URL:
        return url.difference_update_query([_PREFIX + o for o in _OPTIONS])

    def engine_created(self, engine: Engine) -> None:
        options = dict(self._options)
        namespace = options.pop("namespace", catalog.DEFAULT_NAMESPACE)
        names = options.pop("names", "default")
        try:
            exporter = default_exporter(namespace, names)
            exporter.instrument(engine, **options)
        except Exception as exc:
            log.error("engine %s is not instrumented: %s: %s", safe_url(self._url), type(exc).__name__, exc)
