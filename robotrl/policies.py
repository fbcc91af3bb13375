"""From a run folder to an artifact: rebuild the trained policy and call its `export`."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from real.artifact import SUFFIXES, artifact_format
from robotrl.checkpoint import load_checkpoint, run_dir_of
from robotrl.export import config_sha256


def artifact_manifest(task, config: dict, run: str, env_steps: int) -> dict:
    """Everything the robot side needs, from the task that trained the policy."""
    m = task.manifest()
    m["robot"] = task.robot.facts()
    m["task"]["config"] = OmegaConf.to_container(OmegaConf.structured(task.cfg))
    m["training"] = {"run": run, "env_steps": env_steps, "algo": config["algo"]["name"], "seed": config["seed"]}
    m["hashes"] = {"config_sha256": config_sha256(config)}
    return m


def export_run(run: str | Path, out: str | Path | None = None, fmt: str | None = None) -> Path:
    """Export a run's policy to `out` (default: <run dir>/<task>_<algo>.pt or .onnx; for a kept
    checkpoint, <task>_<algo>_step_<steps>.pt). The format is `fmt` (torchscript or onnx) or, when
    not given, the suffix of `out`."""
    if fmt is not None and fmt not in SUFFIXES:
        raise ValueError(f"unknown export format '{fmt}'; available: {', '.join(SUFFIXES)}")
    if fmt is not None and out is not None and artifact_format(out) != fmt:
        raise ValueError(f"out={out} is a {artifact_format(out)} file name but format={fmt}; "
                         f"give out= a {SUFFIXES[fmt]} name or leave format= out")
    ckpt = load_checkpoint(run)
    cfg = OmegaConf.create(ckpt["config"])
    run_dir = run_dir_of(run)   # where the run is now (it may have been moved since it trained)
    kept = "" if Path(run).is_dir() or Path(run).name == "last.pt" else f"_{Path(run).stem}"
    path = Path(out) if out else run_dir / f"{cfg.task.name}_{cfg.algo.name}{kept}{SUFFIXES[fmt or 'torchscript']}"
    from robotrl.offpolicy import export_offpolicy, is_offpolicy
    if cfg.algo.name in ("vla_bc", "vla_rl"):   # the greedy VLA
        if fmt == "onnx" or artifact_format(path) == "onnx":
            raise ValueError(f"{run}: a VLA exports to TorchScript only (its answer loop has no ONNX form here); "
                             "give out= a .pt name")
        from robotrl.vla_runner import export_vla
        full = export_vla(ckpt, run_dir.name, path)
    elif is_offpolicy(cfg.algo.name):  # bc / resfit / rlpd / resppo: chunk queue + residual artifact
        return export_offpolicy(run, path)
    else:
        full = _export_onpolicy(run, ckpt, cfg, run_dir.name, path)
    print(f"artifact: {path}\n  parity max |Δ| = {full['parity_max_abs_error']:.2e} over {len(ckpt['parity_obs'])} "
          f"recorded observations\n  weights sha256 {full['hashes']['weights_sha256'][:16]}…")
    return path


def _export_onpolicy(run, ckpt: dict, cfg, run_name: str, path: Path) -> dict:
    """PPO and its relatives: the trained actor (and normaliser) through the policy's own `export`."""
    from robotrl.runner import build
    env, algo = build(cfg, num_envs=1)
    # The artifact needs the policy only (normaliser, actor): critic-side parts may differ between
    # versions (ECO's cost critic became a cost head) without stopping an export.
    try:
        missing, _ = algo.model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:   # "size mismatch for actor.0.weight: …": weights and config disagree
        raise ValueError(f"{run}: the checkpoint's weights do not fit the network its config describes "
                         f"({str(e).splitlines()[-1].strip()})") from None
    policy_missing = [k for k in missing if k.startswith(("actor.", "obs_norm.", "memory."))]
    if policy_missing:
        raise ValueError(f"{run}: the checkpoint lacks policy tensors {policy_missing}")
    manifest = artifact_manifest(env.task, ckpt["config"], run_name, ckpt["env_steps"])
    return algo.model.export(path, manifest, ckpt["parity_obs"], ckpt.get("parity_starts"))
