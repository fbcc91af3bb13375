"""Evaluate an artifact (never a checkpoint) in the MuJoCo twin, as the robot would run it.
Overrides make it a sim-to-sim check: another physics rate, other randomisation, more delay."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf

from real.artifact import load_artifact
from robotrl.files import write_text


def _policy(art, path, num_envs: int):
    """act(obs [B, obs], starts [B]) -> actions, run as the robot runs the artifact. A stateless
    one (an MLP) takes the whole batch in one call; a stateful one (a chunk queue) gets one
    loaded copy per environment, reset at every episode start."""
    if not art.manifest.get("policy", {}).get("stateful", False):
        return lambda obs, starts: art.act(obs)
    copies = [art] + [load_artifact(path) for _ in range(num_envs - 1)]

    def act(obs, starts):
        for a, start in zip(copies, starts):
            if start:
                a.reset()
        return np.stack([a.act(o) for a, o in zip(copies, obs)])
    return act


def _what_differs(trained, here, where: str) -> str | None:
    """The first place (a dotted key) where `here` is not what the artifact was trained with."""
    if isinstance(trained, dict) or isinstance(here, dict):
        if not (isinstance(trained, dict) and isinstance(here, dict)):
            return f"{where}: {trained} in the artifact, {here} here"
        for key in sorted(trained.keys() | here.keys()):
            if (found := _what_differs(trained.get(key), here.get(key), f"{where}.{key}")) is not None:
                return found
        return None
    if isinstance(trained, list) and isinstance(here, list) and len(trained) == len(here) and any(
            isinstance(x, dict) for x in trained):   # observation terms: say which term differs
        return next((found for i, (a, b) in enumerate(zip(trained, here))
                     if (found := _what_differs(a, b, f"{where}[{i}]")) is not None), None)
    try:
        same = np.allclose(np.asarray(trained, dtype=float), np.asarray(here, dtype=float), rtol=1e-6, atol=1e-9)
    except (TypeError, ValueError):   # strings, or another shape
        same = trained == here
    return None if same else f"{where}: {trained} in the artifact, {here} here"


def evaluate_artifact(path: str | Path, episodes: int = 10, out: str | Path | None = None, seed: int = 0,
                      command: list[float] | None = None, overrides: list[str] | None = None, num_envs: int = 10,
                      video: str | None = None) -> dict:
    from sim.envs import TaskVectorEnv, task_config
    art = load_artifact(path)
    base = OmegaConf.create(art.manifest["task"]["config"])
    for o in overrides or []:
        key, value = o.split("=", 1)
        if not key.startswith("task."):
            raise ValueError(f"eval override '{key}': only task.<key>=… overrides are accepted")
        if key == "task.name":
            raise ValueError(f"task.name: the artifact was trained on task {base.name}, and eval runs it there")
        # unknown keys are refused (naming them) when the task's schema checks the config below
        OmegaConf.update(base, key[5:], yaml.safe_load(value), force_add=True)  # "[1,1]" -> [1, 1]
    if command is not None:   # [vx, vy, yaw_rate], held for the whole evaluation
        if "command" not in base:
            raise ValueError(f"command=: task {base.name} has no velocity command (a walking task has)")
        base.command.vx, base.command.vy, base.command.yaw_rate = ([float(c)] * 2 for c in command)
    task_cfg = task_config(OmegaConf.to_container(base))
    n = max(1, min(num_envs, episodes))
    env = TaskVectorEnv(task_cfg, num_envs=n, nthread=2)
    here = json.loads(json.dumps(env.task.manifest(), default=lambda x: x.tolist()))
    for section in ("observation", "action"):   # the overrides are for the world, not for the policy's inputs
        if (found := _what_differs(art.manifest[section], here[section], section)) is not None:
            env.close()   # its physics threads
            raise ValueError(f"{' '.join(overrides or [])}: changes what the artifact was trained to see or do "
                             f"({found}); eval's task.* overrides may change the physics, randomisation and "
                             "delays, not the observation or the action")
    act = _policy(art, path, n)
    obs, _ = env.reset(seed=seed)
    returns, successes, falls, lengths = [], [], 0, []
    power, joint_power, vel_err, energy = [], [], [], []
    started = n
    active = np.ones(n, dtype=bool)
    starts = np.ones(n, dtype=bool)
    while len(returns) < episodes:
        obs, reward, terminated, truncated, info = env.step(act(obs, starts))
        starts = terminated | truncated   # those envs were reset: a new episode begins
        if "power_w" in info:   # walking tasks report mechanical power; tabletop tasks do not
            power.append(info["power_w"][active])
            joint_power.append(info["joint_power_w"][active])
        if "vel_error" in info:
            vel_err.append(info["vel_error"][active])
        done = (terminated | truncated) & active
        for i in np.flatnonzero(done):
            returns.append(float(info["episode_return"][i]))
            lengths.append(int(info["episode_length"][i]))
            if "episode_energy_j" in info:
                energy.append(float(info["episode_energy_j"][i]))
            ok = bool(info["success"][i]) if "success" in info else not bool(terminated[i])
            successes.append(ok)
            falls += int(terminated[i]) if "success" not in info else 0
            if started >= episodes:
                active[i] = False
            started += 1
    result = {"artifact": str(path), "episodes": len(returns), "return_mean": float(np.mean(returns)),
              "return_std": float(np.std(returns)), "success_rate": float(np.mean(successes)), "falls": falls,
              "episode_length_mean": float(np.mean(lengths)),
              "mean_power_w": float(np.mean(np.concatenate(power))) if power else None,
              "episode_energy_j_mean": float(np.mean(energy)) if energy else None,
              "task": task_cfg.name, "overrides": list(overrides or []), "command": command, "seed": seed}
    if vel_err:
        result["vel_tracking_error"] = float(np.mean(np.concatenate(vel_err)))
    if joint_power:   # where the power goes: mean |τ·q̇| per joint, W (they sum to mean_power_w)
        result["joint_power_w"] = dict(zip(art.joint_names, np.concatenate(joint_power).mean(0).tolist()))
    print(json.dumps(result, indent=1))
    if out:
        write_text(out, json.dumps(result, indent=1))
    if video:
        from robotrl.video import record_video
        art.reset()
        record_video(task_cfg, lambda o: art.act(o), Path(video), seed=seed)
        result["video"] = video
    return result
