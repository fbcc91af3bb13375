"""The one exporter: a deploy module + its manifest -> one artifact file, with a parity check.

TorchScript is the format every policy exports to (real/artifact.py loads it); `torch.jit.script`
(not trace) keeps chunk queues and denoising loops with their control flow. ONNX sits beside it
behind the same function: the deploy module's `pure_tick()` (a function of the observation and a
memory tensor that carries a recurrent state or a chunk queue) becomes the graph; onnxruntime runs
it faster, and in C++ too.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import platform
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from real.artifact import (FORMAT, FORMAT_VERSION, ONNX_MANIFEST_KEY, artifact_format, load_artifact,
                           onnx_initializers_sha256, weights_sha256)
from robotrl.files import atomic_write


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
                    reference: Callable[[torch.Tensor], torch.Tensor], atol: float = 1e-5,
                    episode_starts: np.ndarray | None = None) -> dict:
    """Write `module` with `manifest` to `path` and prove that the file, loaded back the way the
    robot loads it, reproduces `reference` on `parity_obs` (rows in time order; stateful modules
    are reset where `episode_starts` is True). The file's suffix picks the format: TorchScript,
    or ONNX for `.onnx` (real/artifact.py reads it the same way). Returns the full manifest."""
    path = Path(path)
    fmt = artifact_format(path)
    module = module.eval()
    with warnings.catch_warnings():  # torch.jit is deprecated upstream; users asked for TorchScript
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module)   # for ONNX too: both files of a policy carry one weights hash
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
            "hashes": {"weights_sha256": weights_sha256(scripted), **manifest.get("hashes", {})},
            "versions": library_versions()}   # no export time: the same policy gives the same bytes
    with atomic_write(path) as tmp:   # its suffix, the target's, names the format to the parity check
        if fmt == "onnx":
            _write_onnx(module, full, tmp, parity_obs)
        else:
            # Saved through a buffer: torch names the archive's folder after the file, and the temp
            # file's random name would make every export of the same policy a different file.
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(scripted, buffer, _extra_files={"manifest.json": json.dumps(full, indent=1)})
            Path(tmp).write_bytes(buffer.getvalue())
        max_err = parity_error(tmp, parity_obs, reference, episode_starts)
        if not max_err <= atol:
            raise ExportError(f"parity check failed: artifact and training policy differ by {max_err:.3g} "
                              f"(> {atol}) on {len(parity_obs)} recorded observations; nothing was written")
    full["parity_max_abs_error"] = max_err
    return full


def _write_onnx(module: torch.nn.Module, manifest: dict, path: str | Path, parity_obs: np.ndarray) -> None:
    """The tick as an ONNX graph (obs [batch, n] -> action, q_target; a memory goes in and out as
    a tensor) with the manifest in the model's metadata, for onnxruntime on the robot."""
    try:
        import onnx
    except ImportError:
        raise ExportError("format onnx needs the onnx extra: pip install 'robotrl[onnx]'") from None
    try:
        tick = module.pure_tick()
    except NotImplementedError as e:
        raise ExportError(str(e)) from None
    batch = torch.export.Dim("batch", min=1)
    obs = torch.as_tensor(np.asarray(parity_obs[:2], dtype=np.float32))   # a batch of 2: 1 would specialise
    args, names, dynamic = (obs,), ["obs"], {"obs": {0: batch}}
    outputs = ["action", "q_target"]
    memory_size = sum(size for _, size in tick.memory_layout)
    if memory_size:
        args += (torch.zeros(len(obs), memory_size),)
        names.append("memory")
        dynamic["memory"] = {0: batch}
        outputs.append("memory_out")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), _quiet("torch", "onnxscript"):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(tick, args, input_names=names, output_names=outputs,
                                        dynamic_shapes=dynamic, dynamo=True, verbose=False)
        except Exception as e:   # torch.export's report runs to pages: say its root cause in one line
            while e.__cause__ is not None:
                e = e.__cause__
            raise ExportError(f"{type(module).__name__} could not be exported as ONNX ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0]}); export it with format=torchscript") from None
        program.optimize()   # drops constants no node reads, which onnxruntime would warn about at every load
    model = program.model_proto
    manifest = {**manifest, "onnx": {"inputs": names, "outputs": outputs, "memory_size": memory_size,
                                     "memory_layout": [{"name": n, "size": k} for n, k in tick.memory_layout],
                                     "opset": int(model.opset_import[0].version),
                                     "call": "one row per robot: obs [1, size] (float32); a memory starts at zeros "
                                             "and memory_out is fed back as memory on the next tick"}}
    manifest["hashes"] = {**manifest["hashes"], "onnx_initializers_sha256": onnx_initializers_sha256(model)}
    model.metadata_props.add(key=ONNX_MANIFEST_KEY, value=json.dumps(manifest, indent=1))
    onnx.save(model, path)


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Errors only from these loggers for a while: the ONNX exporter's notes (absent torchvision ops,
    skipped constant folds, graph dumps on a failure) are not the user's to read."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@torch.no_grad()
def parity_error(path: str | Path, obs: np.ndarray, reference: Callable[[torch.Tensor], torch.Tensor],
                 episode_starts: np.ndarray | None = None) -> float:
    art = load_artifact(path)
    x = np.asarray(obs, dtype=np.float32)
    starts = np.zeros(len(x), dtype=bool) if episode_starts is None else episode_starts
    out = []
    with torch.random.fork_rng():   # a sampling policy (diffusion) draws the same noise on both sides
        torch.manual_seed(0)
        for i in range(len(x)):
            if starts[i] or i == 0:
                art.reset()
            out.append(art.act(x[i]))
        torch.manual_seed(0)
        want = reference(torch.as_tensor(x)).numpy()
    return float(np.abs(np.stack(out) - want).max())
