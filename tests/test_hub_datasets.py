"""Datasets in the layouts people publish: parquet shards written by pyarrow in the `datasets` library's layout, zip
archives of images with captions, and the bad input each brings; TOKENIZER_MAX_LENGTH. Units on real pyarrow, zip and
PIL files; then the real CLI on the tiny model against the Hub-compatible server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import io
import json
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ALL_LINEAR, ROOT, TINY, run_cli
from hubserver import WRITE_TOKEN, start_hub
from job import builtin, card, data, model
from job.config import DatasetSpec, build_settings, datasets, tokenizer_max_length
from job.data import archive, layout
from job.errors import ConfigError, DataError

FEATURES = {"info": {"features": {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}}}
GRID = model.Grid(patch_size=2, pos_embed_max_size=256, vae_scale_factor=2, latent_channels=4)
FRAMING = data.Framing(64, "pixel", True, "center", "square", GRID.pixel_step, 16 * GRID.pixel_step)


def png(seed: int, size: tuple[int, int] = (64, 64), noise: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if noise:
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        arr = np.zeros((size[1], size[0], 3), dtype=np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def image_rows(images: list[bytes | None], texts: list[str | None]) -> pa.Table:
    """The `datasets` layout: an image column of {bytes, path} structs, a text column, the features metadata."""
    column = pa.array([None if b is None else {"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": column, "text": pa.array(texts, pa.string())})
    return table.replace_schema_metadata({"huggingface": json.dumps(FEATURES)})


def write_split(folder: Path, split: str, tables: list[pa.Table], row_group_size: int = 2) -> list[str]:
    names = []
    for i, table in enumerate(tables):
        name = f"data/{split}-{i:05d}-of-{len(tables):05d}.parquet"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / name, row_group_size=row_group_size)
        names.append(name)
    return names


def spec(source: str | Path = "", **kw) -> DatasetSpec:
    s = build_settings([{"dataset_id": str(source) or "x", "push_to_hub": "false", **kw}])
    return datasets(s)[0][0]


def toy(tmp_path_factory, count: int = 8) -> list[tuple[bytes, str]]:
    folder = builtin.toy_dataset_dir(tmp_path_factory.mktemp("toy"), count=count)
    return [(p.read_bytes(), p.with_suffix(".txt").read_text().strip()) for p in sorted(folder.glob("*.png"))]


# ------------------------------------------------------------------------------------------------ settings

def test_huggingface_entries_take_simpletuners_keys_from_the_entry_and_its_block(tmp_path):
    entries = [
        {"id": "hf", "type": "huggingface", "dataset_name": "me/tags", "split": "holdout", "revision": "v2",
         "huggingface": {"image_column": "jpg", "caption_column": ["short", "long"], "split": "ignored",
                         "filter_func": {"min_width": 512}}, "metadata_backend": "huggingface"},
        {"id": "zips", "type": "local", "instance_data_dir": str(tmp_path), "caption_column": "prompt"},
    ]
    s = build_settings([{"data_backend_config": json.dumps(entries), "push_to_hub": "false", "image_column": "img",
                         "dataset_revision": "main"}])
    specs, _, problems, warnings = datasets(s)
    assert problems == []
    hf, local = specs
    assert (hf.source, hf.split, hf.revision, hf.image_column, hf.caption_column, hf.caption_strategy) == (
        "me/tags", "holdout", "v2", "jpg", ("short", "long"), "huggingface")  # the entry's own split wins
    assert (local.source, local.split, local.image_column, local.caption_column, local.caption_strategy) == (
        str(tmp_path), "train", "img", ("prompt",), "textfile")  # the rest from the top-level settings
    assert "DATA_BACKEND_CONFIG: huggingface.filter_func ignored (not a setting of this job)" in warnings
    bad = [{"id": "a", "type": "huggingface", "split": 3, "huggingface": {"caption_column": [1]}},
           {"id": "b", "type": "s3", "instance_data_dir": str(tmp_path)}]
    with pytest.raises(ConfigError) as e:
        build_settings([{"data_backend_config": json.dumps(bad), "push_to_hub": "false"}])
    assert sorted(e.value.problems) == sorted([
        "DATA_BACKEND_CONFIG[a].dataset_name is required for type huggingface (a Hub dataset repo id)",
        "DATA_BACKEND_CONFIG[a].split=3: expected a non-empty string",
        "DATA_BACKEND_CONFIG[a].huggingface.caption_column=[1]: expected a column name or a list of column names",
        "DATA_BACKEND_CONFIG[b].type='s3': expected local (a folder: images, zips or parquet shards) or huggingface "
        "(a Hub dataset repo)"])


# ------------------------------------------------------------------------------------------------ layouts

def test_the_layout_and_split_come_from_the_file_names():
    names = ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002-8f3a1c.parquet",
             "data/test-00000-of-00001.parquet", "holdout/part0.parquet", ".cache/x.parquet"]
    assert layout.kind(names) == layout.PARQUET
    assert layout.splits(names) == ["test", "train"]  # a shard whose name says no split is train's
    assert [layout.split_of(n) for n in names[1:5]] == ["train", "train", "test", "train"]
    assert layout.shards(names, "train") == ["data/train-00000-of-00002.parquet",
                                             "data/train-00001-of-00002-8f3a1c.parquet", "holdout/part0.parquet"]
    assert layout.pull_patterns(names, "test") == ["data/test-00000-of-00001.parquet"]
    assert layout.split_of("default/validation/0000.parquet") == "validation"
    assert layout.split_of("data/holdout-00000-of-00001.parquet") == "holdout"
    problem = layout.split_problem(names, "validation", "tester/ds")
    assert problem == "DATASET_SPLIT='validation': tester/ds has no parquet shards of that split (splits: test, train)"
    assert layout.kind(["a.zip", "b.png", "__MACOSX/c.zip"]) == layout.ZIP
    assert layout.kind(["a.png", "__MACOSX/._a.zip"]) == layout.FOLDER
    assert layout.pull_patterns(["a.zip", "b.txt"], "train") is None  # everything
    assert layout.pull_patterns(["data/[x]-00000-of-00001.parquet"], "[x]") == ["data/[[]x]-00000-of-00001.parquet"]


def test_disk_needs_count_local_files_and_estimate_remote_ones(tmp_path):
    write_split(tmp_path, "train", [image_rows([png(i) for i in range(5)], ["t"] * 5)])
    write_split(tmp_path, "test", [image_rows([png(9)], ["t"])])
    files = {p.relative_to(tmp_path).as_posix(): p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()}
    assert data.footprint(files, "train", tmp_path) == data.Footprint(5, 0, False)  # the footers' row counts
    remote = data.footprint({"data/train-00000-of-00001.parquet": 1_000_000, "data/test-00000-of-00001.parquet": 10**9},
                            "train")
    assert remote == data.Footprint(-(-1_000_000 // layout.BYTES_PER_IMAGE_GUESS), 0, True)
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        for i in range(3):
            z.writestr(f"{i}.png", png(i))
            z.writestr(f"{i}.txt", "a caption")
        z.writestr("__MACOSX/._0.png", b"junk")
    size = sum(len(png(i)) + len("a caption") for i in range(3))
    assert data.footprint({"set.zip": (tmp_path / "set.zip").stat().st_size}, "train", tmp_path) == \
        data.Footprint(3, size, False)
    assert data.footprint({"set.zip": 2_000_000}, "train") == data.Footprint(10, 2_000_000, True)


# ------------------------------------------------------------------------------------------------ parquet

def test_parquet_rows_become_samples_with_content_keys_and_counted_skips(tmp_path):
    images = [png(i) for i in range(5)] + [b"not an image", png(7), None]
    texts = ["a red square", "a blue square", "a green square", "x", "y", "an undecodable row", None, "no image"]
    write_split(tmp_path, "train", [image_rows(images[:4], texts[:4]), image_rows(images[4:], texts[4:])])
    source = data.open_source(tmp_path, spec(tmp_path))
    assert isinstance(source, data.ParquetShards)
    samples = data.discover(source, FRAMING)
    assert len(samples) == 5  # 8 rows: 1 without bytes, 1 undecodable, 1 without caption
    assert [s.captions for s in samples[:3]] == [("a red square",), ("a blue square",), ("a green square",)]
    for s, b in zip(samples, images[:5]):
        assert source.content_key(s.name) == hashlib.sha256(b).hexdigest()  # as a folder's file of these bytes
        assert np.array_equal(np.asarray(source.open(s.name)), np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(images[0])
    assert data.Folder(tmp_path / "f", "filename").content_key("a.png") == source.content_key(samples[0].name)


def test_parquet_columns_by_setting_or_by_type(tmp_path):
    one = image_rows([png(1), png(2)], ["first", "second"])
    table = pa.table({"id": [1, 2], "picture": pa.array([png(1), png(2)], pa.binary()), "score": [0.5, 0.7],
                      "prompt": ["p one", "p two"], "tags": pa.array([["a", "b"], []], pa.list_(pa.string()))})
    write_split(tmp_path / "plain", "train", [table])
    write_split(tmp_path / "hf", "train", [one])

    def captions(folder, **kw):
        return [i.captions for i in data.open_source(tmp_path / folder, spec(tmp_path / folder, **kw)).items()]

    assert captions("plain") == [("p one",), ("p two",)]  # the binary column, the first of text/caption/prompt
    assert captions("plain", caption_column="tags") == [("a", "b"), ()]
    assert captions("plain", caption_strategy="instanceprompt", instance_prompt="sks") == [("sks",), ("sks",)]
    assert captions("hf", caption_strategy="filename") == [("img0",), ("img1",)]
    for kw, needles in [({"image_column": "photo"}, ["IMAGE_COLUMN='photo'", "no such column", "picture: binary"]),
                        ({"image_column": "score"}, ["IMAGE_COLUMN='score'", "holds double", "not images"]),
                        ({"caption_column": "id"}, ["CAPTION_COLUMN='id'", "holds int64, not text"]),
                        ({"caption_column": "missing"}, ["CAPTION_COLUMN='missing'", "no such column"])]:
        with pytest.raises(DataError) as e:
            captions("plain", **kw)
        assert all(n in str(e.value) for n in needles + ["data/train-00000-of-00001.parquet"]), str(e.value)
    write_split(tmp_path / "nocap", "train", [table.drop_columns(["prompt"])])
    with pytest.raises(DataError, match="no caption column .* name it with CAPTION_COLUMN"):
        captions("nocap")


def test_a_corrupt_shard_is_skipped_and_alone_is_a_data_error(tmp_path):
    names = write_split(tmp_path, "train", [image_rows([png(1), png(2)], ["a", "b"]), image_rows([png(3)], ["c"])])
    (tmp_path / names[1]).write_bytes(b"PAR1 this is not parquet PAR1")
    items = data.open_source(tmp_path, spec(tmp_path)).items()
    assert [i.captions for i in items] == [("a",), ("b",)]
    (tmp_path / names[0]).write_bytes((tmp_path / names[0]).read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match=r"no usable rows in .*2 unreadable shards"):
        data.open_source(tmp_path, spec(tmp_path)).items()


MEASURE = """
import sys, tracemalloc
import pyarrow as pa
from pathlib import Path
from job import data
from job.config import build_settings, datasets
folder = Path(sys.argv[1])
spec = datasets(build_settings([{"dataset_id": str(folder), "push_to_hub": "false"}]))[0][0]
tracemalloc.start()
source = data.open_source(folder, spec)
samples = data.discover(source, data.Framing(64, "pixel", True, "center", "square", 4, 64))
for s in sorted(samples, key=lambda s: s.name)[::-1]:  # every row once, the row groups in reverse
    source.open(s.name)
print(len(samples), pa.default_memory_pool().max_memory(), tracemalloc.get_traced_memory()[1])
"""


@pytest.mark.slow
def test_reading_parquet_holds_one_row_group_at_a_time(tmp_path):
    """Row groups of 4 incompressible 192 KiB images (0.75 MiB): listing every row of a 10-group and of a 30-group
    dataset and decoding each row (the groups in reverse) peaks at the same few row groups in arrow's memory pool
    and in Python's allocations, whatever the dataset's size (23 MiB for the larger)."""
    peaks = {}
    for groups in (10, 30):
        folder = tmp_path / str(groups)
        tables = [image_rows([png(1000 * s + i, (256, 256), noise=True) for i in range(40)], ["noise"] * 40)
                  for s in range(groups // 10)]
        names = write_split(folder, "train", tables, row_group_size=4)
        size = sum((folder / n).stat().st_size for n in names)
        r = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        rows, arrow_peak, python_peak = map(int, r.stdout.split()[-3:])
        assert rows == 4 * groups
        peaks[groups] = (size / groups, arrow_peak, python_peak)
    group, arrow10, python10 = peaks[10]
    _, arrow30, python30 = peaks[30]
    assert group > 0.7 * 2**20
    assert arrow30 < 1.2 * arrow10 and python30 < 1.2 * python10, peaks  # no growth with the dataset
    assert max(arrow30, python30) < 6 * group, peaks  # a few row groups' worth, of the 30 there are


# ------------------------------------------------------------------------------------------------ zip archives

def hostile_zip(path: Path) -> dict[str, bytes]:
    """A zip of images and captions with everything a hostile or careless archive holds; returns what should come
    out of it (paths relative to the extraction folder)."""
    good = {"set/a.png": png(1), "set/a.txt": b"a red square", "set/b.png": png(2), "set/b.txt": b"a blue square",
            "set/metadata.jsonl": b'{"file_name": "a.png", "text": "meta"}\n'}
    with zipfile.ZipFile(path, "w") as z:
        for name, b in good.items():
            z.writestr(name, b)
        z.writestr("__MACOSX/set/._a.png", b"resource fork")
        z.writestr("set/._b.png", b"resource fork")
        z.writestr("set/.DS_Store", b"finder")
        z.writestr("../evil.png", png(3))
        z.writestr("set/../../evil2.png", png(3))
        z.writestr("/abs.png", png(3))
        z.writestr("C:\\windows\\evil.png", png(3))
        link = zipfile.ZipInfo("set/link.png")
        link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/etc/passwd")
        z.writestr("set/readme.docx", b"other")
        z.writestr("set/dir/", b"")
    return good


def test_zip_extraction_keeps_images_and_captions_inside_the_target(tmp_path, caplog):
    caplog.set_level("INFO", logger="job")
    good = hostile_zip(tmp_path / "data.zip")
    cache = tmp_path / "cache" / "archives"
    target = archive.extract(tmp_path / "data.zip", cache)
    assert target.parent == cache
    found = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert found == good
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "cache" / "evil.png").exists()
    assert not any(p.is_symlink() for p in target.rglob("*"))
    assert ("5 files extracted into" in caplog.text and "3 skipped (macOS metadata)" in caplog.text
            and "4 skipped (unsafe paths)" in caplog.text and "1 skipped (links or special files)" in caplog.text
            and "1 skipped (other files)" in caplog.text)
    mtime = target.stat().st_mtime_ns
    caplog.clear()
    assert archive.extract(tmp_path / "data.zip", cache) == target and target.stat().st_mtime_ns == mtime
    assert "extracted before" in caplog.text
    assert [p.name for p in cache.iterdir()] == [target.name]  # no partial folder left


def test_zip_caps_refuse_before_writing_and_keep_what_was_extracted(tmp_path):
    with zipfile.ZipFile(tmp_path / "small.zip", "w") as z:
        z.writestr("a.png", png(1))
    cache = tmp_path / "cache"
    kept = archive.extract(tmp_path / "small.zip", cache)
    with zipfile.ZipFile(tmp_path / "many.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i in range(3):
            z.writestr(f"{i}.png", png(i))
        z.writestr("zeros.png", b"\0" * 3_000_000)  # deflates to a few KB
    with pytest.raises(DataError, match=r"many.zip: 4 files to extract, over the limit of 3"):
        archive.extract(tmp_path / "many.zip", cache, max_files=3)
    with pytest.raises(DataError, match=r"many.zip: 0.00 GiB to extract, over the limit of 0.00 GiB"):
        archive.extract(tmp_path / "many.zip", cache, max_bytes=2_000_000)
    assert [p.name for p in cache.iterdir()] == [kept.name] and (kept / "a.png").read_bytes() == png(1)


def test_damaged_entries_and_archives_are_counted_skips(tmp_path):
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("a.png", png(1))
        z.writestr("a.txt", "first")
        z.writestr("b.png", png(2))
        z.writestr("b.txt", "second")
    blob = bytearray(raw.getvalue())
    start = blob.index(png(2))
    blob[start + 40:start + 50] = b"\xff" * 10  # b.png's bytes no longer match its CRC
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "one.zip").write_bytes(bytes(blob))
    (folder / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    source = data.open_source(folder, spec(folder), tmp_path / "cache")
    assert isinstance(source, data.Archives)
    assert [(i.name, i.captions) for i in source.items()] == [("one.zip/a.png", ("first",))]
    assert np.array_equal(np.asarray(source.open("one.zip/a.png")), np.asarray(Image.open(io.BytesIO(png(1)))))
    (folder / "one.zip").unlink()
    with pytest.raises(DataError, match=r"no readable zip archive in .*broken.zip"):
        data.open_source(folder, spec(folder), tmp_path / "cache").items()


# ------------------------------------------------------------------------------------------------ TOKENIZER_MAX_LENGTH

def test_tokenizer_max_length_defaults_per_flavour_and_is_checked_against_the_model(tiny_model):
    def s(**kw):
        return build_settings([{"dataset_id": "x", "push_to_hub": "false", **kw}])

    assert [tokenizer_max_length(s(model_flavour=f)) for f in ("v0.1", "v0.2", "v0.3", "pony")] == [256, 256, 256, 768]
    assert tokenizer_max_length(s(model_flavour="pony", tokenizer_max_length="512")) == 512
    with pytest.raises(ConfigError) as e:
        s(tokenizer_max_length="-3")
    assert e.value.problems == ["TOKENIZER_MAX_LENGTH='-3': out of range; expected an integer >= 0"]
    assert model.text_limit(tiny_model) == (256, "tokenizer/tokenizer_config.json model_max_length")
    assert model.text_length_problems(s(tokenizer_max_length="256"), tiny_model) == []
    assert model.text_length_problems(s(tokenizer_max_length="300"), tiny_model) == [
        "TOKENIZER_MAX_LENGTH=300: this model's text encoder takes at most 256 tokens (tokenizer/tokenizer_config.json "
        "model_max_length); set TOKENIZER_MAX_LENGTH=256 or lower"]
    assert "MODEL_FLAVOUR=pony's default 768" in model.text_length_problems(s(model_flavour="pony"), tiny_model)[0]
    text = card.render(s(tokenizer_max_length="77"), repo="me/x", model_commit=None, datasets=[], samples=[],
                       steps_done=1)
    assert "    max_sequence_length=77,\n" in text


def test_the_text_cache_is_keyed_by_length_and_truncation_is_counted(tiny_model, tmp_path, caplog):
    caplog.set_level("INFO", logger="job")
    captions = ["a red circle", "a big red circle on a blue background", ""]  # 4, 9 and 1 tokens with </s>
    cache, keys = data.encode_captions(tiny_model, captions, tmp_path, torch.device("cpu"), max_length=8)
    assert "1 of 3 distinct captions and prompts are longer than TOKENIZER_MAX_LENGTH=8 tokens" in caplog.text
    assert "(the longest has 9)" in caplog.text
    assert [tuple(cache.get(keys[c]).shape) for c in captions] == [(8, 32)] * 3
    long8 = cache.get(keys[captions[1]])
    cache16, keys16 = data.encode_captions(tiny_model, captions, tmp_path, torch.device("cpu"), max_length=16)
    assert set(keys16.values()).isdisjoint(keys.values())  # another length, other entries
    assert len(list(tmp_path.rglob("*.safetensors"))) == 6
    full = cache16.get(keys16[captions[1]])
    assert full.shape == (16, 32) and full[9:].abs().sum() == 0 and full[8].abs().sum() > 0  # 9 tokens, then padding
    assert not torch.allclose(full[:8], long8)  # truncation drops </s> and changes what the encoder sees


# ------------------------------------------------------------------------------------------------ the real CLI

PARQUET, ZIPPED = "tester/parquet-shapes", "tester/zipped-shapes"


@pytest.fixture(scope="module")
def hub(tiny_model, tmp_path_factory):
    server = start_hub(lfs_threshold=8 * 1024)
    server.add_repo("tester/tiny-auraflow", {str(p.relative_to(tiny_model)): p.read_bytes()
                                             for p in tiny_model.rglob("*") if p.is_file()})
    rows = toy(tmp_path_factory)
    folder = tmp_path_factory.mktemp("pq")
    write_split(folder, "train", [image_rows([b for b, _ in rows[:3]] + [b"\x89PNG broken"], [t for _, t in rows[:4]]),
                                  image_rows([b for b, _ in rows[3:6]], [t for _, t in rows[3:5]] + [None])])
    write_split(folder, "test", [image_rows([b for b, _ in rows[6:]], [t for _, t in rows[6:]])])
    server.parquet_files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.parquet")}
    server.add_repo(PARQUET, {**server.parquet_files, "README.md": b"---\nlicense: mit\n---\n"}, repo_type="dataset")
    server.train_rows = rows[:6]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, (b, t) in enumerate(rows[:5]):
            z.writestr(f"shapes/{i:02d}.png", b)
            z.writestr(f"shapes/{i:02d}.txt", t)
            z.writestr(f"__MACOSX/shapes/._{i:02d}.png", b"fork")
    server.add_repo(ZIPPED, {"shapes.zip": buf.getvalue(), "README.md": b"zip"}, repo_type="dataset")
    yield server
    server.stop()


def train(hub, tmp_path, *args, **settings):
    base = dict(**TINY, model_id="tester/tiny-auraflow", lycoris_config=ALL_LINEAR, max_train_steps=2,
                output_dir=tmp_path / "out", hf_token=WRITE_TOKEN, hf_endpoint=hub.url, hf_home=tmp_path / "hf",
                hf_hub_offline="0", hf_hub_disable_xet="1", hub_retries=2, validation_step_interval=0)
    return run_cli(*(args or ("train",)), **{**base, **settings})


def latents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.rglob("*.safetensors")}


@pytest.mark.slow
def test_parquet_shards_from_the_hub_train_pulling_only_their_split(hub, tmp_path):
    hub.clear_log()
    r = train(hub, tmp_path, dataset_id=PARQUET, tokenizer_max_length=6)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5 images usable, 1 skipped (unreadable), 1 skipped (no caption)" in r.stderr  # of 7 rows
    fetched = {h.path.split("/resolve/", 1)[1].split("/", 1)[1] for h in hub.requests("GET", "/resolve/")
               if h.path.startswith(f"/datasets/{PARQUET}/")}
    assert fetched == {"data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"}
    out = tmp_path / "out"
    assert len(latents(out / "cache" / "vae")) == 5
    # 7 distinct texts: the 5 captions (7 words + </s>), the empty prompt (1) and the negative prompt (13 tokens)
    assert ("6 of 7 distinct captions and prompts are longer than TOKENIZER_MAX_LENGTH=6 tokens and were truncated "
            "(the longest has 13)") in r.stderr
    embeds = [load_file(p) for p in (out / "cache" / "text").rglob("*.safetensors")]
    assert len(embeds) == 7 and {tuple(t.shape) for e in embeds for t in e.values()} == {(6, 32)}
    assert "max_sequence_length=6," in (out / "README.md").read_text()
    resolved = json.loads((out / "training_config.json").read_text())
    assert resolved["dataset_commits"][PARQUET] and resolved["resolved_tokenizer_max_length"] == 6


@pytest.mark.slow
def test_a_zip_dataset_from_the_hub_is_extracted_and_trains(hub, tmp_path):
    r = train(hub, tmp_path, dataset_id=ZIPPED)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5 images usable" in r.stderr and "5 skipped (macOS metadata)" in r.stderr
    extracted = list((tmp_path / "out" / "cache" / "archives").iterdir())
    assert len(extracted) == 1 and sorted(p.name for p in (extracted[0] / "shapes").iterdir()) == sorted(
        f"{i:02d}.{ext}" for i in range(5) for ext in ("png", "txt"))
    assert "archive shapes.zip: 10 files extracted into" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("repo,settings,needle", [
    (PARQUET, {"image_column": "picture"}, "IMAGE_COLUMN='picture': no such column in data/train-00000-of-00002"),
    (PARQUET, {"caption_column": "image"}, "CAPTION_COLUMN='image' in data/train-00000-of-00002.parquet holds struct"),
    ("tester/broken-shards", {}, "no usable rows in"),
    ("tester/undecodable", {}, "no usable images in"),
    ("tester/broken-zip", {}, "no readable zip archive in"),
])
def test_bad_datasets_exit_4_before_the_model_is_downloaded(hub, tmp_path, repo, settings, needle):
    hub.add_repo("tester/broken-shards", {"data/train-00000-of-00001.parquet": b"PAR1 garbage PAR1"}, repo_type="dataset")
    hub.add_repo("tester/undecodable", {"data/train-00000-of-00001.parquet": table_bytes(
        image_rows([b"\x89PNG\r\n\x1a\n truncated", b"GIF89a"], ["a", "b"]))}, repo_type="dataset")
    hub.add_repo("tester/broken-zip", {"images.zip": b"PK\x03\x04" + b"\0" * 64}, repo_type="dataset")
    hub.clear_log()
    r = train(hub, tmp_path, dataset_id=repo, **settings)
    assert r.returncode == 4, r.stderr[-3000:]
    assert needle in r.stderr
    assert not hub.requests("GET", ".safetensors")  # the data was refused before any weights moved


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@pytest.mark.slow
def test_check_refuses_a_split_the_dataset_lacks_and_a_text_length_the_model_lacks(hub, tmp_path):
    r = train(hub, tmp_path, "check", dataset_id=PARQUET, dataset_split="validation", tokenizer_max_length=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"DATASET_SPLIT='validation': {PARQUET} has no parquet shards of that split (splits: test, train)"
            in r.stderr)
    assert "TOKENIZER_MAX_LENGTH=300: this model's text encoder takes at most 256 tokens" in r.stderr


@pytest.mark.slow
def test_a_huggingface_entry_shares_its_cache_and_a_later_corrupt_shard_loses_nothing(hub, tmp_path):
    """SimpleTuner's `type: huggingface` entry (its keys in the entry and in its `huggingface` block) with its own
    latent cache; a new commit breaks one shard: the run skips it, counts it, and every cached latent stays."""
    cache = tmp_path / "vae"
    entry = {"id": "hf", "type": "huggingface", "dataset_name": "tester/hf-entry", "split": "train",
             "caption_strategy": "huggingface", "metadata_backend": "huggingface", "cache_dir_vae": str(cache),
             "huggingface": {"caption_column": "text", "image_column": "image", "fallback_caption_column": "x"}}
    hub.add_repo("tester/hf-entry", dict(hub.parquet_files), repo_type="dataset")
    r = train(hub, tmp_path / "a", data_backend_config=json.dumps([entry]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "huggingface.fallback_caption_column ignored" in r.stderr and "5 images usable" in r.stderr
    before = latents(cache)
    assert len(before) == 5
    files = dict(hub.parquet_files)
    files["data/train-00001-of-00002.parquet"] = b"PAR1 overwritten by a broken upload PAR1"
    hub.add_repo("tester/hf-entry", files, repo_type="dataset")
    r = train(hub, tmp_path / "b", data_backend_config=json.dumps([entry]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data/train-00001-of-00002.parquet is not a readable parquet file" in r.stderr
    assert "3 images usable" in r.stderr and "latents: 3 cached before, 0 encoded now" in r.stderr
    assert latents(cache) == before
