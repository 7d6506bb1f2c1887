"""Fallback target while `python -m exporter demo` is unavailable: a real instrumented engine under load.

Run as `python load_app.py PORT SECONDS`: serves /metrics on 127.0.0.1:PORT with commits,
rollbacks, statement errors, pool timeouts and a leaked connection.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import threading
import time
from pathlib import Path

from prometheus_client import start_http_server
from sqlalchemy import create_engine, exc, text
from sqlalchemy.pool import QueuePool

import exporter


def main(port: int, seconds: float) -> None:
    db = Path(tempfile.mkdtemp()) / "load.db"
    engine = create_engine(f"sqlite:///{db}", poolclass=QueuePool, pool_size=2, max_overflow=1, pool_timeout=0.2)
    exporter.instrument(engine, name="load")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT)"))
    start_http_server(port, addr="127.0.0.1")
    stop = time.monotonic() + seconds

    def steady() -> None:
        n = 0
        while time.monotonic() < stop:
            n += 1
            try:
                with engine.begin() as conn:
                    conn.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": str(n)})
                    conn.execute(text("SELECT count(*) FROM items")).scalar()
                    conn.execute(text("UPDATE items SET name = name WHERE id = 1"))
                    if n % 5 == 0:
                        conn.execute(text("SELECT * FROM missing_table"))  # statement error -> rollback
            except (exc.OperationalError, exc.TimeoutError):
                pass
            time.sleep(0.05)

    def burst() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                time.sleep(0.5)
        except exc.TimeoutError:
            pass

    def leak() -> None:
        conn = engine.connect()
        conn.execute(text("SELECT 1"))
        del conn
        gc.collect()

    threading.Thread(target=steady, daemon=True).start()
    last_burst = last_leak = 0.0
    while time.monotonic() < stop:
        now = time.monotonic()
        if now - last_burst > 3:
            last_burst = now
            for _ in range(6):
                threading.Thread(target=burst, daemon=True).start()
        if now - last_leak > 10:
            last_leak = now
            leak()
        time.sleep(0.1)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
