"""`pool-exporter demo --duration` as a real subprocess, scraped while it runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import aiohttp
import pytest

from .conftest import PG_URL, PYTHON, cli_env, parse, sample, wait_for_line

DURATION = "6"


REPORT = "GET /demo/report"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def shown(samples: Samples, report_checked_out: bool) -> bool:
    """Everything the assertions look for: a timeout, a rollback, the report held too long and seen held."""
    return (
        (sample(samples, "sqlalchemy_pool_timeouts_total", pool="demo") or 0) >= 1
        and (sample(samples, "sqlalchemy_transactions_total", pool="demo", outcome="rollback") or 0) >= 1
        and (sample(samples, "sqlalchemy_pool_holder_held_too_long_total", pool="demo", holder=REPORT) or 0) >= 1
        and report_checked_out
    )


async def run_and_scrape(env: dict[str, str], *extra: str) -> tuple[Samples, str, str, list[dict[str, Any]]]:
    """Run the demo; scrape until it showed what the tests look for (or it ended).

    Returns the last scrape, the pages (/pools and /), the output, and every /pools row of the demo pool.
    """
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
        samples: Samples = {}
        rows: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as client:
            while proc.poll() is None:
                try:
                    async with client.get(f"{base}/metrics") as r:
                        samples = parse(await r.text())
                    async with client.get(f"{base}/pools") as r:
                        pools_json = await r.text()
                    async with client.get(f"{base}/") as r:
                        pools = pools_json + await r.text()
                except aiohttp.ClientError:
                    break
                rows += [row for row in json.loads(pools_json)["pools"] if row["name"] == "demo"]
                held_by_report = any(c["holder"] == REPORT for row in rows for c in row.get("checkouts_now") or ())
                if shown(samples, held_by_report):
                    break
                await asyncio.sleep(0.5)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return samples, pools, "".join(lines) + out + err, rows


def assert_demo_traffic(samples: Samples) -> None:
    assert (sample(samples, "sqlalchemy_pool_checkouts_total", pool="demo") or 0) > 0
    assert (sample(samples, "sqlalchemy_transactions_total", pool="demo", outcome="commit") or 0) > 0
    assert (sample(samples, "sqlalchemy_transactions_total", pool="demo", outcome="rollback") or 0) > 0
    assert (sample(samples, "sqlalchemy_pool_timeouts_total", pool="demo") or 0) >= 1
    assert sample(samples, "sqlalchemy_pool_max_connections", pool="demo") == 4.0
    assert sample(samples, "sqlalchemy_pool_size", pool="demo") == 3.0
    assert sample(samples, "sqlalchemy_pool_timeout_seconds", pool="demo") == 0.5


def assert_report_is_a_holder(samples: Samples, rows: list[dict[str, Any]], output: str) -> None:
    """The report route is named by holder_middleware, held past the demo's 2 s leak threshold, and listed
    among the current checkouts while it holds."""
    assert "leak_threshold=2s" in output
    assert (sample(samples, "sqlalchemy_pool_holder_checkouts_total", pool="demo", holder=REPORT) or 0) >= 1
    assert (sample(samples, "sqlalchemy_pool_holder_held_too_long_total", pool="demo", holder=REPORT) or 0) >= 1
    # Requests are attributed to their route templates; nothing the demo does runs without a holder.
    assert (sample(samples, "sqlalchemy_pool_holder_checkouts_total", pool="demo", holder="GET /demo/items") or 0) > 0
    assert sample(samples, "sqlalchemy_pool_holder_checkouts_total", pool="demo", holder="none") == 0
    assert REPORT in rows[-1]["holder_connections"]
    held = [c for row in rows for c in row["checkouts_now"] if c["holder"] == REPORT]
    assert held and all(c["in_transaction"] for c in held), held


async def test_demo_on_sqlite() -> None:
    samples, pages, output, rows = await run_and_scrape(cli_env())
    assert_demo_traffic(samples)
    assert_report_is_a_holder(samples, rows, output)
    assert '"pool_class": "AsyncAdaptedQueuePool"' in pages
    assert "sqlite+aiosqlite:///" in output
    assert "pool-exporter demo: stopped" in output
    assert "Traceback" not in output


@pytest.mark.postgres
async def test_demo_on_postgresql_never_prints_the_password() -> None:
    url = PG_URL.replace("postgres@", "postgres:DemoPassw0rd@")
    samples, pages, output, rows = await run_and_scrape(cli_env(POOL_EXPORTER_DATABASE_URL=url))
    assert_demo_traffic(samples)
    assert_report_is_a_holder(samples, rows, output)
    assert "postgresql+asyncpg://postgres:***@127.0.0.1:5432/test" in output
    assert "DemoPassw0rd" not in output + pages
    assert "Traceback" not in output
