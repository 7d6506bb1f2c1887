"""Load: many clients of /pools, / and /readyz next to a Prometheus scraping /metrics, all through one merge."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable

import aiohttp
import pytest

from .conftest import MpWorkers, Serve, get, metric, samples_of

pytestmark = pytest.mark.reliability

CHECKOUTS = 3 + 1 + 5 + 2
WAVES = 10
CLIENTS = {"/pools": 50, "/": 10, "/readyz": 5, "/metrics": 1}


async def test_pools_index_readyz_and_metrics_share_merges(
    mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Load: 10 waves of 50 /pools, 10 / and 5 /readyz clients and one /metrics scrape, all at once,
    against a real `pool-exporter serve` (today: each request merges the directory on its own, one
    after the other, and a /metrics scrape waits behind 50 merges).

    Every answer is 200 with the workers' exact numbers, and the sidecar counts at most one merge per
    10 requests (sqlalchemy_exporter_sidecar_merges_total; 22 to 31 measured, 2 or 3 a wave: a merge
    of two workers ends before the loop has read all 66 requests), where each request cost one.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    serve = serve_dir(mp_workers.directory)
    answered: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:

        async def ask(path: str) -> None:
            async with http.get(serve.base + path) as r:
                body = await r.text()
            assert r.status == 200, (path, r.status, body[:300])
            if path == "/pools":
                assert json.loads(body)["pools"][0]["checkouts"] == CHECKOUTS
            elif path == "/metrics":
                assert metric(samples_of(body), "sqlalchemy_pool_checkouts_total", pool="app") == CHECKOUTS
            answered[path] += 1

        for _ in range(WAVES):
            await asyncio.gather(*(ask(path) for path, n in CLIENTS.items() for _ in range(n)))

    assert answered == {path: WAVES * n for path, n in CLIENTS.items()}
    requests = sum(answered.values())
    status, body = await get(serve.base, "/metrics")
    assert status == 200
    merges = metric(samples_of(body), "sqlalchemy_exporter_sidecar_merges_total")
    print(f"\n{requests} requests in {WAVES} waves: {merges} merges")
    assert merges is not None and merges <= requests / 10, merges
    serve.stop()
    assert serve.proc.returncode == 0
