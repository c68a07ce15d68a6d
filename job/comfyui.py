"""The adapter's ComfyUI copy: the same tensors and metadata as the LyCORIS file, keys renamed to
`transformer.<diffusers module path>.<suffix>`, the form ComfyUI matches for AuraFlow (it has no `lycoris_` keys
for this model family, so it would skip every key of the LyCORIS file and render the base model)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

LYCORIS_PREFIX = "lycoris_"  # LycorisNetwork.LORA_PREFIX: module path with "." → "_"
COMFYUI_PREFIX = "transformer."


def module_paths(transformer: torch.nn.Module) -> dict[str, str]:
    """LyCORIS's flattened module name → the dotted path, from the model's own module list: the flat name alone
    cannot say whether `to_out_0` was `to_out.0` or `to_out_0`. A flat name two paths share maps to None."""
    paths: dict[str, str | None] = {}
    for path, _ in transformer.named_modules():
        if path:
            flat = LYCORIS_PREFIX + path.replace(".", "_")
            paths[flat] = None if flat in paths else path
    return paths


def renamed(tensors: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LyCORIS state dict with each `lycoris_<flat>.<suffix>` key as `transformer.<path>.<suffix>`."""
    paths = module_paths(transformer)
    out = {}
    for key, tensor in tensors.items():
        flat, _, suffix = key.partition(".")  # the flat name holds no ".": the first one starts the suffix
        path = paths.get(flat)
        if path is None:
            raise ValueError(f"adapter key {key!r}: {'two modules share' if flat in paths else 'no module has'} "
                             "that name in this transformer")
        out[f"{COMFYUI_PREFIX}{path}.{suffix}"] = tensor
    return out


def export(adapter: Path, dest: Path, transformer: torch.nn.Module) -> None:
    """Write the ComfyUI copy of the LyCORIS file `adapter` to `dest`, via a temporary name (never a torn file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(adapter), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    try:
        save_file(renamed(tensors, transformer), str(tmp), metadata=metadata)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no torn temporary file behind
        raise


def write(adapter: Path, dest: Path, transformer: torch.nn.Module, *, enabled: bool) -> None:
    """EXPORT_COMFYUI: the copy beside the adapter, or none. Off, a copy an earlier try of this run left is removed:
    the push would take it beside a card that does not mention it."""
    if enabled:
        export(adapter, dest, transformer)
    else:
        dest.unlink(missing_ok=True)
