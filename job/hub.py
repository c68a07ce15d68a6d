"""Every Hugging Face Hub call: preflight, pulls, the final push, checkpoint uploads, retries.

No torch here. A reference that is an existing local folder is used as it is; anything else is a
Hub repo id, downloaded (safetensors only, never pickles or remote code) into HF_HOME's cache.
huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET itself; the CLI
exports them before this module is imported.

huggingface_hub 2.4 retries some calls itself (file transfers, preupload, LFS) but not repo_info,
whoami, create_repo or the commit POST; `retry` covers those against transient failures.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from job.errors import HubAccessError, PushError, disk_full
from job.outputs import comfyui_file

log = logging.getLogger("job")
T = TypeVar("T")

MODEL_FILES = [
    "model_index.json", "scheduler/*.json", "tokenizer/*",
    "text_encoder/*.json", "text_encoder/*.safetensors",
    "transformer/*.json", "transformer/*.safetensors",
    "vae/*.json", "vae/*.safetensors",
]
NEVER = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.py", "*.fp16.safetensors"]
CONFIG_FILES = ["model_index.json", "transformer/config.json", "vae/config.json", "tokenizer/tokenizer_config.json",
                "text_encoder/config.json"]
PUSHED = ["pytorch_lora_weights.safetensors", "lycoris_config.json", "training_config.json", "README.md",
          "loss.png", "samples/*.png", "samples/step-*/*.png"]
RETRY_BASE_S = 1.0


@dataclass(frozen=True)
class Pulled:
    path: Path
    commit: str | None  # None for a local folder


def local_folder(ref: str) -> Path | None:
    p = Path(ref).expanduser()
    return p.resolve() if p.is_dir() else None


def _transient(e: Exception) -> bool:
    """Connection trouble, 408/429 and 5xx: worth another try. Anything else is an answer."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return False
    if isinstance(e, HfHubHTTPError):
        status = getattr(e.response, "status_code", None)
        return status is None or status in (408, 429) or status >= 500
    # not OSError at large: a full disk or an unwritable HF_HOME is no network blip and must not read as one
    return isinstance(e, (ConnectionError, TimeoutError)) or "httpx" in type(e).__module__


def retry(what: str, fn: Callable[[], T], attempts: int) -> T:
    for n in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not _transient(e) or n == attempts - 1:
                raise
            wait = RETRY_BASE_S * 2 ** n
            log.warning("%s: %s; retrying in %.0fs (%d/%d)", what, type(e).__name__, wait, n + 1, attempts - 1)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _hub_error(what: str, ref: str, e: Exception) -> HubAccessError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError):
        return HubAccessError(f"{what} {ref} is gated: accept its terms at https://huggingface.co/{ref} "
                              "with the account of HF_TOKEN, then start again")
    if isinstance(e, RepositoryNotFoundError):
        return HubAccessError(f"{what} {ref} not found on the Hub (or HF_TOKEN cannot see it)")
    if isinstance(e, RevisionNotFoundError):
        return HubAccessError(f"{what} {ref}: revision not found")
    if status == 401:
        return HubAccessError(f"{what} {ref}: HF_TOKEN was refused (401): check the token")
    if isinstance(e, LocalEntryNotFoundError) or _transient(e):
        return HubAccessError(f"{what} {ref}: the Hub is unreachable ({type(e).__name__}) and nothing is cached")
    if isinstance(e, HfHubHTTPError):
        return HubAccessError(f"{what} {ref}: Hub error {status}")
    return HubAccessError(f"{what} {ref}: {type(e).__name__}")


# ---------------------------------------------------------------- preflight

def preflight(*, token: str, model: tuple[str, str], datasets: list[tuple[str, str]], output_repo: str | None,
              attempts: int) -> None:
    """Token valid, model and datasets readable, output repo creatable or writable: each failure exits 3
    with a precise message, before any weights move."""
    from huggingface_hub import HfApi

    remote = [ref for ref, _ in [model, *datasets] if not local_folder(ref)]
    if not remote and not output_repo:
        return  # nothing on the Hub to check (a local model and data, no push)
    api = HfApi(token=token or None)
    user = None
    if token:
        try:
            user = retry("whoami", lambda: api.whoami(), attempts)
        except Exception as e:
            raise _hub_error("HF_TOKEN", "check", e) from None
    for kind, (ref, revision) in [("model", model)] + [("dataset", d) for d in datasets]:
        if local_folder(ref):
            continue
        try:
            retry(f"{kind} {ref}", lambda r=ref, v=revision, k=kind: api.repo_info(r, revision=v, repo_type=k),
                  attempts)
        except Exception as e:
            raise _hub_error(kind, ref, e) from None
    if output_repo:
        if user is None:
            raise HubAccessError("HF_TOKEN is required to push")
        role = user.get("auth", {}).get("accessToken", {}).get("role")
        namespaces = {user.get("name")} | {o.get("name") for o in user.get("orgs", [])}
        owner = output_repo.split("/")[0]
        if role == "read":
            raise HubAccessError(f"HUB_MODEL_ID {output_repo}: HF_TOKEN is a read-only token; use a write token")
        if owner not in namespaces:
            raise HubAccessError(f"HUB_MODEL_ID {output_repo}: HF_TOKEN's user {user.get('name')} cannot write to "
                                 f"{owner} (its namespaces: {', '.join(sorted(n for n in namespaces if n))})")


def pending_download(ref: str, revision: str, token: str, repo_type: str, allow: list[str] | None,
                     attempts: int) -> tuple[int, dict[str, int]]:
    """(bytes not yet in the local cache, {file: size} of the repo's files that a pull would fetch), for the disk
    preflight and for choosing what to pull (a parquet dataset's split)."""
    import fnmatch

    from huggingface_hub import HfApi, try_to_load_from_cache

    api = HfApi(token=token or None)
    get = api.model_info if repo_type == "model" else api.dataset_info
    try:
        info = retry(f"{repo_type} {ref}", lambda: get(ref, revision=revision, files_metadata=True), attempts)
    except Exception as e:
        raise _hub_error(repo_type, ref, e) from None
    files = [f for f in info.siblings or []
             if (allow is None or any(fnmatch.fnmatch(f.rfilename, p) for p in allow))
             and not any(fnmatch.fnmatch(f.rfilename, p) for p in NEVER)]
    pending = sum(f.size or 0 for f in files
                  if not isinstance(try_to_load_from_cache(ref, f.rfilename, revision=info.sha, repo_type=repo_type),
                                    str))
    return pending, {f.rfilename: f.size or 0 for f in files}


def cache_folder() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# ---------------------------------------------------------------- pulls

def _snapshot(ref: str, revision: str, token: str, repo_type: str, allow: list[str] | None, what: str,
              attempts: int) -> Pulled:
    from huggingface_hub import constants, snapshot_download

    def download():
        return snapshot_download(ref, revision=revision, repo_type=repo_type, token=token or None,
                                 allow_patterns=allow, ignore_patterns=NEVER)

    try:
        path = retry(f"download {what} {ref}", download, attempts)
    except Exception as e:
        if disk_full(e):  # HF_HOME is full: no Hub error (the central failure report names the folder)
            raise
        if not _transient(e) or constants.HF_HUB_DISABLE_XET:
            raise _hub_error(what, ref, e) from None
        # Xet transfers are known to stall on large repos: one more round over plain HTTP before giving up
        log.warning("download %s %s: still failing (%s); retrying with Xet disabled", what, ref, type(e).__name__)
        constants.HF_HUB_DISABLE_XET = True
        try:
            path = retry(f"download {what} {ref} without Xet", download, attempts)
        except Exception as e2:
            raise _hub_error(what, ref, e2) from None
    return Pulled(Path(path), Path(path).name)  # snapshots/<commit sha>


def model_configs(ref: str, revision: str, token: str, attempts: int = 3) -> Path:
    """A folder holding the model's small config files only (for validation before any weights move)."""
    return local_folder(ref) or _snapshot(ref, revision, token, "model", CONFIG_FILES, "model", attempts).path


def pull_model(ref: str, revision: str, token: str, attempts: int = 3) -> Pulled:
    folder = local_folder(ref)
    return Pulled(folder, None) if folder else _snapshot(ref, revision, token, "model", MODEL_FILES, "model", attempts)


def pull_dataset(ref: str, revision: str, token: str, attempts: int = 3, allow: list[str] | None = None) -> Pulled:
    """`allow`: the files to fetch (a parquet dataset's split), None for all."""
    folder = local_folder(ref)
    return Pulled(folder, None) if folder else _snapshot(ref, revision, token, "dataset", allow, "dataset", attempts)


# ---------------------------------------------------------------- pushes

def pushed(repo: str) -> list[str]:
    """What the push takes from OUTPUT_DIR: the ComfyUI copy by its exact name, so no other file is caught."""
    return [*PUSHED, comfyui_file(repo)]


def push_command(out: Path, repo: str) -> str:
    includes = " ".join(f"--include '{p}'" for p in pushed(repo))
    return f"hf upload {repo} {out} . {includes} --commit-message 'LoKr adapter'"


def push(out: Path, repo: str, *, token: str, private: bool, attempts: int) -> str:
    """create_repo, then one commit with the adapter, configs, card and samples; exit 6 (local output kept)
    when the Hub still refuses after retries. Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        retry("create repo", lambda: api.create_repo(repo, private=private, exist_ok=True), attempts)
        info = retry("upload", lambda: api.upload_folder(repo_id=repo, folder_path=str(out),
                                                         allow_patterns=pushed(repo),
                                                         commit_message="LoKr adapter, samples and model card"),
                     attempts)
    except Exception as e:
        raise PushError(f"push to {repo} failed ({type(e).__name__}); the complete output is kept in {out}. "
                        f"Push it later with: {push_command(out, repo)}") from None
    log.info("pushed to %s", info.commit_url if hasattr(info, "commit_url") else repo)
    return str(getattr(info, "commit_url", repo))


class CheckpointUploader:
    """Uploads checkpoints to `checkpoints/checkpoint-N/` of the output repo in a background thread, so
    training never waits; keeps the Hub's copies to the same limit as the local ones."""

    def __init__(self, repo: str, *, token: str, private: bool, limit: int, attempts: int):
        self.repo, self.token, self.private, self.limit, self.attempts = repo, token, private, limit, attempts
        self._thread: threading.Thread | None = None
        self.failures: list[str] = []

    def submit(self, folder: Path) -> None:
        self.wait()  # one upload at a time, in order
        self._thread = threading.Thread(target=self._upload, args=(folder,), daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread:
            self._thread.join(timeout)

    def _upload(self, folder: Path) -> None:
        from huggingface_hub import CommitOperationDelete, HfApi

        api = HfApi(token=self.token)
        try:
            retry("create repo", lambda: api.create_repo(self.repo, private=self.private, exist_ok=True),
                  self.attempts)
            existing = [s for s in hub_checkpoints(api, self.repo) if f"checkpoint-{s}" != folder.name]
            doomed = existing[:max(0, len(existing) - (self.limit - 1))] if self.limit else []
            retry("checkpoint upload", lambda: api.upload_folder(
                repo_id=self.repo, folder_path=str(folder), path_in_repo=f"checkpoints/{folder.name}",
                commit_message=folder.name), self.attempts)
            if doomed:
                ops = [CommitOperationDelete(path_in_repo=f"checkpoints/checkpoint-{s}/") for s in doomed]
                retry("checkpoint rotation", lambda: api.create_commit(self.repo, ops, commit_message="rotate"),
                      self.attempts)
            log.info("uploaded %s to %s", folder.name, self.repo)
        except Exception as e:  # never stops training; the local checkpoint is intact
            self.failures.append(folder.name)
            log.warning("checkpoint upload of %s failed (%s); it stays local", folder.name, type(e).__name__)


def hub_checkpoints(api, repo: str) -> list[int]:
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        entries = api.list_repo_tree(repo, path_in_repo="checkpoints")
        names = [Path(e.path).name for e in entries]
    except (RepositoryNotFoundError, EntryNotFoundError):
        return []
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("checkpoint-") and n.split("-")[1].isdigit())


def fetch_latest_checkpoint(repo: str, dest: Path, *, token: str, attempts: int) -> Path | None:
    """A fresh pod after preemption: the newest checkpoint on the Hub, downloaded into `dest`."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(token=token)
    tmp = None
    try:
        steps = retry("list checkpoints", lambda: hub_checkpoints(api, repo), attempts)
        if not steps:
            return None
        name = f"checkpoint-{steps[-1]}"
        tmp = dest / f".{name}.download"
        retry("download checkpoint", lambda: snapshot_download(repo, token=token, allow_patterns=[f"checkpoints/{name}/*"],
                                                               local_dir=str(tmp)), attempts)
    except Exception as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # (and checkpoint.complete clears one a kill left)
        if disk_full(e):
            raise
        raise _hub_error("checkpoints of", repo, e) from None
    dest.mkdir(parents=True, exist_ok=True)
    (tmp / "checkpoints" / name).replace(dest / name)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest / name
