"""The offline / off-policy training runner: BC (`algo=bc`, offline from demos), ResFiT
(`algo=resfit`) and its baselines (`algo=rlpd`: the same learner without a base; `algo=resppo`:
a PPO residual). Separate from the on-policy runner (robotrl/runner.py); same run folder:
config.yaml, checkpoints/last.pt, metrics.csv + tb/ (MetricsLogger), learning_curves.png,
summary.json, and an export through robotrl/export.py.

`robotrl train task=arm_lift algo=bc algo.demos=data/arm_lift.npz` then
`robotrl train task=arm_lift algo=resfit algo.base=<bc run folder>`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robotrl.algos import typed_config
from robotrl.checkpoint import load_checkpoint, run_dir_of, save_checkpoint
from robotrl.files import write_text
from robotrl.logging import MetricsLogger, plot_curves

PARITY_EPISODES = 2
BC_KEYS = ("train/grad_steps", "loss/bc", "grad_norm", "lr", "perf/grad_steps_per_s", "eval/success_rate",
           "eval/episode_length")
RESFIT_KEYS = ("eval/success_rate", "eval/episode_length", "train/success_rate", "train/episodes", "loss/critic",
               "q/mean", "q/target", "grad_norm/critic", "loss/actor", "residual/abs_mean", "grad_norm/actor",
               "perf/env_steps_per_s", "perf/critic_updates_per_s", "replay/online")


class Rows:
    """MetricsLogger fixes its CSV columns at the first row: give every row the same keys."""

    def __init__(self, logger: MetricsLogger, keys: tuple[str, ...]):
        self.logger, self.keys = logger, keys

    def log(self, step: int, metrics: dict) -> None:
        self.logger.log(step, {k: float(metrics.get(k, np.nan)) for k in self.keys})

    def close(self) -> None:
        self.logger.close()


def algo_registry() -> dict:
    from robotrl.algos.bc import BCConfig
    from robotrl.algos.diwa import DiWAConfig
    from robotrl.algos.residual_ppo import ResPPOConfig
    from robotrl.algos.resfit import ResFiTConfig
    from robotrl.algos.vla_rl import VLABCConfig, VLARLConfig
    from robotrl.algos.world_model import WorldModelConfig
    return {"bc": BCConfig, "resfit": ResFiTConfig, "rlpd": ResFiTConfig, "resppo": ResPPOConfig,
            "world_model": WorldModelConfig, "diwa": DiWAConfig, "vla_bc": VLABCConfig, "vla_rl": VLARLConfig}


def is_offpolicy(name: str) -> bool:
    return name in algo_registry()


def algo_config(raw: dict):
    reg = algo_registry()
    if raw.get("name") not in reg:
        raise ValueError(f"unknown algo '{raw.get('name')}'; available here: {', '.join(sorted(reg))}")
    return typed_config(reg[raw["name"]], raw)


def _task_cfg(cfg: DictConfig):
    from sim.envs import task_config
    return task_config(OmegaConf.to_container(cfg.task, resolve=True))


# ---------------------------------------------------------------- evaluation (training-time path)
@torch.no_grad()
def evaluate(task_cfg, act, reset, episodes: int, num_envs: int, seed: int, record_env0: int = 0) -> dict:
    """Run `act(obs [B, obs]) -> env actions` until `episodes` episodes ended; `reset(mask)`
    is called for envs that start a new episode. Also returns env 0's observations and episode
    starts over its first `record_env0` episodes (parity data for the export)."""
    from sim.envs import TaskVectorEnv
    n = max(1, min(num_envs, episodes))
    env = TaskVectorEnv(task_cfg, num_envs=n, nthread=min(2, n))
    obs, _ = env.reset(seed=seed)
    reset(torch.ones(n, dtype=torch.bool))
    succ, lengths, started = [], [], n
    active = np.ones(n, dtype=bool)
    rec_obs, rec_starts, env0_eps, new0 = [], [], 0, True
    while len(succ) < episodes or env0_eps < record_env0:   # env 0 may run on to finish its recorded episodes
        if env0_eps < record_env0:
            rec_obs.append(obs[0].copy())
            rec_starts.append(new0)
        obs, reward, terminated, truncated, info = env.step(act(torch.as_tensor(obs)))
        new0 = False
        done = terminated | truncated
        if done.any():
            for i in np.flatnonzero(done & active):
                succ.append(float(info["success"][i]))
                lengths.append(int(info["episode_length"][i]))
                if started >= episodes:
                    active[i] = False
                started += 1
            env0_eps += int(done[0])
            new0 = bool(done[0])
            reset(torch.as_tensor(done))
    env.close()
    return {"success_rate": float(np.mean(succ[:episodes])), "episode_length": float(np.mean(lengths[:episodes])),
            "parity_obs": np.array(rec_obs, dtype=np.float32), "parity_starts": np.array(rec_starts, dtype=bool)}


def evaluate_residual(cfg: DictConfig, task_cfg, eval_base, actor, step: int, record: bool = False,
                      label: str = "env step") -> dict:
    """A residual run's evaluation at `label` `step`: base + residual `actor` (None: the base
    alone), `algo.eval_episodes` episodes from seed + 10 000 (apart from training's seeds),
    printed when `progress`; `record` keeps env 0's first episodes as the export's parity data."""
    a = cfg.algo
    ev = evaluate(task_cfg, base_act_fn(eval_base, actor, task_cfg.action_clip), eval_base.reset, a.eval_episodes,
                  a.eval_envs, seed=cfg.seed + 10_000, record_env0=PARITY_EPISODES if record else 0)
    if cfg.progress:
        print(f"  {label} {step}: eval success {ev['success_rate']:.2f} (episode length {ev['episode_length']:.0f})")
    return ev


def base_act_fn(base, actor=None, clip: float = 1.0):
    """The training-time deterministic policy: base chunk queue (+ residual) -> env actions."""
    @torch.no_grad()
    def act(obs: torch.Tensor) -> np.ndarray:
        a_base = base(obs)
        a = a_base if actor is None else torch.clamp(a_base + actor(base.norm.obs(obs), a_base), -1.0, 1.0)
        return torch.clamp(base.norm.unaction(a), -clip, clip).numpy()
    return act


# ---------------------------------------------------------------- the run folder
def _setup(cfg: DictConfig) -> Path:
    _seed(cfg)
    return _run_folder(cfg)


def _seed(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)


def _run_folder(cfg: DictConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def _finish(run_dir: Path, cfg: DictConfig, keys: list[str], summary: dict, video_policy=None) -> None:
    curves = plot_curves(run_dir / "metrics.csv", run_dir, keys)
    video = None
    if cfg.get("video") and video_policy is not None:
        from robotrl.video import record_video
        policy, reset = video_policy
        video = record_video(_task_cfg(cfg), policy, run_dir / "rollout.mp4", seconds=cfg.video_seconds,
                             seed=cfg.seed, on_reset=reset)
    summary = {"run_dir": str(run_dir), "plots": [str(p) for p in curves], "video": str(video) if video else None,
               **summary}
    write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    print(f"run folder: {run_dir}\n  " + "\n  ".join(f"{k}: {v}" for k, v in summary.items() if k != "run_dir"))


def _video_policy(base, actor, clip):
    """(one-env policy, its reset) for the video: the chunk queue is emptied at each episode start."""
    b1 = base.with_batch(1)
    act = base_act_fn(b1, actor, clip)
    return (lambda o: act(torch.as_tensor(o, dtype=torch.float32)[None])[0]), b1.reset


def keep_freed_memory() -> None:
    """glibc hands large freed blocks back to the OS and page-faults them in again on the next
    update (visible as system time in small-batch learners); keep them in the heap instead."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def train(cfg: DictConfig) -> Path:
    torch.set_num_threads(1)
    keep_freed_memory()
    name = cfg.algo.name
    if name == "bc":
        return train_bc(cfg)
    if name == "resppo":
        from robotrl.algos.residual_ppo import train_residual_ppo
        return train_residual_ppo(cfg)
    if name in ("world_model", "diwa"):
        from robotrl.diwa_runner import train_diwa, train_world_model
        return train_world_model(cfg) if name == "world_model" else train_diwa(cfg)
    if name in ("vla_bc", "vla_rl"):
        from robotrl.vla_runner import train_vla_bc, train_vla_rl
        return train_vla_bc(cfg) if name == "vla_bc" else train_vla_rl(cfg)
    return train_resfit(cfg)


# ---------------------------------------------------------------- BC (offline)
def load_training_demos(path: str, task, successes_only: bool, max_demos, key: str = "algo.demos"):
    """A demos file for training on `task` (a task core): the same task and the same observation
    layout (terms, order, sizes, scales), or an error naming the first difference."""
    from robotrl.datasets import load_demos
    if not path or path == "???":
        raise ValueError(f"{key}: give a demos file (record one with `robotrl demos task=… n=… out=…`)")
    demos = load_demos(path)
    name = task.cfg.name
    if demos.header["task"] != name or demos.obs.shape[1] != task.obs_size:
        raise ValueError(f"{key}: {path} holds task '{demos.header['task']}' with observations of size "
                         f"{demos.obs.shape[1]}; this run trains task '{name}' (observation size {task.obs_size})")
    recorded = [(t["name"], t["size"], t["scale"]) for t in demos.header.get("observation", {}).get("terms", [])]
    here = [(t["name"], t["size"], t["scale"]) for t in task.layout.to_manifest()["terms"]]
    if recorded and recorded != here:
        n = max(len(recorded), len(here))
        recorded, here = recorded + [None] * (n - len(recorded)), here + [None] * (n - len(here))
        i = next(i for i in range(n) if recorded[i] != here[i])
        raise ValueError(f"{key}: {path} was recorded with observation term {i} = {recorded[i]} (name, size, "
                         f"scale); this run's task.observation has {here[i]} there")
    # an image term's pixels mean what the camera's pose made them mean: same sizes are not enough
    camera = getattr(task.cfg, "camera", None)
    recorded_camera = demos.header.get("task_config", {}).get("camera")
    if camera is not None and recorded_camera is not None:
        here_camera = dataclasses.asdict(camera)
        differ = [k for k in here_camera if recorded_camera.get(k) != here_camera[k]]
        if differ:
            k = differ[0]
            raise ValueError(f"{key}: {path} was recorded with task.camera.{k} = {recorded_camera.get(k)}; "
                             f"this run's task.camera.{k} is {here_camera[k]}")
    demos = demos.select(successes_only, max_demos)
    if demos.num_episodes == 0:
        raise ValueError(f"{key}: no episodes left in {path} after successes_only/max_demos")
    return demos


def train_bc(cfg: DictConfig) -> Path:
    from robotrl.algos.bc import BC
    acfg = algo_config(OmegaConf.to_container(cfg.algo, resolve=True))
    task_cfg = _task_cfg(cfg)
    run_dir = _setup(cfg)
    from sim.envs import make_task
    probe = make_task(task_cfg)
    demos = load_training_demos(acfg.demos, probe, acfg.successes_only, acfg.max_demos)
    clip = probe.cfg.action_clip
    bc = BC(acfg, demos, seed=cfg.seed)
    logger = Rows(MetricsLogger(run_dir), BC_KEYS)
    print(f"bc ({acfg.policy}, chunk {acfg.chunk}, execute {acfg.execute}) on {demos.num_episodes} demo episodes "
          f"({len(demos.obs)} steps) from {acfg.demos}")
    t0, last_eval, ev = time.perf_counter(), {}, {}
    eval_base = bc.base.with_batch(acfg.eval_envs)
    for step in range(1, acfg.steps + 1):
        stats = bc.update()
        evaluate_now = step % acfg.eval_every == 0 or step == acfg.steps
        if step % 100 == 0 or evaluate_now:
            metrics = {"train/grad_steps": step, **stats, "perf/grad_steps_per_s": step / (time.perf_counter() - t0)}
            if evaluate_now:
                ev = evaluate(task_cfg, base_act_fn(eval_base, None, clip), eval_base.reset, acfg.eval_episodes,
                              acfg.eval_envs, seed=cfg.seed + 10_000, record_env0=PARITY_EPISODES)
                metrics.update({"eval/success_rate": ev["success_rate"], "eval/episode_length": ev["episode_length"]})
                last_eval = {k: v for k, v in ev.items() if not k.startswith("parity")}
                if cfg.progress:
                    print(f"  step {step}: loss {stats['loss/bc']:.4f}  eval success {ev['success_rate']:.2f}")
            logger.log(step, metrics)
        if evaluate_now:
            save_checkpoint({"algo": "bc", "model": bc.base.state_dict(), "opt": bc.opt.state_dict(),
                             "grad_steps": step, "env_steps": 0, "config": OmegaConf.to_container(cfg, resolve=True),
                             "obs_size": probe.obs_size, "action_size": probe.action_size,
                             "demos_header": demos.header, "demo_episodes": demos.num_episodes,
                             "parity_obs": ev["parity_obs"], "parity_starts": ev["parity_starts"], "eval": last_eval},
                            run_dir, step, keep=cfg.get("keep_checkpoints", False))
    logger.close()
    _finish(run_dir, cfg, ["loss/bc", "eval/success_rate", "eval/episode_length"],
            {"algo": "bc", "policy": acfg.policy, "demo_episodes": demos.num_episodes,
             **{f"eval_{k}": v for k, v in last_eval.items()}},
            _video_policy(bc.base, None, clip))
    return run_dir


# ---------------------------------------------------------------- ResFiT / RLPD-style (online, off-policy)
def load_base(run: str | Path):
    """The frozen base of a BC run: (BasePolicy, its BCConfig, the checkpoint)."""
    from robotrl.algos.bc import BasePolicy
    ckpt = load_checkpoint(run)
    if ckpt.get("algo") != "bc":
        raise ValueError(f"algo.base: {run} is not an algo=bc run "
                         f"(its algo is '{ckpt.get('algo', ckpt['config']['algo']['name'])}')")
    bcfg = algo_config(ckpt["config"]["algo"])
    base = BasePolicy.build(bcfg, ckpt["obs_size"], ckpt["action_size"])
    base.load_state_dict(ckpt["model"])
    return base.eval(), bcfg, ckpt


def build_resfit_parts(acfg, task, base_state: dict | None = None, base_cfg: dict | None = None, demos=None):
    """The frozen base (or the RLPD-style zero base with a demo-fitted normaliser)."""
    from robotrl.algos.bc import BasePolicy, BCConfig, Normalizer
    from robotrl.algos.resfit import OffsetBase, ZeroBase
    if acfg.use_base:
        bcfg = algo_config(base_cfg)
        base = BasePolicy.build(bcfg, task.obs_size, task.action_size)
        base.load_state_dict(base_state)
        bias = getattr(acfg, "base_bias", None)
        if bias:
            if len(bias) != task.action_size:
                raise ValueError(f"algo.base_bias: {len(bias)} values for {task.action_size} actions")
            return OffsetBase(base.eval(), torch.tensor(bias))
        return base.eval()
    norm = Normalizer(task.obs_size, task.action_size)
    if base_state is not None:      # the BC run's normaliser (same demos)
        norm.load_state_dict({k[len("norm."):]: v for k, v in base_state.items() if k.startswith("norm.")})
    else:
        norm.fit(demos.obs, demos.actions, BCConfig().action_scale)
    return ZeroBase(norm, task.action_size)


class Collector:
    """One environment step of the off-policy loop: act (base + residual + exploration), step,
    and turn the steps into n-step transitions in the online replay. A time-out (truncation)
    ends with a bootstrapping transition from the final observation, with the base action the
    queue would have executed there; a success (termination) ends with discount 0."""

    def __init__(self, env, learner, base, online, nstep, clip: float):
        self.env, self.learner, self.base, self.online, self.nstep, self.clip = env, learner, base, online, nstep, clip
        self.successes: list[float] = []

    def reset(self, seed: int | None = None) -> None:
        self.obs, _ = self.env.reset(seed=seed)
        self.base.reset()

    def step(self, phase: str) -> None:
        env, n = self.env, self.env.num_envs
        obs_n, a_base, a = self.learner.act(torch.as_tensor(self.obs), self.base, phase)
        for i in range(n):           # the n-step transitions that end at this observation
            self.online.add(self.nstep.ready(i, obs_n[i], a_base[i]))
        action = torch.clamp(self.base.norm.unaction(a), -self.clip, self.clip).numpy()
        self.obs, reward, terminated, truncated, info = env.step(action)
        for i in range(n):
            self.nstep.add(i, obs_n[i], a_base[i], a[i], reward[i])
        done = terminated | truncated
        if done.any():
            ids = np.flatnonzero(done)
            final = torch.as_tensor(info["final_obs"][ids], dtype=torch.float32)
            with torch.no_grad():
                final_base = self.base.peek(final, torch.as_tensor(ids))  # what a time-out bootstraps with
                final_n = self.base.norm.obs(final)
            for j, i in enumerate(ids):
                self.online.add(self.nstep.end(i, final_n[j], final_base[j], bool(terminated[i])))
                self.successes.append(float(info["success"][i]))
            self.base.reset(torch.as_tensor(done))


def run_resfit(env, learner, base, online, demo_rb, c, clip: float, seed: int | None = None,
               after_step=None, start_step: int = 0, successes: list[float] | None = None) -> Collector:
    """The off-policy loop: `c.env_steps` environment steps (warm-up: base + uniform noise
    for `learning_starts`; then residual + exploration noise), and after `learning_starts`
    every env step is followed by utd critic updates and, after `critic_warmup` more steps,
    the delayed actor updates. Works with any vector env of the TaskVectorEnv API."""
    from robotrl.algos.resfit import NStep
    collector = Collector(env, learner, base, online, NStep(c.nstep, c.gamma, env.num_envs), clip)
    collector.reset(seed=seed)
    collector.successes = list(successes or [])
    env_steps, stats, t_update = start_step, {}, 0.0
    while env_steps < c.env_steps:
        collector.step("warmup" if env_steps < c.learning_starts else "explore")
        env_steps += env.num_envs
        # The first online transition is stored nstep steps in: with no demos, updates wait for it.
        if env_steps >= c.learning_starts and (online.size > 0 or (demo_rb is not None and demo_rb.size > 0)):
            tu = time.perf_counter()
            stats = learner.update(online, demo_rb, env.num_envs,
                                   train_actor=env_steps >= c.learning_starts + c.critic_warmup)
            t_update += time.perf_counter() - tu
        if after_step is not None:
            after_step(env_steps, stats, collector, t_update)
    return collector


def unwrap(base):
    """The BC base inside a stress-test OffsetBase (checkpoints keep the BC run's format)."""
    from robotrl.algos.resfit import OffsetBase
    return base.base if isinstance(base, OffsetBase) else base


RESUMABLE = ("resfit", "rlpd")


def resume(run: str | Path, env_steps: int | None = None, ckpt: dict | None = None) -> Path:
    """Go on with a resfit / rlpd run from its last checkpoint (written at every evaluation:
    learner, optimisers, targets, the online replay and the counters), in the folder it is in now,
    to its own algo.env_steps or to `env_steps`. Episodes in progress when it stopped start over.
    `ckpt`: that checkpoint, when the caller has read it already."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(run)
    algo = ckpt["config"]["algo"]["name"]
    if algo not in RESUMABLE:
        raise ValueError(f"resume is not supported for algo={algo} runs; it is for {', '.join(RESUMABLE)}")
    if "replay" not in ckpt:
        raise ValueError(f"{run}: this checkpoint holds no replay buffer (written before resume existed); "
                         "start a new run")
    cfg = OmegaConf.create(ckpt["config"])
    cfg.run_dir = str(run_dir_of(run))
    if env_steps is not None:
        cfg.algo.env_steps = int(env_steps)
    return train_resfit(cfg, ckpt)


def train_resfit(cfg: DictConfig, ckpt: dict | None = None) -> Path:
    from robotrl.algos.resfit import Replay, ResFiT, demo_transitions
    from sim.envs import TaskVectorEnv
    c = algo_config(OmegaConf.to_container(cfg.algo, resolve=True))
    task_cfg = _task_cfg(cfg)
    bounded = [name for name, on in (("algo.clip_q_target", c.clip_q_target),
                                     ("algo.critic_loss=hl_gauss", c.critic_loss == "hl_gauss")) if on]
    if bounded and getattr(task_cfg, "reward_mode", "sparse") != "sparse" and (c.v_min, c.v_max) == (0.0, 1.0):
        raise ValueError(f"{' and '.join(bounded)} bound Q to [algo.v_min, algo.v_max] = [0, 1], the returns of a "
                         f"sparse 0/1 reward; task.reward_mode={task_cfg.reward_mode} gives larger ones: set "
                         "algo.clip_q_target=false and algo.critic_loss=mse, or algo.v_min/v_max to its returns' range")
    _seed(cfg)    # where it always was: the networks' initial weights reproduce the shipped runs
    env = TaskVectorEnv(task_cfg, num_envs=c.num_envs, nthread=min(2, c.num_envs))
    task = env.task
    clip = task.cfg.action_clip
    base_cfg = base_state = bc_ckpt = None
    if c.use_base and not c.base:
        raise ValueError("algo.base: give the run folder of an algo=bc run (the frozen base), "
                         "or algo.use_base=false for the RLPD-style baseline")
    if c.base:   # without use_base (RLPD-style) the BC run only lends its demos and normaliser
        _, bcfg, bc_ckpt = load_base(c.base)
        base_cfg, base_state = bc_ckpt["config"]["algo"], bc_ckpt["model"]
        if bc_ckpt["obs_size"] != task.obs_size or bc_ckpt["action_size"] != task.action_size:
            raise ValueError(f"algo.base: {c.base} was trained on observations of size {bc_ckpt['obs_size']} and "
                             f"actions of size {bc_ckpt['action_size']}; this task has "
                             f"{task.obs_size}, {task.action_size}")
    demos_path = c.demos or (base_cfg["demos"] if base_cfg else None)
    max_demos = c.max_demos if c.max_demos is not None else (base_cfg.get("max_demos") if base_cfg else None)
    demos = None
    if c.use_demos or not c.use_base:
        demos = load_training_demos(demos_path, task, True, max_demos)
    base = build_resfit_parts(c, task, base_state, base_cfg, demos)
    learner = ResFiT(c, base, task.obs_size, task.action_size, seed=cfg.seed)
    run_dir = _run_folder(cfg)     # after every check: a refused run leaves no folder
    online = Replay(c.buffer_size, task.obs_size, task.action_size)
    demo_rb = (demo_transitions(demos, base, base.norm, c.nstep, c.gamma)
               if (c.use_demos and demos is not None) else None)
    train_base, eval_base = base.with_batch(c.num_envs), base.with_batch(c.eval_envs)
    start = 0
    if ckpt is not None:
        learner.load_state_dict(ckpt["model"]["learner"])
        online.load(ckpt["replay"], run_dir / "checkpoints")
        start = ckpt["env_steps"]
        print(f"resumed {run_dir} at env step {start} ({online.size} online transitions)")
    logger = Rows(MetricsLogger(run_dir, resume_at=start if ckpt is not None else None), RESFIT_KEYS)
    print(f"{c.name}: base {'off (RLPD-style)' if not c.use_base else c.base}; demos "
          f"{demo_rb.size if demo_rb else 0} transitions from {demos.num_episodes if demos else 0} episodes; "
          f"{c.env_steps} env steps, UTD {c.utd}, {c.num_q} Q heads")

    ev0 = ckpt["eval0"] if ckpt is not None else evaluate_residual(cfg, task_cfg, eval_base, learner.actor, 0)
    if ckpt is None:
        logger.log(0, {"eval/success_rate": ev0["success_rate"], "eval/episode_length": ev0["episode_length"]})
    t0, next_log, next_eval = time.perf_counter(), start + c.log_every, start + c.eval_every
    ev = ev0

    def after_step(env_steps: int, stats: dict, collector: Collector, t_update: float) -> None:
        nonlocal next_log, next_eval, ev
        row = {}
        if env_steps >= next_eval or env_steps >= c.env_steps:
            next_eval += c.eval_every
            ev = evaluate_residual(cfg, task_cfg, eval_base, learner.actor, env_steps, record=env_steps >= c.env_steps)
            row.update({"eval/success_rate": ev["success_rate"], "eval/episode_length": ev["episode_length"]})
            save_checkpoint({"algo": c.name,
                             "model": {"base": unwrap(base).state_dict(), "learner": learner.state_dict()},
                             "env_steps": env_steps, "config": OmegaConf.to_container(cfg, resolve=True),
                             "base_config": base_cfg, "obs_size": task.obs_size, "action_size": task.action_size,
                             "parity_obs": ev.get("parity_obs"), "parity_starts": ev.get("parity_starts"),
                             "eval": {k: v for k, v in ev.items() if not k.startswith("parity")},
                             "eval0": {k: v for k, v in ev0.items() if not k.startswith("parity")},
                             "replay": online.save(run_dir / "checkpoints"), "successes": collector.successes},
                            run_dir, env_steps, keep=cfg.get("keep_checkpoints", False))
            online.prune(run_dir / "checkpoints")   # segments the new checkpoint no longer lists
        if env_steps >= next_log or row:
            next_log += c.log_every if env_steps >= next_log else 0
            recent = collector.successes[-20:]
            row.update({"train/success_rate": float(np.mean(recent)) if recent else np.nan,
                        "train/episodes": len(collector.successes), **stats,
                        "perf/env_steps_per_s": (env_steps - start) / (time.perf_counter() - t0),
                        "perf/critic_updates_per_s": learner.critic_updates / max(t_update, 1e-9),
                        "replay/online": online.size})
            logger.log(env_steps, row)

    collector = run_resfit(env, learner, train_base, online, demo_rb, c, clip, seed=cfg.seed + start,
                           after_step=after_step, start_step=start,
                           successes=ckpt["successes"] if ckpt is not None else None)
    env_steps = c.env_steps
    env.close()
    logger.close()
    _finish(run_dir, cfg, ["eval/success_rate", "train/success_rate", "loss/critic", "q/mean", "loss/actor",
                           "residual/abs_mean"],
            {"algo": c.name, "env_steps": env_steps, "episodes": len(collector.successes),
             "eval_success_rate_start": ev0["success_rate"],
             "eval_success_rate_final": ev["success_rate"], "wall_s": round(time.perf_counter() - t0, 1)},
            _video_policy(base, learner.actor, clip))
    return run_dir


# ---------------------------------------------------------------- export (robotrl export run=…)
def export_offpolicy(run: str | Path, path: Path) -> Path:
    """Base (+ residual) as ONE TorchScript artifact with the chunk queue inside, parity
    checked over whole recorded episodes (the queue is reset at each episode start)."""
    from robotrl.algos.bc import BasePolicy
    from robotrl.algos.resfit import DeployPolicy, NoResidual, ResidualActor
    from robotrl.export import export_artifact
    from robotrl.policies import artifact_manifest
    from sim.envs import make_task
    ckpt = load_checkpoint(run)
    cfg = OmegaConf.create(ckpt["config"])
    algo = ckpt.get("algo", cfg.algo.name)
    task = make_task(_task_cfg(cfg))
    if algo == "world_model":
        raise ValueError(f"{run} is a world model, not a policy: export the algo=diwa run fine-tuned inside it")
    if ckpt.get("parity_obs") is None or len(ckpt["parity_obs"]) == 0:
        raise ValueError(f"{run}: the checkpoint holds no recorded episodes for the parity check (run not finished?)")
    if algo in ("bc", "diwa"):   # a chunk policy alone (DiWA's: the fine-tuned diffusion policy)
        bcfg = algo_config(ckpt["config"]["algo"] if algo == "bc" else ckpt["base_config"])
        base = BasePolicy.build(bcfg, task.obs_size, task.action_size)
        base.load_state_dict(ckpt["model"])
        actor, policy_info = None, {"family": "bc_chunk" if algo == "bc" else "diwa", "policy": bcfg.policy,
                                    "chunk": bcfg.chunk, "execute": bcfg.execute}
    elif algo in ("resfit", "rlpd", "resppo"):
        c = algo_config(ckpt["config"]["algo"])
        if algo == "resppo":
            from robotrl.algos.residual_ppo import deploy_parts
            base, actor = deploy_parts(ckpt, task)
        else:
            base = build_resfit_parts(c, task, ckpt["model"]["base"], ckpt["base_config"])
            actor = ResidualActor(task.obs_size, task.action_size, c.actor_hidden,
                                  c.action_scale if c.use_base else 1.0, c.layer_norm)
            actor.load_state_dict(ckpt["model"]["learner"]["actor"])
        bcfg = algo_config(ckpt["base_config"]) if ckpt.get("base_config") and algo != "rlpd" else None
        policy_info = {"family": algo, "residual": algo != "rlpd",
                       **({"policy": bcfg.policy, "chunk": bcfg.chunk, "execute": bcfg.execute} if bcfg else {})}
    else:
        raise ValueError(f"{run}: cannot export algo '{algo}' here")
    base.eval()
    actor = actor.eval() if actor is not None else None
    manifest = artifact_manifest(task, ckpt["config"], Path(cfg.run_dir).name, ckpt["env_steps"])
    manifest["policy"] = {**policy_info, "control_hz": task.robot.control_hz, "stateful": True,
                          "reset": "call reset() at every episode start (empties the chunk queue)"}
    deploy = DeployPolicy(base, actor if actor is not None else NoResidual(), manifest)
    ref_base = base.with_batch(1)
    ref_act = base_act_fn(ref_base, actor, task.cfg.action_clip)
    starts = np.asarray(ckpt["parity_starts"], dtype=bool)

    @torch.no_grad()
    def reference(x: torch.Tensor) -> torch.Tensor:      # the training-time (batched) path, one env
        rows = []
        for i in range(len(x)):
            if i == 0 or starts[i]:
                ref_base.reset()
            rows.append(torch.as_tensor(ref_act(x[i:i + 1]))[0])
        return torch.stack(rows)

    full = export_artifact(deploy, manifest, path, ckpt["parity_obs"], reference, episode_starts=starts)
    print(f"artifact: {path}\n  parity max |Δ| = {full['parity_max_abs_error']:.2e} over {len(starts)} observations "
          f"({int(starts.sum())} episodes, chunk queue reset at each start)\n  weights sha256 "
          f"{full['hashes']['weights_sha256'][:16]}…")
    return path
