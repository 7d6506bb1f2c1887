"""Goals 1 and 2 in instructions: valgrind's callgrind counts them exactly, however busy the machine is.

The child (`python -m benchmarks.callgrind VARIANT KIND N`) starts with instrumentation off (fast:
imports are not simulated), sets up and warms up, switches it on with `callgrind_control -i on`,
then calls os.getppid() right before and right after the N timed cycles. Callgrind runs with
`--dump-before=getppid`, so the second dump holds exactly the N cycles: no start-up run to
subtract, no import noise.

KIND is `pool` or `engine` (one pool cycle), `tx` (one SQLite transaction without I/O, committed),
`close` (the same ended by closing the connection, as an ORM read ends) or `rollback` (ended by
`rollback()`), `e2e<C>`
(one asyncpg transaction at concurrency C, e.g. `e2e1`, `e2e16`), `render<P>` (one /metrics render
of P busy pools, unchanged since the last; VARIANT is ignored) or `rendertx<P>` (the same after one
committed transaction on every pool). The last three take a list, `e2e1,16,64` or `render1,20,500`:
one window of N cycles per size in one process, each set up and warmed up with instrumentation off,
so that the start-up (~8 s under valgrind) is paid once; window i is dump 2i. `rendertx` counts two
windows a size, the transactions with the renders and the same transactions alone, and returns the
difference: switching callgrind off around the transactions instead leaves the counts of the frame
that waited for `callgrind_control` wrong by millions.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .variants import Variant

_TOTALS = re.compile(rb"^totals:\s*(\d+)", re.MULTILINE)


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


# Memory layout moves instruction counts: CPython's method cache and id()-keyed dicts hash addresses,
# so a miss or a collision costs more instructions in one layout than in another (up to ~1% of an
# asyncpg transaction, ~1-2k Ir of a pool cycle; measured). Each extra layout pads the environment,
# which shifts the process's addresses; a count is the median over the layouts, its range the noise.
_LAYOUT_PAD = 4096


def _windows(variant: str, kind: str, cycles: int, workdir: Path, layout: int = 0) -> list[float]:
    out = workdir / f"{variant}-{kind}-{layout}.out"
    # setarch -R: no address randomisation, so that id()-keyed dicts probe the same way every run.
    cmd = [
        *(["setarch", platform.machine(), "-R"] if shutil.which("setarch") else []),
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--dump-before=getppid",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "benchmarks.callgrind",
        variant,
        kind,
        str(cycles),
    ]
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(root)) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": "0", "BENCH_LAYOUT": "x" * (layout * _LAYOUT_PAD)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    subprocess.run(cmd, check=True, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Dump 2i: window i's cycles; the odd dumps: set-up and warm-up; the final file: teardown.
    counts = []
    windows = len(sizes(kind)) * (2 if kind.startswith("rendertx") else 1)
    for window in range(1, windows + 1):
        match = _TOTALS.search((workdir / f"{out.name}.{2 * window}").read_bytes())
        if match is None:
            raise RuntimeError(f"no totals in callgrind output for {variant}, window {window} of {kind}")
        counts.append(int(match.group(1)) / cycles)
    if kind.startswith("rendertx"):  # (transactions + renders) - transactions alone
        return [both - alone for both, alone in zip(counts[::2], counts[1::2], strict=True)]
    return counts


def sizes(kind: str) -> list[int]:
    """The sizes of a kind's windows: `e2e1,16,64` -> [1, 16, 64]; `pool` and `engine` have one window."""
    for prefix in ("e2e", "rendertx", "render"):
        if kind.startswith(prefix):
            return [int(n) for n in kind.removeprefix(prefix).split(",")]
    return [0]


def run(variants: list[str], *, kind: str, cycles: int, jobs: int = 2) -> dict[str, float]:
    """Instructions per cycle for each variant; `jobs` valgrind runs at a time."""
    return {v: counts[0] for v, counts in run_windows(variants, kind=kind, cycles=cycles, jobs=jobs).items()}


@dataclass(frozen=True)
class Spread:
    """Instructions per cycle over several memory layouts: the median, and the lowest and highest."""

    median: float
    low: float
    high: float
    by_layout: tuple[float, ...] = ()  # each layout's count, in layout order (paired across variants)


# The end-to-end kinds run one valgrind at a time (run.py, growth.py say why).
E2E_JOBS = 1

# The variants the goals compare: counted in every layout; the others in the first only.
LAYOUT_VARIANTS = ("none", "noop", "ours", "ours_pool", "ours_lean", "ours_holders")


def run_layouts(variants: list[str], *, kind: str, cycles: int, layouts: int, jobs: int = 2) -> dict[str, Spread]:
    """As run(), `layouts` times for LAYOUT_VARIANTS, each in another memory layout (see _LAYOUT_PAD)."""

    def runs(v: str) -> range:
        return range(layouts if v in LAYOUT_VARIANTS else 1)

    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp, ThreadPoolExecutor(jobs) as pool:
        futures = {
            (v, layout): pool.submit(_windows, v, kind, cycles, Path(tmp), layout)
            for layout in range(layouts)
            for v in variants
            if layout in runs(v)
        }
        counts = {key: f.result()[0] for key, f in futures.items()}
    out = {}
    for v in variants:
        values = [counts[(v, layout)] for layout in runs(v)]
        out[v] = Spread(statistics.median(values), min(values), max(values), tuple(values))
    return out


def run_windows(
    variants: list[str], *, kind: str, cycles: int, jobs: int = 2, layout: int = 0
) -> dict[str, list[float]]:
    """Instructions per cycle in each of the kind's windows (`e2e1,16,64`: one per concurrency), by variant."""
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp, ThreadPoolExecutor(jobs) as pool:
        futures = {v: pool.submit(_windows, v, kind, cycles, Path(tmp), layout) for v in variants}
        return {v: f.result() for v, f in futures.items()}


def _instrument(on: bool = True) -> None:
    state = "on" if on else "off"
    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True, capture_output=True)


def _child(variant: str, kind: str, cycles: int) -> None:
    from .pool_cycle import close_cycles, engine_cycles, make_engine, pool_cycles, rollback_cycles, transaction_cycles
    from .variants import BY_NAME, inside

    if kind.startswith("render"):
        _child_render(sizes(kind), cycles, changed=kind.startswith("rendertx"))
        return
    with inside(BY_NAME[variant]):
        if kind.startswith("e2e"):
            asyncio.run(_child_e2e(BY_NAME[variant], sizes(kind), cycles))
        else:
            loops = {
                "pool": pool_cycles,
                "engine": engine_cycles,
                "tx": transaction_cycles,
                "close": close_cycles,
                "rollback": rollback_cycles,
            }
            _child_cycles(BY_NAME[variant], loops[kind], make_engine, cycles)


def _child_cycles(variant: Variant, loop: Any, make_engine: Any, cycles: int) -> None:
    engine = make_engine(variant)
    loop(engine, 200)
    _instrument()
    loop(engine, 20)
    # A full collection now, so that none falls inside the window by chance of timing (one costs
    # ~1,000 Ir per cycle at 2,000 cycles); the young-generation collections that the cycles'
    # own allocations trigger still count, as they should.
    gc.collect()
    os.getppid()
    loop(engine, cycles)
    os.getppid()


async def _child_e2e(variant: Variant, concurrencies: list[int], transactions: int) -> None:
    """The end-to-end transaction of benchmarks.e2e, counted in our process only: the app's CPU."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from .e2e import PG_URL, run_transactions

    for concurrency in concurrencies:
        engine = create_async_engine(PG_URL, pool_size=concurrency, max_overflow=0)
        variant.attach(engine.sync_engine)
        maker = async_sessionmaker(engine, expire_on_commit=False)
        await run_transactions(maker, concurrency * 4, concurrency)
        _instrument()
        await run_transactions(maker, concurrency, concurrency)
        gc.collect()
        os.getppid()
        await run_transactions(maker, transactions, concurrency)
        os.getppid()
        _instrument(False)  # the next window's set-up runs at full speed
        await engine.dispose()


def _child_render(pools: list[int], renders: int, *, changed: bool = False) -> None:
    """What /metrics runs (benchmarks.scrape.render's `ms`) for each number of busy pools, idle between renders.

    `changed`: one committed transaction on every pool before each render; a second window runs the
    same transactions without rendering, for the parent to subtract.
    """
    from prometheus_client import CollectorRegistry, generate_latest

    from sqlalchemy_pool_exporter import Exporter
    from sqlalchemy_pool_exporter.exposition.render import Exposition

    from .scrape import busy_engine, one_transaction

    for n in pools:
        registry = CollectorRegistry()
        exporter = Exporter(registry)
        engines = [busy_engine(exporter, f"db{i}") for i in range(n)]
        exposition = Exposition(registry, [exporter.collector])
        exposition.render(generate_latest)  # the first render builds the cached line starts
        _instrument()
        exposition.render(generate_latest)
        gc.collect()
        os.getppid()
        for _ in range(renders):
            if changed:
                for engine in engines:
                    one_transaction(engine)
            exposition.render(generate_latest)
        os.getppid()
        if changed:
            exposition.render(generate_latest)  # the last transactions' values: unchanged from here
            gc.collect()
            os.getppid()
            for _ in range(renders):
                for engine in engines:
                    one_transaction(engine)
            os.getppid()
        _instrument(False)
        exporter.close()
        for engine in engines:
            engine.dispose()


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
