"""The workers' checkouts files as the sidecar reads them: written by a real writer, and hostile ones
(garbage, a million entries, a FIFO, oversized, foreign pids, too many holders) bounded or quarantined."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text

from sqlalchemy_pool_exporter import Exporter, holder
from sqlalchemy_pool_exporter.exposition import checkouts as written
from sqlalchemy_pool_exporter.exposition.writer import alive_path
from sqlalchemy_pool_exporter.service.pgview import join_by_pool
from sqlalchemy_pool_exporter.sidecar import checkouts
from sqlalchemy_pool_exporter.sidecar.merge import Sidecar

from ..conftest import PG_DSN


def plant(directory: Path, pid: int, data: bytes) -> str:
    alive_path(directory, pid).touch()
    path = checkouts.path(directory, pid)
    path.write_bytes(data)
    return path.name


def lines(*entries: list[object]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in entries)


def test_a_workers_own_checkouts_as_the_writer_writes_them(tmp_path: Path) -> None:
    engine = create_engine(PG_DSN.replace("postgresql://", "postgresql+psycopg://"), pool_size=2)
    exporter = Exporter(CollectorRegistry())  # its own registry: another test's pools may be in the default one
    try:
        handle = exporter.instrument(engine, name="p")
        with holder("GET /x"), engine.connect() as conn:
            conn.execute(text("SELECT 1"))  # a transaction open
            backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            written.write(tmp_path, 4242, written.entries([handle]))
            alive_path(tmp_path, 4242).touch()
            (held,) = Sidecar(tmp_path).checkouts()
        assert (held.worker, held.pool, held.pid, held.holder, held.transaction) == (4242, "p", backend, "GET /x", True)
    finally:
        exporter.close()
        engine.dispose()


def test_hostile_files_are_quarantined_and_the_rest_still_read(tmp_path: Path) -> None:
    sidecar = Sidecar(tmp_path)
    good = plant(tmp_path, 1, lines(["p", 100, "h", 1.5, False]))
    bad = {
        plant(tmp_path, 2, b"\x00\xff garbage"),
        plant(tmp_path, 3, lines(*[["p", n + 1, "h", 0, False] for n in range(written.MAX_ENTRIES + 1)])),
        plant(tmp_path, 4, b"[" * 1_000_000),  # oversized: over MAX_BYTES, never parsed
        plant(tmp_path, 5, lines(["p", -1, "h", 0, False])),
        plant(tmp_path, 6, lines(["p", 7, "h", float("nan"), False])),
        plant(tmp_path, 7, lines(["p", 8, "bad\nname", 0, False])),
        plant(tmp_path, 8, lines(["p", 9, "h", 0, "yes"])),
    }
    fifo = checkouts.path(tmp_path, 9)
    alive_path(tmp_path, 9).touch()
    os.mkfifo(fifo)  # never blocks the reader
    bad.add(fifo.name)
    found = sidecar.checkouts()
    assert [(h.worker, h.pid) for h in found] == [(1, 100)]
    assert set(sidecar.quarantine.recent) == bad
    assert sorted(os.listdir(tmp_path / "quarantine")) and os.path.exists(tmp_path / good)


def test_a_million_entries_never_reach_the_join(tmp_path: Path) -> None:
    sidecar = Sidecar(tmp_path)
    name = plant(tmp_path, 1, b'["p",1,"h",0,false]\n' * 1_000_000)
    assert sidecar.checkouts() == []
    assert list(sidecar.quarantine.recent) == [name]


def test_a_dead_workers_file_is_not_read(tmp_path: Path) -> None:
    checkouts.path(tmp_path, 1).write_bytes(lines(["p", 100, "h", 0, False]))  # no .alive mark
    assert Sidecar(tmp_path).checkouts() == []


def test_holders_capped_pids_claimed_twice_dropped_foreign_pids_count_nowhere(tmp_path: Path) -> None:
    plant(tmp_path, 1, lines(*[["p", 100 + n, f"h{n}", 0, False] for n in range(60)], ["p", 999, "(pool)", 0, False]))
    plant(tmp_path, 2, lines(["p", 100, "liar", 0, True], ["q", 500, "h", 0, False]))
    found = Sidecar(tmp_path).checkouts()
    by_pid = {h.pid: h.holder for h in found}
    assert 100 not in by_pid  # claimed by both workers: neither
    assert len({h for h in by_pid.values() if h.startswith("h")}) == 50 + 1  # 50 of p's, and q's
    assert sum(1 for pid, h in by_pid.items() if h == "other") == 59 - 50 + 1  # past the cap, and "(pool)"
    # Pids the server does not list (other apps' or lies) count nowhere: no states, no waits.
    joins = join_by_pool(found, {}, [], 0.0)
    assert all(v.states == {} and v.lock_waiting == v.blocking == 0 for j in joins.values() for v in j.holders.values())


def test_arrays_nested_too_deep_and_ages_too_large_for_a_float_are_quarantined(tmp_path: Path) -> None:
    # Found by tests/fuzz/fuzz_checkouts.py: json's RecursionError and float()'s OverflowError escaped
    # the reader, and every poll of the server view failed while such a file was there.
    sidecar = Sidecar(tmp_path)
    good = plant(tmp_path, 1, lines(["p", 100, "h", 1.5, False]))
    bad = {
        plant(tmp_path, 2, b"[" * 5000 + b"\n"),  # well under MAX_BYTES
        plant(tmp_path, 3, b'["p",101,"h",' + b"9" * 400 + b",false]\n"),
    }
    assert [(h.worker, h.pid) for h in sidecar.checkouts()] == [(1, 100)]
    assert set(sidecar.quarantine.recent) == bad and os.path.exists(tmp_path / good)
