"""How each cost grows with the work (issue #13): one Markdown table, a row group per cost.

    python -m benchmarks.growth [--only render|merge|e2e|memory ...] [--quick] [--output FILE]

Each row group comes from one command:

- `python -m benchmarks.growth --only render`: the /metrics render by instrumented pools (1, 20, 100,
  500 busy pools, every series present, as benchmarks.scrape's): median ms of what the handler runs
  (Exposition.render, text format), ms per pool, and instructions per render under callgrind.
- `python -m benchmarks.growth --only merge`: the sidecar's merge by live workers (1, 64, 256 forked
  workers writing real multiprocess files, benchmarks.growth_merge), then 1,000 workers that came and
  went beside 64 live ones: the one scrape that reaps them, and the steady merge after it.
- `python -m benchmarks.growth --only e2e`: app overhead by concurrency (c = 1, 16, 64) on the local
  PostgreSQL (BENCH_PG_URL): instructions per transaction of `ours` and `ours_holders` against `none`
  under callgrind, this process's only (the server's CPU is not counted).
- `python -m benchmarks.growth --only memory`: tracemalloc KiB by pools (1, 20, 100, 500, every series
  present and rendered) and by holder names (1, 10, 50 = the default max_holders, 200; max_holders=1000).

`--quick` runs every row at tiny sizes, in under a minute (tests/bench/test_growth_quick.py).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from sqlalchemy_pool_exporter import Exporter, holder
from sqlalchemy_pool_exporter.exposition.render import Exposition
from sqlalchemy_pool_exporter.instrumentation import holders

from . import callgrind, e2e
from .growth_merge import BATCH
from .measure import table
from .memory import sqlite_engine
from .run import machine
from .scrape import busy_engine, busy_statements, multiprocess_child, one_transaction

GROUPS = ("render", "merge", "e2e", "memory")
E2E_VARIANTS = ("ours", "ours_lean", "ours_holders")
HOLDER_SERIES = 6  # catalog.py: connections, checkouts, hold, wait, timeouts, held too long


@dataclass(frozen=True)
class Plan:
    pools: tuple[int, ...]  # render and memory rows
    render_repeat: int  # renders per size, at least: the small sizes get more
    render_ir: int  # renders counted under callgrind per size
    live: tuple[int, ...]  # merge rows
    churn: tuple[int, int]  # (live, gone): `gone` workers come and go beside `live` ones
    merge_repeat: int
    concurrency: tuple[int, ...]
    transactions: int  # counted under callgrind per concurrency: a multiple of each
    holders: tuple[int, ...]
    max_holders: int
    layouts: int = 1  # e2e rows: counted in this many memory layouts (benchmarks.callgrind), median

    def __post_init__(self) -> None:
        if self.churn[0] not in self.live:
            raise ValueError("the churn starts from one of the live rows' directories")
        if any(self.transactions % c for c in self.concurrency):
            raise ValueError("transactions must split evenly over every concurrency")


FULL = Plan(
    pools=(1, 20, 100, 500),
    render_repeat=15,
    render_ir=3,
    live=(1, 64, 256),
    churn=(64, 1_000),
    merge_repeat=15,
    concurrency=(1, 16, 64),
    transactions=640,
    holders=(1, 10, 50, 200),
    max_holders=1_000,
    layouts=3,
)
QUICK = Plan(
    pools=(1, 2, 4, 8),
    render_repeat=5,
    render_ir=2,
    live=(1, 2, 4),
    churn=(2, 8),
    merge_repeat=3,
    concurrency=(1, 2, 4),
    transactions=32,
    holders=(1, 2, 4, 8),
    max_holders=1_000,
)

Row = list[str]


def _ms(fn: Callable[[], object]) -> float:
    t0 = perf_counter()
    fn()
    return (perf_counter() - t0) * 1000


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _marginal(sizes: tuple[int, ...], values: list[float]) -> list[float | None]:
    """What each unit of work above the previous row added: (value - previous) / (size - previous size)."""
    out: list[float | None] = [None]
    for i in range(1, len(sizes)):
        out.append((values[i] - values[i - 1]) / (sizes[i] - sizes[i - 1]))
    return out


# -- render ---------------------------------------------------------------------------------------


def _render(pools: int, repeat: int) -> dict[str, float]:
    """Median ms of the handler's render with the pools idle, and after one transaction on every pool."""
    registry = CollectorRegistry()
    exporter = Exporter(registry)
    engines = [busy_engine(exporter, f"db{i}") for i in range(pools)]
    exposition = Exposition(registry, [exporter.collector])

    def run() -> bytes:
        return exposition.render(generate_latest)

    first = _ms(run)  # builds every series' cached line start
    idle: list[float] = []
    moved: list[float] = []
    for _ in range(repeat):
        idle.append(_ms(run))
        for engine in engines:  # counters and histograms move, as between two scrapes under load
            one_transaction(engine)
        moved.append(_ms(run))
    body = run()
    exporter.close()
    for engine in engines:
        engine.dispose()
    return {
        "first_ms": first,
        "ms": statistics.median(idle),
        "moved_ms": statistics.median(moved),
        "lines": body.count(b"\n"),
        "bytes": len(body),
    }


def render_rows(plan: Plan) -> list[Row]:
    # A render of one pool takes ~0.1 ms: more rounds there, where they are cheap.
    timed = {n: _render(n, max(plan.render_repeat, plan.render_repeat * 20 // n)) for n in plan.pools}
    ir: list[float] | None = None
    moved_ir: list[float] | None = None
    if callgrind.available():
        sizes = ",".join(map(str, plan.pools))
        ir = callgrind.run_windows(["ours"], kind="render" + sizes, cycles=plan.render_ir, jobs=1)["ours"]
        moved_ir = callgrind.run_windows(["ours"], kind="rendertx" + sizes, cycles=plan.render_ir, jobs=1)["ours"]
    ms_above = _marginal(plan.pools, [r["ms"] for r in timed.values()])
    ir_above = _marginal(plan.pools, ir) if ir else [None] * len(plan.pools)
    rows = []
    for i, (n, r) in enumerate(timed.items()):
        counted = f"{ir[i]:,.0f} Ir a render, {ir[i] / n:,.0f} Ir/pool" if ir else "Ir not counted (no valgrind)"
        above_ir, above_ms = ir_above[i], ms_above[i]
        if above_ir is not None:
            counted += f" ({above_ir:,.0f} Ir/pool from the row above)"
        above = f" ({above_ms:.3f} ms/pool from the row above)" if above_ms is not None else ""
        moved = f", {moved_ir[i]:,.0f} Ir" if moved_ir else ""
        rows.append(
            [
                "/metrics render",
                _plural(n, "busy pool"),
                f"{r['ms']:.3f} ms",
                f"{r['ms'] / n:.3f} ms/pool{above}",
                f"{counted}; {r['lines']:,.0f} lines, {r['bytes'] / 1024:,.0f} KiB; after a transaction on every "
                f"pool {r['moved_ms']:.3f} ms{moved}; first render {r['first_ms']:.1f} ms",
            ]
        )
    return rows


# -- merge ----------------------------------------------------------------------------------------


def _merge(live: int, gone: int, repeat: int) -> dict[str, Any]:
    """benchmarks.growth_merge in a child: prometheus_client picks its multiprocess mode at import."""
    return multiprocess_child("benchmarks.growth_merge", live, gone, repeat)


def merge_rows(plan: Plan) -> list[Row]:
    merges = [_merge(live, plan.churn[1] if live == plan.churn[0] else 0, plan.merge_repeat) for live in plan.live]
    churn = next(m for m in merges if m["gone"])
    above = _marginal(plan.live, [m["live_ms"] for m in merges])
    rows = []
    for live, m, ms_above in zip(plan.live, merges, above, strict=True):
        rows.append(
            [
                "sidecar merge",
                _plural(live, "live worker"),
                f"{m['live_ms']:.2f} ms",
                f"{m['live_ms'] / live:.3f} ms/worker"
                + (f" ({ms_above:.3f} ms/worker from the row above)" if ms_above is not None else ""),
                f"{m['live_files']:,} files merged, {m['live_ms'] * 1000 / m['live_files']:.0f} µs a file",
            ]
        )
    live, gone = plan.churn
    rows += [
        [
            "sidecar merge",
            f"{live:,} live + {gone:,} gone: the reaping scrape (once)",
            f"{churn['reaping_ms']:.1f} ms",
            f"{churn['reaping_ms'] / gone:.3f} ms/gone worker",
            f"{churn['churned_files']:,} files before, {churn['after_churn_files']:,} after (reaped and compacted)",
        ],
        [
            "sidecar merge",
            f"{live:,} live + {gone:,} gone: steady, after the reaping scrape",
            f"{churn['after_churn_ms']:.2f} ms",
            f"{churn['after_churn_ms'] / live:.3f} ms/live worker",
            f"{churn['after_churn_files']:,} files merged; {live:,} live before the churn: {churn['live_ms']:.2f} ms",
        ],
    ]
    return rows


# -- end to end -----------------------------------------------------------------------------------


def e2e_rows(plan: Plan) -> list[Row]:
    why = ""
    if not callgrind.available():
        why = "not run (no valgrind)"
    elif not e2e.postgres_available():
        why = f"not run (no PostgreSQL at {e2e.PG_URL})"
    if why:
        return [
            ["app CPU per transaction", f"c={c}, {name}", why, "–", "–"]
            for c in plan.concurrency
            for name in E2E_VARIANTS
        ]
    kind = "e2e" + ",".join(map(str, plan.concurrency))
    jobs = callgrind.E2E_JOBS  # one valgrind at a time (benchmarks/run.py says why)
    names = ["none", *E2E_VARIANTS]
    runs = [
        callgrind.run_windows(names, kind=kind, cycles=plan.transactions, jobs=jobs, layout=layout)
        for layout in range(plan.layouts)
    ]
    rows = []
    for i, c in enumerate(plan.concurrency):
        nones = [run["none"][i] for run in runs]
        none = statistics.median(nones)
        for name in E2E_VARIANTS:
            ours_each = [run[name][i] for run in runs]
            ours = statistics.median(ours_each)
            spread = ""
            if plan.layouts > 1:
                spread = (
                    f"; {min(ours_each) - max(nones):+,.0f} to {max(ours_each) - min(nones):+,.0f} Ir/tx "
                    f"over {plan.layouts} memory layouts"
                )
            rows.append(
                [
                    "app CPU per transaction",
                    f"c={c}, {name}",
                    f"×{ours / none:.3f} none",
                    f"{ours - none:+,.0f} Ir/tx",
                    f"none {none:,.0f} Ir/tx, {name} {ours:,.0f} Ir/tx (medians){spread}",
                ]
            )
    return rows


# -- memory ---------------------------------------------------------------------------------------


def _traced(setup: Callable[[], None], render: Callable[[], bytes]) -> int:
    """Bytes still allocated after `setup()` and two renders, traced by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        setup()
        render()
        render()  # the second keeps what a scrape keeps (cached line starts, last values), no more
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _pools_memory(pools: int) -> tuple[int, int]:
    """Bytes that `pools` busy instrumented pools keep, rendered; and the series they export."""
    registry = CollectorRegistry()
    exporter = Exporter(registry)
    engines = [sqlite_engine() for _ in range(pools)]
    for engine in engines:  # SQLAlchemy's own caches and SQLite's connection, before tracing
        busy_statements(engine)
    exposition = Exposition(registry, [exporter.collector])

    def render() -> bytes:
        return exposition.render(generate_latest)

    render()

    def setup() -> None:
        for i, engine in enumerate(engines):
            exporter.instrument(engine, name=f"m{i}")
            busy_statements(engine)

    kept = _traced(setup, render)
    series = sum(1 for line in render().splitlines() if line and not line.startswith(b"#"))
    exporter.close()
    for engine in engines:
        engine.dispose()
    return kept, series


def _holders_memory(names: int, max_holders: int) -> tuple[int, int]:
    """Bytes that `names` holders keep in one busy pool, rendered; and their series."""
    registry = CollectorRegistry()
    exporter = Exporter(registry, max_holders=max_holders)
    engine = sqlite_engine()
    exporter.instrument(engine, name="holders")
    busy_statements(engine)
    exposition = Exposition(registry, [exporter.collector])

    def render() -> bytes:
        return exposition.render(generate_latest)

    labels = [f"holder-{i:04d}" for i in range(names)]

    def setup() -> None:
        for label in labels:
            with holder(label):
                engine.pool.connect().close()

    try:
        with holder("warm-up"):  # attribution on, with no slot yet: the `none` slot alone is rendered
            pass
        engine.pool.connect().close()
        render()
        kept = _traced(setup, render)
        series = sum(1 for line in render().splitlines() if b'holder="holder-' in line)
    finally:
        # Attribution is process-wide once a holder was set (as benchmarks.variants.inside does).
        holders.ATTRIBUTING[0] = False
        exporter.close()
        engine.dispose()
    return kept, series


def memory_rows(plan: Plan) -> list[Row]:
    rows = []
    pools = [_pools_memory(n) for n in plan.pools]
    above = _marginal(plan.pools, [kept / 1024 for kept, _ in pools])
    for n, (kept, series), kib_above in zip(plan.pools, pools, above, strict=True):
        rows.append(
            [
                "memory, pools (tracemalloc)",
                _plural(n, "busy pool"),
                f"{kept / 1024:,.1f} KiB",
                f"{kept / 1024 / n:.1f} KiB/pool"
                + (f" ({kib_above:.1f} KiB/pool from the row above)" if kib_above is not None else ""),
                f"{series:,} series, {series / n:.0f} a pool",
            ]
        )
    named = [_holders_memory(n, plan.max_holders) for n in plan.holders]
    above = _marginal(plan.holders, [kept / 1024 for kept, _ in named])
    for n, (kept, series), kib_above in zip(plan.holders, named, above, strict=True):
        default = " (the default max_holders)" if n == holders.DEFAULT_MAX_HOLDERS else ""
        rows.append(
            [
                "memory, holders (tracemalloc)",
                f"{_plural(n, 'holder name')}{default}, max_holders={plan.max_holders:,}",
                f"{kept / 1024:,.1f} KiB",
                f"{kept / 1024 / n:.2f} KiB/holder"
                + (f" ({kib_above:.2f} KiB/holder from the row above)" if kib_above is not None else ""),
                f"{series:,} holder series, {series / n:.0f} a holder",
            ]
        )
    return rows


# -- the table ------------------------------------------------------------------------------------


def _captions(plan: Plan, quick: bool) -> list[str]:
    flag = " --quick" if quick else ""
    live, gone = plan.churn
    cs = ", ".join(map(str, plan.concurrency))
    return [
        f"- **/metrics render** (`python -m benchmarks.growth --only render{flag}`): pools of benchmarks.scrape's "
        "`busy_engine` (commits, rollbacks, every statement kind: every series exists), idle between renders "
        "(unchanged values: the cached lines are reused); what the handler runs, Exposition.render() in the text "
        f"format, median of ≥ {plan.render_repeat} renders after a first one. Ir = instructions a render under "
        f"callgrind ({plan.render_ir} renders a size, after warm-up; every render takes the pool size advice's "
        "snapshot, as scrapes at Prometheus' intervals do). Also: the median after one committed transaction on "
        "every pool (values moved, as between scrapes under load; its Ir: transactions and renders minus the "
        "transactions alone) and the first render (builds the cached line starts).",
        f"- **sidecar merge** (`python -m benchmarks.growth --only merge{flag}`): `Sidecar(dir).merge()` over "
        "forked workers' real multiprocess files, each worker with one instrumented engine; median of "
        f"{plan.merge_repeat} merges. Then {gone:,} workers come and go ({BATCH} at a time, vanishing without "
        f"cleanup as after SIGKILL) beside the {live:,} live ones: the one scrape that reaps and compacts them, "
        "then the steady merge.",
        f"- **app CPU per transaction** (`python -m benchmarks.growth --only e2e{flag}`): `async with session: "
        f"SELECT 1; commit` on PostgreSQL via asyncpg (BENCH_PG_URL, default {e2e.PG_URL}), at c = {cs} tasks "
        f"over a pool of c connections; instructions per transaction under callgrind ({plan.transactions:,} "
        "transactions a concurrency, after warm-up, one valgrind at a time), `ours` (all metrics), `ours_lean` "
        "(LEAN_BUCKETS, statements=False) and `ours_holders` (holder attribution on) against `none` (bare "
        "SQLAlchemy). Ir counts only this process's CPU: not PostgreSQL's, not the kernel's. Close to "
        "deterministic for one command line (~1.4k Ir/tx between identical runs), yet the same code moves by "
        "1–2% (10–20k Ir/tx) with the process's memory layout and command line (CPython's method cache and "
        "dicts hash addresses; the event loop's polls follow the timing), so each count is the median over "
        f"{plan.layouts} layout(s), with the range of the difference: differences between rows smaller than "
        "that are not the code's; the exporter's own work is the no-I/O count of `python -m benchmarks`.",
        f"- **memory** (`python -m benchmarks.growth --only memory{flag}`): what tracemalloc still sees allocated "
        "after instrumenting, running every statement kind and rendering twice (the cached lines count), "
        "SQLAlchemy's and SQLite's own allocations made before tracing. Holders: one pool, one checkout per "
        f"holder name, max_holders={plan.max_holders:,} so that no name folds into `other`.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.growth", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="every row at tiny sizes (< 60 s)")
    parser.add_argument("--output", type=Path, help="also write the Markdown to this file")
    parser.add_argument("--only", choices=GROUPS, action="append", help="run only these row groups")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    groups = [g for g in GROUPS if g in (args.only or GROUPS)]
    builders: dict[str, Callable[[Plan], list[Row]]] = {
        "render": render_rows,
        "merge": merge_rows,
        "e2e": e2e_rows,
        "memory": memory_rows,
    }
    started = time.monotonic()
    rows: list[Row] = []
    took: list[str] = []
    for group in groups:
        t0 = time.monotonic()
        rows += builders[group](plan)
        took.append(f"{group} {time.monotonic() - t0:.0f} s")
    command = "python -m benchmarks.growth" + (" --quick" if args.quick else "")
    command += "".join(f" --only {g}" for g in args.only or ())
    out = [
        "# How each cost grows with the work",
        "",
        f"`{command}` — {time.strftime('%Y-%m-%d')}",
        "",
        *machine(),
        "",
        "Each row group comes from one command:",
        "",
        *(c for c, g in zip(_captions(plan, args.quick), GROUPS, strict=True) if g in groups),
        "",
        table(["cost", "work", "result", "per unit", "detail"], rows),
        "",
        f"Ran in {time.monotonic() - started:.0f} s ({', '.join(took)}).",
        "",
    ]
    text_out = "\n".join(out)
    print(text_out)
    if args.output:
        args.output.write_text(text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
