"""Logging set-up with secret redaction, progress lines for pod logs, and the metrics sink."""
from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("job")

# Hugging Face user tokens: redacted even when nobody registered them (a pasted token in a prompt).
_TOKEN_SHAPED = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_secrets: set[str] = set()
MASK = "***"


def _maskable(value: str | None) -> bool:
    return bool(value) and len(value) >= 4  # shorter values would mask common words


def register_secret(value: str | None) -> None:
    if _maskable(value):
        _secrets.add(value)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every registered secret, every one of `secrets` and anything token-shaped masked. A token pasted
    into the wrong setting (a prompt, say) must not be echoed anywhere: logs, problem lines, status.json,
    training_config.json, tracker configs, the model card, webhooks."""
    for secret in sorted(_secrets.union(filter(_maskable, secrets)), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _TOKEN_SHAPED.sub(MASK, text)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup(verbose: bool = False, rank: int = 0) -> None:
    """One handler on stderr for the job's own logger; libraries stay at WARNING. With several processes, rank 0
    speaks for the job; the others say only warnings and errors, each line marked with the rank."""
    handler = logging.StreamHandler(sys.stderr)
    mark = f"[rank {rank}] " if rank else ""
    handler.setFormatter(_RedactingFormatter(f"%(asctime)s %(levelname)-7s {mark}%(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)


def quiet_libraries() -> None:
    """Called once the heavy libraries are needed anyway (importing them costs seconds). Library chatter (per-module LyCORIS lines, loading bars) would bury the job's own progress lines."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels-community" notice at import on CPU
    for name in ("diffusers", "transformers"):
        try:
            lib = __import__(name)
            lib.utils.logging.disable_progress_bar()
            lib.utils.logging.set_verbosity_error()
        except (ImportError, AttributeError):
            pass


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class StatusFile:
    """OUTPUT_DIR/status.json for health checks, scripts and people with a shell: phase, step, total, last loss,
    throughput, ETA, last checkpoint, last error. Rewritten atomically, at most every `interval` seconds unless
    forced, so a reader never sees half a file."""

    def __init__(self, path: Path | None, interval: float = 2.0):
        self.path, self.interval, self.last = path, interval, -math.inf
        self.state: dict = {"phase": "starting", "step": 0, "total_steps": None, "loss": None, "it_per_s": None,
                            "eta_s": None, "last_checkpoint": None, "last_error": None}

    def update(self, force: bool = False, **fields) -> None:
        self.state.update(fields)
        if "phase" in fields:  # when each phase began (unix time): where start-up goes, for people and benches
            self.state.setdefault("phase_started", {})[fields["phase"]] = round(time.time(), 3)
        now = time.monotonic()
        if self.path is None or not (force or "phase" in fields or now - self.last >= self.interval):
            return
        self.last = now
        self.state["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(redact(json.dumps(self.state, indent=1)), encoding="utf-8")
            tmp.replace(self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class Progress:
    """A tqdm bar on a terminal; otherwise one concise line every `interval` seconds (and at the first and last
    step), so pod logs get no '\\r' spam."""

    def __init__(self, total: int, start_step: int = 0, interval: float = 10.0, status: StatusFile | None = None):
        self.total, self.start_step, self.interval = total, start_step, interval
        self.status = status or StatusFile(None)
        self.bar = None
        if sys.stderr.isatty() and log.isEnabledFor(logging.INFO):  # not for a quiet rank
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)
        self.t0 = time.monotonic()
        self.last_print = -math.inf

    def rate(self, step: int) -> float:
        done = step - self.start_step
        elapsed = time.monotonic() - self.t0
        return done / elapsed if elapsed > 0 and done > 0 else 0.0

    def eta(self, step: int) -> float:
        r = self.rate(step)
        return (self.total - step) / r if r > 0 else math.inf

    def update(self, step: int, loss: float, lr: float) -> None:
        now = time.monotonic()
        eta = self.eta(step)
        self.status.update(step=step, total_steps=self.total, loss=loss, it_per_s=round(self.rate(step), 4),
                           eta_s=round(eta, 1) if math.isfinite(eta) else None)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
            if step >= self.total:
                self.bar.close()
            return
        if step in (self.start_step + 1, self.total) or now - self.last_print >= self.interval:
            self.last_print = now
            log.info("step %d/%d loss %.4f lr %.3g %.2f it/s eta %s", step, self.total, loss, lr,
                     self.rate(step), fmt_duration(self.eta(step)))


class Tracker:
    """REPORT_TO=none: the null tracker."""

    def log(self, step: int, values: dict) -> None:
        pass

    def images(self, step: int, files: list[Path]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, folder: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter  # only runs that report pay for the import

        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("training_config", "```\n" + json.dumps(config, indent=1) + "\n```")

    def log(self, step: int, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def images(self, step: int, files: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for f in files:
            with Image.open(f) as im:
                self.writer.add_image(f"samples/{f.stem}", np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """Logs in with WANDB_API_KEY from the environment (wandb reads it itself); WANDB_MODE=offline needs no network."""

    def __init__(self, folder: Path, config: dict, project: str, name: str):
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        # no system metadata: it records the command line, where a --hf-token would be
        self.run = wandb.init(project=project, name=name or None, config=config, dir=str(folder), resume="allow",
                              settings=wandb.Settings(x_disable_meta=True, disable_code=True, save_code=False))

    def log(self, step: int, values: dict) -> None:
        self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def images(self, step: int, files: list[Path]) -> None:
        import wandb

        self.run.log({f"samples/{f.stem}": wandb.Image(str(f)) for f in files}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_tracker(kind: str, out: Path, config: dict, project: str, name: str) -> Tracker:
    """`config` must already be free of secrets (Settings.public_dict)."""
    if kind == "tensorboard":
        return TensorBoardTracker(out / "logs" / "tensorboard" / (name or "run"), config)
    if kind == "wandb":
        return WandbTracker(out / "logs", config, project, name)
    return Tracker()


class NullSink:
    """The metrics sink of ranks other than 0 (rank 0 writes the job's)."""

    def write(self, **row) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsSink:
    """metrics.jsonl, one object per logged step, mirrored to the tracker; appends so a resumed run continues
    the file."""

    def __init__(self, path: Path, resume_step: int = 0, tracker: Tracker | None = None):
        self.path, self.tracker = path, tracker or Tracker()
        if path.exists():  # drop lines past the resume point: they belong to steps that will be redone
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        self._f = path.open("a", encoding="utf-8")

    def write(self, **row) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        self.tracker.log(row["step"], {k: v for k, v in row.items() if k != "step"})

    def close(self) -> None:
        self._f.close()
        self.tracker.close()
