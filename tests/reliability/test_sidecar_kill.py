"""A worker process is killed with SIGKILL mid-transaction in sidecar (multiprocess) mode."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.reliability

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    import sqlalchemy_pool_exporter as pool_exporter
    from sqlalchemy_pool_exporter import default_exporter

    async def main(url, app, checkouts, hold):
        engine = create_async_engine(url, pool_size=2, connect_args={"server_settings": {"application_name": app}})
        pool_exporter.instrument(engine, name="mp")
        for _ in range(checkouts):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        if hold:
            conn = await engine.connect()
            await conn.execute(text("SELECT 1"))  # a transaction is now open on the server
        default_exporter().flush()
        print("ready", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "hold"))
    """
)


def _metrics(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
    }


def _get(samples: dict, name: str, **labels: str) -> float | None:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_sigkill_worker_mid_transaction(live_cluster, tmp_path: Path, emitted, secret: str) -> None:
    """Fault: two worker processes write a multiprocess directory; one is SIGKILLed holding a connection
    inside an open transaction. A real `pool-exporter serve` (server view on, DEBUG logs) serves it.

    Every scrape answers; after the kill the dead worker's live gauges are gone (used 1 -> 0) while
    its counted checkouts stay (exactly 20 + 1 + 10); its files are folded away; the server view sees
    the idle-in-transaction session vanish; nothing emitted holds the database password.
    """
    directory = tmp_path / "mp"
    directory.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("POOL_EXPORTER_")},
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    url = live_cluster.url()
    app = f"mp_{os.getpid()}"
    killed = subprocess.Popen(
        [sys.executable, "-c", WORKER, url, app, "20", "hold"], env=env, stdout=subprocess.PIPE, text=True
    )
    alive = subprocess.Popen(
        [sys.executable, "-c", WORKER, url, app, "10", "no"], env=env, stdout=subprocess.PIPE, text=True
    )
    log = tmp_path / "serve.log"
    serve_env = {
        **env,
        "POOL_EXPORTER_DATABASE_URL": url,
        "POOL_EXPORTER_LOG_LEVEL": "DEBUG",
        "POOL_EXPORTER_HOST": "127.0.0.1",
        "POOL_EXPORTER_PORT": "0",
        "POOL_EXPORTER_PROBE_INTERVAL": "0.2",
    }
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "sqlalchemy_pool_exporter", "serve"], env=serve_env, stderr=log_file, stdout=log_file
        )
    try:
        for worker in (killed, alive):
            assert worker.stdout is not None
            assert await asyncio.to_thread(worker.stdout.readline) == "ready\n"
        base = None
        for _ in range(300):
            m = re.search(r"(http://127\.0\.0\.1:\d+)/metrics", log.read_text())
            if m:
                base = m[1]
                break
            await asyncio.sleep(0.05)
        assert base is not None, log.read_text()

        async with aiohttp.ClientSession() as http:

            async def scrape() -> dict:  # type: ignore[type-arg]
                async with http.get(base + "/metrics") as r:
                    body = await r.text()
                    assert r.status == 200
                emitted.add(body)
                return _metrics(body)

            async def idle_in_tx() -> float:
                m = await scrape()
                return (
                    _get(
                        m,
                        "sqlalchemy_server_connections",
                        datname="app",
                        application_name=app,
                        state="idle in transaction",
                    )
                    or 0
                )

            before = await scrape()
            assert _get(before, "sqlalchemy_pool_connections", pool="mp", state="used") == 1
            assert _get(before, "sqlalchemy_pool_checkouts_total", pool="mp") == 31
            for _ in range(100):
                if await idle_in_tx() == 1:
                    break
                await asyncio.sleep(0.05)
            assert await idle_in_tx() == 1

            killed.send_signal(signal.SIGKILL)
            assert killed.wait(10) == -signal.SIGKILL
            after = await scrape()
            assert _get(after, "sqlalchemy_pool_connections", pool="mp", state="used") == 0
            assert _get(after, "sqlalchemy_pool_connections", pool="mp", state="idle") == 1
            assert _get(after, "sqlalchemy_pool_checkouts_total", pool="mp") == 31
            assert _get(after, "sqlalchemy_exporter_sidecar_workers") == 1
            assert not list(directory.glob(f"*_{killed.pid}.db"))
            deadline = time.monotonic() + 10
            while await idle_in_tx() != 0:
                assert time.monotonic() < deadline, "the killed worker's transaction is still open"
                await asyncio.sleep(0.05)
            assert len(await live_cluster.backends(app)) == 1
            for path in ("/pools", "/", "/readyz"):
                async with http.get(base + path) as r:
                    emitted.add(await r.read())
                    assert r.status == 200, path
    finally:
        for proc in (killed, alive, server):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (killed, alive, server):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        emitted.add(log.read_bytes())
    assert server.returncode == 0
    assert b"Traceback" not in log.read_bytes()
