"""Disk preflight: the bytes a run will write to each folder, against the free space there, before any download.

Estimates err on the generous side; the point is to refuse a run that cannot fit, in seconds rather than
after an hour of downloading.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("job")
MARGIN = 1.1
GB = 1024 ** 3


@dataclass(frozen=True)
class Need:
    folder: Path
    what: str
    bytes: int


def latent_bytes(resolution: int, images: int, channels: int = 4, vae_factor: int = 8) -> int:
    side = max(1, resolution // vae_factor)
    return images * channels * side * side * 4 + images * 256  # fp32 + file header


def text_bytes(captions: int, seq_len: int = 256, dim: int = 2048) -> int:
    return captions * seq_len * dim * 4


def checkpoint_bytes(adapter_params: int, keep: int) -> int:
    # adapter + two optimizer moments (+ EMA) in fp32, per kept checkpoint, plus one being written
    return ((keep or 1) + 1) * adapter_params * 4 * 4


@dataclass(frozen=True)
class DatasetPlan:
    """What one dataset will put on disk: still to download (bytes), and images to encode at a resolution."""

    source: str
    download: int | None  # bytes still to fetch from the Hub; None for a local folder
    images: int
    resolution: int
    latent_cache: Path
    unpacked: int = 0  # bytes its zip archives extract to (OUTPUT_DIR/cache/archives)


def run_needs(*, hf_home: Path, out: Path, model_download: int | None, datasets: list[DatasetPlan], offload_folder: Path | None,
              offload_bytes: int, adapter_params: int, keep_checkpoints: int, text_tokens: int = 256) -> list[Need]:
    """What a run writes where: model and dataset downloads, extracted archives, caches, offloaded weights,
    checkpoints. `text_tokens`: TOKENIZER_MAX_LENGTH, the length of every cached text embedding."""
    needs = [Need(hf_home, "model download", model_download)] if model_download is not None else []
    for d in datasets:
        if d.download is not None:
            needs.append(Need(hf_home, f"dataset {d.source}", d.download))
        if d.unpacked:
            needs.append(Need(out / "cache" / "archives", f"archives of {d.source} extracted", d.unpacked))
        needs.append(Need(d.latent_cache, "latent cache", latent_bytes(d.resolution, d.images)))
        needs.append(Need(out / "cache" / "text", "text-embedding cache", text_bytes(d.images + 32, text_tokens)))
    if offload_folder:
        needs.append(Need(offload_folder, "group offload files", offload_bytes))
    needs.append(Need(out, "checkpoints", checkpoint_bytes(adapter_params, keep_checkpoints)))
    return needs


def existing_parent(folder: Path) -> Path:
    folder = folder.expanduser().resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def problems(needs: list[Need]) -> list[str]:
    """One line per filesystem that lacks room, naming the folders, the need and the free space."""
    by_device: dict[int, list[Need]] = {}
    for n in needs:
        by_device.setdefault(existing_parent(n.folder).stat().st_dev, []).append(n)
    out = []
    for group in by_device.values():
        need = int(sum(n.bytes for n in group) * MARGIN)
        free = shutil.disk_usage(existing_parent(group[0].folder)).free
        log.debug("disk: %s need %.2f GB, %.2f GB free", [str(n.folder) for n in group], need / GB, free / GB)
        if need > free:
            parts = ", ".join(f"{n.what} in {n.folder} {n.bytes / GB:.2f} GB" for n in group)
            out.append(f"not enough disk space: {parts}: {need / GB:.2f} GB needed with a 10% margin, "
                       f"{free / GB:.2f} GB free")
    return out


def placement_warnings(needs: list[Need], volume: Path | None) -> list[str]:
    """Folders outside the mounted volume: container disks on RunPod and Vast.ai are small and vanish on restart."""
    if volume is None:
        return []
    vol = volume.resolve()
    return [f"{n.what} ({n.bytes / GB:.2f} GB) goes to {n.folder}, outside the volume {vol}: it is lost when the "
            f"pod restarts; point it under {vol}" for n in needs
            if n.bytes and vol not in n.folder.expanduser().resolve().parents and n.folder.resolve() != vol]
