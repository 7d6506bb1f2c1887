"""Goal 2: `async with session: SELECT 1; commit` on the local PostgreSQL through asyncpg.

App CPU per transaction is the process's CPU time (time.process_time) over the transactions run;
the server's CPU is not ours and not counted. Each variant has its own engine; between slots the
engine is disposed so that at most `concurrency` server connections are open at a time.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from .measure import Summary, orders, summarise
from .variants import Variant, inside

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
SELECT_1 = text("SELECT 1")


@dataclass
class Result:
    cpu_us: dict[str, Summary]  # app CPU µs per transaction
    tps: dict[str, Summary]  # transactions per second


async def run_transactions(maker: async_sessionmaker, total: int, concurrency: int) -> None:  # type: ignore[type-arg]
    async def worker(n: int) -> None:
        for _ in range(n):
            async with maker() as session:
                await session.execute(SELECT_1)
                await session.commit()

    share, extra = divmod(total, concurrency)
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))


async def _slot(engine: AsyncEngine, total: int, concurrency: int) -> tuple[float, float]:
    maker = async_sessionmaker(engine, expire_on_commit=False)
    await run_transactions(maker, concurrency * 4, concurrency)  # open the connections, untimed
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await run_transactions(maker, total, concurrency)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await engine.dispose()
    return cpu / total * 1e6, total / wall


async def _run(variants: list[Variant], rounds: int, concurrency: int, total: int) -> Result:
    engines: dict[str, AsyncEngine] = {}
    for v in variants:
        engine = create_async_engine(PG_URL, pool_size=concurrency, max_overflow=0)
        v.attach(engine.sync_engine)
        engines[v.name] = engine
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    tps: dict[str, list[float]] = {v.name: [] for v in variants}
    by_name = {v.name: v for v in variants}
    for order in orders([v.name for v in variants], rounds):
        for name in order:
            gc.collect()
            with inside(by_name[name]):
                cpu_us, rate = await _slot(engines[name], total, concurrency)
            cpu[name].append(cpu_us)
            tps[name].append(rate)
    for engine in engines.values():
        await engine.dispose()
    return Result(summarise(cpu), summarise(tps))


def run(variants: list[Variant], *, rounds: int, concurrency: int, total: int) -> Result:
    return asyncio.run(_run(variants, rounds, concurrency, total))


def postgres_available() -> bool:
    async def probe() -> None:
        engine = create_async_engine(PG_URL, pool_size=1)
        try:
            async with engine.connect() as conn:
                await conn.execute(SELECT_1)
        finally:
            await engine.dispose()

    try:
        asyncio.run(asyncio.wait_for(probe(), 5))
    except Exception:
        return False
    return True
