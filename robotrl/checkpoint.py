"""Checkpoints written atomically (temp file + rename) and read back with clear errors."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from real.artifact import artifact_format
from robotrl.files import atomic_write


class CheckpointError(RuntimeError):
    pass


def save_atomic(obj: dict, path: Path) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(obj: dict, run_dir: Path, step: int, keep: bool = False) -> None:
    """A run's checkpoints/last.pt, written atomically. With keep (keep_checkpoints=true) the same
    checkpoint also stays as checkpoints/step_<step>.pt: a hard link, so no second write, and the
    next last.pt replaces the name, not this file."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    save_atomic(obj, last)
    if keep:
        kept = last.with_name(f"step_{step}.pt")
        kept.unlink(missing_ok=True)   # a resumed run may pass the same step again
        try:
            os.link(last, kept)
        except OSError:                # a file system without hard links
            save_atomic(obj, kept)


def run_dir_of(path: str | Path) -> Path:
    """The run folder of a run folder or of a checkpoint in its checkpoints/ (where it is now)."""
    path = Path(path)
    return path if path.is_dir() else path.resolve().parents[1]


def _an_artifact(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} is an exported artifact, not a checkpoint: give a run folder or its "
                           "checkpoints/*.pt (robotrl eval takes the artifact)")


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if artifact_format(path) == "onnx":
        raise _an_artifact(path)
    try:
        with warnings.catch_warnings():   # torch's advice for an artifact given here; the error below says it
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or truncated and cannot be read "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(ckpt, torch.jit.ScriptModule):   # torch.load hands a TorchScript file to torch.jit.load
        raise _an_artifact(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a robotrl checkpoint (no 'model'/'config' entries)")
    return ckpt
