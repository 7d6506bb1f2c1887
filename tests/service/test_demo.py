"""`pool-exporter demo --duration` as a real subprocess, scraped while it runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable

import aiohttp
import pytest

from .conftest import PG_URL, PYTHON, cli_env, parse, sample, wait_for_line

DURATION = "6"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def saw_timeout_and_rollback(samples: Samples) -> bool:
    return (sample(samples, "sqlalchemy_pool_timeouts_total", pool="demo") or 0) >= 1 and (
        sample(samples, "sqlalchemy_transactions_total", pool="demo", outcome="rollback") or 0
    ) >= 1


async def run_and_scrape(
    env: dict[str, str], *extra: str, done: Callable[[Samples], bool] = saw_timeout_and_rollback
) -> tuple[Samples, str, str]:
    """Run the demo; scrape until `done` (or it ended); return the last scrape, /pools and /, output."""
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "sqlalchemy_pool_exporter",
            "demo",
            "--duration",
            DURATION,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        base = wait_for_line(proc, r"overview  (http://127\.0\.0\.1:\d+)/", lines)[1]
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        async with aiohttp.ClientSession() as client:
            while proc.poll() is None:
                try:
                    async with client.get(f"{base}/metrics") as r:
                        samples = parse(await r.text())
                    async with client.get(f"{base}/pools") as r:
                        pools = await r.text()
                    async with client.get(f"{base}/") as r:
                        pools += await r.text()
                except aiohttp.ClientError:
                    break
                if done(samples):
                    break
                await asyncio.sleep(0.5)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return samples, pools, "".join(lines) + out + err


def assert_demo_traffic(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    assert (sample(samples, "sqlalchemy_pool_checkouts_total", pool="demo") or 0) > 0
    assert (sample(samples, "sqlalchemy_transactions_total", pool="demo", outcome="commit") or 0) > 0
    assert (sample(samples, "sqlalchemy_transactions_total", pool="demo", outcome="rollback") or 0) > 0
    assert (sample(samples, "sqlalchemy_pool_timeouts_total", pool="demo") or 0) >= 1
    assert sample(samples, "sqlalchemy_pool_max_connections", pool="demo") == 4.0
    assert sample(samples, "sqlalchemy_pool_size", pool="demo") == 3.0
    assert sample(samples, "sqlalchemy_pool_timeout_seconds", pool="demo") == 0.5


async def test_demo_on_sqlite() -> None:
    samples, pages, output = await run_and_scrape(cli_env())
    assert_demo_traffic(samples)
    assert '"pool_class": "AsyncAdaptedQueuePool"' in pages
    assert "sqlite+aiosqlite:///" in output
    assert "pool-exporter demo: stopped" in output
    assert "Traceback" not in output


@pytest.mark.postgres
async def test_demo_on_postgresql_never_prints_the_password() -> None:
    url = PG_URL.replace("postgres@", "postgres:DemoPassw0rd@")
    samples, pages, output = await run_and_scrape(cli_env(POOL_EXPORTER_DATABASE_URL=url))
    assert_demo_traffic(samples)
    assert "postgresql+asyncpg://postgres:***@127.0.0.1:5432/test" in output
    assert "DemoPassw0rd" not in output + pages
    assert "Traceback" not in output


async def test_demo_with_semconv_names_in_two_workers_and_the_sidecar() -> None:
    """`--names semconv` reaches the worker processes (through their environment) and the sidecar reads it."""
    pool = {"db_client_connection_pool_name": "demo"}

    def done(samples: Samples) -> bool:
        timeouts = sample(samples, "db_client_connection_timeouts_total", **pool) or 0
        return timeouts >= 1 and (sample(samples, "sqlalchemy_pool_checkouts_total", **pool) or 0) > 0

    extra = ("--names", "semconv", "--workers", "2", "--duration", "15")  # the last --duration wins
    samples, pages, output = await run_and_scrape(cli_env(), *extra, done=done)
    assert done(samples), output
    # Two workers' pools merged: the conventions' names, none of ours for the same metrics, no `pool` label.
    assert sample(samples, "db_client_connection_max", **pool) == 2 * 4.0
    assert sample(samples, "db_client_connection_idle_max", **pool) == 2 * 3.0
    assert (sample(samples, "db_client_connection_wait_time_seconds_count", **pool) or 0) > 0
    assert not {"sqlalchemy_pool_connections", "sqlalchemy_pool_timeouts_total"} & {name for name, _ in samples}
    assert not any(label == "pool" for _, labels in samples for label, _ in labels)
    rows = json.JSONDecoder().raw_decode(pages)[0]["pools"]  # /pools, then the / page
    assert [(row["name"], row["max"], row["size"]) for row in rows] == [("demo", 8, 6)]
    assert "Traceback" not in output
