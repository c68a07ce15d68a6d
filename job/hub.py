"""Every Hugging Face Hub call: resolving the model and dataset into local folders.

No torch here. A reference that is an existing local folder is used as it is; anything else is a
Hub repo id, downloaded (safetensors only, never pickles or remote code) into HF_HOME's cache.
"""
from __future__ import annotations

import logging
from pathlib import Path

from job.errors import HubAccessError

log = logging.getLogger("job")

MODEL_FILES = [
    "model_index.json", "scheduler/*.json", "tokenizer/*",
    "text_encoder/*.json", "text_encoder/*.safetensors",
    "transformer/*.json", "transformer/*.safetensors",
    "vae/*.json", "vae/*.safetensors",
]
NEVER = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.py", "*.fp16.safetensors"]
CONFIG_FILES = ["model_index.json", "transformer/config.json", "vae/config.json"]


def local_folder(ref: str) -> Path | None:
    p = Path(ref).expanduser()
    return p.resolve() if p.is_dir() else None


def _hub_error(what: str, ref: str, e: Exception) -> HubAccessError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return HubAccessError(f"{what} {ref} is gated: accept its terms at https://huggingface.co/{ref} "
                              "with the account of HF_TOKEN")
    if isinstance(e, RepositoryNotFoundError):
        return HubAccessError(f"{what} {ref} not found on the Hub (or HF_TOKEN cannot see it)")
    if isinstance(e, RevisionNotFoundError):
        return HubAccessError(f"{what} {ref}: revision not found")
    if isinstance(e, LocalEntryNotFoundError):
        return HubAccessError(f"{what} {ref}: the Hub is unreachable and nothing is cached")
    if isinstance(e, HfHubHTTPError):
        return HubAccessError(f"{what} {ref}: Hub error {e.__class__.__name__}")
    return HubAccessError(f"{what} {ref}: {e.__class__.__name__}")


def _snapshot(ref: str, revision: str, token: str, repo_type: str, allow: list[str] | None,
              what: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, revision=revision, repo_type=repo_type, token=token or None,
                                      allow_patterns=allow, ignore_patterns=NEVER))
    except Exception as e:  # every failure of the client becomes exit 3 with a precise message
        raise _hub_error(what, ref, e) from None


def model_configs(ref: str, revision: str, token: str) -> Path:
    """A folder holding the model's small config files only (for validation before any weights move)."""
    return local_folder(ref) or _snapshot(ref, revision, token, "model", CONFIG_FILES, "model")


def pull_model(ref: str, revision: str, token: str) -> Path:
    return local_folder(ref) or _snapshot(ref, revision, token, "model", MODEL_FILES, "model")


def pull_dataset(ref: str, revision: str, token: str) -> Path:
    return local_folder(ref) or _snapshot(ref, revision, token, "dataset", None, "dataset")
