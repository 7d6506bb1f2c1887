"""Load: 50 concurrent scrapers while the app works; 200 sidecar workers coming and going."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.sidecar.merge import Sidecar

pytestmark = pytest.mark.reliability

SCRAPERS = 50


SCRAPER = textwrap.dedent(
    """
    import asyncio, sys
    import aiohttp

    async def main(url, n, pause):
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "start":
                stop, ok, failed = asyncio.Event(), [0], [0]

                async def scraper():
                    while not stop.is_set():
                        try:
                            async with http.get(url) as r:
                                body = await r.read()
                            if r.status == 200 and b"sqlalchemy_pool_checkouts_total" in body:
                                ok[0] += 1
                            else:
                                failed[0] += 1
                        except Exception:
                            failed[0] += 1
                        if pause:
                            await asyncio.sleep(pause)

                tasks = [asyncio.create_task(scraper()) for _ in range(n)]
                await loop.run_in_executor(None, sys.stdin.readline)
                stop.set()
                await asyncio.gather(*tasks)
                print(ok[0], failed[0], flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
    """
)


@pytest.mark.parametrize("pause", [0.0, 0.25], ids=["back-to-back", "every-250ms"])
async def test_fifty_scrapers_while_the_app_runs(
    make_engine,
    registry: CollectorRegistry,
    exporter: Exporter,
    serve,
    at_rest,
    live_cluster,
    record_property,
    pause: float,
) -> None:
    """Load: 50 scrapers (another process) GET the in-process /metrics back to back while 10 app tasks
    run transactions flat out in the same event loop as the endpoint.

    No scrape fails; the counts stay exact (checkouts and commits equal the app's own). App
    throughput with and without the scrapers is measured in alternating rounds and reported
    (printed, and record_property `throughput_ratio`); no timing assertion is made.
    """
    engine, app = make_engine(pool_size=5, max_overflow=5)
    handle = exporter.instrument(engine, name="scraped")
    done = 0

    async def work(seconds: float) -> int:
        nonlocal done
        n = 0
        until = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal n
            while time.monotonic() < until:
                async with engine.begin() as conn:
                    await conn.execute(text("SELECT 1"))
                n += 1

        await asyncio.gather(*(worker() for _ in range(10)))
        done += n
        return n

    async with serve(exporter) as base:
        scrapers = subprocess.Popen(
            [sys.executable, "-c", SCRAPER, base + "/metrics", str(SCRAPERS), str(pause)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert scrapers.stdin is not None and scrapers.stdout is not None
        plain: list[int] = []
        scraped: list[int] = []
        ok = failed = 0
        try:
            await work(0.3)  # warm up: connections open, statements cached
            for _ in range(3):
                plain.append(await work(0.6))
                scrapers.stdin.write("start\n")
                scrapers.stdin.flush()
                scraped.append(await work(0.6))
                scrapers.stdin.write("stop\n")
                scrapers.stdin.flush()
                line = await asyncio.to_thread(scrapers.stdout.readline)
                round_ok, round_failed = map(int, line.split())
                ok, failed = ok + round_ok, failed + round_failed
        finally:
            scrapers.stdin.close()
            scrapers.wait(30)
    assert failed == 0
    assert ok >= SCRAPERS
    ratio = sum(scraped) / sum(plain)
    record_property("throughput_ratio", round(ratio, 3))
    record_property("scrapes", ok)
    print(
        f"\napp throughput with {SCRAPERS} scrapers (pause {pause} s) / without: {ratio:.3f} "
        f"({sum(scraped)} vs {sum(plain)} transactions in 3 x 0.6 s each; {ok} scrapes)"
    )
    s = registry.get_sample_value
    assert s("sqlalchemy_pool_checkouts_total", {"pool": "scraped"}) == done
    assert s("sqlalchemy_transactions_total", {"pool": "scraped", "outcome": "commit"}) == done
    await at_rest(handle, registry, live_cluster, app)


SPAWNER = textwrap.dedent(
    """
    import atexit, os, sys
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import QueuePool
    import sqlalchemy_pool_exporter as pool_exporter
    from sqlalchemy_pool_exporter import default_exporter

    engine = create_engine("sqlite://", poolclass=QueuePool)
    pool_exporter.instrument(engine, name="churn")
    default_exporter().flush()
    total = 0
    for wave in range(int(sys.argv[1])):
        sys.stdin.readline()
        pids = []
        for i in range(int(sys.argv[2])):
            n = 1 + (wave + i) % 4
            pid = os.fork()
            if pid == 0:
                for _ in range(n):
                    with engine.connect() as conn:
                        conn.execute(text("SELECT 1"))
                default_exporter().flush()
                if i % 2 == 0:
                    atexit._run_exitfuncs()  # a clean exit, minus the slow interpreter teardown
                os._exit(0)  # odd ones vanish like a crash: no clean-up at all
            pids.append(pid)
            total += n
        for pid in pids:
            os.waitpid(pid, 0)
        print(total, flush=True)
    sys.stdin.readline()
    """
)


def test_sidecar_with_200_workers_coming_and_going(tmp_path: Path) -> None:
    """Load: 200 worker processes (10 waves of 20; half exit cleanly, half vanish like a crash) write a
    multiprocess directory that the sidecar scrapes after every wave.

    After each scrape no file of a dead worker is left (they are folded into per-type archives), so
    the directory stays at a bounded size; the merged checkout count equals exactly what all workers
    did; the live gauges sum only the surviving process.
    """
    directory = tmp_path / "mp"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    waves, per_wave = 10, 20
    spawner = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", SPAWNER, str(waves), str(per_wave)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert spawner.stdin is not None and spawner.stdout is not None
    sidecar = Sidecar(directory)
    registry = CollectorRegistry()
    registry.register(sidecar)
    sizes = []
    try:
        for _ in range(waves):
            spawner.stdin.write("go\n")
            spawner.stdin.flush()
            total = int(spawner.stdout.readline())
            body = generate_latest(registry).decode()
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(body)
                for s in f.samples
            }
            assert samples[("sqlalchemy_pool_checkouts_total", (("pool", "churn"),))] == total
            assert samples[("sqlalchemy_pool_connections", (("pool", "churn"), ("state", "used")))] == 0
            assert samples[("sqlalchemy_exporter_sidecar_workers", ())] == 1
            pids = {m[1] for p in directory.glob("*.db") if (m := re.match(r".*_(\d+)\.db$", p.name))}
            assert pids == {str(spawner.pid)}, pids  # only the living process has files of its own
            sizes.append(len(list(directory.iterdir())))
        assert total == sum(1 + (w + i) % 4 for w in range(waves) for i in range(per_wave))
        assert sidecar.reaped == waves * per_wave
        assert max(sizes) == min(sizes), sizes  # flat: the same file count after every wave
    finally:
        spawner.stdin.write("bye\n")
        spawner.stdin.close()
        spawner.wait(30)
        sidecar.close()
