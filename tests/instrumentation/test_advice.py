"""The advice window: offered load, rate, mean hold and opened connections from the counters, exactly."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from sqlalchemy_pool_exporter import Exporter, catalog
from sqlalchemy_pool_exporter.instrumentation import views
from sqlalchemy_pool_exporter.instrumentation.advice import Window
from sqlalchemy_pool_exporter.instrumentation.stats import PoolStats

from ..conftest import poll_sync, sample


def traffic(stats: PoolStats, checkouts: int, hold: float, created: int = 0) -> None:
    """What the hot path counts for `checkouts` checkouts held `hold` seconds each (pool.py)."""
    for _ in range(checkouts):
        stats.wait.observe(0.0)
        stats.use.observe(hold)
    stats.created += created


def test_offered_load_rate_and_hold_over_the_window() -> None:
    stats = PoolStats(catalog.DEFAULT_BUCKETS)
    window = Window(seconds=100.0, wait_probability=0.01)  # one snapshot per second at most
    window.ring.clear()
    assert window.advice(stats, now=1000.0) is None  # the first snapshot: nothing to compare with
    traffic(stats, 400, 0.1, created=7)  # 40/s held 0.1 s over 10 s: 4 Erlangs
    advice = window.advice(stats, now=1010.0)
    assert advice is not None
    assert advice.seconds == 10.0
    assert advice.rate == pytest.approx(40.0)
    assert advice.mean_hold == pytest.approx(0.1)
    assert advice.offered_load == pytest.approx(4.0)
    assert advice.advised_size == 10  # Erlang C: 0.88% at 10, 2.4% at 9
    assert advice.opened == 7
    # Between two steps every reader sees the same numbers.
    traffic(stats, 100, 0.1)
    assert window.advice(stats, now=1010.5) is advice


def test_the_window_slides_and_forgets_old_traffic() -> None:
    stats = PoolStats(catalog.DEFAULT_BUCKETS)
    window = Window(seconds=10.0)
    window.ring.clear()
    window.advice(stats, now=0.0)
    traffic(stats, 1000, 0.5)  # a burst long ago: 50 Erlangs over its 10 s
    first = window.advice(stats, now=10.0)
    assert first is not None and first.offered_load == pytest.approx(50.0)
    traffic(stats, 20, 0.1)  # then 2/s held 0.1 s: 0.2 Erlangs
    later = window.advice(stats, now=20.0)
    assert later is not None
    assert later.seconds == 10.0
    assert later.offered_load == pytest.approx(0.2)
    assert later.advised_size == 3  # Erlang C(2, 0.2) = 1.6%, C(3, 0.2) = 0.1%
    # An idle window has no advice: no checkout to advise on.
    assert window.advice(stats, now=30.0) is None
    assert len(window.ring) == 2


def test_connections_still_held_count_as_busy() -> None:
    stats = PoolStats(catalog.DEFAULT_BUCKETS)
    window = Window(seconds=100.0)
    window.ring.clear()
    window.advice(stats, now=0.0)
    stats.wait.observe(0.0)
    stats.checked_out[object()] = (2.0, None, None, None)  # out since t=2, not returned yet
    advice = window.advice(stats, now=10.0)
    assert advice is not None
    assert advice.offered_load == pytest.approx(0.8)  # 8 s busy of 10


def test_the_ring_stays_bounded() -> None:
    stats = PoolStats(catalog.DEFAULT_BUCKETS)
    window = Window(seconds=300.0)  # a snapshot every 3 s
    window.ring.clear()
    for t in range(0, 3000):
        traffic(stats, 1, 0.01)
        window.advice(stats, now=float(t))
    assert len(window.ring) <= 102


def test_exporter_exports_the_advice_and_says_it_in_words(sqlite_engine: Engine) -> None:
    registry = CollectorRegistry()
    with Exporter(registry, advice_window=50, advice_wait_probability=0.05) as exporter:
        handle = exporter.instrument(sqlite_engine, name="p")
        assert handle.stats.window.step == 1.0
        with sqlite_engine.connect():
            pass
        assert sample(registry, "sqlalchemy_pool_advised_size", pool="p") is None  # the window has no step yet
        poll_sync(lambda: sample(registry, "sqlalchemy_pool_advised_size", pool="p") is not None, timeout=5.0)
        assert sample(registry, "sqlalchemy_pool_advised_size", pool="p") == 1.0
        row = handle.snapshot()
        assert row["advised_size"] == 1
        assert row["advice"]["wait_probability"] == 0.05
        assert row["sizing"].startswith("0.00 connections busy on average")
        assert ": 1 connection so that at most 5% of checkouts wait (Erlang C)" in row["sizing"]
        ending = "Configured: pool_size 2 + max_overflow 1. Enough. 1 connection was opened in the window."
        assert row["sizing"].endswith(ending)
        _, body = views.sizing_table([row])
        assert body[0][0] == "p" and body[0][4] == 1


@pytest.mark.parametrize(("window", "p"), [(0, 0.01), (86401, 0.01), (300, 0.0), (300, 1.0), (300, "x")])
def test_bad_advice_settings_are_refused(window: float, p: float) -> None:
    with pytest.raises(ValueError, match="advice_"):
        Exporter(CollectorRegistry(), advice_window=window, advice_wait_probability=p)
