"""job.data end to end on small image folders built on the fly: captions, odd image files, bucket geometry,
the batch plan, multi-dataset configs, latent sizes the tiny transformer accepts, cache reuse, and the CLI's
exit 4 for unusable datasets.

No network; the tiny model comes from the session fixture. The whole file runs in well under a minute on CPU.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, run_cli
from job import builtin, config, data, model
from job.cache import TensorCache
from job.errors import DataError

# the tiny model's grid: VAE factor 2 x patch 2 = 4 px steps; 16 patches a side = 64 px at most
TINY_GRID = model.Grid(patch_size=2, pos_embed_max_size=256, vae_scale_factor=2, latent_channels=4)
ORIENTATION = 0x0112


def geo(resolution=64, resolution_type="pixel", crop=False, crop_style="center", crop_aspect="square", step=4,
        max_side=64) -> data.Framing:
    return data.Framing(resolution, resolution_type, crop, crop_style, crop_aspect, step, max_side)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def write(folder: Path, name: str, img: Image.Image, caption: str | None = None, **save) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path


@pytest.fixture
def job_log():
    """The job logger's messages (independent of pytest's capture and of job.log.setup's handlers)."""
    records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("job")
    handler, level = ListHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def vae(tiny_model):
    return model.load_vae(tiny_model, torch.device("cpu"))


@pytest.fixture(scope="module")
def transformer(tiny_model):
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").eval()


# ------------------------------------------------------------------ captions

def test_textfile_captions_several_lines_rotate_across_epochs(tmp_path, job_log):
    d = tmp_path / "ds"
    write(d, "a.png", noise(64, 64, 1), "first line\n\n  second line  \nthird line\n")
    write(d, "b.png", noise(64, 64, 2), "only one")
    write(d, "c.png", noise(64, 64, 3))  # no caption file: skipped
    samples = data.discover(data.Folder(d, "textfile", ""), geo())
    assert [s.name for s in samples] == ["a.png", "b.png"]
    assert samples[0].captions == ("first line", "second line", "third line")  # blank lines dropped, stripped
    assert samples[1].captions == ("only one",)
    assert any("2 images usable, 1 skipped (no caption)" in m for m in job_log), job_log

    plan = data.BatchPlan(samples, batch_size=1, seed=0)
    assert plan.batches_per_epoch == 2
    chosen = {i: [] for i in range(2)}
    for epoch in range(30):
        batches = plan.epoch_batches(epoch)
        assert sorted(i for (i, _), in batches) == [0, 1]
        for (i, c), in batches:
            chosen[i].append(c)
    assert set(chosen[0]) <= {0, 1, 2} and len(set(chosen[0])) >= 2, chosen[0]  # varies, stays in range
    assert set(chosen[1]) == {0}
    # the plan is a pure function of (seed, epoch): a fresh Plan agrees, another seed does not
    again = data.BatchPlan(samples, batch_size=1, seed=0)
    assert [again.epoch_batches(e) for e in range(30)] == [data.BatchPlan(samples, 1, 0).epoch_batches(e) for e in range(30)]
    assert [again.epoch_batches(e) for e in range(30)] != [data.BatchPlan(samples, 1, 1).epoch_batches(e) for e in range(30)]


def test_filename_captions(tmp_path):
    d = tmp_path / "ds"
    write(d, "a_red_circle.png", noise(64, 64))
    write(d, "sub/two_blue__squares_.jpg", noise(64, 64), "ignored text file")
    samples = data.discover(data.Folder(d, "filename", ""), geo())
    assert sorted(s.captions for s in samples) == [("a red circle",), ("two blue  squares",)]


def test_instanceprompt_captions_ignore_text_files(tmp_path):
    d = tmp_path / "ds"
    write(d, "x.png", noise(64, 64, 1), "a text file caption")
    write(d, "y.png", noise(64, 64, 2))
    samples = data.discover(data.Folder(d, "instanceprompt", "photo of sks dog"), geo())
    assert [s.captions for s in samples] == [("photo of sks dog",)] * 2


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_captions_with_images_in_a_subfolder(tmp_path, kind, job_log):
    d = tmp_path / "ds"
    write(d, "images/one.png", noise(64, 64, 1))
    write(d, "images/two.png", noise(64, 64, 2))
    write(d, "images/three.png", noise(64, 64, 3))  # no row: skipped
    rows = [{"file_name": "images/one.png", "text": "the first, with a comma"},
            {"file_name": "./images/two.png", "text": "the second"}]
    if kind == "jsonl":
        (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    else:
        lines = ["file_name,text"] + [f'{r["file_name"]},"{r["text"]}"' for r in rows]
        (d / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    samples = data.discover(data.Folder(d, "metadata", ""), geo())
    got = {s.name: s.captions for s in samples}
    assert got == {"images/one.png": ("the first, with a comma",), "images/two.png": ("the second",)}
    assert any("2 images usable, 1 skipped (no caption)" in m for m in job_log), job_log


def test_metadata_strategy_without_a_table_is_a_data_error(tmp_path):
    write(tmp_path, "a.png", noise(64, 64))
    with pytest.raises(DataError, match="metadata.jsonl or metadata.csv"):
        data.discover(data.Folder(tmp_path, "metadata", ""), geo())


def test_no_caption_anywhere_is_a_data_error_with_the_counts(tmp_path):
    for i in range(3):
        write(tmp_path, f"{i}.png", noise(64, 64, i))
    with pytest.raises(DataError, match=r"no usable images .*\(3 image files found; 3 no caption\)"):
        data.discover(data.Folder(tmp_path, "textfile", ""), geo())


# ------------------------------------------------------------------ odd image files

def test_unreadable_files_are_skipped_and_counted(tmp_path, job_log):
    d = tmp_path / "ds"
    write(d, "good.png", noise(64, 64), "ok")
    truncate(write(d, "trunc.png", noise(64, 64, 1), "ok"))
    (d / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    (d / "garbage.txt").write_text("ok")
    (d / "empty.webp").write_bytes(b"")
    (d / "empty.txt").write_text("ok")
    samples = data.discover(data.Folder(d, "textfile", ""), geo())
    assert [s.name for s in samples] == ["good.png"]
    assert any("1 images usable, 3 skipped (unreadable)" in m for m in job_log), job_log
    with pytest.raises(OSError):
        data.open_image(d / "trunc.png")


def test_truncated_jpeg_with_a_good_header_is_skipped_while_caching(tmp_path, job_log):
    """The header reads (so discovery keeps it) but the pixels do not: caching leaves it out, never crashes."""
    d = tmp_path / "ds"
    write(d, "good.jpg", noise(64, 64, 0), "ok", quality=90)
    truncate(write(d, "trunc.jpg", noise(64, 64, 1), "ok", quality=90))
    with pytest.raises(OSError):
        data.open_image(d / "trunc.jpg")
    samples = data.discover(data.Folder(d, "textfile", ""), geo())
    assert [s.name for s in samples] == ["good.jpg", "trunc.jpg"]
    cache = TensorCache(tmp_path / "cache", "fake")
    keys = data.cache_latents(samples, cache, lambda px: px[:, :1, ::2, ::2].clone(), batch_size=2)
    assert list(keys) == [0] and cache.writes == 1
    assert any("latents: 0 cached before, 1 encoded now, 1 undecodable image(s) skipped" in m for m in job_log), job_log


def _two_tone(w: int, h: int, first=(255, 0, 0), second=(0, 0, 255)) -> Image.Image:
    """Left half `first`, right half `second`."""
    img = Image.new("RGB", (w, h), first)
    img.paste(second, (w // 2, 0, w, h))
    return img


def _close(pixel, want, tol=6) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, want))


@pytest.mark.parametrize("fmt", ["jpg", "webp", "png"])
def test_exif_rotated_image_comes_out_upright_and_buckets_follow(tmp_path, fmt):
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored landscape, shown rotated 90 degrees clockwise
    save = {"jpg": {"quality": 95}, "webp": {"lossless": True}, "png": {}}[fmt]
    path = write(tmp_path, f"rot.{fmt}", _two_tone(40, 20), "rotated", exif=exif.tobytes(), **save)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    img = data.open_image(path)
    assert img.mode == "RGB" and img.size == (20, 40)
    assert _close(img.getpixel((10, 2)), (255, 0, 0)) and _close(img.getpixel((10, 37)), (0, 0, 255))  # left → top
    assert data.oriented_size(path) == (20, 40)
    (s,) = data.discover(data.Folder(tmp_path, "textfile", ""), geo())
    assert s.bucket == (32, 64)  # portrait: short side 64 → 64x128, clamped to the 64 px grid
    fitted = data.fit(img, s.bucket, s.framing, "k")
    assert fitted.size == (32, 64) and _close(fitted.getpixel((16, 2)), (255, 0, 0))


def test_exif_rotated_tiff_bucket_matches_the_decoded_image(tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = write(tmp_path, "rot.tif", _two_tone(40, 20), "rotated", exif=exif.tobytes())
    img = data.open_image(path)  # pillow reports a TIFF's size already in display orientation: no second swap
    assert img.size == (20, 40) and _close(img.getpixel((10, 2)), (255, 0, 0), 0)
    assert data.oriented_size(path) == (20, 40)
    (s,) = data.discover(data.Folder(tmp_path, "textfile", ""), geo())
    assert s.bucket == (32, 64)


def test_palette_png_transparency_becomes_white(tmp_path):
    img = Image.new("P", (4, 1), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red (transparent), 1: blue
    img.putpixel((0, 0), 0)
    img.putpixel((3, 0), 0)
    path = write(tmp_path, "pal.png", img, transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    out = data.open_image(path)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(4)] == [(255, 255, 255), (0, 0, 255), (0, 0, 255), (255, 255, 255)]


@pytest.mark.parametrize("mode,key", [("L", 0), ("RGB", (10, 20, 30))])
def test_colour_key_transparency_becomes_white(tmp_path, mode, key):
    img = Image.new(mode, (2, 1), key)
    img.putpixel((1, 0), 200 if mode == "L" else (200, 200, 200))
    path = write(tmp_path, "key.png", img, transparency=key)
    with Image.open(path) as raw:
        assert raw.mode == mode and raw.info["transparency"] == key
    out = data.open_image(path)
    assert [out.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (200, 200, 200)]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    img = Image.new("I;16", (4, 1))
    img.putdata([0, 32768, 65535, 1000])
    path = write(tmp_path, "g16.png", img)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    out = data.open_image(path)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (4, 4, 4)]


def test_rgba_la_l_and_webp_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 255, 0, 255), (0, 0, 0, 128)])
    out = data.open_image(write(tmp_path, "rgba.png", rgba))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 255, 0)
    assert _close(out.getpixel((2, 0)), (127, 127, 127), 1)  # half-transparent black over white

    la = Image.new("LA", (3, 1))
    la.putdata([(0, 0), (0, 255), (100, 255)])
    out = data.open_image(write(tmp_path, "la.png", la))
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (0, 0, 0), (100, 100, 100)]

    out = data.open_image(write(tmp_path, "l.png", Image.new("L", (2, 2), 100)))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (100, 100, 100)

    out = data.open_image(write(tmp_path, "rgb.webp", Image.new("RGB", (8, 8), (10, 200, 30)), lossless=True))
    assert out.mode == "RGB" and out.size == (8, 8) and out.getpixel((4, 4)) == (10, 200, 30)
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    clear.paste((0, 0, 255, 255), (0, 0, 4, 8))
    out = data.open_image(write(tmp_path, "rgba.webp", clear, lossless=True))
    assert out.getpixel((1, 1)) == (0, 0, 255) and out.getpixel((6, 6)) == (255, 255, 255)

    # and all five are discovered (webp included)
    for p in list(tmp_path.iterdir()):
        p.with_suffix(".txt").write_text("x")
    assert sorted(s.name for s in data.discover(data.Folder(tmp_path, "textfile", ""), geo())) == \
        ["l.png", "la.png", "rgb.webp", "rgba.png", "rgba.webp"]


# ------------------------------------------------------------------ geometry

def test_bucket_for_pixel_and_pixel_area():
    big = dict(max_side=1024)
    assert data.bucket_for(96, 64, geo(**big)) == (96, 64)  # short side = resolution
    assert data.bucket_for(64, 96, geo(**big)) == (64, 96)
    assert data.bucket_for(300, 200, geo(**big)) == (96, 64)
    assert data.bucket_for(96, 64, geo(resolution_type="pixel_area", **big)) == (80, 52)  # ~64² px of area
    assert data.bucket_for(500, 500, geo(resolution_type="pixel_area", **big)) == (64, 64)
    assert data.bucket_for(1024, 768, geo(1024, "pixel_area", step=16, max_side=4096)) == (1184, 880)
    # cropping to squares ignores the aspect; preserve keeps it
    for rtype in ("pixel", "pixel_area"):
        assert data.bucket_for(96, 64, geo(resolution_type=rtype, crop=True, **big)) == (64, 64)
        assert data.bucket_for(96, 64, geo(resolution_type=rtype, crop=True, crop_aspect="preserve", **big)) == \
            data.bucket_for(96, 64, geo(resolution_type=rtype, **big))


def test_extreme_aspects_clamp_to_max_side_and_sides_are_step_multiples():
    assert data.bucket_for(1000, 10, geo(max_side=128)) == (128, 4)
    assert data.bucket_for(10, 1000, geo(max_side=128)) == (4, 128)
    assert data.bucket_for(4000, 1000, geo(max_side=64)) == (64, 16)
    sizes = [1, 3, 7, 10, 33, 64, 65, 100, 127, 333, 640, 1000, 4096]
    for rtype in ("pixel", "pixel_area"):
        for crop, aspect in ((False, "square"), (True, "square"), (True, "preserve")):
            for res, step, max_side in ((64, 4, 64), (1024, 16, 2048), (512, 16, 1024)):
                g = geo(res, rtype, crop, crop_aspect=aspect, step=step, max_side=max_side)
                for w in sizes:
                    for h in sizes:
                        bw, bh = data.bucket_for(w, h, g)
                        assert bw % step == 0 and bh % step == 0, (g, w, h, bw, bh)
                        assert step <= bw <= max_side and step <= bh <= max_side, (g, w, h, bw, bh)


def test_fit_gives_the_bucket_size_and_crops_where_asked():
    stripes = Image.new("RGB", (192, 64), (255, 0, 0))  # red | green | blue thirds
    stripes.paste((0, 255, 0), (64, 0, 128, 64))
    stripes.paste((0, 0, 255), (128, 0, 192, 64))
    want = {"center": (0, 255, 0), "corner": (255, 0, 0)}
    for style, colour in want.items():
        out = data.fit(stripes, (64, 64), geo(crop=True, crop_style=style), "key")
        assert out.size == (64, 64)
        assert all(out.getpixel(xy) == colour for xy in ((0, 0), (63, 0), (0, 63), (63, 63), (32, 32))), style
    # every style lands exactly on the bucket, whatever the input's size
    for size in ((192, 64), (50, 70), (33, 200), (64, 64)):
        img = noise(*size)
        for bucket in ((64, 64), (64, 44), (16, 64)):
            for style in ("center", "corner", "random"):
                assert data.fit(img, bucket, geo(crop=True, crop_style=style), "k").size == bucket
            assert data.fit(img, bucket, geo(crop=False), "k").size == bucket  # plain resize


def test_random_crop_is_deterministic_per_seed_key():
    img = noise(200, 64)
    g = geo(crop=True, crop_style="random")
    first = data.fit(img, (64, 64), g, "sample-a").tobytes()
    assert all(data.fit(img, (64, 64), g, "sample-a").tobytes() == first for _ in range(3))
    crops = {data.fit(img, (64, 64), g, f"sample-{k}").tobytes() for k in range(8)}
    assert len(crops) >= 4  # different keys, different places


def test_minimum_image_size_drops_and_counts(tmp_path, job_log):
    for name, size in (("small.png", (32, 32)), ("ok.png", (64, 64)), ("wide.png", (100, 40))):
        write(tmp_path, name, noise(*size), "x")
    kept = data.discover(data.Folder(tmp_path, "textfile", ""), geo(), minimum_image_size=48)  # short side 32, 64, 40
    assert [s.name for s in kept] == ["ok.png"]
    assert any("1 images usable, 2 skipped (smaller than minimum_image_size 48)" in m for m in job_log), job_log
    kept = data.discover(data.Folder(tmp_path, "textfile", ""), geo(resolution_type="pixel_area"), minimum_image_size=48)
    assert sorted(s.name for s in kept) == ["ok.png", "wide.png"]  # sqrt(area) 32, 64, 63.2
    assert any("2 images usable, 1 skipped (smaller than minimum_image_size 48)" in m for m in job_log), job_log


# ------------------------------------------------------------------ the batch plan

def test_batches_never_mix_buckets(tmp_path):
    toy = builtin.toy_dataset_dir(tmp_path, count=24)
    samples = data.discover(data.Folder(toy, "textfile", ""), geo(crop=False))
    assert Counter(s.bucket for s in samples) == {(64, 64): 21, (64, 44): 2, (44, 64): 1}
    plan = data.make_plan(samples, 2, seed=1)
    assert plan.batches_per_epoch == 21 // 2 + 2 // 2 + 1 // 2  # incomplete tails dropped per bucket
    for epoch in range(6):
        batches = plan.epoch_batches(epoch)
        assert len(batches) == 11
        for batch in batches:
            assert len(batch) == 2 and len({samples[i].bucket for i, _ in batch}) == 1, batch
        assert sum(samples[b[0][0]].bucket == (64, 44) for b in batches) == 1
    # micro_batch walks the epochs one after another
    assert plan.micro_batch(11 * 3 + 4) == plan.epoch_batches(3)[4]


def test_repeats_multiply_appearances_per_epoch(tmp_path):
    toy = builtin.toy_dataset_dir(tmp_path, count=24)
    samples = data.discover(data.Folder(toy, "textfile", ""), geo(crop=False), repeats=2)
    assert {s.repeats for s in samples} == {2}
    plan = data.BatchPlan(samples, 1, seed=0)
    assert plan.batches_per_epoch == 72
    for epoch in range(3):
        assert Counter(i for (i, _), in plan.epoch_batches(epoch)) == {i: 3 for i in range(24)}
    assert data.BatchPlan(samples, 2, 0).batches_per_epoch == 63 // 2 + 6 // 2 + 3 // 2


def test_data_backend_config_datasets_keep_their_own_settings(tmp_path):
    a, b = tmp_path / "photos", tmp_path / "named"
    for i in range(3):
        write(a, f"{i}.png", noise(96, 64, i), f"photo {i}\nalternative {i}")
    for name in ("a_blue_cube.png", "a_red_ball.png"):
        write(b, name, noise(64, 64, len(name)))
    entries = [
        {"id": "photos", "type": "local", "instance_data_dir": str(a), "caption_strategy": "textfile",
         "repeats": 1, "resolution": 64, "resolution_type": "pixel", "crop": False},
        {"id": "named", "type": "local", "instance_data_dir": str(b), "caption_strategy": "filename",
         "repeats": 3, "resolution": 32, "resolution_type": "pixel_area", "crop": True, "crop_style": "random",
         "cache_dir_vae": str(tmp_path / "named-cache")},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "text-cache")},
    ]
    s = config.build_settings([{"data_backend_config": json.dumps(entries), "push_to_hub": "false"}])
    specs, text_dir, problems, _ = config.datasets(s)
    assert problems == [] and [sp.id for sp in specs] == ["photos", "named"]
    assert text_dir == str(tmp_path / "text-cache")
    samples, cache_dirs = data.discover_all(specs, [a, b], TINY_GRID, tmp_path / "out")
    assert [(Path(s.source.where).name, s.repeats, s.bucket) for s in samples] == \
        [("photos", 1, (64, 44))] * 3 + [("named", 3, (32, 32))] * 2
    assert [smp.captions for smp in samples[3:]] == [("a blue cube",), ("a red ball",)]
    assert samples[0].captions == ("photo 0", "alternative 0")
    assert samples[0].framing.resolution == 64 and samples[0].framing.crop is False
    assert samples[3].framing == data.Framing(32, "pixel_area", True, "random", "square", 4, 64)
    assert cache_dirs == [tmp_path / "out" / "cache" / "vae"] * 3 + [tmp_path / "named-cache"] * 2
    plan = data.BatchPlan(samples, 1, seed=0)
    assert Counter(i for (i, _), in plan.epoch_batches(0)) == {0: 2, 1: 2, 2: 2, 3: 4, 4: 4}


# ------------------------------------------------------------------ latents the model can take

def _odd_sizes(folder: Path) -> None:
    for k, size in enumerate(((64, 64), (96, 64), (64, 96), (200, 50), (50, 200), (70, 30), (1000, 10),
                              (30, 31), (128, 128))):
        write(folder, f"{k}.png", noise(*size, seed=k), f"image {k}")


def test_every_cached_latent_fits_the_tiny_transformer(tmp_path, tiny_model, vae, transformer):
    folder = tmp_path / "odd"
    _odd_sizes(folder)
    grid = model.read_grid(tiny_model)
    assert (grid.pixel_step, grid.vae_scale_factor) == (4, 2)
    max_side = int(grid.pos_embed_max_size ** 0.5) * grid.pixel_step
    seen = set()
    for rtype, crop in (("pixel", False), ("pixel_area", False), ("pixel", True)):
        g = data.Framing(64, rtype, crop, "center", "square", grid.pixel_step, max_side)
        samples = data.discover(data.Folder(folder, "textfile", ""), g)
        cache = TensorCache(tmp_path / f"cache-{rtype}-{crop}", "tiny-vae")
        keys = data.cache_latents(samples, cache, lambda px: model.encode_latents(vae, px), batch_size=4)
        by_bucket = {}
        for i, s in enumerate(samples):
            by_bucket.setdefault(s.bucket, i)
        for (bw, bh), i in sorted(by_bucket.items()):
            lat = cache.get(keys[i])
            assert lat.shape == (4, bh // 2, bw // 2), ((bw, bh), lat.shape)
            with torch.no_grad():
                out = transformer(hidden_states=lat[None], encoder_hidden_states=torch.randn(1, 8, 32),
                                  timestep=torch.tensor([0.5]), return_dict=False)[0]
            assert out.shape == lat[None].shape and torch.isfinite(out).all(), (bw, bh)
            seen.add((bw, bh))
    assert {(64, 44), (44, 64), (64, 16), (16, 64), (64, 28), (64, 4), (64, 64)} <= seen, seen
    assert any(w != h for w, h in seen)


# ------------------------------------------------------------------ cache reuse

def test_latent_cache_reuse_and_one_changed_image(tmp_path, vae):
    folder = tmp_path / "ds"
    for k, size in enumerate(((64, 64), (64, 64), (96, 64), (64, 96))):
        write(folder, f"{k}.png", noise(*size, seed=k), f"image {k}")
    samples = data.discover(data.Folder(folder, "textfile", ""), geo())
    cache = TensorCache(tmp_path / "vae", "tiny-vae")

    def encode(px):
        return model.encode_latents(vae, px)

    first = data.cache_latents(samples, cache, encode, batch_size=8)
    assert cache.writes == 4 and len(set(first.values())) == 4
    again = data.cache_latents(samples, cache, encode, batch_size=8)
    assert cache.writes == 4 and again == first  # nothing encoded the second time
    before = cache.get(first[2])
    write(folder, "2.png", noise(96, 64, seed=99))  # new pixels, same size and name
    third = data.cache_latents(samples, cache, encode, batch_size=8)
    assert cache.writes == 5
    assert third[2] != first[2] and {i: k for i, k in third.items() if i != 2} == {i: k for i, k in first.items() if i != 2}
    assert not torch.equal(cache.get(third[2]), before)
    # a fresh cache object over the same folder (a restarted job) reuses everything
    assert TensorCache(tmp_path / "vae", "tiny-vae").writes == 0
    restarted = TensorCache(tmp_path / "vae", "tiny-vae")
    data.cache_latents(samples, restarted, encode, batch_size=1)
    assert restarted.writes == 0
    # another encoder identity never reuses
    other = TensorCache(tmp_path / "vae", "another-vae")
    data.cache_latents(samples, other, encode, batch_size=8)
    assert other.writes == 4


def test_text_cache_reuse_and_one_changed_caption(tmp_path):
    calls: list[list[str]] = []

    def encode(captions):
        calls.append(list(captions))
        return torch.stack([torch.full((3, 4), float(len(c))) for c in captions])

    cache = TensorCache(tmp_path / "text", "tiny-t5")
    captions = ["a red circle", "a blue square", "a red circle", "a green star", ""]
    keys = data.cache_text(captions, cache, encode, batch_size=2)
    assert cache.writes == 4 and sum(map(len, calls)) == 4 and len(calls) == 2  # duplicates once, in batches of 2
    assert set(keys) == set(captions)
    calls.clear()
    assert data.cache_text(captions, cache, encode) == keys
    assert cache.writes == 4 and calls == []
    changed = ["a red circle", "a blue cube", "a green star", ""]
    new = data.cache_text(changed, cache, encode)
    assert cache.writes == 5 and calls == [["a blue cube"]]
    assert torch.equal(cache.get(new["a blue cube"]), torch.full((3, 4), 11.0))
    assert {c: new[c] for c in changed if c != "a blue cube"} == {c: keys[c] for c in changed if c != "a blue cube"}


# ------------------------------------------------------------------ through the CLI

@pytest.mark.slow
def test_fewer_usable_images_than_one_batch_exits_4(tiny_model, tmp_path):
    one = builtin.single_image_dataset_dir(tmp_path / "data")
    r = run_cli("train", **TINY, model_id=tiny_model, dataset_id=one, output_dir=tmp_path / "out",
                max_train_steps=2, train_batch_size=2)
    assert r.returncode == 4, r.stderr[-2000:]
    assert "1 usable image(s) give no full batch of TRAIN_BATCH_SIZE=2" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_only_corrupt_images_exits_4(tiny_model, tmp_path):
    d = tmp_path / "corrupt"
    truncate(write(d, "a.png", noise(64, 64), "a caption"))
    (d / "b.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (d / "b.txt").write_text("a caption")
    r = run_cli("train", **TINY, model_id=tiny_model, dataset_id=d, output_dir=tmp_path / "out", max_train_steps=2)
    assert r.returncode == 4, r.stderr[-2000:]
    assert f"no usable images in {d} (2 image files found; 2 unreadable)" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_second_run_over_the_same_output_encodes_nothing(tiny_model, tmp_path):
    toy = builtin.toy_dataset_dir(tmp_path / "data", count=8)
    captions = {p.read_text(encoding="utf-8").strip() for p in toy.glob("*.txt")}
    common = dict(**TINY, model_id=tiny_model, dataset_id=toy, output_dir=tmp_path / "out", max_train_steps=1,
                  train_batch_size=2, resume_from_checkpoint="none")
    first = run_cli("train", **common)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "latents: 0 cached before, 8 encoded now" in first.stderr
    # training captions + the empty prompt (+ whatever validation prompts the pipeline also caches)
    m = re.search(r"text embeddings: 0 cached before, (\d+) encoded now", first.stderr)
    assert m and int(m.group(1)) >= len(captions) + 1, first.stderr[-3000:]
    n_text = int(m.group(1))
    # a restart after a crash at the very end (no completion record yet) reuses every cache entry
    (tmp_path / "out" / "completed.json").unlink()
    second = run_cli("train", **common)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "latents: 8 cached before, 0 encoded now" in second.stderr
    assert f"text embeddings: {n_text} cached before, 0 encoded now" in second.stderr
    assert not re.search(r"caching latents \d+/", second.stderr)
