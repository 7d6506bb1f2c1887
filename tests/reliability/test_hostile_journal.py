"""A planted compaction journal: whoever can write the directory writes what the sidecar replays at start.

Each test plants `pool_exporter_compaction.json` in a directory two real workers write, then starts a
real `pool-exporter serve` on it and scrapes it over a real socket.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import MpWorkers, Serve, get, metric, samples_of

pytestmark = pytest.mark.reliability

JOURNAL = "pool_exporter_compaction.json"
CHECKOUTS = 3 + 1 + 5 + 2


async def test_a_planted_journal_cannot_touch_files_outside(
    tmp_path: Path, mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: a journal whose renames and removals name files outside the directory, by absolute path,
    by `..` from the sidecar's working directory, and through a symlink in the directory (today: the
    sidecar overwrites and deletes them at every start).

    Every file outside keeps its exact content; each of the 5 entries is ignored and counted in
    sqlalchemy_exporter_sidecar_errors_total, with one WARNING; the sidecar starts and serves the
    workers' numbers.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    directory = mp_workers.directory
    outside = tmp_path / "outside"
    outside.mkdir()
    survivors = ["victim", "victim2", "doomed", "doomed2", "linked", "evil", "evil2"]
    for name in survivors:
        (outside / name).write_text(f"{name}: must survive\n")
    cwd = tmp_path / "cwd"  # relative names in the journal resolve from here
    cwd.mkdir()
    (directory / "counter_1.db").symlink_to(outside / "linked")
    plan = {
        "replace": [
            [str(outside / "evil"), str(outside / "victim")],
            ["../outside/evil2", "../outside/victim2"],
        ],
        "remove": [str(outside / "doomed"), "../outside/doomed2", "counter_1.db"],
    }
    (directory / JOURNAL).write_text(json.dumps(plan))
    serve = serve_dir(directory, cwd=cwd)

    status, body = await get(serve.base, "/metrics")
    for name in survivors:
        assert (outside / name).read_text() == f"{name}: must survive\n", name
    assert status == 200, body[:500]
    s = samples_of(body)
    assert metric(s, "sqlalchemy_pool_checkouts_total", pool="app") == CHECKOUTS
    assert metric(s, "sqlalchemy_exporter_sidecar_errors_total") == 5
    assert not os.path.lexists(directory / JOURNAL)
    assert len(serve.warnings(JOURNAL)) == 1, serve.text()
    # The symlink itself is no file to merge either: it goes to quarantine, its target stays.
    assert metric(s, "sqlalchemy_exporter_sidecar_quarantined_files_total") == 1
    assert not os.path.lexists(directory / "counter_1.db")
    serve.stop()
    assert serve.proc.returncode == 0


def _plant(kind: str, journal: Path, outside: Path) -> None:
    if kind == "not-json":
        journal.write_bytes(b'{"replace": [["counter_archive.db.new", ')
    elif kind == "wrong-shape":
        journal.write_text('{"replace": {"a": 1}, "remove": "counter_1.db"}')
    elif kind == "fifo":
        os.mkfifo(journal)
    elif kind == "symlink":  # to a journal outside that removes a file outside
        (outside / "plan.json").write_text(json.dumps({"replace": [], "remove": [str(outside / "doomed")]}))
        journal.symlink_to(outside / "plan.json")
    elif kind == "huge":  # valid, and 2 MiB: more than a journal of ours can be
        journal.write_text('{"replace": [], "remove": []}' + " " * (2 << 20))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["not-json", "wrong-shape", "fifo", "symlink", "huge"])
async def test_a_journal_that_does_not_parse_is_set_aside(
    kind: str, tmp_path: Path, mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: a journal that is not JSON, not a journal, a FIFO, a symlink to a journal outside, or
    2 MiB long (today: the sidecar does not start, hangs before it listens, or replays the outside one).

    It is moved into quarantine/ (counted, one WARNING, listed by /readyz), the sidecar starts and
    serves the workers' numbers, and nothing outside the directory changes.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    directory = mp_workers.directory
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "doomed").write_text("must survive\n")
    _plant(kind, directory / JOURNAL, outside)
    serve = serve_dir(directory)

    status, body = await get(serve.base, "/metrics")
    assert status == 200, body[:500]
    assert (outside / "doomed").read_text() == "must survive\n"
    s = samples_of(body)
    assert metric(s, "sqlalchemy_pool_checkouts_total", pool="app") == CHECKOUTS
    assert metric(s, "sqlalchemy_exporter_sidecar_quarantined_files_total") == 1
    assert not os.path.lexists(directory / JOURNAL)
    moved = os.listdir(directory / "quarantine")
    assert len(moved) == 1 and moved[0].endswith("-" + JOURNAL), moved
    status, body = await get(serve.base, "/readyz")
    assert status == 200, body
    assert json.loads(body)["quarantined"] == [JOURNAL]
    assert len(serve.warnings(JOURNAL)) == 1, serve.text()
    serve.stop()
    assert serve.proc.returncode == 0
