"""A dataset as a folder of image files (a local path or a downloaded Hub snapshot), captioned by strategy:
a sibling `.txt` (textfile), the file name, the Hub imagefolder's metadata.jsonl/csv, or INSTANCE_PROMPT."""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from job.data.images import IMAGE_SUFFIXES, open_image, oriented_size
from job.data.source import Item
from job.errors import DataError


@dataclass(frozen=True)
class Folder:
    root: Path
    caption_strategy: str  # textfile | filename | metadata | instanceprompt
    instance_prompt: str = ""
    where: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "where", str(self.root))

    def items(self) -> list[Item]:
        if not self.root.is_dir():
            raise DataError(f"dataset folder {self.root} does not exist")
        table = caption_table(self.root) if self.caption_strategy == "metadata" else {}
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        return [Item(p.relative_to(self.root).as_posix(), self.captions(p, table)) for p in paths]

    def captions(self, path: Path, table: dict[str, str]) -> tuple[str, ...]:
        if self.caption_strategy == "instanceprompt":
            return (self.instance_prompt,)
        if self.caption_strategy == "filename":
            return (path.stem.replace("_", " ").strip(),)
        if self.caption_strategy == "metadata":
            text = table.get(path.relative_to(self.root).as_posix())
            return (text,) if text else ()
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            return ()
        lines = [ln.strip() for ln in txt.read_text(encoding="utf-8", errors="replace").splitlines()]
        return tuple(ln for ln in lines if ln)  # several lines: one is chosen per epoch

    def size(self, name: str) -> tuple[int, int]:
        return oriented_size(self.root / name)

    def open(self, name: str) -> Image.Image:
        return open_image(self.root / name)

    def content_key(self, name: str) -> str:
        return hashlib.sha256((self.root / name).read_bytes()).hexdigest()


def caption_table(folder: Path) -> dict[str, str]:
    """Hub imagefolder convention: metadata.jsonl or metadata.csv with file_name and a text column."""
    rows: list[dict] = []
    if (folder / "metadata.jsonl").is_file():
        rows = [json.loads(ln) for ln in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
                if ln.strip()]
    elif (folder / "metadata.csv").is_file():
        with (folder / "metadata.csv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise DataError(f"CAPTION_STRATEGY=metadata: no metadata.jsonl or metadata.csv in {folder}")
    table = {}
    for row in rows:
        text = next((row[k] for k in ("text", "caption", "prompt") if row.get(k)), None)
        if "file_name" in row and text:
            table[Path(row["file_name"]).as_posix()] = str(text)
    return table
