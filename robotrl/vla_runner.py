"""VLA-RL's two runs (robotrl/algos/vla_rl.py, robotrl/vla.py), in the run folder of
robotrl/offpolicy.py (config.yaml, checkpoints/last.pt, metrics.csv + tb/, learning_curves.png,
summary.json, rollout.mp4):

    robotrl train task=arm_reach algo=vla_bc algo.demos=<demos .npz>     # supervised fine-tuning
    robotrl train task=arm_reach algo=vla_rl algo.base=<vla_bc run>     # online PPO from it
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robotrl.checkpoint import load_checkpoint, save_checkpoint
from robotrl.logging import MetricsLogger
from robotrl.offpolicy import (PARITY_EPISODES, Rows, _finish, _setup, _task_cfg, algo_config, evaluate,
                               load_training_demos)
from robotrl.vla import VLA, VLACritic, VLAInputs

BC_KEYS = ("train/grad_steps", "loss/bc", "bc/token_accuracy", "loss/privileged", "eval/success_rate",
           "eval/episode_length", "perf/grad_steps_per_s")
RL_KEYS = ("train/iteration", "train/env_steps", "rollout/success_rate", "rollout/episodes", "loss/policy",
           "loss/value", "clip_fraction", "approx_kl", "entropy_proxy", "eval/success_rate", "eval/episode_length",
           "perf/env_steps_per_s", "perf/iteration_s")


def vla_inputs(task) -> VLAInputs:
    """Where a VLA finds its inputs in this task's observations (the task needs camera_rgb and instruction terms)."""
    facts = task.manifest()["task"]
    if "vocabulary" not in facts:
        raise ValueError(f"task {task.cfg.name} gives no instructions; a VLA needs a language-conditioned task "
                         "(task=arm_reach)")
    return VLAInputs.from_layout(task.layout.terms, task.layout.sizes, task.layout.history, facts["camera"],
                                 facts["vocabulary"])


def load_vla(run: str | Path, key: str = "algo.base") -> tuple[VLA, dict]:
    if not run:
        raise ValueError(f"{key}: give an `algo=vla_bc` (or `algo=vla_rl`) run folder")
    ckpt = load_checkpoint(run)
    if ckpt.get("algo") not in ("vla_bc", "vla_rl"):
        algo = ckpt.get("algo", ckpt["config"]["algo"]["name"])
        raise ValueError(f"{key}: {run} is not a VLA run (its algo is '{algo}'); train one with algo=vla_bc")
    return vla_of(ckpt), ckpt


def vla_of(ckpt: dict) -> VLA:
    """The VLA a vla_bc / vla_rl checkpoint holds."""
    inputs = VLAInputs(**{k: tuple(map(tuple, v)) if k == "state" else tuple(v) for k, v in ckpt["inputs"].items()})
    policy = VLA(inputs, **ckpt["model_config"])
    policy.load_state_dict(ckpt["model"])
    return policy


def greedy(policy: VLA):
    return lambda obs: policy.act(obs).numpy()


def _evaluate(cfg, task_cfg, policy: VLA, label: str, step: int) -> dict:
    """The greedy policy's success in the twin; env 0's first episodes are kept as the export's parity data."""
    a = cfg.algo
    ev = evaluate(task_cfg, greedy(policy), lambda done: None, a.eval_episodes, a.eval_envs, seed=cfg.seed + 10_000,
                  record_env0=PARITY_EPISODES)
    if cfg.progress:
        print(f"  {label} {step}: eval success {ev['success_rate']:.2f} (episode length {ev['episode_length']:.0f})")
    return ev


def _figures(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if not k.startswith("parity")}


def _video_policy(policy: VLA):
    return (lambda o: policy.act(torch.as_tensor(o, dtype=torch.float32)[None])[0].numpy()), lambda: None


def _checkpoint(algo: str, policy: VLA, cfg, probe, step: int, run_dir: Path, ev: dict, extra: dict) -> None:
    save_checkpoint({"algo": algo, "model": policy.state_dict(), "model_config": policy.config,
                     "inputs": dataclasses.asdict(policy.inputs), "config": OmegaConf.to_container(cfg, resolve=True),
                     "obs_size": probe.obs_size, "action_size": probe.action_size, "eval": _figures(ev),
                     "parity_obs": ev["parity_obs"], "parity_starts": ev["parity_starts"], **extra},
                    run_dir, step, keep=cfg.get("keep_checkpoints", False))


def export_vla(ckpt: dict, run_name: str, path: Path) -> dict:
    """`robotrl export run=<vla_bc or vla_rl run>` (robotrl/policies.py): the greedy VLA as one
    TorchScript artifact; returns its full manifest."""
    from robotrl.policies import artifact_manifest
    from sim.envs import make_task
    task = make_task(_task_cfg(OmegaConf.create(ckpt["config"])))
    manifest = artifact_manifest(task, ckpt["config"], run_name, ckpt["env_steps"])
    return vla_of(ckpt).eval().export(path, manifest, ckpt["parity_obs"], ckpt["parity_starts"])


# ---------------------------------------------------------------- supervised fine-tuning
def train_vla_bc(cfg: DictConfig) -> Path:
    from robotrl.algos.vla_rl import bc_loss
    from sim.envs import make_task
    acfg = algo_config(OmegaConf.to_container(cfg.algo, resolve=True))
    task_cfg = _task_cfg(cfg)
    probe = make_task(task_cfg)
    inputs = vla_inputs(probe)
    demos = load_training_demos(acfg.demos, probe, acfg.successes_only, acfg.max_demos)
    privileged = None
    if acfg.privileged_weight > 0:   # the critic observation beyond the policy's frame, standardised
        extra = torch.as_tensor(demos.critic_obs[:, probe.layout.frame_size:])
        privileged = (extra - extra.mean(0)) / extra.std(0).clamp(min=1e-3)
    policy = VLA(inputs, probe.action_size, bins=acfg.bins, clip=task_cfg.action_clip, width=acfg.width,
                 layers=acfg.layers, heads=acfg.heads, patch=acfg.patch,
                 privileged=0 if privileged is None else privileged.shape[1])
    run_dir = _setup(cfg)       # after every check: a refused run leaves no folder
    opt = torch.optim.AdamW(policy.parameters(), lr=acfg.lr, weight_decay=acfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, acfg.steps)
    obs, actions = torch.as_tensor(demos.obs), torch.as_tensor(demos.actions)
    gen = torch.Generator().manual_seed(cfg.seed)
    logger = Rows(MetricsLogger(run_dir), BC_KEYS)
    print(f"vla_bc: {sum(p.numel() for p in policy.parameters())} parameters, on {demos.num_episodes} demo episodes "
          f"({len(obs)} steps) from {acfg.demos}")
    t0, ev = time.perf_counter(), {}
    for step in range(1, acfg.steps + 1):
        policy.train()
        idx = torch.randint(0, len(obs), (acfg.batch,), generator=gen)
        loss, stats = bc_loss(policy, obs[idx], actions[idx], None if privileged is None else privileged[idx],
                              acfg.privileged_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        evaluate_now = step % acfg.eval_every == 0 or step == acfg.steps
        if step % 100 == 0 or evaluate_now:
            metrics = {"train/grad_steps": step, **stats, "perf/grad_steps_per_s": step / (time.perf_counter() - t0)}
            if evaluate_now:
                policy.eval()
                ev = _evaluate(cfg, task_cfg, policy, "step", step)
                metrics.update({"eval/success_rate": ev["success_rate"], "eval/episode_length": ev["episode_length"]})
                _checkpoint("vla_bc", policy, cfg, probe, step, run_dir, ev,
                            {"grad_steps": step, "env_steps": 0, "demos_header": demos.header})
            logger.log(step, metrics)
    logger.close()
    _finish(run_dir, cfg, ["loss/bc", "bc/token_accuracy", "eval/success_rate"],
            {"algo": "vla_bc", "demo_episodes": demos.num_episodes,
             **{f"eval_{k}": v for k, v in _figures(ev).items()}},
            _video_policy(policy))
    return run_dir


# ---------------------------------------------------------------- online PPO
class Rollout:
    """Steps the vector env with the VLA's sampled answers and keeps what PPO needs, (T, N) each."""

    def __init__(self, env, policy: VLA, critic: VLACritic, cfg, seed: int):
        self.env, self.policy, self.critic, self.cfg = env, policy, critic, cfg
        obs, _ = env.reset(seed=seed)
        self.obs = torch.as_tensor(obs)
        n_instr = len(getattr(env.task, "instruction_weights", [1.0]))
        self.successes = np.zeros(n_instr)     # per instruction, over the episodes that ended this iteration
        self.episodes = np.zeros(n_instr)

    @torch.no_grad()
    def collect(self) -> dict:
        c, env = self.cfg, self.env
        keys = ("obs", "tokens", "logp", "values", "rewards", "dones")
        out = {k: [] for k in keys}
        self.successes[:], self.episodes[:] = 0, 0
        for _ in range(c.steps):
            tokens, logp = self.policy.generate(self.obs, c.temperature)
            value = self.critic(self.obs)
            obs, reward, terminated, truncated, info = env.step(self.policy.decode(tokens).numpy())
            reward = torch.as_tensor(reward, dtype=torch.float32)
            if truncated.any():    # a time limit is not a failure: bootstrap from the last observation
                rows = np.flatnonzero(truncated)
                reward[rows] += c.gamma * self.critic(torch.as_tensor(info["final_obs"][rows]))
            for i in np.flatnonzero(terminated | truncated):
                k = int(info.get("instruction_id", np.zeros(env.num_envs))[i])
                self.episodes[k] += 1
                self.successes[k] += info["success"][i]
            for k, v in zip(keys, (self.obs, tokens, logp, value, reward,
                                   torch.as_tensor(terminated | truncated, dtype=torch.float32))):
                out[k].append(v)
            self.obs = torch.as_tensor(obs)
        batch = {k: torch.stack(v) for k, v in out.items()}
        batch["last_value"] = self.critic(self.obs)
        return batch


def train_vla_rl(cfg: DictConfig) -> Path:
    from robotrl.algos.vla_rl import VLAPPO, curriculum_weights
    from sim.envs import TaskVectorEnv
    acfg = algo_config(OmegaConf.to_container(cfg.algo, resolve=True))
    task_cfg = _task_cfg(cfg)
    policy, bckpt = load_vla(acfg.base)
    if bckpt["config"]["task"]["name"] != task_cfg.name:
        raise ValueError(f"algo.base: that run was trained on task '{bckpt['config']['task']['name']}'; "
                         f"this run is task '{task_cfg.name}'")
    env = TaskVectorEnv(task_cfg, num_envs=acfg.envs, nthread=1)
    if env.task.obs_size != bckpt["obs_size"] or dataclasses.asdict(vla_inputs(env.task)) != bckpt["inputs"]:
        raise ValueError(f"algo.base: {acfg.base} reads observations of another layout than task "
                         f"'{task_cfg.name}' as configured here (observation size {env.task.obs_size}, "
                         f"the base's {bckpt['obs_size']})")
    m = policy.config
    critic = VLACritic(policy.inputs, m["width"], m["layers"], m["heads"], m["patch"], list(acfg.critic_hidden))
    learner = VLAPPO(acfg, policy, critic)
    run_dir = _setup(cfg)
    logger = Rows(MetricsLogger(run_dir), RL_KEYS)
    rollout = Rollout(env, policy, critic, acfg, cfg.seed)
    curriculum = acfg.curriculum == "frontier" and hasattr(env.task, "set_instruction_weights")
    success_ema = np.full(len(rollout.successes), 0.5)
    print(f"vla_rl: PPO on {acfg.base} ({sum(p.numel() for p in policy.parameters())} parameters), "
          f"{acfg.envs} envs x {acfg.steps} steps per iteration, curriculum {acfg.curriculum}")
    policy.eval()
    ev0 = ev = _evaluate(cfg, task_cfg, policy, "iteration", 0)
    logger.log(0, {"train/iteration": 0, "eval/success_rate": ev0["success_rate"],
                   "eval/episode_length": ev0["episode_length"]})
    env_steps, t_start = 0, time.perf_counter()
    for it in range(1, acfg.iterations + 1):
        t0 = time.perf_counter()
        batch = rollout.collect()
        env_steps += acfg.envs * acfg.steps
        t_collect = time.perf_counter() - t0
        stats = learner.update(batch)
        ended = rollout.episodes > 0
        success_ema[ended] = 0.7 * success_ema[ended] + 0.3 * rollout.successes[ended] / rollout.episodes[ended]
        if curriculum:
            env.task.set_instruction_weights(curriculum_weights(success_ema, acfg.curriculum_tau))
        metrics = {"train/iteration": it, "train/env_steps": env_steps,
                   "rollout/success_rate": rollout.successes.sum() / max(1, rollout.episodes.sum()),
                   "rollout/episodes": rollout.episodes.sum(), **stats,
                   "perf/env_steps_per_s": acfg.envs * acfg.steps / t_collect,
                   "perf/iteration_s": time.perf_counter() - t0}
        if it % acfg.eval_every == 0 or it == acfg.iterations:
            ev = _evaluate(cfg, task_cfg, policy, "iteration", it)
            metrics.update({"eval/success_rate": ev["success_rate"], "eval/episode_length": ev["episode_length"]})
            _checkpoint("vla_rl", policy, cfg, env.task, it, run_dir, ev,
                        {"critic": critic.state_dict(), "iteration": it, "env_steps": env_steps,
                         "base_config": bckpt["config"]["algo"]})
        elif cfg.progress:
            print(f"  iteration {it}: rollout success {metrics['rollout/success_rate']:.2f} "
                  f"({int(metrics['rollout/episodes'])} episodes; per instruction "
                  f"{np.round(success_ema, 2).tolist()})  kl {stats['approx_kl']:.2e}  "
                  f"{metrics['perf/iteration_s']:.1f} s")
        logger.log(it, metrics)
    env.close()
    logger.close()
    _finish(run_dir, cfg, ["rollout/success_rate", "eval/success_rate", "loss/value", "approx_kl"],
            {"algo": "vla_rl", "env_steps": env_steps, "eval_success_rate_start": ev0["success_rate"],
             "eval_success_rate_final": ev["success_rate"], "wall_s": round(time.perf_counter() - t_start, 1)},
            _video_policy(policy))
    return run_dir
