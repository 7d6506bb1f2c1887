"""Pool names and error class names full of quotes, newlines, backslashes, markup and non-ASCII."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import Exporter, holder, logs
from sqlalchemy_pool_exporter.sidecar.merge import Sidecar

pytestmark = pytest.mark.reliability

NAMES = [
    'quo"te',
    "new\nline",
    "back\\slash\\",
    "ünïcødé-池-🐘",
    "<script>alert(1)</script>",
    "tab\tand}{=,\"'",
]
ERROR_NAMES = ['Bad"Error', "Multi\nLine\\Error", "Ошибка<b>"]


def promtool(exposition: bytes, tmp_path: Path) -> None:
    """`promtool check metrics` must accept it: exit 0, no lint complaint either."""
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")


def _engines(registry: CollectorRegistry, exporter: Exporter) -> list:  # type: ignore[type-arg]
    engines = []
    for i, name in enumerate(NAMES):
        error_name = ERROR_NAMES[i % len(ERROR_NAMES)]
        failing = type(error_name, (Exception,), {})

        def creator(failing: type[Exception] = failing) -> object:
            raise failing("no database here")

        good = create_engine("sqlite://", poolclass=QueuePool)
        exporter.instrument(good, name=name)
        with good.connect() as conn:
            conn.execute(text("SELECT 1"))
        bad = create_engine("sqlite://", creator=creator, poolclass=QueuePool)
        exporter.instrument(bad, name=f"{name}-bad")
        for _ in range(2):
            with pytest.raises(failing):
                bad.connect()
        engines += [good, bad]
    return engines


async def test_hostile_names_in_process(
    registry: CollectorRegistry, exporter: Exporter, tmp_path: Path, serve, emitted
) -> None:
    """Fault: pool names and raised exception class names carry quotes, newlines, backslashes, markup, emoji.

    The text exposition passes `promtool check metrics` and parses back to the exact names; the
    OpenMetrics one parses too; /pools round-trips them through JSON; / shows them HTML-escaped.
    """
    engines = _engines(registry, exporter)
    try:
        body = generate_latest(registry)
        promtool(body, tmp_path)
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        pools = {s.labels["pool"] for s in families["sqlalchemy_pool_checkouts"].samples}
        assert pools == set(NAMES) | {f"{n}-bad" for n in NAMES}
        errors = {
            (s.labels["pool"], s.labels["error"], s.value) for s in families["sqlalchemy_pool_connect_errors"].samples
        }
        assert errors == {(f"{n}-bad", ERROR_NAMES[i % len(ERROR_NAMES)], 2.0) for i, n in enumerate(NAMES)}

        async with serve(exporter) as base, aiohttp.ClientSession() as http:
            async with http.get(base + "/metrics", headers={"Accept": "application/openmetrics-text"}) as r:
                assert r.status == 200
                om = await r.text()
            async with http.get(base + "/pools") as r:
                assert r.status == 200
                listed = {p["name"] for p in json.loads(await r.read())["pools"]}
            async with http.get(base + "/") as r:
                assert r.status == 200
                page = await r.text()
        emitted.add(om)
        emitted.add(page)
        om_pools = {
            s.labels["pool"] for f in parse_openmetrics(om) if f.name == "sqlalchemy_pool_checkouts" for s in f.samples
        }
        assert om_pools == pools
        assert set(NAMES) <= listed
        assert "<script>" not in page and "&lt;script&gt;" in page
    finally:
        for engine in engines:
            pool_exporter.uninstrument(engine)
            engine.dispose()


WORKER = textwrap.dedent(
    """
    import json, sys
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import QueuePool
    import sqlalchemy_pool_exporter as pool_exporter
    from sqlalchemy_pool_exporter import default_exporter
    names = json.loads(sys.argv[1])
    engines = []
    for name in names:
        engine = create_engine("sqlite://", poolclass=QueuePool)
        pool_exporter.instrument(engine, name=name)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engines.append(engine)
    default_exporter().flush()
    """
)


def test_hostile_names_through_the_sidecar(tmp_path: Path) -> None:
    """Fault: the same names written by a worker into a multiprocess directory and merged by the sidecar.

    The merged exposition passes `promtool check metrics` and names every pool exactly.
    """
    directory = tmp_path / "mp"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", WORKER, json.dumps(NAMES)], env=env, check=True, timeout=60)
    sidecar = Sidecar(directory)
    try:
        registry = CollectorRegistry()
        registry.register(sidecar)
        body = generate_latest(registry)
    finally:
        sidecar.close()
    promtool(body, tmp_path)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    checkouts = {s.labels["pool"]: s.value for s in families["sqlalchemy_pool_checkouts"].samples}
    assert checkouts == dict.fromkeys(NAMES, 1.0)


# A line break, an ANSI colour, NUL and a right-to-left override: each would forge or hide text in a log.
HOSTILE = "evil\nname \x1b[31mred\x00nul\u202eesrever"
ESCAPED = "evil\\nname \\x1b[31mred\\x00nul\\u202eesrever"


def test_hostile_pool_and_holder_names_stay_on_one_escaped_text_log_line(
    registry: CollectorRegistry, exporter: Exporter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fault: a pool and a holder named with a newline, an ANSI escape, NUL and an RTL override.

    Through `logs.setup()` in text mode (with a secret to scrub, as the CLI runs it), the leak warning
    that names both is one line with each of them escaped; the checkout stack follows on lines of its own.
    """
    logs.setup("INFO", "text", secrets=["Hunter2-not-in-this-line"])
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite", poolclass=QueuePool)
    handle = exporter.instrument(engine, name=f"pool-{HOSTILE}", leak_threshold=0.000_001)
    try:
        with holder(f"holder-{HOSTILE}"), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            handle.check_leaks()  # or the watchdog did: either way, one warning
            err = ""
            for _ in range(1000):  # the watchdog's line may still be on its way
                err += capsys.readouterr().err
                if "leak threshold" in err:
                    break
                time.sleep(0.01)
    finally:
        pool_exporter.uninstrument(engine)
        engine.dispose()
    err += capsys.readouterr().err
    for raw in ("\x1b", "\x00", "\u202e"):
        assert raw not in err
    lines = err.splitlines()
    [at] = [i for i, line in enumerate(lines) if "leak threshold" in line]
    assert f"pool pool-{ESCAPED}: connection held for " in lines[at]
    assert f" by holder-{ESCAPED}, longer than the leak threshold of 1e-06s; checked out at:" in lines[at]
    assert lines[at + 1].startswith('  File "')
    assert "test_hostile_names.py" in "\n".join(lines[at + 1 :])
