"""The one exporter: a deploy module + its manifest -> one artifact file, with a parity check.

TorchScript is the format robots load today (real/artifact.py); torch.export/ONNX can sit
beside it behind the same function. `torch.jit.script` (not trace) is used so that chunk
queues and denoising loops keep their control flow.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from real.artifact import FORMAT, FORMAT_VERSION, load_artifact, weights_sha256


class ExportError(RuntimeError):
    pass


def library_versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("robotrl", "torch", "numpy", "mujoco", "gymnasium"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def export_artifact(module: torch.nn.Module, manifest: dict, path: str | Path, parity_obs: np.ndarray,
                    reference: Callable[[torch.Tensor], torch.Tensor], fmt: str = "torchscript",
                    atol: float = 1e-5, episode_starts: np.ndarray | None = None) -> dict:
    """Write `module` with `manifest` to `path` and prove that the file, loaded back the way the
    robot loads it, reproduces `reference` on `parity_obs` (rows in time order; stateful modules
    are reset where `episode_starts` is True). Returns the full manifest."""
    if fmt != "torchscript":
        raise ExportError(f"unknown export format '{fmt}'; available: torchscript")
    path = Path(path)
    module = module.eval()
    with warnings.catch_warnings():  # torch.jit is deprecated upstream; users asked for TorchScript
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
            "hashes": {"weights_sha256": weights_sha256(scripted), **manifest.get("hashes", {})},
            "versions": library_versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(scripted, tmp, _extra_files={"manifest.json": json.dumps(full, indent=1)})
        max_err = parity_error(tmp, parity_obs, reference, episode_starts)
        if not max_err <= atol:
            raise ExportError(f"parity check failed: artifact and training policy differ by {max_err:.3g} "
                              f"(> {atol}) on {len(parity_obs)} recorded observations; nothing was written")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an artifact is meant to be copied and read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    full["parity_max_abs_error"] = max_err
    return full


@torch.no_grad()
def parity_error(path: str | Path, obs: np.ndarray, reference: Callable[[torch.Tensor], torch.Tensor],
                 episode_starts: np.ndarray | None = None) -> float:
    art = load_artifact(path)
    x = torch.as_tensor(obs, dtype=torch.float32)
    starts = np.zeros(len(x), dtype=bool) if episode_starts is None else episode_starts
    out = []
    for i in range(len(x)):
        if starts[i] or i == 0:
            art.module.reset()
        out.append(art.module(x[i]))
    got = torch.stack(out)
    want = reference(x)
    return float((got - want).abs().max())
