"""What a compiled hot path would buy: instrumentation/pool.py's checkout and return bookkeeping, for mypyc.

Not used by the exporter. `python -m benchmarks.compiled` compiles this module with mypyc and counts
the instructions of a pool cycle through it, beside the same source run as plain Python and beside
the exporter itself (docs/performance.md, "A compiled hot path").
"""

from __future__ import annotations

from time import perf_counter
from typing import Any


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    # Compiled, a native loop over native floats: no bisect call, no boxing.
    i = 0
    n = len(bounds)
    while i < n and value > bounds[i]:
        i += 1
    return i


class Hist:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: list[int] = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bucket(self.bounds, value)] += 1
        self.sum += value


class Probe:
    """pool.connect() and pool._return_conn() with the exporter's bookkeeping: waiters, wait and use
    histograms, the checkout table keyed by pool record with SQLAlchemy's own fairy weakref."""

    def __init__(self, pool: Any, bounds: tuple[float, ...]) -> None:
        self.pool = pool
        self.cls = type(pool)
        self.waiting: list[float] = []
        self.checked_out: dict[Any, tuple[float, Any, Any, Any]] = {}
        self.wait = Hist(bounds)
        self.use = Hist(bounds)

    def connect(self) -> Any:
        t0 = perf_counter()
        self.waiting.append(t0)
        try:
            fairy = self.cls.connect(self.pool)
        except BaseException:
            self.waiting.remove(t0)
            raise
        self.waiting.remove(t0)
        t1 = perf_counter()
        self.wait.observe(t1 - t0)
        record = fairy._connection_record
        self.checked_out[record] = (t1, record.fairy_ref, None, None)
        return fairy

    def return_conn(self, record: Any) -> None:
        entry = self.checked_out.pop(record, None)
        if entry is not None:
            self.use.observe(perf_counter() - entry[0])
        self.cls._return_conn(self.pool, record)
