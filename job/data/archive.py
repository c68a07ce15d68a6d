"""A dataset as zip archives of images with their captions (what many LoRA training sets are), each extracted once
into the cache and then read as a folder (`folder.Folder`, with the same caption strategies).

An archive is hostile until checked. Extraction keeps regular files with image, `.txt` or metadata names only; it
never writes outside its target (absolute names, drive letters and `..` are skipped, as are links and other
special entries), skips macOS's `__MACOSX/` and `._*` debris, and refuses an archive whose kept entries exceed
MAX_FILES or MAX_BYTES before writing anything (bytes are counted again while writing). It extracts into a
temporary folder renamed into place when complete, so an interrupted or refused extraction leaves no half folder,
and a finished one is never touched again.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from job.data.folder import Folder
from job.data.images import IMAGE_SUFFIXES
from job.data.source import Item
from job.errors import DataError

log = logging.getLogger("job")
MAX_FILES = 200_000  # kept entries per archive
MAX_BYTES = 64 * 2**30  # extracted bytes per archive
KEPT_NAMES = {"metadata.jsonl", "metadata.csv"}
_RULES = 1  # the extraction rules' version: part of the target's name, so a change extracts afresh
_CHUNK = 1 << 20


def archive_identity(path: Path) -> str:
    """The archive's content hash: the Hub cache names its blobs by their sha256, anything else is hashed."""
    real = path.resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    h = hashlib.sha256()
    with real.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def plan(infos: list[zipfile.ZipInfo]) -> tuple[list[tuple[PurePosixPath, zipfile.ZipInfo]], Counter]:
    """(the entries to extract with their safe relative paths, what was skipped by reason)."""
    kept, skipped, seen = [], Counter(), set()
    for info in infos:
        raw = info.filename.replace("\\", "/")
        if info.is_dir() or raw.endswith("/"):
            continue
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or ".." in parts or not parts:
            skipped["unsafe paths"] += 1
            continue
        kind = stat.S_IFMT(info.external_attr >> 16)  # unix file type, when the archive records one
        if kind and kind != stat.S_IFREG:
            skipped["links or special files"] += 1
            continue
        if parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store":
            skipped["macOS metadata"] += 1
            continue
        suffix = PurePosixPath(parts[-1]).suffix.lower()
        if any(p.startswith(".") for p in parts) or (suffix not in IMAGE_SUFFIXES and suffix != ".txt"
                                                      and parts[-1] not in KEPT_NAMES):
            skipped["other files"] += 1
            continue
        rel = PurePosixPath(*parts)
        if rel in seen:
            skipped["duplicate names"] += 1
            continue
        seen.add(rel)
        kept.append((rel, info))
    return kept, skipped


def extract(archive: Path, cache: Path, *, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES) -> Path:
    """The folder holding `archive`'s images and captions, extracted into `cache` the first time. Raises
    zipfile.BadZipFile (or ValueError, EOFError for some damaged directories) for an archive that cannot be opened,
    DataError for one over the caps."""
    target = cache / f"{archive_identity(archive)[:32]}-r{_RULES}"
    if target.is_dir():
        log.info("archive %s: extracted before, in %s", archive.name, target)
        return target
    with zipfile.ZipFile(archive) as z:
        entries, skipped = plan(z.infolist())
        total = sum(info.file_size for _, info in entries)
        if len(entries) > max_files:
            raise DataError(f"archive {archive}: {len(entries)} files to extract, over the limit of {max_files}")
        if total > max_bytes:
            raise DataError(f"archive {archive}: {total / 2**30:.2f} GiB to extract, over the limit of "
                            f"{max_bytes / 2**30:.2f} GiB")
        _clear_stale(cache, target.name)
        tmp = cache / f".{target.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            written = 0
            for rel, info in entries:
                dest = tmp.joinpath(*rel.parts)
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(dest, "xb") as out:
                        for chunk in iter(lambda src=src: src.read(_CHUNK), b""):
                            written += len(chunk)
                            if written > max_bytes:
                                raise DataError(f"archive {archive}: more than {max_bytes / 2**30:.2f} GiB extracted "
                                                "(its directory understates the sizes)")
                            out.write(chunk)
                except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as e:
                    dest.unlink(missing_ok=True)  # a damaged, encrypted or oddly compressed entry
                    skipped[f"unreadable entries ({type(e).__name__})"] += 1
                except OSError as e:
                    if e.errno not in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL, errno.EEXIST, errno.ENOTDIR):
                        raise  # a full disk or a permission problem is no fault of the archive
                    if dest.is_file():
                        dest.unlink()
                    skipped["unusable names"] += 1
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same archive first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("archive %s: %d files extracted into %s%s", archive.name, len(entries) - sum(
        n for why, n in skipped.items() if why.startswith(("unreadable", "unusable"))), target,
        "".join(f", {n} skipped ({why})" for why, n in skipped.items()))
    return target


def _clear_stale(cache: Path, name: str) -> None:
    """Partial folders of `name` left by a process that is gone (killed mid-extraction)."""
    for p in cache.glob(f".{name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(p, ignore_errors=True)
            except PermissionError:
                pass


def content_root(folder: Path) -> Path:
    """An archive that wraps everything in one top folder (`mydata/...`) is read from inside it."""
    entries = list(folder.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


@dataclass(eq=False)  # compared and hashed by identity, as samples hold it
class Archives:
    """Every zip under `root` (and any image files beside them), each archive's items named `<archive>/<path>`."""

    root: Path
    caption_strategy: str  # as for a folder
    cache: Path  # where archives are extracted
    instance_prompt: str = ""
    where: str = field(init=False)
    _parts: dict[str, tuple[Folder, str]] = field(init=False, default_factory=dict)  # name → (folder, its name there)

    def __post_init__(self):
        self.where = str(self.root)

    def items(self) -> list[Item]:
        if not self.root.is_dir():
            raise DataError(f"dataset folder {self.root} does not exist")
        zips = sorted(p for p in self.root.rglob("*.zip") if p.is_file() and not any(
            part.startswith(".") or part == "__MACOSX" for part in p.relative_to(self.root).parts))
        folders, bad = [], []
        for z in zips:
            rel = z.relative_to(self.root).as_posix()
            try:
                folders.append((rel + "/", content_root(extract(z, self.cache))))
            except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as e:  # a damaged directory
                log.warning("dataset %s: %s is not a readable zip archive (%s: %s); skipped", self.where, rel,
                            type(e).__name__, e)
                bad.append(rel)
        loose = Folder(self.root, self.caption_strategy, self.instance_prompt)
        if any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(self.root).parts) for p in self.root.rglob("*")):
            folders.insert(0, ("", self.root))
        if not folders:
            raise DataError(f"no readable zip archive in {self.where} ({len(zips)} found, unreadable: "
                            f"{', '.join(bad)})")
        self._parts.clear()
        items = []
        for prefix, folder in folders:
            source = loose if not prefix else Folder(folder, self.caption_strategy, self.instance_prompt)
            try:
                found = source.items()
            except DataError as e:
                raise DataError(f"{prefix.rstrip('/') or self.where}: {e}") from None
            for item in found:
                self._parts[prefix + item.name] = (source, item.name)
                items.append(Item(prefix + item.name, item.captions))
        return items

    def size(self, name: str) -> tuple[int, int]:
        folder, inner = self._parts[name]
        return folder.size(inner)

    def open(self, name: str) -> Image.Image:
        folder, inner = self._parts[name]
        return folder.open(inner)

    def content_key(self, name: str) -> str:
        folder, inner = self._parts[name]
        return folder.content_key(inner)
