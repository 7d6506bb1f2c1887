"""The demo's traffic: commits, rollbacks, slow transactions, a slow report, pool-exhausting bursts, rare leaks."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

log = logging.getLogger("sqlalchemy_pool_exporter.loadgen")


@dataclass
class LoadPlan:
    """How hard to push: steady request loops plus periodic bursts, reports and leaks."""

    loops: int = 3
    pause: float = 0.05
    # A burst fires this many slow requests at once: more than the pool can hold, so some time out.
    burst_size: int = 10
    burst_every: float = 5.0
    burst_hold: float = 1.0
    leak_every: float = 15.0
    # One report at a time (it holds its connection for the demo's REPORT_HOLD), then this pause.
    report_every: float = 1.0
    first_burst: float = 1.0
    first_leak: float = 2.0
    first_report: float = 0.5
    seed: int | None = None


@dataclass
class LoadGenerator:
    """Drive the demo app over HTTP, as a client would; `sent` counts responses by route and status."""

    base_url: str
    plan: LoadPlan = field(default_factory=LoadPlan)
    headers: dict[str, str] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)

    async def run(self) -> None:
        """Run until cancelled."""
        rng = random.Random(self.plan.seed)
        connector = aiohttp.TCPConnector(limit=0, ssl=_no_verify() if self.base_url.startswith("https") else True)
        timeout = aiohttp.ClientTimeout(total=30)
        session = aiohttp.ClientSession(self.base_url, connector=connector, timeout=timeout, headers=self.headers)
        async with session as client, asyncio.TaskGroup() as tg:
            for _ in range(self.plan.loops):
                tg.create_task(self._steady(client, random.Random(rng.random())))
            tg.create_task(self._every(client, self.plan.first_burst, self.plan.burst_every, self._burst))
            tg.create_task(self._every(client, self.plan.first_leak, self.plan.leak_every, self._leak))
            tg.create_task(self._every(client, self.plan.first_report, self.plan.report_every, self._report))

    async def _hit(self, client: aiohttp.ClientSession, method: str, path: str) -> None:
        try:
            async with client.request(method, path) as response:
                await response.read()
                self.sent[f"{method} {path.split('?')[0]} {response.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.sent[f"{method} {path.split('?')[0]} {type(exc).__name__}"] += 1

    async def _steady(self, client: aiohttp.ClientSession, rng: random.Random) -> None:
        choices = (
            (0.55, "GET", "/demo/items"),
            (0.25, "POST", "/demo/items"),
            (0.12, "POST", "/demo/fail"),
            (0.08, "GET", "/demo/slow?seconds=0.2"),
        )
        weights = [w for w, _, _ in choices]
        while True:
            _, method, path = rng.choices(choices, weights)[0]
            await self._hit(client, method, path)
            await asyncio.sleep(self.plan.pause * (0.5 + rng.random()))

    async def _every(
        self,
        client: aiohttp.ClientSession,
        first: float,
        every: float,
        action: Callable[[aiohttp.ClientSession], Awaitable[None]],
    ) -> None:
        await asyncio.sleep(first)
        while True:
            await action(client)
            await asyncio.sleep(every)

    async def _burst(self, client: aiohttp.ClientSession) -> None:
        path = f"/demo/slow?seconds={self.plan.burst_hold}"
        await asyncio.gather(*(self._hit(client, "GET", path) for _ in range(self.plan.burst_size)))

    async def _report(self, client: aiohttp.ClientSession) -> None:
        await self._hit(client, "GET", "/demo/report")

    async def _leak(self, client: aiohttp.ClientSession) -> None:
        await self._hit(client, "POST", "/demo/leak")


def _no_verify() -> ssl.SSLContext:
    # The demo talks to its own server, whose certificate may be self-signed.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
