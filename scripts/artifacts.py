"""What a training job writes besides its model dir: checkpoints, history, loss curve,
the failure file; written atomically (temp file + rename), JSON kept strict.

Imports nothing of the host (pipeline/, steps/): this folder ships on its own.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
from pathlib import Path

import torch
from torch import nn

from train_errors import InputError

CHECKPOINT_FILE = "checkpoint.pt"
# SageMaker syncs /opt/ml/checkpoints with checkpoint_s3_uri; outside a container, ./checkpoints
DEFAULT_CHECKPOINT_DIR = "/opt/ml/checkpoints" if Path("/opt/ml").is_dir() else "checkpoints"


# ----------------------------------------------------------------------------- files

def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_json(obj) -> str:
    """Strict JSON: a diverged run's NaN/inf become null (json.dumps would write NaN)."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), indent=2, allow_nan=False)


# ----------------------------------------------------------------------------- checkpoints

def cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "best_loss", "best_epoch",
                   "bad_epochs", "stopped", "history", "best_state")


def load_checkpoint(path: Path, identity: dict, device: torch.device, move_aside: bool = True) -> dict | None:
    """The checkpoint of an interrupted run of this same job, or None.

    One of another job (arch, classes, image size) is refused. An unreadable one (empty or
    truncated by a kill mid-upload, not a checkpoint) is moved aside to <name>.corrupt, with
    a warning, and the job starts from epoch 1: a spot restart goes on rather than failing on
    a file that can never load. move_aside: this process renames it (one per host)."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict):
            raise ValueError(f"holds a {type(ckpt).__name__}, not a checkpoint dict")
    except Exception as err:  # EOFError (empty), RuntimeError (bad zip), UnpicklingError ...
        reason = f"{type(err).__name__}: {err}" if str(err).strip() else \
            f"{type(err).__name__}: an empty or truncated file ({size} bytes)"
        return _unreadable_checkpoint(path, reason, move_aside)
    theirs = ckpt.get("identity", {})
    diff = {k: (theirs.get(k), v) for k, v in identity.items() if theirs.get(k) != v}
    if diff:
        raise InputError(f"--checkpoint-dir {path.parent}: {path.name} belongs to another job "
                         f"(differs in {sorted(diff)}); give this job its own checkpoint dir or delete it")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        return _unreadable_checkpoint(path, f"incomplete, no {missing}", move_aside)
    return ckpt


def _unreadable_checkpoint(path: Path, reason: str, move_aside: bool) -> None:
    aside = path.with_name(path.name + ".corrupt")
    if not move_aside:  # the process that moves it says so, once per host
        return None
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, aside)
    reason = " ".join(reason.split())[:300] or "unreadable"
    print(f"warning: --checkpoint-dir {path.parent}: {path.name} cannot be loaded ({reason}); moved to "
          f"{aside.name}, starting from epoch 1", file=sys.stderr, flush=True)
    return None

# ----------------------------------------------------------------------------- outputs

def plot_history(history: list[dict], path: Path, best_epoch: int | None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib not installed; no loss curve", file=sys.stderr)
        return
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (label-smoothed)")
    ax.plot(epochs, [h["valid_loss"] for h in history], "o-", label="validation")
    if best_epoch:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept: epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)

def write_failure(message: str) -> None:
    """SageMaker shows /opt/ml/output/failure as the job's FailureReason."""
    out = os.environ.get("SM_OUTPUT_DIR")
    if out and Path(out).is_dir():
        with contextlib.suppress(OSError):
            (Path(out) / "failure").write_text(message[:1000])
