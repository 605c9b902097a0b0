"""The results chart, ``benchmarks/results.png``: every workload's median per loop relative to
uvloop's (= 1.0), turned so that higher is always better. ``run.py --write-results`` writes it.

Drawing only: ``run.py`` (in-process workloads) and ``network.py`` (network workloads) choose
the metric of each bar group and normalise it with ``normalise``. matplotlib is imported when
the chart is drawn (headless, Agg backend), so the rest of the suite runs without it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = "uvloop"
# One colour per loop, the same in every panel; ferroloop stands out.
LOOP_COLORS = {
    "asyncio": "#a0a0a0",
    "uvloop": "#1f77b4",
    "rloop": "#2ca02c",
    "rsloop": "#9467bd",
    "ferroloop": "#d62728",
}

# Layout, in inches.
BAR_H = 0.11  # one bar
GROUP_GAP = 0.22  # between bar groups
PANEL_PAD = 0.75  # a panel's title and x axis
LABEL_W = 2.5  # the workload names left of each panel
PLOT_W = 3.9
COLUMN_W = LABEL_W + PLOT_W + 0.35
HEAD_H = 1.15  # title and legend
CAPTION_LINE_H = 0.17  # one line of the caption
CAPTION_CHARS_PER_INCH = 15  # at its font size, with a margin


@dataclass
class Group:
    """One bar group: a workload, with one normalised value per loop (None: no result)."""

    panel: str
    label: str
    values: dict[str, float | None]


def normalise(metric: dict[str, float | None], higher_is_better: bool) -> dict[str, float | None]:
    """Each loop's value relative to the baseline loop's, so that > 1 is better than it:
    value ÷ baseline when higher is better (requests/s), baseline ÷ value otherwise (time,
    CPU per request, bytes). None where the loop or the baseline has no result."""
    base = metric.get(BASELINE)
    out: dict[str, float | None] = {}
    for loop, value in metric.items():
        if base is None or value is None or not (base > 0 and value > 0):
            out[loop] = None
        elif math.isfinite(base) and math.isfinite(value):
            out[loop] = value / base if higher_is_better else base / value
        else:
            out[loop] = None
    return out


def _columns(panels: list[tuple[str, list[Group]]]) -> list[list[tuple[str, list[Group]]]]:
    """Panels spread over 1-3 columns: each, in order, goes to the column with the fewest bar
    groups so far, so the figure stays roughly as wide as it is tall."""
    total = sum(len(gs) for _, gs in panels)
    ncols = 1 if total <= 16 else 2 if total <= 36 else 3
    cols: list[list[tuple[str, list[Group]]]] = [[] for _ in range(ncols)]
    sizes = [0] * ncols
    for panel in panels:
        i = sizes.index(min(sizes))
        cols[i].append(panel)
        sizes[i] += len(panel[1])
    return [c for c in cols if c]


def write_chart(
    path: Path, loops: Sequence[str], groups: Sequence[Group], title: str, caption: str
) -> str | None:
    """Draws the bar groups into ``path`` (PNG); returns None, or why no chart was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); benchmarks/setup.sh installs it"
    if not groups:
        return "no workloads to chart"
    if all(v is None for g in groups for v in g.values.values()):
        return f"no {BASELINE} results to normalise to (measure {BASELINE} too)"
    panels: dict[str, list[Group]] = {}
    for g in groups:
        panels.setdefault(g.panel, []).append(g)
    columns = _columns(list(panels.items()))
    group_h = BAR_H * len(loops) + GROUP_GAP

    def panel_h(gs: list[Group]) -> float:
        return len(gs) * group_h + PANEL_PAD

    body_h = max(sum(panel_h(gs) for _, gs in col) for col in columns)
    fig_w = COLUMN_W * len(columns)
    caption_lines = textwrap.wrap(caption, int(fig_w * CAPTION_CHARS_PER_INCH))
    foot_h = 0.3 + CAPTION_LINE_H * len(caption_lines)
    fig_h = HEAD_H + body_h + foot_h
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110)
    width = 1.0 / len(loops)
    for c, col in enumerate(columns):
        top = fig_h - HEAD_H
        for name, gs in col:
            h = panel_h(gs)
            plot_h = len(gs) * group_h
            ax = fig.add_axes(
                (
                    (c * COLUMN_W + LABEL_W) / fig_w,
                    (top - 0.35 - plot_h) / fig_h,
                    PLOT_W / fig_w,
                    plot_h / fig_h,
                )
            )
            top -= h
            _draw_panel(ax, name, gs, loops, width)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=LOOP_COLORS.get(loop, "#555555")) for loop in loops
    ]
    fig.legend(
        handles,
        list(loops),
        loc="upper center",
        ncol=len(loops),
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.55 / fig_h),
        fontsize=10,
    )
    fig.suptitle(title, y=1 - 0.12 / fig_h, fontsize=13, fontweight="bold")
    fig.text(0.5, 0.12 / fig_h, "\n".join(caption_lines), ha="center", va="bottom", fontsize=8.5)
    fig.savefig(path)
    plt.close(fig)
    return None


def _draw_panel(ax: Any, name: str, gs: list[Group], loops: Sequence[str], width: float) -> None:
    """One panel: a horizontal bar per loop in each group, the baseline at x = 1."""
    values = [v for g in gs for v in g.values.values() if v is not None]
    xmax = max([1.25, *(v * 1.12 for v in values)])
    for i, g in enumerate(gs):
        for j, loop in enumerate(loops):
            y = i + (j - (len(loops) - 1) / 2) * width * 0.9
            v = g.values.get(loop)
            if v is None:
                ax.text(0.01 * xmax, y, "n/a", va="center", fontsize=5.5, color="#777777")
                continue
            ax.barh(y, v, height=width * 0.85, color=LOOP_COLORS.get(loop, "#555555"))
            ax.text(v + 0.01 * xmax, y, f"{v:.2f}", va="center", fontsize=5.5)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(range(len(gs)), [g.label for g in gs], fontsize=7.5)
    ax.set_ylim(len(gs) - 0.5, -0.5)
    ax.set_xlim(0, xmax)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(name, fontsize=10, loc="left")
    ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    ax.set_axisbelow(True)
