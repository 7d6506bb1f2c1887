"""The series budget per pool (README "Series budget"): exact counts for the defaults and the lean profile."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool

from sqlalchemy_pool_exporter import LEAN_BUCKETS, Exporter, holder


def series_per_pool(
    tmp_path: Path, buckets: Mapping[str, Sequence[float]] | None = None, holders: int = 0, **options: bool
) -> int:
    """Series with pool="p" once every kind of statement, a commit, a rollback and a savepoint ran."""
    registry = CollectorRegistry()
    with Exporter(registry, buckets=buckets) as exporter:
        engine = create_engine(f"sqlite:///{tmp_path}/{len(list(tmp_path.iterdir()))}.db", poolclass=QueuePool)
        exporter.instrument(engine, name="p", **options)
        with engine.connect() as conn:
            for sql in ("CREATE TABLE t (x INTEGER)", "INSERT INTO t VALUES (1)", "UPDATE t SET x = 2",
                        "SELECT x FROM t", "DELETE FROM t"):  # fmt: skip
                conn.execute(text(sql))
            conn.commit()
            with conn.begin_nested():
                pass
            conn.rollback()
        for i in range(holders):
            with holder(f"h{i}"), engine.connect():
                pass
        count = sum(1 for m in registry.collect() for s in m.samples if s.labels.get("pool") == "p")
        engine.dispose()
    return count


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, 222),  # 90 of them: 5 operations x 18 statement-histogram series
        ({"statements": False}, 132),  # 3 transaction outcomes x (1 count + 18 histogram series)
        ({"statements": False, "buckets": LEAN_BUCKETS}, 66),  # the lean profile
        ({"statements": False, "transactions": False, "buckets": LEAN_BUCKETS}, 40),
    ],
)
def test_series_per_pool(tmp_path: Path, options: dict[str, object], expected: int) -> None:
    assert series_per_pool(tmp_path, **options) == expected  # type: ignore[arg-type]


def test_each_holder_adds_six_series(tmp_path: Path) -> None:
    base = series_per_pool(tmp_path, statements=False, buckets=LEAN_BUCKETS)
    # Attribution on: `none` (six) and the pool's folded count (one), then six per holder.
    assert series_per_pool(tmp_path, statements=False, buckets=LEAN_BUCKETS, holders=3) == base + 6 + 1 + 3 * 6
