"""Content-keyed tensor caches (VAE latents, text embeddings) with atomic writes.

A key hashes everything the value depends on (the input's bytes, the geometry, the encoder's
identity), so a restarted job reuses entries and a changed image, caption or model never does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from job.errors import DataError, DiskFull, disk_full

log = logging.getLogger("job")

_FULL_HASH_LIMIT = 1 << 30  # bigger weight files: size + first and last 16 MiB (hashing 5 GB per start costs too much)
_EDGE = 16 << 20


def _file_identity(path: Path) -> str:
    real = path.resolve()
    if real.parent.name == "blobs" and len(real.name) == 64:  # Hub cache: the blob's name is its sha256
        return real.name
    size = real.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with real.open("rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def component_identity(model_dir: Path, subfolder: str) -> str:
    """A fingerprint of one model component: its config and its weight files' contents."""
    folder = model_dir / subfolder
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in (".json", ".txt", ".model") or p.suffix == ".safetensors"):
            h.update(p.name.encode())
            h.update(p.read_bytes() if p.suffix != ".safetensors" else _file_identity(p).encode())
    return h.hexdigest()[:16]


def _jsonable(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(type(o).__name__)


class TensorCache:
    """One folder of `<key>.safetensors` files, two-level fanned out."""

    def __init__(self, folder: Path, identity: str):
        self.folder, self.identity = folder, identity
        self.writes = 0  # counted so tests (and the summary) can tell what was recomputed
        # set by whoever fills the cache: key → that entry encoded and put again, for an entry found unreadable
        # when it is read (header intact, so `has` passed at start-up, the rest damaged)
        self.refill: Callable[[str], None] | None = None

    def key(self, *parts) -> str:
        return hashlib.sha256(json.dumps([self.identity, *parts], default=_jsonable).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """Present and whole: a file torn by a crash (before writes were atomic, or a full disk) is recomputed."""
        path = self.path(key)
        try:
            with path.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            return path.stat().st_size == 8 + n + end
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def put(self, key: str, tensor: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file({"t": tensor.detach().contiguous().cpu()}, str(tmp))
            os.replace(tmp, path)  # readers see the old file or the whole new one, never a torn one
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, Exception) and disk_full(e):
                raise DiskFull(f"no space left for a cache entry in {self.folder}", path=path,
                               needed=tensor.numel() * tensor.element_size()) from e
            raise
        self.writes += 1

    def get(self, key: str) -> torch.Tensor:
        """The entry; one that cannot be read is recomputed through `refill` (when set) and read again."""
        try:
            return self._read(key)
        except CacheCorrupt as e:
            if self.refill is None:
                raise
            log.warning("%s (%s); recomputing it", e, type(e.__cause__).__name__)
            self.path(key).unlink(missing_ok=True)  # gone even if the refill fails: the next start encodes it
            self.refill(key)
        try:
            return self._read(key)
        except CacheCorrupt:
            raise DataError(f"cache entry {self.path(key)} cannot be read and could not be recomputed now; it was "
                            "removed, and the same command encodes it again at start-up") from None

    def _read(self, key: str) -> torch.Tensor:
        try:
            return load_file(str(self.path(key)))["t"]
        except (SafetensorError, OSError, KeyError) as e:
            raise CacheCorrupt(self.path(key)) from e


class CacheCorrupt(Exception):
    """An entry that cannot be read (e.g. from a crash before atomic writes, or damaged on disk); recompute it."""

    def __init__(self, path: Path):
        super().__init__(f"cache entry {path} cannot be read")
        self.path = path
