"""A dataset as parquet shards in the `datasets` library's layout (what `push_to_hub` writes): an image column of
`{bytes, path}` structs (or plain binary) and a text column, read with pyarrow one row group at a time.

Memory stays bounded by one row group: listing reads the image and caption columns group by group and keeps, per
row, only its size, content key and captions; `open` reads back the one row group that holds the row (and keeps
that one). Everything in a shard is hostile until checked: its schema, each value's type, each image's bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from job.data.images import UNREADABLE, open_image, oriented_size
from job.data.source import Item
from job.errors import DataError

log = logging.getLogger("job")
CAPTION_DEFAULTS = ("text", "caption", "prompt")


@dataclass(frozen=True)
class _Row:
    shard: int  # index into ParquetShards.shards
    group: int  # row group within the shard
    index: int  # row within the row group
    size: tuple[int, int] | None  # None: the bytes are not a readable image
    key: str


def _is_binary(t) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_text(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_texts(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_text(t.value_type)


def _image_typed(schema) -> list[str]:
    """Columns the `datasets` features metadata declares as images (the metadata is the shard's, so untrusted)."""
    try:
        meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        features = meta.get("info", {}).get("features", {})
        return [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
    except (ValueError, AttributeError):
        return []


def _image_struct(t) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


@dataclass(eq=False)  # compared and hashed by identity, as samples hold it
class ParquetShards:
    root: Path
    shards: list[str]  # relative to root, the chosen split's
    caption_strategy: str  # instanceprompt | filename | anything else: the caption column
    instance_prompt: str = ""
    image_column: str = ""
    caption_column: tuple[str, ...] = ()
    where: str = field(init=False)
    _rows: dict[str, _Row] = field(init=False, default_factory=dict)
    _group: tuple[int, int] | None = field(init=False, default=None)
    _images: list = field(init=False, default_factory=list)

    def __post_init__(self):
        self.where = str(self.root)

    # ---------------------------------------------------------------- columns

    def _columns(self, schema, shard: str) -> tuple[str, tuple[str, ...]]:
        """(image column, caption columns) of a shard, from the settings or the defaults; DataError naming the
        setting, the shard and what is there when they do not fit."""
        names = list(schema.names)
        there = f"(columns: {', '.join(f'{n}: {schema.field(n).type}' for n in names)})"
        if self.image_column:
            image = self.image_column
            if image not in names:
                raise DataError(f"IMAGE_COLUMN={image!r}: no such column in {shard} {there}")
        else:
            typed = [n for n in _image_typed(schema) if n in names]
            structs = [n for n in names if _image_struct(schema.field(n).type)]
            binary = [n for n in names if _is_binary(schema.field(n).type)]
            found = typed or structs or binary
            if not found:
                raise DataError(f"no image column in {shard} {there}; name it with IMAGE_COLUMN")
            image = found[0]
        t = schema.field(image).type
        if not (_image_struct(t) or _is_binary(t)):
            raise DataError(f"IMAGE_COLUMN={image!r} in {shard} holds {t}, not images (a {{bytes, path}} struct "
                            "or binary)")
        if self.caption_strategy in ("instanceprompt", "filename"):
            return image, ()
        if self.caption_column:
            captions = self.caption_column
            for c in captions:
                if c not in names:
                    raise DataError(f"CAPTION_COLUMN={c!r}: no such column in {shard} {there}")
        else:
            captions = next(((c,) for c in CAPTION_DEFAULTS if c in names), ())
            if not captions:
                raise DataError(f"no caption column in {shard} (none of {', '.join(CAPTION_DEFAULTS)}) {there}; name "
                                "it with CAPTION_COLUMN, or set CAPTION_STRATEGY=instanceprompt")
        for c in captions:
            ct = schema.field(c).type
            if not (_is_text(ct) or _is_texts(ct)):
                raise DataError(f"CAPTION_COLUMN={c!r} in {shard} holds {ct}, not text")
        return image, captions

    # ---------------------------------------------------------------- the Source methods

    def items(self) -> list[Item]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        items, skipped = [], Counter()
        self._rows.clear()
        for s, shard in enumerate(self.shards):
            try:
                pf = pq.ParquetFile(self.root / shard)
                schema = pf.schema_arrow
            except (pa.ArrowException, OSError) as e:
                log.warning("dataset %s: %s is not a readable parquet file (%s); skipped", self.where, shard,
                            type(e).__name__)
                skipped["unreadable shards"] += 1
                continue
            image, captions = self._columns(schema, shard)
            for g in range(pf.num_row_groups):
                try:
                    table = pf.read_row_group(g, columns=[image, *captions])
                except (pa.ArrowException, OSError) as e:
                    n = pf.metadata.row_group(g).num_rows
                    log.warning("dataset %s: row group %d of %s cannot be read (%s); its %d rows skipped", self.where,
                                g, shard, type(e).__name__, n)
                    skipped["rows in unreadable row groups"] += n
                    continue
                images = table.column(image).to_pylist()
                texts = [table.column(c).to_pylist() for c in captions]
                del table
                for i, value in enumerate(images):
                    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
                    if not isinstance(data, bytes) or not data:
                        skipped["rows without image bytes"] += 1
                        continue
                    name = f"{shard}#{g}:{i}"
                    try:
                        size = oriented_size(io.BytesIO(data))
                    except UNREADABLE:
                        size = None  # counted as unreadable by discovery
                    self._rows[name] = _Row(s, g, i, size, hashlib.sha256(data).hexdigest())
                    items.append(Item(name, self._captions([col[i] for col in texts], path)))
                del images, texts
        if skipped:
            log.warning("dataset %s: %s", self.where, ", ".join(f"{n} {why}" for why, n in skipped.items()))
        if not items:
            raise DataError(f"no usable rows in {self.where} ({len(self.shards)} shard(s)"
                            + "".join(f"; {n} {why}" for why, n in skipped.items()) + ")")
        return items

    def _captions(self, values: list, path) -> tuple[str, ...]:
        if self.caption_strategy == "instanceprompt":
            return (self.instance_prompt,)
        if self.caption_strategy == "filename":
            stem = PurePosixPath(path).stem.replace("_", " ").strip() if isinstance(path, str) else ""
            return (stem,) if stem else ()
        out = []
        for v in values:
            for text in v if isinstance(v, list) else [v]:
                if isinstance(text, str) and text.strip():
                    out.append(text.strip())
        return tuple(dict.fromkeys(out))

    def size(self, name: str) -> tuple[int, int]:
        row = self._rows[name]
        if row.size is None:
            raise OSError(f"{name}: not a readable image")
        return row.size

    def open(self, name: str) -> Image.Image:
        row = self._rows[name]
        if self._group != (row.shard, row.group):
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._images, self._group = [], None  # the previous row group goes before the next comes
            shard = self.shards[row.shard]
            try:
                pf = pq.ParquetFile(self.root / shard)
                image, _ = self._columns(pf.schema_arrow, shard)
                self._images = pf.read_row_group(row.group, columns=[image]).column(0).to_pylist()
            except pa.ArrowException as e:  # the shard broke since it was listed: its rows are skipped
                raise OSError(f"{shard}: row group {row.group} cannot be read ({type(e).__name__})") from None
            self._group = (row.shard, row.group)
        value = self._images[row.index]
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, bytes) or hashlib.sha256(data).hexdigest() != row.key:
            raise OSError(f"{name}: the shard changed since it was listed")
        return open_image(io.BytesIO(data))

    def content_key(self, name: str) -> str:
        return self._rows[name].key
