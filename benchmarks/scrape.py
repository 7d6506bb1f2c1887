"""Goal 3: render /metrics for 20 instrumented pools, and the sidecar's merge of many workers' files."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

import exporter


def _busy_engine(registry: CollectorRegistry, name: str) -> Engine:
    """An instrumented engine whose every series exists: commits, rollbacks, all statement kinds."""
    engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=5, max_overflow=10)
    exporter.instrument(engine, name=name, registry=registry, multiprocess=False)
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
        conn.execute(text("UPDATE t SET x = 2"))
        conn.execute(text("SELECT x FROM t"))
        conn.execute(text("DELETE FROM t"))
        conn.commit()
        conn.execute(text("SELECT 1"))
        conn.rollback()
    return engine


def render(pools: int, repeat: int) -> dict[str, float]:
    """Median ms of generate_latest() over a registry holding `pools` instrumented pools."""
    registry = CollectorRegistry()
    engines = [_busy_engine(registry, f"db{i}") for i in range(pools)]
    generate_latest(registry)  # warm
    times = []
    for _ in range(repeat):
        t0 = perf_counter()
        body = generate_latest(registry)
        times.append((perf_counter() - t0) * 1000)
    for engine in engines:
        engine.dispose()
    return {"ms": statistics.median(times), "lines": body.count(b"\n"), "bytes": len(body)}


def sidecar(live: int, gone: int, repeat: int) -> dict[str, float | str]:
    """Run the multiprocess half in a child: prometheus_client picks its file mode at import time."""
    with tempfile.TemporaryDirectory(prefix="bench-mp-") as tmp:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": tmp}
        root = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(root)) if p)
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.sidecar_child", tmp, str(live), str(gone), str(repeat)],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
    result: dict[str, float | str] = json.loads(out.strip().splitlines()[-1])
    return result
