"""The loss plot and the samples grid, drawn by matplotlib: what they show, read back from the figures and PNGs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from job import plots


def test_smoothing_is_a_debiased_moving_average():
    assert plots.smooth([2.0, 2.0, 2.0], span=10) == pytest.approx([2.0, 2.0, 2.0])  # no rise from zero
    w = 0.5  # span 2
    expected = [1.0, (w * (1 - w) * 1 + (1 - w) * 3) / (1 - w**2)]
    assert plots.smooth([1.0, 3.0], span=2) == pytest.approx(expected)
    assert plots.smooth([1.0, 5.0, 3.0], span=1) == [1.0, 5.0, 3.0]  # a span of one point is no smoothing
    noisy = [1.0 + (-1) ** i * 0.5 for i in range(200)]
    smoothed = plots.smooth(noisy, span=20)
    assert max(abs(v - 1.0) for v in smoothed[50:]) < 0.05  # the alternation averages out


def _series(losses, evals=(), lrs=()):
    return {"loss": list(enumerate(losses, 1)), "eval_loss": list(evals), "lr": list(enumerate(lrs, 1))}


def test_loss_figure_draws_raw_smoothed_eval_and_lr():
    losses = [1.0 / (1 + 0.05 * i) + 0.02 * (-1) ** i for i in range(120)]
    lrs = [1e-3 * min(1.0, i / 10) for i in range(1, 121)]
    fig = plots.loss_figure(_series(losses, [(40, 0.5), (80, 0.3), (120, 0.2)], lrs), title="my-run")
    ax, lr_ax = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    raw, smoothed, evals = lines["loss (each step)"], lines["loss, smoothed"], lines["eval loss (fixed images)"]
    assert list(raw.get_ydata()) == losses and raw.get_alpha() < 0.5  # every point, faint
    assert smoothed.get_alpha() is None and list(smoothed.get_ydata()) == plots.smooth(losses, 120 / 25)
    assert np.std(np.diff(smoothed.get_ydata())) < np.std(np.diff(losses)) / 4
    assert list(evals.get_xdata()) == [40, 80, 120] and list(evals.get_ydata()) == [0.5, 0.3, 0.2]
    (lr_line,) = lr_ax.get_lines()
    assert list(lr_line.get_ydata()) == lrs and lr_ax.get_ylabel() == "learning rate"
    assert ax.get_yscale() == "linear"  # 1.02 → 0.14: under a factor of 10
    assert ax.get_title() == "my-run: loss over 120 steps" and ax.get_xlabel() == "step"
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 120]
    assert len(ticks) >= 4 and all(float(t).is_integer() for t in ticks)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["loss (each step)", "loss, smoothed", "eval loss (fixed images)", "learning rate"]


def test_loss_axis_is_logarithmic_when_the_losses_span_a_decade():
    falling = [2.0 * 0.97**i for i in range(100)]  # 2.0 → 0.1
    assert plots.loss_figure(_series(falling)).axes[0].get_yscale() == "log"
    assert plots.loss_figure(_series(falling[:60])).axes[0].get_yscale() == "linear"  # 2.0 → 0.33
    assert len(plots.loss_figure(_series(falling)).axes) == 1  # no learning-rate axis without learning rates


def test_plot_losses_writes_a_png_of_the_asked_size(tmp_path):
    path = plots.plot_losses(_series([1.0, 0.9, 0.7], lrs=[1e-3] * 3), tmp_path / "loss.png", size=(640, 320))
    with Image.open(path) as im:
        assert im.size == (640, 320)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    blue = np.array([31, 119, 180])  # tab:blue, the smoothed loss line
    assert (np.abs(pixels.astype(int) - blue).sum(1) < 30).sum() > 50
    assert not list(tmp_path.glob(".*"))  # written through a temporary file, renamed into place


def _image(path, size, colour):
    Image.new("RGB", size, colour).save(path)
    return path


def test_grid_puts_each_image_in_its_cell_with_labels(tmp_path):
    red, blue = _image(tmp_path / "r.png", (64, 64), (220, 30, 30)), _image(tmp_path / "b.png", (64, 64), (30, 70, 220))
    tall = _image(tmp_path / "t.png", (32, 48), (30, 170, 60))
    cells = [[red, blue], [None, tall]]
    fig = plots.grid_figure(cells, ["first: a red circle", "second"], ["step 0 (base)", "step 10"], title="samples")
    texts = [t.get_text() for t in fig.texts]
    assert texts[:3] == ["samples", "step 0 (base)", "step 10"] and "first: a red circle" in texts
    path = plots.image_grid(cells, ["first: a red circle", "second"], ["step 0 (base)", "step 10"],
                            tmp_path / "grid.png", title="samples", cell=128)
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB")).astype(int)
    fig = plots.grid_figure(cells, ["first: a red circle", "second"], ["step 0 (base)", "step 10"], title="samples",
                            cell=128)
    fig.canvas.draw()
    boxes = [ax.get_window_extent() for ax in fig.axes]  # row by row; y counted from the bottom
    height = grid.shape[0]

    def centre(box):
        return grid[height - int((box.y0 + box.y1) / 2), int((box.x0 + box.x1) / 2)]

    assert list(centre(boxes[0])) == [220, 30, 30] and list(centre(boxes[1])) == [30, 70, 220]
    assert list(centre(boxes[2])) == [255, 255, 255]  # no image: an empty cell
    assert list(centre(boxes[3])) == [30, 170, 60]
    for box, colour in ((boxes[0], (220, 30, 30)), (boxes[1], (30, 70, 220))):  # a square image fills its cell
        x0, x1, y0, y1 = int(box.x0) + 2, int(box.x1) - 2, height - int(box.y1) + 2, height - int(box.y0) - 2
        assert (grid[y0:y1, x0:x1] == colour).all(axis=-1).mean() > 0.99
        assert x1 - x0 >= 128 - 6
