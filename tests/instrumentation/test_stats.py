"""stats.py: the bucket search the hot paths inline, against bisect_left over the plain bounds."""

from __future__ import annotations

import math
from bisect import bisect_left

import pytest

from sqlalchemy_pool_exporter import LEAN_BUCKETS
from sqlalchemy_pool_exporter.catalog import DEFAULT_BUCKETS
from sqlalchemy_pool_exporter.instrumentation.stats import Histogram, bucket, probe

_SETS = [(0.5,), (0.1, 1.0), (0.001, 0.01, 0.1), *DEFAULT_BUCKETS.values(), *LEAN_BUCKETS.values()]


@pytest.mark.parametrize("bounds", _SETS, ids=[f"{len(b)} bounds" for b in _SETS])
def test_bucket_is_bisect_left_over_the_bounds(bounds: tuple[float, ...]) -> None:
    values = [0.0, -1.0, math.inf, -math.inf, math.nan, 1e-9, 1e9]
    for b in bounds:  # each bound, and either side of it
        values += [b, math.nextafter(b, -math.inf), math.nextafter(b, math.inf), b * 1.5]
    for value in values:
        assert bucket(probe(bounds), value) == bisect_left(bounds, value), value


def test_an_observation_lands_where_prometheus_client_puts_it() -> None:
    hist = Histogram((0.1, 1.0))
    for value in (0.1, 0.10000001, 1.0, 2.0, math.inf, 0.0):
        hist.observe(value)
    assert hist.counts == [2, 2, 2]  # le=0.1: 0.1 and 0.0; le=1.0: 0.10000001 and 1.0; +Inf: 2.0 and inf
