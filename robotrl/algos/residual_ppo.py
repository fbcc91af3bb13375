"""Baseline: a residual over the same frozen BC chunk base, learned on-policy with PPO (the
ResiP recipe) instead of off-policy RL. Reuses robotrl/algos/ppo.py unchanged: the PPO actor sees
(normalised obs, base action), its Gaussian sample x gives the residual action_scale · x, and the
executed action is clamp(a_base + action_scale · x, -1, 1). The actor's last layer starts at 0.
Time-outs bootstrap (as in robotrl/runner.py); success terminates.

`robotrl train task=arm_lift algo=resppo algo.base=<algo=bc run folder>`
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robotrl.algos.ppo import PPO, PPOConfig


@dataclasses.dataclass
class ResPPOConfig(PPOConfig):
    """PPO's own knobs (robotrl/algos/ppo.py), other defaults for a residual, and the run's."""
    name: str = "resppo"
    base: Optional[str] = None       # run folder of the algo=bc run (required)
    base_bias: Optional[List[float]] = None  # stress test, as in resfit.yaml
    num_envs: int = 16
    env_steps: int = 200000
    action_scale: float = 0.2        # residual = action_scale · x, x ~ N(μ(s, a_base), σ)
    steps_per_env: int = 64
    entropy_coef: float = 0.0
    lr: float = 3e-4
    actor_hidden: List[int] = dataclasses.field(default_factory=lambda: [256, 256])
    critic_hidden: List[int] = dataclasses.field(default_factory=lambda: [256, 256])
    init_std: float = 0.5            # σ of x: the residual's initial exploration std is action_scale · init_std
    eval_every: int = 10000
    eval_episodes: int = 20
    eval_envs: int = 10


class PPOResidual(nn.Module):
    """The deterministic residual of a PPO actor: action_scale · μ(obs_n, a_base)."""

    def __init__(self, model, scale: float):
        super().__init__()
        import copy
        self.obs_norm = copy.deepcopy(model.obs_norm)
        self.actor = copy.deepcopy(model.actor)
        self.scale = scale

    def forward(self, obs_n: torch.Tensor, base_n: torch.Tensor) -> torch.Tensor:
        return self.actor(self.obs_norm(torch.cat([obs_n, base_n], -1))) * self.scale


def _build(c: ResPPOConfig, task, base_ckpt_state=None, base_cfg=None):
    from robotrl.offpolicy import build_resfit_parts
    if c.rnn != "none":
        raise ValueError(f"algo.rnn={c.rnn}: the resppo residual is feed-forward (its base carries the "
                         "chunk's context); algo.rnn is available with algo=ppo")
    base = build_resfit_parts(SimpleNamespace(use_base=True, base_bias=c.base_bias), task, base_ckpt_state, base_cfg)
    A = task.action_size
    ppo = PPO(task.obs_size + A, task.critic_obs_size + A, A, c, c.num_envs)
    last = ppo.model.actor[-1]
    nn.init.zeros_(last.weight)   # the residual's mean starts at exactly 0
    nn.init.zeros_(last.bias)
    return base, ppo


def deploy_parts(ckpt: dict, task):
    """(base, residual module) of a resppo checkpoint, for robotrl/offpolicy.py's export."""
    from robotrl.offpolicy import algo_config
    c = algo_config(ckpt["config"]["algo"])
    base, ppo = _build(c, task, ckpt["model"]["base"], ckpt["base_config"])
    ppo.model.load_state_dict(ckpt["model"]["ppo"])
    return base, PPOResidual(ppo.model, c.action_scale)


def train_residual_ppo(cfg: DictConfig) -> Path:
    from robotrl.checkpoint import save_atomic
    from robotrl.logging import MetricsLogger
    from robotrl.offpolicy import (RESFIT_KEYS, Rows, _finish, _setup, _task_cfg, _video_policy, algo_config,
                                   evaluate_residual, load_base, unwrap)
    from sim.envs import TaskVectorEnv
    c = algo_config(OmegaConf.to_container(cfg.algo, resolve=True))
    if not c.base:
        raise ValueError("algo.base: give the run folder of an algo=bc run (the frozen base)")
    task_cfg = _task_cfg(cfg)
    run_dir = _setup(cfg)
    env = TaskVectorEnv(task_cfg, num_envs=c.num_envs, nthread=2)
    task = env.task
    clip = task.cfg.action_clip
    _, _, bc_ckpt = load_base(c.base)
    base_cfg = bc_ckpt["config"]["algo"]
    base, ppo = _build(c, task, bc_ckpt["model"], base_cfg)
    train_base, eval_base = base.with_batch(c.num_envs), base.with_batch(c.eval_envs)
    keys = RESFIT_KEYS + ("loss/policy", "loss/value", "kl", "action_std")
    logger = Rows(MetricsLogger(run_dir), keys)

    def residual() -> PPOResidual:
        return PPOResidual(ppo.model, c.action_scale).eval()

    ev0 = ev = evaluate_residual(cfg, task_cfg, eval_base, residual(), 0)
    logger.log(0, {"eval/success_rate": ev0["success_rate"], "eval/episode_length": ev0["episode_length"]})
    obs, info = env.reset(seed=cfg.seed)
    critic = info["critic_obs"]
    train_base.reset()
    env_steps, successes, next_eval, t0 = 0, [], c.eval_every, time.perf_counter()
    rows = torch.arange(c.num_envs)
    while env_steps < c.env_steps:
        for _ in range(c.steps_per_env):
            o = torch.as_tensor(obs)
            with torch.no_grad():
                a_base = train_base(o)
                x = ppo.act(torch.cat([base.norm.obs(o), a_base], -1),
                            torch.cat([torch.as_tensor(critic), a_base], -1))
            a = torch.clamp(a_base + c.action_scale * x, -1.0, 1.0)
            obs, reward, terminated, truncated, info = env.step(torch.clamp(base.norm.unaction(a), -clip, clip).numpy())
            critic = info["critic_obs"]
            bonus = torch.zeros(c.num_envs)
            done = terminated | truncated
            if truncated.any():   # bootstrap time-outs with V(final obs, the base action the queue would give)
                ids = torch.as_tensor(np.flatnonzero(truncated))
                with torch.no_grad():
                    fb = train_base.peek(torch.as_tensor(info["final_obs"][truncated]), ids)
                    bonus[ids] = ppo.value(torch.cat([torch.as_tensor(info["final_critic_obs"][truncated]), fb], -1))
            ppo.record(torch.as_tensor(reward, dtype=torch.float32), torch.as_tensor(terminated),
                       torch.as_tensor(truncated), bonus, info)
            if done.any():
                successes += info["success"][done].tolist()
                train_base.reset(torch.as_tensor(done))
        env_steps += c.num_envs * c.steps_per_env
        with torch.no_grad():
            last = torch.cat([torch.as_tensor(critic), train_base.peek(torch.as_tensor(obs), rows)], -1)
        stats = ppo.update(last, progress=env_steps / c.env_steps, step=env_steps)
        row = {"train/success_rate": float(np.mean(successes[-50:])) if successes else np.nan,
               "train/episodes": len(successes), "perf/env_steps_per_s": env_steps / (time.perf_counter() - t0),
               **stats}
        if env_steps >= next_eval or env_steps >= c.env_steps:
            next_eval += c.eval_every
            ev = evaluate_residual(cfg, task_cfg, eval_base, residual(), env_steps, record=env_steps >= c.env_steps)
            row.update({"eval/success_rate": ev["success_rate"], "eval/episode_length": ev["episode_length"]})
            save_atomic({"algo": "resppo", "model": {"base": unwrap(base).state_dict(), "ppo": ppo.model.state_dict()},
                         "env_steps": env_steps, "config": OmegaConf.to_container(cfg, resolve=True),
                         "base_config": base_cfg, "obs_size": task.obs_size, "action_size": task.action_size,
                         "parity_obs": ev.get("parity_obs"), "parity_starts": ev.get("parity_starts"),
                         "eval": {k: v for k, v in ev.items() if not k.startswith("parity")}},
                        run_dir / "checkpoints" / "last.pt")
        logger.log(env_steps, row)
    env.close()
    logger.close()
    _finish(run_dir, cfg, ["eval/success_rate", "train/success_rate", "loss/value", "kl", "action_std"],
            {"algo": "resppo", "env_steps": env_steps, "episodes": len(successes),
             "eval_success_rate_start": ev0["success_rate"], "eval_success_rate_final": ev["success_rate"],
             "wall_s": round(time.perf_counter() - t0, 1)},
            _video_policy(base, residual(), clip))
    return run_dir
