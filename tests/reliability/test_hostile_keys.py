"""Hostile keys in the multiprocess directory: well-framed files whose keys no encoder could write.

Each test runs a real `pool-exporter serve` over a directory that two real instrumented workers
write, plants a file whose framing is fine but whose key is absurd (nested a thousand deep, huge),
or names what the exposition format forbids, and scrapes over real sockets. The file is quarantined
and the workers' numbers are served exactly; the body passes `promtool check metrics`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import MpWorkers, Serve, get, metric, samples_of
from .test_hostile_files import CHECKOUTS, USED, _db, _entry

pytestmark = pytest.mark.reliability

PROMTOOL = shutil.which("promtool")


def _key(metric_name: str, sample: str, labels: dict[str, str]) -> str:
    return json.dumps([metric_name, sample, labels, "x"])


def _checkouts(labels: dict[str, str]) -> str:
    return _key("sqlalchemy_pool_checkouts", "sqlalchemy_pool_checkouts_total", labels)


def _gauge(name: str, pool: str) -> str:
    return _key(name, name, {"pool": pool})


def _dead_pid() -> int:
    """The pid of a process that has exited and been waited for: a dead worker to reap."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, timeout=30)
    return int(proc.stdout)


# Keys that make a decoder recurse, or that are absurdly large: each a file that cannot be decoded.
ABSURD = {
    "lists-1000-deep": "[" * 1000 + "]" * 1000,
    "objects-1000-deep": '{"a":' * 1000 + "1" + "}" * 1000,
    "labels-1000-deep": '["m", "m_total", ' + '{"a":' * 1000 + '"1"' + "}" * 1000 + ', "x"]',
    "a-2-mib-label-value": _key("m", "m_total", {"pool": "v" * (2 << 20)}),
}


def _assert_workers_served(body: str, quarantined: int) -> None:
    s = samples_of(body)
    assert metric(s, "sqlalchemy_pool_checkouts_total", pool="app") == CHECKOUTS
    assert metric(s, "sqlalchemy_pool_connections", pool="app", state="used") == USED
    assert metric(s, "sqlalchemy_exporter_sidecar_quarantined_files_total") == quarantined
    assert metric(s, "sqlalchemy_exporter_sidecar_errors_total") == 0


def _promtool(body: str) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body.encode(), capture_output=True, timeout=60)
    assert result.returncode == 0 and not result.stdout and not result.stderr, (result.stdout + result.stderr).decode()


@pytest.mark.parametrize("worker", ["live", "dead"])
async def test_keys_that_cannot_be_decoded_are_quarantined_and_the_rest_still_served(
    worker: str, mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: `counter_<pid>.db` files, each with one key nested 1,000 deep (lists, objects, the labels)
    or 2 MiB long; the pid is a live process (merged at every scrape) or a dead one (folded into the
    archive by the reaper). Today the nested keys raise RecursionError, which nothing catches: every
    merge fails and /metrics, /pools and / answer 503 until someone deletes the file.

    Each file is quarantined once (one WARNING naming it) and every page answers 200 with exactly the
    workers' numbers; nothing is counted as our own error.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    directory = mp_workers.directory
    if worker == "live":  # our own pid, alive: a file of each type
        types = ["counter", "summary", "histogram", "gauge_max"]
        names = {kind: f"{t}_{os.getpid()}.db" for kind, t in zip(ABSURD, types, strict=True)}
    else:  # a dead worker's counter file each
        names = {kind: f"counter_{_dead_pid()}.db" for kind in ABSURD}
    for kind, raw in ABSURD.items():
        (directory / names[kind]).write_bytes(_db([_entry(raw, 1000.0)]))
    serve = serve_dir(directory)

    for _ in range(2):
        for path in ("/pools", "/"):
            status, body = await get(serve.base, path)
            assert status == 200, body[:500]
        status, body = await get(serve.base, "/metrics")
        assert status == 200, body[:500]
        _assert_workers_served(body, len(ABSURD))

    assert [name for name in names.values() if os.path.lexists(directory / name)] == []
    assert {k: len(serve.warnings(name)) for k, name in names.items()} == dict.fromkeys(ABSURD, 1), serve.text()
    serve.stop()
    assert serve.proc.returncode == 0, serve.text()


# Keys well formed as JSON that no prometheus_client writer produces, each breaking the exposition.
FORGED = {
    "label-__name__": _checkouts({"__name__": "x", "pool": "f1"}),
    "label-reserved": _checkouts({"__meta": "x", "pool": "f2"}),
    "label-empty": _checkouts({"": "x", "pool": "f3"}),
    "label-dash": _checkouts({"a-b": "x", "pool": "f4"}),
    "label-duplicate": _checkouts({"pool": "f5"}).replace('"pool": "f5"', '"pool": "f5", "pool": "app"'),
    "metric-digit": _key("1forged", "1forged_total", {"pool": "f6"}),
    "metric-space": _key("forged metric", "forged metric_total", {"pool": "f7"}),
    "metric-dot": _key("sqlalchemy.pool.checkouts", "sqlalchemy.pool.checkouts_total", {"pool": "f8"}),
    "sample-elsewhere": _key("forged_a", "sqlalchemy_pool_checkouts_total", {"pool": "f9"}),
    "sample-bad-suffix": _key("forged_b", "forged_b{x}", {"pool": "f10"}),
    # Valid names that another family writes: two families of one name make the whole body invalid.
    "clash-ours": _key("sqlalchemy_pool_checkouts_total", "sqlalchemy_pool_checkouts_total_total", {"pool": "f11"}),
    "clash-sidecar": _key("sqlalchemy_exporter_sidecar_merges", "sqlalchemy_exporter_sidecar_merges_total", {}),
    "clash-in-file": _key("forged_c", "forged_c_total", {}) + "\0" + _key("forged_c_total", "forged_c_total_total", {}),
}


async def test_keys_no_encoder_could_write_are_quarantined_and_the_body_passes_promtool(
    mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: counter files whose keys name a `__name__`, `__meta`, empty, dashed or repeated label, a
    metric name that is not the exposition format's, a sample outside its metric, or a family whose
    names another family writes (ours, the sidecar's own, another in the same file). Today most are
    served as they are: `promtool check metrics` rejects the body, and Prometheus drops every series
    of the scrape, not just the forged one.

    Each file is quarantined (one WARNING naming it); the body passes promtool and holds exactly the
    workers' numbers and none of the forged ones.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    directory = mp_workers.directory
    names = {kind: f"counter_{kind}.db" for kind in FORGED}
    for kind, raw in FORGED.items():
        (directory / names[kind]).write_bytes(_db([_entry(key, 1000.0) for key in raw.split("\0")]))
    serve = serve_dir(directory)

    status, body = await get(serve.base, "/metrics")
    assert status == 200, body[:500]
    _assert_workers_served(body, len(FORGED))
    assert "forged" not in body and "__" not in body and 'pool="f' not in body
    _promtool(body)
    assert [name for name in names.values() if os.path.lexists(directory / name)] == []
    assert {k: len(serve.warnings(name)) for k, name in names.items()} == dict.fromkeys(FORGED, 1), serve.text()
    serve.stop()
    assert serve.proc.returncode == 0, serve.text()


def _strict(constant: str) -> Any:
    raise ValueError(f"not strict JSON: {constant}")


async def test_pools_is_strict_json_when_a_gauge_is_not_a_number(
    mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: a gauge file holding NaN and +Inf for a pool (today /pools says bare `NaN` and
    `Infinity`, which strict JSON parsers reject, so a dashboard reading it sees no pool at all).

    /pools is strict JSON: a value that is not a finite number is null; the workers' row is exact.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    directory = mp_workers.directory
    entries = [
        _entry(_gauge("sqlalchemy_pool_timeout_seconds", "ghost"), math.nan),
        _entry(_gauge("sqlalchemy_pool_size", "ghost"), math.inf),
        _entry(_gauge("sqlalchemy_pool_overflow_connections", "ghost"), -math.inf),
    ]
    (directory / "gauge_max_ghost.db").write_bytes(_db(entries))
    serve = serve_dir(directory)

    status, body = await get(serve.base, "/pools")
    assert status == 200, body[:500]
    rows = {row["name"]: row for row in json.loads(body, parse_constant=_strict)["pools"]}
    assert (rows["ghost"]["timeout"], rows["ghost"]["size"], rows["ghost"]["overflow"]) == (None, None, None)
    assert rows["app"]["checkouts"] == CHECKOUTS
    assert rows["app"]["used"] == USED
    status, body = await get(serve.base, "/")
    assert status == 200, body[:500]
    serve.stop()
    assert serve.proc.returncode == 0, serve.text()


async def test_a_journal_nested_a_hundred_thousand_deep_is_set_aside(
    mp_workers: MpWorkers, serve_dir: Callable[..., Serve]
) -> None:
    """Fault: a compaction journal of 200,000 brackets, under its 1 MiB bound (today: decoding it
    raises RecursionError, which nothing catches: the sidecar dies at start, or, planted later, every
    maintenance fails and no dead worker is ever reaped).

    The journal is quarantined once; the sidecar starts and serves the workers' numbers exactly.
    """
    a, b = mp_workers.start(commits=3, held=1), mp_workers.start(commits=5, held=2)
    mp_workers.ready(a, b)
    directory = mp_workers.directory
    journal = "pool_exporter_compaction.json"
    (directory / journal).write_text("[" * 100_000 + "]" * 100_000)
    serve = serve_dir(directory)

    for _ in range(2):
        status, body = await get(serve.base, "/metrics")
        assert status == 200, body[:500]
        _assert_workers_served(body, 1)
    assert not os.path.lexists(directory / journal)
    assert len(serve.warnings(journal)) == 1, serve.text()
    serve.stop()
    assert serve.proc.returncode == 0, serve.text()
