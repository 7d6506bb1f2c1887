"""Draw the dashboard from real Prometheus data into a PNG (no Grafana server can run here).

Every panel is drawn at its grid position from the dashboard JSON, with its own queries, legends
and unit, so the picture is what Grafana shows for the same data.

    python -m dashboards.render --with-demo 150          # start demo + sidecar + Prometheus, then draw
    python -m dashboards.render --prometheus http://127.0.0.1:9090 --minutes 15
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter

from . import dashboard, live

BACKGROUND, PANEL, GRID, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#d8d9da", "#8e8e8e"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d"]
COLORS = {"green": "#73bf69", "orange": "#ff9830", "red": "#f2495c"}
COL_INCH, ROW_INCH = 0.78, 0.36


def fmt(value: float, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    if unit == "s":
        if value == 0:
            return "0 s"
        if abs(value) < 1e-3:
            return f"{value * 1e6:.0f} µs"
        if abs(value) < 1:
            return f"{value * 1e3:.0f} ms"
        return f"{value:.1f} s"
    if unit in ("ops", "reqps"):
        return f"{value:.2g}/s" if value else "0/s"
    if unit == "bool_yes_no":
        return "Yes" if value >= 1 else "No"
    return f"{value:.3g}"


def legend(template: str, labels: dict[str, str]) -> str:
    # Grafana shows an empty label value as nothing; say so instead of drawing a blank legend.
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1)) or f"({m.group(1)} unset)", template).strip()


def threshold_color(panel: dict[str, Any], value: float) -> str:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    color = "green"
    for step in steps:
        if step["value"] is None or value >= step["value"]:
            color = step["color"]
    return COLORS.get(color, color)


def draw_stat(ax: Axes, panel: dict[str, Any], prom: live.Prometheus, sub: dict[str, Any]) -> None:
    unit = panel["fieldConfig"]["defaults"]["unit"]
    values: list[tuple[str, float]] = []
    for target in panel["targets"]:
        result = prom.query(live.substitute(target["expr"], **sub))["data"]["result"]
        values += [(legend(target["legendFormat"], r["metric"]), float(r["value"][1])) for r in result]
    ax.set_xticks([])
    ax.set_yticks([])
    if not values:
        ax.text(0.5, 0.45, "No data", ha="center", va="center", color=MUTED, fontsize=16, transform=ax.transAxes)
        return
    width = 1 / len(values)
    for i, (name, value) in enumerate(values):
        ax.add_patch(plt.Rectangle((i * width + 0.01, 0.02), width - 0.02, 0.8, color=threshold_color(panel, value)))
        ax.text(
            (i + 0.5) * width,
            0.45,
            fmt(value, unit),
            ha="center",
            va="center",
            color="white",
            fontsize=22,
            weight="bold",
            transform=ax.transAxes,
        )
        if len(values) > 1:
            ax.text((i + 0.5) * width, 0.12, name, ha="center", color="white", fontsize=8, transform=ax.transAxes)


def draw_timeseries(
    ax: Axes, panel: dict[str, Any], prom: live.Prometheus, sub: dict[str, Any], seconds: float, step: str
) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults["unit"]
    custom = defaults.get("custom", {})
    reference = [re.compile(o["matcher"]["options"]) for o in panel["fieldConfig"].get("overrides", [])]
    log = custom.get("scaleDistribution", {}).get("type") == "log"
    bars = custom.get("drawStyle") == "bars"
    stacked = custom.get("stacking", {}).get("mode") == "normal"
    base: dict[float, float] = {}  # the stack's height so far, by timestamp
    now = time.time()
    n = 0
    positive: list[float] = []
    for target in panel["targets"]:
        payload = prom.query_range(live.substitute(target["expr"], **sub), seconds=seconds, step=step)
        for series in payload["data"]["result"]:
            xs = [(float(t) - now) / 60 for t, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            name = legend(target["legendFormat"], series["metric"])
            is_ref = any(r.fullmatch(name) for r in reference)
            color = COLORS["red"] if is_ref else PALETTE[n % len(PALETTE)]
            n += 0 if is_ref else 1
            positive += [y for y in ys if y > 0 and not math.isnan(y)]
            if bars and not is_ref:
                ax.bar(xs, ys, width=0.8 * (xs[1] - xs[0]) if len(xs) > 1 else 0.01, color=color, label=name, alpha=0.8)
            elif stacked and not is_ref:
                stamps = [float(t) for t, _ in series["values"]]
                below = [base.get(t, 0.0) for t in stamps]
                tops = [b + (0.0 if math.isnan(y) else y) for b, y in zip(below, ys, strict=True)]
                base.update(zip(stamps, tops, strict=True))
                ax.plot(xs, tops, color=color, lw=1.0, label=name)
                ax.fill_between(xs, below, tops, color=color, alpha=0.5)
            else:
                ax.plot(xs, ys, color=color, lw=1.2, ls="--" if is_ref else "-", label=name)
                if not is_ref and not log:
                    ax.fill_between(xs, ys, color=color, alpha=0.08)
    if n == 0 and not ax.lines:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", color=MUTED, fontsize=14, transform=ax.transAxes)
    if log and positive:
        ax.set_yscale("log")
    elif "min" in defaults:
        ax.set_ylim(bottom=defaults["min"])
    if "max" in defaults:
        ax.set_ylim(top=defaults["max"] * 1.05)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v, unit)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 60:.0f}s" if round(v * 60) else "now"))
    ax.grid(color=GRID, lw=0.5)
    ax.tick_params(colors=MUTED, labelsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6.5, loc="upper left", frameon=False, labelcolor=TEXT, ncol=2)


def render(prom: live.Prometheus, output: Path, seconds: float, rate_interval: str, step: str) -> None:
    doc = dashboard.build()
    panels = doc["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width, height = 24 * COL_INCH, rows * ROW_INCH + 0.8
    fig = plt.figure(figsize=(width, height), facecolor=BACKGROUND)
    fig.text(
        0.01,
        1 - 0.35 / height,
        f"{doc['title']}   ·   job={live.JOB}   instance=All   pool=All   holder=All   ·   "
        f"last {seconds / 60:.0f} min, drawn from Prometheus",
        color=TEXT,
        fontsize=14,
        va="center",
    )
    sub = {"rate_interval": rate_interval, "interval": step, "range_seconds": int(seconds)}
    for panel in panels:
        g = panel["gridPos"]
        pad = 0.06
        left = (g["x"] * COL_INCH + pad) / width
        top = 1 - (0.8 + g["y"] * ROW_INCH) / height
        w = (g["w"] * COL_INCH - 2 * pad) / width
        if panel["type"] == "row":
            fig.text(
                left, top - 0.5 * ROW_INCH / height, panel["title"], color=TEXT, fontsize=13, weight="bold", va="center"
            )
            continue
        h = (g["h"] * ROW_INCH - 0.45) / height
        # Room for the y tick labels inside the panel's own cell, as Grafana draws them.
        inset = 0 if panel["type"] == "stat" else 0.55 / width
        ax = fig.add_axes((left + inset, top - h - 0.3 / height, w - inset, h), facecolor=PANEL)
        for spine in ax.spines.values():
            spine.set_color(GRID)
        fig.text(left, top - 0.12 / height, panel["title"], color=TEXT, fontsize=9.5, weight="bold", va="top")
        if panel["type"] == "stat":
            draw_stat(ax, panel, prom, sub)
        else:
            draw_timeseries(ax, panel, prom, sub, seconds, step)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=72, facecolor=BACKGROUND)
    print(f"wrote {output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", help="URL of a Prometheus that scrapes the exporter (job sqlalchemy-pool)")
    parser.add_argument(
        "--with-demo",
        type=float,
        metavar="SECONDS",
        help="start demo + sidecar + Prometheus locally, let it run this long, then draw",
    )
    parser.add_argument("--minutes", type=float, default=None, help="time range to draw (default: all of it)")
    parser.add_argument("--rate-interval", default="10s", help="value of $__rate_interval")
    parser.add_argument("--step", default="2s")
    parser.add_argument("--output", type=Path, default=live.REPO / "docs" / "dashboard.png")
    args = parser.parse_args(argv)
    if args.with_demo:
        with tempfile.TemporaryDirectory() as tmp, live.stack(Path(tmp), demo_seconds=args.with_demo + 120) as prom:
            time.sleep(max(0.0, args.with_demo - (time.monotonic() - prom.started)))
            seconds = args.minutes * 60 if args.minutes else time.monotonic() - prom.started
            render(prom, args.output, seconds, args.rate_interval, args.step)
        return 0
    if not args.prometheus:
        parser.error("give --prometheus URL or --with-demo SECONDS")
    render(
        live.Prometheus(args.prometheus.rstrip("/"), time.monotonic()),
        args.output,
        (args.minutes or 15) * 60,
        args.rate_interval,
        args.step,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
