"""`pool-exporter demo --duration` as a real subprocess, scraped while it runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from ..conftest import PG_URL, PYTHON, wait_for_line
from ..conftest import clean_env as cli_env
from ..conftest import metric as sample
from ..conftest import samples_of as parse

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


Rows = list[dict[str, Any]]


def shown_with_holders(samples: Samples, rows: Rows) -> bool:
    held_by_report = any(c["holder"] == REPORT for row in rows for c in row.get("checkouts_now") or ())
    return shown(samples, held_by_report)


async def run_and_scrape(
    env: dict[str, str], *extra: str, done: Callable[[Samples, Rows], bool] = shown_with_holders
) -> tuple[Samples, str, str, Rows]:
    """Run the demo; scrape until `done` says it showed what the test looks for (or it ended).

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
                if done(samples, rows):
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


async def test_demo_with_semconv_names_in_two_workers_and_the_sidecar() -> None:
    """`--names semconv` reaches the worker processes (through their environment) and the sidecar reads it."""
    pool = {"db_client_connection_pool_name": "demo"}

    def done(samples: Samples) -> bool:
        timeouts = sample(samples, "db_client_connection_timeouts_total", **pool) or 0
        return timeouts >= 1 and (sample(samples, "sqlalchemy_pool_checkouts_total", **pool) or 0) > 0

    extra = ("--names", "semconv", "--workers", "2", "--duration", "15")  # the last --duration wins
    samples, pages, output, _ = await run_and_scrape(cli_env(), *extra, done=lambda samples, rows: done(samples))
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
