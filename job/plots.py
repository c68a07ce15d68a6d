"""The run's two pictures: the loss plot and the samples grid (prompts × rounds).

matplotlib through its Agg canvas alone (no pyplot): no display, no global figure state, safe to
call from any thread of a headless job.
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

LOSS_COLOUR, EVAL_COLOUR, LR_COLOUR = "tab:blue", "tab:red", "0.45"
LOG_SCALE_RANGE = 10.0  # max/min of the plotted losses from which the loss axis is logarithmic
GRID_CELL, GRID_GAP, GRID_LABEL_WIDTH = 192, 6, 200  # pixels: a 64 px sample shows 3x, pixel for pixel


def smooth(values: list[float], span: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average over about `span` points, debiased so the line
    starts at the first value instead of rising from zero."""
    w = 1 - 1 / max(span, 1.0)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = w * avg + (1 - w) * v
        out.append(avg / (1 - w**i) if w else v)
    return out


def plot_losses(series: dict[str, list[tuple[int, float]]], path: Path, title: str = "",
                size: tuple[int, int] = (900, 450)) -> Path:
    return _save(loss_figure(series, title, size), path)


def loss_figure(series: dict[str, list[tuple[int, float]]], title: str = "",
                size: tuple[int, int] = (900, 450)) -> Figure:
    """Training loss (raw points faint, smoothed line), eval loss on the same axes, learning rate on a second
    axis. `series`: {"loss", "eval_loss", "lr"} → [(step, value)], any of them absent or empty."""
    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    loss, evals, lrs = series.get("loss") or [], series.get("eval_loss") or [], series.get("lr") or []
    if loss:
        steps, values = zip(*loss)
        # raw points as dots, so a short run still shows each step; the smoothed line carries the trend
        ax.plot(steps, values, ".", color=LOSS_COLOUR, alpha=0.25, ms=3, label="loss (each step)")
        ax.plot(steps, smooth(list(values), len(values) / 25), color=LOSS_COLOUR, lw=2, label="loss, smoothed")
    if evals:
        steps, values = zip(*evals)
        ax.plot(steps, values, "o-", color=EVAL_COLOUR, ms=4, lw=1.5, label="eval loss (fixed images)")
    plotted = [v for _, v in loss + evals if math.isfinite(v)]
    if plotted and min(plotted) > 0 and max(plotted) / min(plotted) >= LOG_SCALE_RANGE:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        lr_ax = ax.twinx()
        steps, values = zip(*lrs)
        lr_ax.plot(steps, values, "--", color=LR_COLOUR, lw=1.2, label="learning rate")
        lr_ax.set_ylabel("learning rate", color=LR_COLOUR)
        lr_ax.tick_params(axis="y", colors=LR_COLOUR)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        lr_ax.set_ylim(bottom=0, top=max(values) * 1.1 or 1.0)
        h, lab = lr_ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:  # under the axes: inside, it would hide the first steps or the learning-rate line
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)
    last = max((s for s, _ in loss + evals + lrs), default=0)
    ax.set_title(f"{title}: loss over {last} steps" if title else f"loss over {last} steps")
    return fig


def image_grid(cells: list[list[Path | None]], row_labels: list[str], column_labels: list[str], path: Path,
               title: str = "", cell: int = GRID_CELL) -> Path:
    return _save(grid_figure(cells, row_labels, column_labels, title, cell), path)


def grid_figure(cells: list[list[Path | None]], row_labels: list[str], column_labels: list[str], title: str = "",
                cell: int = GRID_CELL) -> Figure:
    """Images in rows × columns, each scaled to fit a `cell`-pixel square (small ones enlarged pixel for pixel),
    a label left of each row and above each column. A missing image leaves its cell empty."""
    dpi, left, top, gap = 100, GRID_LABEL_WIDTH, _grid_top(bool(title)), GRID_GAP
    width, height = grid_size(len(cells), len(column_labels), cell, bool(title))
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    if title:
        fig.text(0.5, 1 - 10 / height, title, ha="center", va="top", fontsize=12, weight="bold")
    for c, label in enumerate(column_labels):
        fig.text((left + c * (cell + gap) + cell / 2) / width, 1 - (top - 8) / height, label, ha="center",
                 va="bottom", fontsize=11)
    for r, (row, label) in enumerate(zip(cells, row_labels)):
        y = 1 - (top + r * (cell + gap) + cell) / height
        fig.text(10 / width, y + cell / 2 / height, textwrap.fill(label, 24), ha="left", va="center", fontsize=10)
        for c, image_path in enumerate(row):
            ax = fig.add_axes((((left + c * (cell + gap)) / width), y, cell / width, cell / height))
            ax.set_axis_off()
            if image_path is not None:
                with Image.open(image_path) as im:
                    ax.imshow(im.convert("RGB"), interpolation="nearest")
    return fig


def grid_size(rows: int, columns: int, cell: int = GRID_CELL, titled: bool = True) -> tuple[int, int]:
    """The grid's size in pixels: the row labels' column, then `cell`-pixel squares `GRID_GAP` apart."""
    return GRID_LABEL_WIDTH + columns * (cell + GRID_GAP), _grid_top(titled) + rows * (cell + GRID_GAP)


def _grid_top(titled: bool) -> int:
    return 56 if titled else 32  # the column labels, and the title above them


def _save(fig: Figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png", facecolor="white")
    os.replace(tmp, path)  # a reader (the Hub push, a person) never sees half a file
    return path
