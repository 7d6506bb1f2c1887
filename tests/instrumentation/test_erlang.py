"""Erlang B and C against published values, and the advised size at its boundaries."""

from __future__ import annotations

import pytest

from sqlalchemy_pool_exporter.instrumentation import erlang


@pytest.mark.parametrize(
    ("c", "load", "expected"),
    [
        # Published Erlang C tables (e.g. Cooper, Introduction to Queueing Theory; call-centre tables): A = 10 Erlangs.
        (11, 10.0, 0.6821),
        (12, 10.0, 0.4494),
        (13, 10.0, 0.2853),
        (14, 10.0, 0.1741),
        (15, 10.0, 0.1020),
        # Exact: two servers under one Erlang wait with probability 1/3, three under two with 4/9.
        (2, 1.0, 1 / 3),
        (3, 2.0, 4 / 9),
        # FIELD-NOTES: 40/s held 0.1 s is 4 Erlangs; 5.9% wait at 8 connections, 0.88% at 10.
        (8, 4.0, 0.0590),
        (10, 4.0, 0.0088),
    ],
)
def test_erlang_c_matches_published_values(c: int, load: float, expected: float) -> None:
    assert erlang.erlang_c(c, load) == pytest.approx(expected, abs=5e-5)


def test_erlang_b_matches_the_closed_form() -> None:
    # B(2, 1) = (1/2) / (1 + 1 + 1/2) = 0.2; B(0, A) = 1.
    assert erlang.erlang_b(2, 1.0) == pytest.approx(0.2)
    assert erlang.erlang_b(0, 3.0) == 1.0


def test_no_steady_state_means_everyone_waits() -> None:
    assert erlang.erlang_c(4, 4.0) == 1.0
    assert erlang.erlang_c(3, 4.5) == 1.0
    assert erlang.mean_wait(4, 4.0, 0.1) == float("inf")


def test_mean_wait_is_c_times_hold_over_spare_servers() -> None:
    assert erlang.mean_wait(3, 2.0, 0.1) == pytest.approx(4 / 9 * 0.1 / 1)


@pytest.mark.parametrize(
    ("load", "p", "expected"),
    [
        (4.0, 0.01, 10),  # 9 gives 2.4%, 10 gives 0.88%
        (4.0, 0.06, 8),  # 5.9% at 8
        (10.0, 0.2, 14),  # 17.4% at 14, 28.5% at 13
        (0.0, 0.01, 1),
        (0.001, 0.01, 1),
        (0.5, 0.01, 4),
        (100.0, 0.01, 125),
    ],
)
def test_advised_size_is_the_smallest_size_under_the_target(load: float, p: float, expected: int) -> None:
    size = erlang.advised_size(load, p)
    assert size == expected
    assert erlang.erlang_c(size, load) <= p
    if size > 1:
        assert erlang.erlang_c(size - 1, load) > p


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 2.0])
def test_advised_size_refuses_a_target_that_is_no_probability(p: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        erlang.advised_size(4.0, p)


def test_erlang_b_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        erlang.erlang_b(-1, 1.0)
    with pytest.raises(ValueError):
        erlang.erlang_b(1, float("nan"))
