"""Demonstration datasets: record scripted-expert rollouts, write them atomically in one
documented file, and read them back (docs/datasets.md is the format's reference).

One dataset = one `.npz` holding flat per-step arrays (episodes back to back, in time order)
plus per-episode index arrays, and a JSON header (inside the file as `header`, and beside it as
`<name>.json` for people) with the task config, robot facts, observation/action layout, the
expert and its noise, and library versions.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from robotrl.files import save_arrays, write_text

FORMAT = "robotrl-demos"
FORMAT_VERSION = 1

# task name -> "module:Class" of its scripted expert (constructor: (task, noise=, seed=, noise_steps=))
EXPERTS = {"arm_lift": "sim.experts:ArmLiftExpert", "arm_place": "sim.experts_arm_place:ArmPlaceExpert",
           "arm_reach": "sim.experts_arm_reach:ArmReachExpert"}

LABELS = ("executed", "expert")   # which action a demos file records (record_demos)
PER_STEP = ("obs", "critic_obs", "actions", "rewards", "terminated", "truncated")
PER_EPISODE = ("episode_starts", "episode_ends", "success", "final_obs", "final_critic_obs")


class DatasetError(ValueError):
    """The file is missing, not a demos file, of another format version, or inconsistent."""


def make_expert(task, noise: float = 0.0, seed: int | None = None, aim: float = 0.0, noise_steps: float = 0.0):
    name = task.cfg.name
    if name not in EXPERTS:
        raise ValueError(f"no scripted expert for task '{name}'; available: {', '.join(sorted(EXPERTS))}")
    if aim and name != "arm_lift":
        raise ValueError(f"aim= is an option of arm_lift's expert; task '{name}' has none")
    mod, cls = EXPERTS[name].split(":")
    return getattr(importlib.import_module(mod), cls)(task, noise=noise, seed=seed, noise_steps=noise_steps,
                                                      **({"aim": aim} if aim else {}))


@dataclasses.dataclass
class Demos:
    """A dataset in memory. Step arrays have T rows; episode arrays E rows; episode e is the
    rows episode_starts[e] : episode_ends[e], and final_obs[e] is the observation after its
    last step (the `next_obs` of that step)."""
    header: dict
    obs: np.ndarray
    critic_obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    episode_starts: np.ndarray
    episode_ends: np.ndarray
    success: np.ndarray
    final_obs: np.ndarray
    final_critic_obs: np.ndarray

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts)

    def episodes(self):
        for s, e in zip(self.episode_starts, self.episode_ends):
            yield int(s), int(e)

    def next_obs(self) -> np.ndarray:
        """The observation after every step (obs[t + 1] inside an episode, final_obs at its end)."""
        nxt = np.empty_like(self.obs)
        for k, (s, e) in enumerate(self.episodes()):
            nxt[s:e - 1] = self.obs[s + 1:e]
            nxt[e - 1] = self.final_obs[k]
        return nxt

    def select(self, successes_only: bool = False, max_episodes: int | None = None) -> "Demos":
        """A subset of whole episodes (in file order)."""
        keep = [k for k in range(self.num_episodes) if self.success[k] or not successes_only][:max_episodes]
        rows = np.concatenate([np.arange(self.episode_starts[k], self.episode_ends[k]) for k in keep]) \
            if keep else np.zeros(0, dtype=np.int64)
        lengths = self.episode_ends[keep] - self.episode_starts[keep]
        ends = np.cumsum(lengths)
        return Demos(dict(self.header), *(getattr(self, k)[rows] for k in PER_STEP),
                     ends - lengths, ends, self.success[keep], self.final_obs[keep], self.final_critic_obs[keep])

    @staticmethod
    def concatenate(parts: list["Demos"]) -> "Demos":
        """Recordings of one task as one dataset, episodes in order (play data from several sessions).
        The header is the first part's, with the counts summed and each part's expert listed."""
        first = parts[0].header
        for p in parts[1:]:
            if p.header["task"] != first["task"] or p.obs.shape[1] != parts[0].obs.shape[1]:
                raise DatasetError(f"demos: cannot join task '{p.header['task']}' (observation size {p.obs.shape[1]}) "
                                   f"to task '{first['task']}' (observation size {parts[0].obs.shape[1]})")
        offsets = np.cumsum([0] + [len(p.obs) for p in parts[:-1]])
        header = dict(first, expert=[p.header.get("expert") for p in parts],
                      **{k: sum(p.header[k] for p in parts) for k in ("episodes", "successes", "failures",
                                                                    "episodes_tried", "transitions")})
        return Demos(header, *(np.concatenate([getattr(p, k) for p in parts]) for k in PER_STEP),
                     np.concatenate([p.episode_starts + o for p, o in zip(parts, offsets)]),
                     np.concatenate([p.episode_ends + o for p, o in zip(parts, offsets)]),
                     *(np.concatenate([getattr(p, k) for p in parts])
                       for k in ("success", "final_obs", "final_critic_obs")))

    def validate(self, where: str = "demos") -> None:
        T, E = len(self.obs), len(self.episode_starts)
        for k in PER_STEP:
            if len(getattr(self, k)) != T:
                raise DatasetError(f"{where}: '{k}' has {len(getattr(self, k))} rows, 'obs' has {T}")
        for k in PER_EPISODE:
            if len(getattr(self, k)) != E:
                raise DatasetError(f"{where}: '{k}' has {len(getattr(self, k))} rows, 'episode_starts' has {E}")
        if E and (self.episode_starts[0] != 0 or self.episode_ends[-1] != T
                  or np.any(self.episode_starts[1:] != self.episode_ends[:-1])
                  or np.any(self.episode_ends <= self.episode_starts)):
            raise DatasetError(f"{where}: episode_starts/episode_ends do not tile the {T} steps")
        done = self.terminated | self.truncated
        if E and (not done[self.episode_ends - 1].all() or done.sum() != E):
            raise DatasetError(f"{where}: every episode must end with exactly one terminated or truncated step")


def save_demos(demos: Demos, path: str | Path) -> Path:
    """Written atomically (real.files): readers never see half a file."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    demos.validate(str(path))
    arrays = {k: getattr(demos, k) for k in PER_STEP + PER_EPISODE}
    header = json.dumps(demos.header, indent=1, default=str)
    save_arrays(path, {"header": np.array(header), **arrays}, compressed=True)
    write_text(path.with_suffix(".json"), header)
    return path


def load_demos(path: str | Path) -> Demos:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"demos file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        raise DatasetError(f"{path} is not a readable .npz demos file ({type(e).__name__}: {e})") from None
    if "header" not in data:
        raise DatasetError(f"{path} has no 'header': it was not written by `robotrl demos`")
    header = json.loads(str(data["header"]))
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format {header.get('format')} v{header.get('format_version')}, "
                           f"this reader reads {FORMAT} v{FORMAT_VERSION}")
    missing = [k for k in PER_STEP + PER_EPISODE if k not in data]
    if missing:
        raise DatasetError(f"{path}: missing array(s) {missing}")
    demos = Demos(header, *(data[k] for k in PER_STEP + PER_EPISODE))
    demos.validate(str(path))
    return demos


def record_demos(task_cfg: Any, n: int, noise: float = 0.0, failures: int = 0, seed: int = 0,
                 num_envs: int = 4, nthread: int = 2, max_episodes: int | None = None,
                 progress: bool = False, aim: float = 0.0, noise_steps: float = 0.0,
                 labels: str = "executed") -> Demos:
    """Roll the task's scripted expert out until `n` successful episodes (and up to `failures`
    failed ones, kept and marked success=False) are collected. `noise`: Gaussian std added to
    the expert's action (in action units, before the [-1, 1] clip); the noisy action is what is
    executed and what is recorded; `noise_steps` > 0 correlates it over about that many control steps
    (an Ornstein-Uhlenbeck process), so episodes wander off the expert's path: play data whose actions
    are not a function of the state, from which a world model can learn what actions do. `aim`:
    arm_lift's expert grasps at the cube plus a per-episode offset ~ N(0, aim²) (m, in x and y):
    play data with near misses. `labels`: which action is recorded, `executed` (the noisy one: play
    data, whose actions must be what moved the world) or `expert` (the expert's action at the state the
    noise led to: demonstrations that show how to recover, as in DART)."""
    from robotrl.export import library_versions
    from sim.envs import TaskVectorEnv
    if n < 0 or failures < 0 or aim < 0 or noise_steps < 0:
        raise ValueError(f"demos: n, failures, aim and noise_steps must be >= 0, got n={n}, failures={failures}, "
                         f"aim={aim}, noise_steps={noise_steps}")
    if labels not in LABELS:
        raise ValueError(f"demos: labels must be one of {list(LABELS)}, got {labels!r}")
    env = TaskVectorEnv(task_cfg, num_envs=num_envs, nthread=nthread)
    task = env.task
    expert = make_expert(task, noise=noise, seed=seed, aim=aim, noise_steps=noise_steps)
    obs, info = env.reset(seed=seed)
    critic = info["critic_obs"]
    cur = [{k: [] for k in PER_STEP} for _ in range(num_envs)]
    kept: list[tuple[dict, bool, np.ndarray, np.ndarray]] = []
    n_ok = n_fail = tried = 0
    cap = max_episodes if max_episodes is not None else 50 * (n + failures) + 50
    while (n_ok < n or n_fail < failures) and tried < cap:
        action = expert().astype(np.float32)
        nobs, reward, terminated, truncated, info = env.step(action)
        if labels == "expert":
            action = expert.clean.astype(np.float32)
        for i in range(num_envs):
            ep = cur[i]
            for k, v in (("obs", obs[i]), ("critic_obs", critic[i]), ("actions", action[i]), ("rewards", reward[i]),
                         ("terminated", terminated[i]), ("truncated", truncated[i])):
                ep[k].append(v)
        if "_final_obs" in info:
            for i in np.flatnonzero(info["_final_obs"]):
                tried += 1
                ok = bool(info["success"][i])
                if (ok and n_ok < n) or (not ok and n_fail < failures):
                    n_ok, n_fail = n_ok + ok, n_fail + (not ok)
                    kept.append((cur[i], ok, info["final_obs"][i].copy(), info["final_critic_obs"][i].copy()))
                cur[i] = {k: [] for k in PER_STEP}
                if progress:
                    print(f"\r  episodes {tried}: kept {n_ok} successes, {n_fail} failures", end="", flush=True)
        obs, critic = nobs, info["critic_obs"]
    if progress:
        print()
    env.close()
    if n_ok < n or n_fail < failures:
        raise DatasetError(f"demos: after {tried} episodes only {n_ok}/{n} successes and {n_fail}/{failures} failures")
    lengths = np.array([len(ep["obs"]) for ep, *_ in kept], dtype=np.int64)
    ends = np.cumsum(lengths)
    cat = {k: np.concatenate([np.asarray(ep[k]) for ep, *_ in kept]) if kept else np.zeros(0) for k in PER_STEP}
    m = task.manifest()
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": task.cfg.name,
              "task_config": dataclasses.asdict(task.cfg), "robot": task.robot.facts(),
              "observation": m["observation"], "action": m["action"],
              "expert": {"name": EXPERTS[task.cfg.name], "noise": noise, "noise_steps": noise_steps, "aim": aim,
                         "seed": seed, "labels": labels},
              "episodes": len(kept), "successes": n_ok, "failures": n_fail, "episodes_tried": tried,
              "transitions": int(lengths.sum()), "control_hz": task.robot.control_hz,
              "versions": library_versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return Demos(header, cat["obs"].astype(np.float32), cat["critic_obs"].astype(np.float32),
                 cat["actions"].astype(np.float32), cat["rewards"].astype(np.float32),
                 cat["terminated"].astype(bool), cat["truncated"].astype(bool),
                 ends - lengths, ends, np.array([ok for _, ok, *_ in kept], dtype=bool),
                 np.stack([f for *_, f, _ in kept]).astype(np.float32) if kept
                 else np.zeros((0, task.obs_size), np.float32),
                 np.stack([c for *_, c in kept]).astype(np.float32) if kept
                 else np.zeros((0, task.critic_obs_size), np.float32))


def demos_command(task: str = "arm_lift", n: int = 50, noise: float = 0.0, failures: int = 0, seed: int = 0,
                  out: str | None = None, num_envs: int = 4, overrides: list[str] | None = None,
                  aim: float = 0.0, noise_steps: float = 0.0, labels: str = "executed") -> Path:
    """`robotrl demos task=… n=… noise=… noise_steps=… failures=… aim=… labels=… out=…` (task.<key>=… overrides
    allowed)."""
    import yaml
    from omegaconf import OmegaConf

    from sim.envs import task_config
    raw = OmegaConf.create(dataclasses.asdict(task_config(task)))
    for o in overrides or []:
        key, value = o.split("=", 1)
        if not key.startswith("task.") or OmegaConf.select(raw, key[5:], default="__missing__") == "__missing__":
            raise ValueError(f"demos override '{key}': only existing task.<key>=… overrides are accepted")
        OmegaConf.update(raw, key[5:], yaml.safe_load(value) if value else value)
    cfg = task_config(OmegaConf.to_container(raw))
    demos = record_demos(cfg, n, noise=noise, failures=failures, seed=seed, num_envs=num_envs, progress=True, aim=aim,
                         noise_steps=noise_steps, labels=labels)
    path = save_demos(demos, out or f"data/{task}_n{n}_noise{noise:g}_seed{seed}.npz")
    h = demos.header
    print(f"demos: {path}\n  {h['episodes']} episodes ({h['successes']} successes, {h['failures']} failures, "
          f"{h['episodes_tried']} tried), {h['transitions']} transitions, expert noise {noise:g}\n  header: "
          f"{path.with_suffix('.json')}")
    return path
