"""The size advice against Erlang C on real asyncpg pools: Poisson arrivals, exponential holds, fixed seed.

One stream of arrivals (rate RATE, holds of mean HOLD: A = 3.76 connections busy) is fed at the same
instants, with the same holds, to three pools: one large enough never to wait (the advice is read from
it), one of the size Erlang C advises for 1% (10), and one two smaller (8). Common random numbers: the
three differ only by their size. A caller "waits" when it arrives to find every connection of its pool
held or promised (the event Erlang C gives the probability of), counted by the generator itself, which
is the only code running on the loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.instrumentation import erlang

from ..conftest import PG_URL

RATE = 40.0  # checkouts per second
HOLD = 0.094  # mean hold, seconds: A = 3.76 Erlangs, in the middle of the loads Erlang C sizes at 10 for 1%
SECONDS = 24.0
SEED = 21
TARGET = 0.01


def arrivals(seed: int) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    out, t = [], rng.expovariate(RATE)
    while t < SECONDS:
        out.append((t, rng.expovariate(1.0 / HOLD)))
        t += rng.expovariate(RATE)
    return out


async def warm(engine: Any, n: int) -> None:
    """Open the pool's connections first: connection setup is not part of the hold."""
    conns = [await engine.connect() for _ in range(n)]
    for conn in conns:
        await conn.close()


async def run(engines: dict[int, Any], exporter: Exporter, big: int) -> dict[str, Any]:
    from sqlalchemy.ext.asyncio import AsyncEngine

    assert all(isinstance(e, AsyncEngine) for e in engines.values())
    in_system = dict.fromkeys(engines, 0)
    waited = dict.fromkeys(engines, 0)
    held: list[float] = []

    async def one(size: int, hold: float) -> None:
        if in_system[size] >= size:
            waited[size] += 1
        in_system[size] += 1
        try:
            async with engines[size].connect():
                started = time.perf_counter()
                await asyncio.sleep(hold)
                if size == big:
                    held.append(time.perf_counter() - started)
        finally:
            in_system[size] -= 1

    handle = exporter.handle_for(engines[big])
    assert handle is not None
    stream = arrivals(SEED)
    tasks = []
    start = time.perf_counter()
    for at, hold in stream:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks += [asyncio.create_task(one(size, hold)) for size in engines]
    await asyncio.sleep(max(0.0, start + SECONDS - time.perf_counter()))
    advice = handle.stats.window.advice(handle.stats)  # now, the holds still out counted as busy
    await asyncio.gather(*tasks)
    return {"n": len(stream), "held": held, "waited": waited, "advice": advice}


@pytest.mark.timeout(120)
async def test_advice_matches_erlang_c_on_real_pools() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    advised = erlang.advised_size(RATE * HOLD, TARGET)
    assert advised == 10
    sizes = (30, advised, advised - 2)
    engines = {size: create_async_engine(PG_URL, pool_size=size, max_overflow=0) for size in sizes}
    try:
        for size, engine in engines.items():
            await warm(engine, size)
        with Exporter(CollectorRegistry(), advice_window=SECONDS * 2) as exporter:
            for size, engine in engines.items():
                exporter.instrument(engine, name=f"size{size}")
            result = await run(engines, exporter, sizes[0])
    finally:
        for engine in engines.values():
            await engine.dispose()
    n, held, waited, advice = result["n"], result["held"], result["waited"], result["advice"]
    # λ and W as the generator measured them: its arrivals over the run, the holds it timed.
    rate, mean_hold = n / SECONDS, sum(held) / len(held)
    assert advice is not None
    print(f"\nλ={rate:.2f}/s W={mean_hold * 1000:.1f} ms λW={rate * mean_hold:.3f}; exporter: λ={advice.rate:.2f}/s "
          f"W={advice.mean_hold * 1000:.1f} ms A={advice.offered_load:.3f} advised={advice.advised_size}")  # fmt: skip
    # The exporter's offered load is the generator's λ·W (5%: the holds still out at the end, the loop's lag).
    assert advice.offered_load == pytest.approx(rate * mean_hold, rel=0.05)
    assert advice.advised_size == erlang.advised_size(rate * mean_hold, TARGET) == advised
    # And λ·W is the nominal 3.76 within the estimator's noise: var(mean busy) = 2·A·W/T for exponential holds,
    # sd = 0.054 here (1.4%); 4 sd, plus the loop's lag on each hold (< 3 ms).
    assert advice.offered_load == pytest.approx(RATE * HOLD, rel=0.06 + 0.003 / HOLD)
    p = {size: waited[size] / n for size in sizes}
    formula = {size: erlang.erlang_c(size, rate * mean_hold) for size in sizes}
    print("P(wait) measured vs Erlang C: " + ", ".join(f"{s}: {p[s]:.4f} vs {formula[s]:.4f}" for s in sizes))
    assert waited[sizes[0]] == 0  # 30 connections never all busy at 3.8 Erlangs (Erlang C: 1e-11)
    # Waits come in bursts (busy periods), so their count varies more than a binomial's: allow a factor of 2
    # around the formula at 8, and below 2.5% at the advised size (the target is 1%).
    assert formula[advised - 2] / 2 <= p[advised - 2] <= formula[advised - 2] * 2
    assert p[advised] <= 0.025
    assert p[advised - 2] > 3 * p[advised]
