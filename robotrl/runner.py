"""The on-policy training runner: environments, rollouts, updates, logging, checkpoints, resume,
and the end-of-run plots and video. Algorithms plug in through ALGOS."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robotrl.algos import typed_config
from robotrl.checkpoint import load_checkpoint, run_dir_of, save_checkpoint
from robotrl.files import write_text
from robotrl.logging import MetricsLogger, plot_curves

PARITY_ROWS = 512


def algo_registry() -> dict:
    from robotrl.algos.constrained import BASELINES
    from robotrl.algos.eco import ECO, ECOConfig
    from robotrl.algos.ppo import PPO, PPOConfig
    return {"ppo": (PPO, PPOConfig), "eco": (ECO, ECOConfig), **BASELINES}


def algo_config(raw: dict):
    name = raw.get("name")
    reg = algo_registry()
    if name not in reg:
        raise ValueError(f"unknown algo '{name}'; available: {', '.join(sorted(reg))}")
    return typed_config(reg[name][1], raw)


def build(cfg: DictConfig, num_envs: int | None = None):
    from sim.envs import TaskVectorEnv, task_config
    task_cfg = task_config(OmegaConf.to_container(cfg.task, resolve=True))
    acfg = algo_config(OmegaConf.to_container(cfg.algo, resolve=True))
    env = TaskVectorEnv(task_cfg, num_envs=num_envs or cfg.num_envs, nthread=cfg.nthread)
    t = env.task
    from robotrl.algos.eco import ConstrainedConfig
    if isinstance(acfg, ConstrainedConfig) and not getattr(t, "measures_energy", False):
        env.close()
        raise ValueError(f"algo={acfg.name} constrains the energy the task measures at the physics rate, and task "
                         f"{task_cfg.name} does not measure it (humanoid_walk does); train it with algo=ppo")
    algo = algo_registry()[acfg.name][0](t.obs_size, t.critic_obs_size, t.action_size, acfg, env.num_envs)
    return env, algo


def train(cfg: DictConfig, ckpt: dict | None = None) -> Path:
    """Train by `cfg`; with `resume=`, go on from that checkpoint (`ckpt`, when the caller has read it)."""
    torch.set_num_threads(1)  # the physics threads use the other core; small nets are faster this way
    run_dir = Path(cfg.run_dir)
    resume = cfg.resume
    if resume:
        ckpt = ckpt if ckpt is not None else load_checkpoint(resume)
        saved = OmegaConf.create(ckpt["config"])
        saved.total_steps = cfg.total_steps   # the run's own, or more to extend it (robotrl.cli)
        # The run continues where its checkpoint is now (a run folder may have been moved or copied).
        run_dir = run_dir_of(resume)
        saved.run_dir = str(run_dir)
        cfg = saved
    if cfg.task.get("action_type") == "delta":   # before anything is written: the artifact maps action to target
        raise ValueError(f"algo={cfg.algo.name} exports policies whose action is the joint target; task "
                         f"{cfg.task.name}'s action is a step of it (task.action_type=delta): set "
                         "task.action_type=absolute, or train it with algo=bc, resfit, rlpd or resppo")
    init_lr = cfg.get("init_lr", "source")   # runs saved before the key resume with its default
    if init_lr not in ("source", "config"):
        raise ValueError(f"init_lr must be 'source' or 'config', got '{init_lr}'")
    torch.manual_seed(cfg.seed)
    env, algo = build(cfg)   # bad settings are refused before the run folder is written
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    obs, info = env.reset(seed=cfg.seed)
    critic = info["critic_obs"]
    iteration, env_steps = 0, 0
    if ckpt is not None:
        algo.model.load_state_dict(ckpt["model"])
        algo.load_training_state(ckpt["algo_state"])
        iteration, env_steps = ckpt["iteration"], ckpt["env_steps"]
        torch.set_rng_state(ckpt["torch_rng"])
        print(f"resumed {run_dir} at iteration {iteration}, {env_steps} env steps")
    elif cfg.get("init_from"):
        source = init_policy(algo.model, cfg.init_from)
        if init_lr == "source" and algo.continue_learning_rate(source.get("algo_state", {})):
            print(f"learning rate {algo.lr:.1e}: where {cfg.init_from}'s adaptive schedule ended (init_lr=source)")
    logger = MetricsLogger(run_dir, resume_at=env_steps if ckpt is not None else None)
    per_iter = env.num_envs * algo.cfg.steps_per_env
    total_iters = max(1, int(np.ceil(cfg.total_steps / per_iter)))
    from tqdm import tqdm
    bar = tqdm(total=total_iters * per_iter, initial=env_steps, unit="step", unit_scale=True,
               desc=f"{cfg.task.name}/{cfg.algo.name}", dynamic_ncols=True, disable=not cfg.progress,
               mininterval=0.1 if sys.stderr.isatty() else 30)   # into a log file: a line each 30 s, not each update
    returns, lengths, falls, episodes = [], [], 0, 0
    while iteration < total_iters:
        t0 = time.perf_counter()
        power, vel_err, info_sums = [], [], {}
        for _ in range(algo.cfg.steps_per_env):
            obs, reward, terminated, truncated, info = algo.env_step(env, obs, critic)
            critic = info["critic_obs"]
            power.append(info["power_w"].mean() if "power_w" in info else np.nan)   # walking tasks report
            vel_err.append(info["vel_error"].mean() if "vel_error" in info else np.nan)   # these two
            for k, v in info.items():
                if k.startswith("reward/") or k == "success":
                    info_sums[k] = info_sums.get(k, 0.0) + float(np.mean(v))
            if "episode_return" in info:
                done = info["_final_obs"]
                returns.extend(info["episode_return"][done].tolist())
                lengths.extend(info["episode_length"][done].tolist())
                falls += int(terminated.sum())
                episodes += int(done.sum())
        env_steps += per_iter
        collect_s = time.perf_counter() - t0
        parity_obs, parity_starts = algo.parity_sequences(PARITY_ROWS)
        stats = algo.update(torch.as_tensor(critic), progress=iteration / total_iters, step=env_steps)
        iteration += 1
        metrics = {"train/episode_return": float(np.mean(returns[-100:])) if returns else np.nan,
                   "train/episode_length": float(np.mean(lengths[-100:])) if lengths else np.nan,
                   "train/fall_rate": falls / episodes if episodes else np.nan,
                   "train/power_w": float(np.mean(power)),   # NaN where the task reports none
                   "train/vel_error": float(np.mean(vel_err)),
                   "perf/env_steps_per_s": per_iter / max(collect_s, 1e-9),
                   "perf/iteration_s": time.perf_counter() - t0,
                   **{k: v / algo.cfg.steps_per_env for k, v in info_sums.items()}, **stats}
        falls = episodes = 0
        logger.log(env_steps, metrics)
        postfix = {"ret": f"{metrics['train/episode_return']:.2f}"}
        if not np.isnan(metrics["train/power_w"]):   # walking tasks
            postfix["P"] = f"{metrics['train/power_w']:.1f}W"
        bar.set_postfix(postfix, refresh=False)   # shown by the update, at the bar's own interval
        bar.update(per_iter)
        if iteration % cfg.checkpoint_every == 0 or iteration == total_iters:
            save_checkpoint({"model": algo.model.state_dict(), "algo_state": algo.training_state(),
                             "iteration": iteration, "env_steps": env_steps, "torch_rng": torch.get_rng_state(),
                             "config": OmegaConf.to_container(cfg, resolve=True), "parity_obs": parity_obs,
                             "parity_starts": parity_starts},
                            run_dir, env_steps, keep=cfg.get("keep_checkpoints", False))
    bar.close()
    logger.close()
    finish(run_dir, cfg, algo)
    return run_dir


def init_policy(model: torch.nn.Module, source: str) -> dict:
    """Start from another run's policy (fine-tuning, e.g. ECO from a PPO walker): every tensor
    whose name and shape match is copied; the rest (a cost critic, say) keeps its fresh init.
    Returns the source checkpoint."""
    checkpoint = load_checkpoint(source)
    theirs = checkpoint["model"]
    ours = model.state_dict()
    taken = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    if not taken:
        raise ValueError(f"init_from={source}: no tensor matches this policy's names and shapes")
    model.load_state_dict(taken, strict=False)
    fresh = sorted(set(ours) - set(taken))
    print(f"initialised {len(taken)}/{len(ours)} tensors from {source}"
          + (f"; fresh: {', '.join(fresh)}" if fresh else ""))
    return checkpoint


def finish(run_dir: Path, cfg: DictConfig, algo) -> None:
    """Plots and a rollout video at the end of a run, so a person can look rather than read."""
    curves = plot_curves(run_dir / "metrics.csv", run_dir, ["train/episode_return", "train/episode_length",
                                                              "train/fall_rate", "train/power_w", "train/vel_error",
                                                              "loss/value", "kl", "action_std"])
    video = None
    if cfg.video:
        from robotrl.video import record_video
        from sim.envs import task_config
        task_cfg = task_config(OmegaConf.to_container(cfg.task, resolve=True))

        memory = [algo.model.initial_state(1)]

        def policy(o):
            with torch.no_grad():
                mean, memory[0] = algo.model.step(torch.as_tensor(o, dtype=torch.float32)[None], memory[0])
            return mean[0].numpy()

        def reset():
            memory[0] = algo.model.initial_state(1)
        video = record_video(task_cfg, policy, run_dir / "rollout.mp4", seconds=cfg.video_seconds, seed=cfg.seed,
                             on_reset=reset)
    summary = {"run_dir": str(run_dir), "plots": [str(p) for p in curves], "video": str(video) if video else None}
    write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    print(f"run folder: {run_dir}\n  plots: {', '.join(str(p) for p in curves)}\n  video: {video}")
