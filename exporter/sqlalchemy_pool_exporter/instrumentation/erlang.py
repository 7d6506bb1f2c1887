"""Erlang B and C (M/M/c): how many connections a pool needs for an offered load, as pure functions.

A pool is a queue with `c` servers: callers arrive at rate λ, hold a connection W seconds on average,
and wait when all `c` are busy. The offered load A = λ·W (Erlangs) is the mean number of busy
connections. Erlang C gives the probability that a caller must wait; it assumes random (Poisson)
arrivals and exponential holds, and is known to be a close approximation for other hold-time shapes.
"""

from __future__ import annotations

import math

# Past this many connections the answer is "more than any pool should have": stop searching.
MAX_SIZE = 10_000


def erlang_b(c: int, load: float) -> float:
    """Blocking probability of `c` servers under `load` Erlangs (the stable recursion, no factorials)."""
    if c < 0 or load < 0 or not math.isfinite(load):
        raise ValueError(f"erlang_b needs c >= 0 and a finite load >= 0, not c={c}, load={load}")
    b = 1.0
    for k in range(1, c + 1):
        b = load * b / (k + load * b)
    return b


def erlang_c(c: int, load: float) -> float:
    """Probability that a caller waits, with `c` servers under `load` Erlangs (1.0 when c <= load: no steady state)."""
    if c <= load:
        return 1.0
    b = erlang_b(c, load)
    return c * b / (c - load * (1.0 - b))


def mean_wait(c: int, load: float, mean_hold: float) -> float:
    """Mean time a caller waits (all callers, waiting or not), in the unit of `mean_hold`."""
    if c <= load:
        return math.inf
    return erlang_c(c, load) * mean_hold / (c - load)


def advised_size(load: float, wait_probability: float) -> int:
    """The smallest c > load whose Erlang C probability of waiting is at most `wait_probability`; at least 1."""
    if not 0.0 < wait_probability < 1.0:
        raise ValueError(f"wait_probability must be between 0 and 1, not {wait_probability}")
    if load <= 0:
        return 1
    c = max(1, math.floor(load) + 1)
    # Erlang B by the same recursion, carried on from c-1 instead of restarted for every c.
    b = erlang_b(c - 1, load)
    while c < MAX_SIZE:
        b = load * b / (c + load * b)
        if c * b / (c - load * (1.0 - b)) <= wait_probability:
            return c
        c += 1
    return MAX_SIZE
