"""Our own failures: counted in `exporter_errors_total`, logged at a throttled rate, never raised to the app."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..logs import Throttle

if TYPE_CHECKING:
    from .stats import PoolStats

log = logging.getLogger("sqlalchemy_pool_exporter")

LOG_EVERY = 60.0


class Failures:
    """Counts and logs one pool's failures; each place (`where`) logs at most once per LOG_EVERY seconds."""

    def __init__(self, pool: str, stats: PoolStats) -> None:
        self.pool = pool
        self.stats = stats
        self._throttles: dict[str, Throttle] = {}

    def __call__(self, where: str, exc: BaseException) -> None:
        """Count and log a bug of ours in `where`."""
        self.stats.errors += 1
        if self.due(where):
            log.error(
                "pool %s: exporter listener %r failed (counted; the app is unaffected)",
                self.pool,
                where,
                exc_info=exc,
                extra={"pool": self.pool},
            )

    def due(self, where: str) -> bool:
        """Whether a message about `where` may be logged now; marks it logged if so."""
        throttle = self._throttles.get(where)
        if throttle is None:
            throttle = self._throttles[where] = Throttle(LOG_EVERY)
        return throttle.ready() is not None
