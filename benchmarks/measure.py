"""Interleaved A/B/A/B rounds and paired medians: the only way to compare on a shared, noisy machine."""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Each round runs every variant once; the order rotates and reverses so none always goes first."""
    out = []
    for r in range(rounds):
        k = r % len(names)
        order = list(names[k:]) + list(names[:k])
        out.append(order[::-1] if (r // len(names)) % 2 else order)
    return out


def interleaved(names: Sequence[str], rounds: int, run: Callable[[str], float]) -> dict[str, list[float]]:
    """`run(name)` returns one measurement; every variant gets `rounds` of them, interleaved."""
    results: dict[str, list[float]] = {n: [] for n in names}
    for order in orders(names, rounds):
        for name in order:
            gc.collect()
            results[name].append(run(name))
    return results


@dataclass(frozen=True)
class Summary:
    median: float
    delta: float  # median of per-round (variant - baseline)
    ratio: float  # median of per-round variant / baseline
    spread: float  # half the interquartile range of the per-round deltas: the noise of `delta`
    best: float  # the fastest round: the least disturbed by other processes


def summarise(results: dict[str, list[float]], baseline: str = "none") -> dict[str, Summary]:
    """Paired statistics: round i of a variant is compared with round i of the baseline."""
    base = results[baseline]
    out = {}
    for name, values in results.items():
        deltas = [v - b for v, b in zip(values, base, strict=True)]
        ratios = [v / b if b else math.nan for v, b in zip(values, base, strict=True)]
        out[name] = Summary(
            statistics.median(values),
            statistics.median(deltas),
            statistics.median(ratios),
            _iqr(deltas) / 2,
            min(values),
        )
    return out


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values) if values else math.nan
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def fmt(value: float, digits: int = 2, sign: bool = False) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
