"""DiWA's two offline runs (robotrl/algos/world_model.py, robotrl/algos/diwa.py), in the run
folder of robotrl/offpolicy.py (config.yaml, checkpoints/last.pt, metrics.csv + tb/,
learning_curves.png, summary.json):

    robotrl train task=arm_lift algo=world_model algo.play=<play data .npz, or a list of them>
    robotrl train task=arm_lift algo=diwa algo.base=<diffusion bc run> algo.world_model=<world model run>

Neither steps the twin while learning: the world model learns from play data, DiWA learns in the
world model. The twin resets (its reset observations start the dreams) and evaluates.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robotrl.checkpoint import load_checkpoint, save_checkpoint
from robotrl.logging import MetricsLogger
from robotrl.offpolicy import (Rows, _finish, _setup, _task_cfg, _video_policy, algo_config, evaluate_residual,
                               load_base, load_training_demos)

WORLD_MODEL_KEYS = ("train/grad_steps", "loss/world_model", "loss/reconstruction", "loss/prediction", "loss/latent",
                    "loss/success", "grad_norm", "val/prediction_error", "val/copy_error",
                    "val/prediction_over_copy", "val/success_recall", "val/success_false_positive",
                    "perf/grad_steps_per_s")
DIWA_KEYS = ("train/iteration", "train/model_steps", "imagined/success_rate", "imagined/episodes", "loss/policy",
             "loss/value", "loss/bc", "clip_fraction", "approx_kl", "eval/success_rate", "eval/episode_length",
             "perf/iteration_s")


# ---------------------------------------------------------------- the world model
def train_world_model(cfg: DictConfig) -> Path:
    from robotrl.algos.world_model import Sequences, WorldModel, held_out_figures, success_steps, world_model_loss
    from robotrl.datasets import Demos
    from sim.envs import make_task
    acfg = algo_config(OmegaConf.to_container(cfg.algo, resolve=True))
    task_cfg = _task_cfg(cfg)
    probe = make_task(task_cfg)
    paths = list(acfg.play) if isinstance(acfg.play, (list, tuple)) else [acfg.play]
    play = Demos.concatenate([load_training_demos(p, probe, False, None, key="algo.play")
                              for p in paths])
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(play.num_episodes)
    n_val = max(1, int(round(acfg.val_fraction * play.num_episodes)))
    if play.num_episodes - n_val < 1:
        raise ValueError(f"algo.play: {acfg.play} holds {play.num_episodes} episode(s); the world model needs at "
                         "least one to train on besides those held out (algo.val_fraction)")
    hold = success_steps(play.header)
    train, val = (Sequences(play, order[n_val:], acfg.horizon, hold),
                  Sequences(play, order[:n_val], acfg.horizon, hold))
    if train.positive_fraction == 0:
        raise ValueError(f"algo.play: {acfg.play} holds no successful step; the success classifier needs some "
                         "(record play data with successes and failures)")
    run_dir = _setup(cfg)
    model = WorldModel(probe.obs_size, probe.action_size, acfg.latent, acfg.hidden)
    model.fit_to_play(play.obs, play.actions, play.next_obs())
    opt = torch.optim.AdamW(model.parameters(), lr=acfg.lr, weight_decay=acfg.weight_decay)
    pos_weight = (1 - train.positive_fraction) / train.positive_fraction
    gen = torch.Generator().manual_seed(cfg.seed)
    logger = Rows(MetricsLogger(run_dir), WORLD_MODEL_KEYS)
    print(f"world model on {play.num_episodes} play episodes ({len(play.obs)} steps, "
          f"{play.success.sum()} successful) from {acfg.play}; {n_val} held out")
    t0, figures = time.perf_counter(), {}
    for step in range(1, acfg.steps + 1):
        model.train()
        loss, stats = world_model_loss(model, *train.batch(torch.randint(0, len(train), (acfg.batch,), generator=gen)),
                                       acfg, pos_weight)
        opt.zero_grad()
        loss.backward()
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), acfg.grad_clip))
        opt.step()
        evaluate_now = step % acfg.eval_every == 0 or step == acfg.steps
        if step % 100 == 0 or evaluate_now:
            metrics = {"train/grad_steps": step, **stats, "perf/grad_steps_per_s": step / (time.perf_counter() - t0)}
            if evaluate_now:
                model.eval()
                figures = held_out_figures(model, val)
                metrics.update(figures)
                if cfg.progress:
                    print(f"  step {step}: loss {stats['loss/world_model']:.4f}  held-out prediction "
                          f"{figures['val/prediction_over_copy']:.3f}× copying  success recall "
                          f"{figures['val/success_recall']:.2f}, false positives "
                          f"{figures['val/success_false_positive']:.3f}")
                save_checkpoint({"algo": "world_model", "model": model.state_dict(), "grad_steps": step, "env_steps": 0,
                                 "config": OmegaConf.to_container(cfg, resolve=True), "obs_size": probe.obs_size,
                                 "action_size": probe.action_size, "play_header": play.header, "figures": figures},
                                run_dir, step, keep=cfg.get("keep_checkpoints", False))
            logger.log(step, metrics)
    logger.close()
    _finish(run_dir, cfg, ["loss/world_model", "val/prediction_over_copy", "val/success_recall"],
            {"algo": "world_model", "play_episodes": play.num_episodes, **{k.replace("/", "_"): v
                                                                          for k, v in figures.items()}})
    return run_dir


def load_world_model(run: str | Path):
    from robotrl.algos.world_model import WorldModel
    if not run:
        raise ValueError("algo.world_model: give an `algo=world_model` run folder")
    ckpt = load_checkpoint(run)
    if ckpt.get("algo") != "world_model":
        raise ValueError(f"algo.world_model: {run} is not an algo=world_model run "
                         f"(its algo is '{ckpt.get('algo', ckpt['config']['algo']['name'])}')")
    a = ckpt["config"]["algo"]
    model = WorldModel(ckpt["obs_size"], ckpt["action_size"], a["latent"], a["hidden"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


# ---------------------------------------------------------------- DiWA
def reset_observations(task_cfg, n: int, seed: int) -> np.ndarray:
    """n of the twin's reset observations (no step is taken): what the dreams start from."""
    from sim.envs import TaskVectorEnv
    env = TaskVectorEnv(task_cfg, num_envs=n, nthread=1)
    obs, _ = env.reset(seed=seed)
    env.close()
    return obs


def train_diwa(cfg: DictConfig) -> Path:
    from robotrl.algos.diwa import DiWA
    acfg = algo_config(OmegaConf.to_container(cfg.algo, resolve=True))
    task_cfg = _task_cfg(cfg)
    if not acfg.base:
        raise ValueError("algo.base: give the `algo=bc algo.policy=diffusion` run to fine-tune")
    base, bcfg, bckpt = load_base(acfg.base)
    wm, wckpt = load_world_model(acfg.world_model)
    for what, ckpt in (("algo.base", bckpt), ("algo.world_model", wckpt)):
        if ckpt["config"]["task"]["name"] != task_cfg.name or ckpt["obs_size"] != bckpt["obs_size"]:
            raise ValueError(f"{what}: that run was trained on task '{ckpt['config']['task']['name']}' "
                             f"(observation size {ckpt['obs_size']}); this run is task '{task_cfg.name}'")
    clip = task_cfg.action_clip
    learner = DiWA(acfg, base, wm, reset_observations(task_cfg, 4 * acfg.envs, cfg.seed + 20_000), bcfg.execute,
                   clip, seed=cfg.seed)
    run_dir = _setup(cfg)
    logger = Rows(MetricsLogger(run_dir), DIWA_KEYS)
    eval_base = base.with_batch(acfg.eval_envs)
    print(f"diwa: fine-tuning {acfg.base} (diffusion, {bcfg.denoise_steps} steps, the last {acfg.finetune_steps} "
          f"trained) inside {acfg.world_model}; {acfg.envs} imagined environments")

    def evaluate_in_twin(iteration: int) -> dict:
        return evaluate_residual(cfg, task_cfg, eval_base, None, iteration, record=True, label="iteration")

    ev0 = ev = evaluate_in_twin(0)
    logger.log(0, {"train/iteration": 0, "eval/success_rate": ev0["success_rate"],
                   "eval/episode_length": ev0["episode_length"]})
    model_steps, t_start = 0, time.perf_counter()
    for it in range(1, acfg.iterations + 1):
        t0 = time.perf_counter()
        batch = learner.rollout()
        stats = learner.update(batch)
        model_steps += acfg.envs * acfg.decisions * bcfg.execute
        metrics = {"train/iteration": it, "train/model_steps": model_steps,
                   "imagined/success_rate": batch["imagined_success_rate"],
                   "imagined/episodes": batch["imagined_episodes"], **stats,
                   "perf/iteration_s": time.perf_counter() - t0}
        if it % acfg.eval_every == 0 or it == acfg.iterations:
            ev = evaluate_in_twin(it)
            metrics.update({"eval/success_rate": ev["success_rate"], "eval/episode_length": ev["episode_length"]})
            save_checkpoint({"algo": "diwa", "model": base.state_dict(), "critic": learner.critic.state_dict(),
                             "iteration": it, "env_steps": 0, "config": OmegaConf.to_container(cfg, resolve=True),
                             "base_config": bckpt["config"]["algo"], "obs_size": bckpt["obs_size"],
                             "action_size": bckpt["action_size"], "parity_obs": ev["parity_obs"],
                             "parity_starts": ev["parity_starts"],
                             "eval": {k: v for k, v in ev.items() if not k.startswith("parity")}},
                            run_dir, it, keep=cfg.get("keep_checkpoints", False))
        elif cfg.progress:
            print(f"  iteration {it}: imagined success {batch['imagined_success_rate']:.2f} "
                  f"({batch['imagined_episodes']} episodes)  kl {stats['approx_kl']:.2e}")
        logger.log(it, metrics)
    logger.close()
    _finish(run_dir, cfg, ["imagined/success_rate", "eval/success_rate", "loss/value", "approx_kl"],
            {"algo": "diwa", "env_steps": 0, "model_steps": model_steps,
             "eval_success_rate_start": ev0["success_rate"], "eval_success_rate_final": ev["success_rate"],
             "wall_s": round(time.perf_counter() - t_start, 1)},
            _video_policy(base, None, clip))
    return run_dir
