"""What kind of dataset a file listing holds, decided from the names alone (a Hub repo before download, or a folder):
parquet shards (the `datasets` library's layout, one split of them chosen), zip archives, or image files.

Pure: no reads beyond what `footprint` needs of local files (parquet footers, zip directories), no torch.
"""
from __future__ import annotations

import glob
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from job.data.images import IMAGE_SUFFIXES

PARQUET, ZIP, FOLDER = "parquet", "zip", "folder"
# the `datasets` library's own shard names (push_to_hub): data/<split>-00000-of-00004[-<hash>].parquet
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?$")
# otherwise a split is named by a file or folder name starting with one of the keywords the library knows
_KEYWORD = re.compile(r"^(?P<split>train|training|validation|valid|val|dev|test|testing|eval|evaluation)(?:[-._\d].*)?$",
                      re.IGNORECASE)
# a remote dataset's image count is unknown before download: one image per this many bytes of shards or archives
# (generous: a 1024 px JPEG is 200-600 KB, so the latent cache estimate errs on the large side)
BYTES_PER_IMAGE_GUESS = 200 * 1024


def _visible(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def kind(names: list[str]) -> str:
    """parquet when any shard is there, else zip when any archive is, else a folder of image files."""
    visible = [n for n in names if _visible(n)]
    if any(n.lower().endswith(".parquet") for n in visible):
        return PARQUET
    if any(n.lower().endswith(".zip") for n in visible):
        return ZIP
    return FOLDER


def split_of(name: str) -> str:
    """The split a parquet shard belongs to; a shard whose name says none belongs to `train` (as in `datasets`)."""
    path = PurePosixPath(name)
    m = _SHARD.match(path.stem)
    if m:
        return m.group("split")
    for part in [path.stem, *reversed(path.parent.parts)]:
        m = _KEYWORD.match(part)
        if m:
            return m.group("split")
    return "train"


def shards(names: list[str], split: str) -> list[str]:
    """The split's parquet shards, sorted."""
    return sorted(n for n in names if n.lower().endswith(".parquet") and _visible(n) and split_of(n) == split)


def splits(names: list[str]) -> list[str]:
    return sorted({split_of(n) for n in names if n.lower().endswith(".parquet") and _visible(n)})


def archives(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.lower().endswith(".zip") and _visible(n))


def split_problem(names: list[str], split: str, where: str) -> str | None:
    """DATASET_SPLIT naming no shard of a parquet dataset: the message, naming the splits there are."""
    if kind(names) == PARQUET and not shards(names, split):
        return (f"DATASET_SPLIT={split!r}: {where} has no parquet shards of that split (splits: "
                f"{', '.join(splits(names))})")
    return None


def pull_patterns(names: list[str], split: str) -> list[str] | None:
    """What to download of a Hub dataset repo: the split's shards alone for parquet, everything otherwise (None)."""
    if kind(names) != PARQUET:
        return None
    return [glob.escape(n) for n in shards(names, split)]


@dataclass(frozen=True)
class Footprint:
    images: int  # to encode
    unpacked: int  # bytes extracted from archives into the cache
    estimated: bool  # from byte sizes (a remote dataset before download), not counted


def footprint(files: dict[str, int], split: str, folder: Path | None = None) -> Footprint:
    """Images and extracted bytes of a dataset, from its listing ({name: size}). For a local `folder` they are
    counted (parquet footers, zip directories); for a Hub repo, parquet and zip counts are estimated from bytes."""
    names = list(files)
    layout = kind(names)
    if layout == FOLDER:
        return Footprint(sum(1 for n in names if PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES and _visible(n)),
                         0, False)
    chosen = shards(names, split) if layout == PARQUET else archives(names)
    size = sum(files[n] for n in chosen)
    if folder is None:
        return Footprint(-(-size // BYTES_PER_IMAGE_GUESS), size if layout == ZIP else 0, True)
    images = unpacked = 0
    for n in chosen:
        try:
            if layout == PARQUET:
                import pyarrow.parquet as pq

                images += pq.ParquetFile(folder / n).metadata.num_rows
            else:
                with zipfile.ZipFile(folder / n) as z:
                    kept = [i for i in z.infolist() if not i.is_dir() and _visible(i.filename)]
                    images += sum(1 for i in kept if PurePosixPath(i.filename).suffix.lower() in IMAGE_SUFFIXES)
                    unpacked += sum(i.file_size for i in kept)
        except Exception:  # a broken file is reported where it is read; here its bytes stand in for it
            images += -(-files[n] // BYTES_PER_IMAGE_GUESS)
            unpacked += files[n] if layout == ZIP else 0
    return Footprint(images, unpacked, False)
