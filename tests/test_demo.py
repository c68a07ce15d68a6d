"""`demo` as a newcomer runs it: through the real CLI and pipeline, the last validation round shows the training
pictures, where step 0 (the untrained base) shows noise. About a minute of one CPU core."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from job import builtin, plots


@pytest.fixture(scope="module")
def demo(tiny_model, builtin_root, tmp_path_factory):
    # the demo builds its model and pictures under $XDG_CACHE_HOME/auraflow-lokr-job: there, the session's folder
    # (the same recipe, so its tiny model is found and the VAE is not fitted twice)
    xdg = tmp_path_factory.mktemp("xdg")
    (xdg / "auraflow-lokr-job").symlink_to(builtin_root, target_is_directory=True)
    out = tmp_path_factory.mktemp("demo") / "out"
    r = run_cli("demo", timeout=900, output_dir=out, xdg_cache_home=xdg)  # one thread, as every run_cli
    assert r.returncode == 0, r
    return out


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255


@pytest.mark.slow
def test_the_final_round_is_closer_to_the_training_pictures_than_step_0(demo, builtin_root):
    pictures = sorted(builtin.demo_dataset_dir(builtin_root).glob("*.png"))
    training = [_pixels(p) for p in pictures]
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in pictures]
    names = {"validation": captions[0], **{s: c for s, c in builtin.demo_captions().items() if c != captions[0]}}
    assert len(names) == len(pictures) == 4  # every picture is a validation prompt

    def distances(path) -> list[float]:  # pixel MSE to each training picture
        image = _pixels(path)
        return [float(((image - t) ** 2).mean()) for t in training]

    for name, caption in names.items():
        base = distances(demo / "samples" / "step-000000" / f"{name}.png")
        final = distances(demo / "samples" / f"{name}.png")
        own = captions.index(caption)
        # measured: the base model's noise is 0.077 from the nearest picture, the final images 0.005-0.016 from
        # their own (with one thread or two)
        assert final[own] < 0.4 * min(base), (name, min(base), final)
        assert min(final) == final[own], (name, final)  # the picture its prompt names, not another one


@pytest.mark.slow
def test_the_grid_and_loss_plot_are_written(demo):
    with Image.open(demo / "samples" / "grid.png") as grid, Image.open(demo / "loss.png") as loss:
        assert grid.size == plots.grid_size(4, 4) and loss.size == (900, 450)  # 4 prompts x 4 rounds
    rounds = sorted(p.name for p in (demo / "samples").iterdir() if p.is_dir())
    assert rounds == ["step-000000", "step-000100", "step-000200", "step-000300"]
