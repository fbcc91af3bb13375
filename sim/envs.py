"""Tasks behind the gymnasium APIs: `make` gives a gymnasium.Env, `make_vec` a VectorEnv that
steps every copy in one C call (sim/batched.py) with same-step autoreset."""
from __future__ import annotations

import dataclasses
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from real.robot_spec import CONFIG_DIR, available_robots


# task name -> module in sim/tasks defining <Class> and <Class>Config
TASKS = {"humanoid_walk": "HumanoidWalk", "arm_lift": "ArmLift", "arm_place": "ArmPlace", "arm_reach": "ArmReach"}


def _registry() -> dict[str, tuple[type, type]]:
    import importlib

    class Lazy(dict):
        def __missing__(self, name):
            mod = importlib.import_module(f"sim.tasks.{name}")
            self[name] = (getattr(mod, TASKS[name]), getattr(mod, TASKS[name] + "Config"))
            return self[name]

        def __contains__(self, name):
            return name in TASKS

        def __iter__(self):
            return iter(TASKS)
    return Lazy()


def available_tasks() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))


def task_config(name_or_cfg: str | dict | DictConfig, **overrides: Any):
    """The task's typed config: its YAML (or a given mapping) checked against its schema.
    Wrong types and unknown keys raise with the full key name; ranges are checked too."""
    if isinstance(name_or_cfg, str):
        path = CONFIG_DIR / "task" / f"{name_or_cfg}.yaml"
        if not path.exists():
            raise ValueError(f"unknown task '{name_or_cfg}'; available: {', '.join(available_tasks())}")
        raw = OmegaConf.load(path)
    else:
        raw = OmegaConf.create(name_or_cfg if isinstance(name_or_cfg, dict) else OmegaConf.to_container(name_or_cfg))
    name = raw.get("name")
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown task '{name}'; available: {', '.join(sorted(registry))}")
    if raw.get("robot") not in available_robots():
        raise ValueError(f"task.robot: unknown robot '{raw.get('robot')}'; available: {', '.join(available_robots())}")
    schema = OmegaConf.structured(registry[name][1])
    try:
        merged = OmegaConf.merge(schema, raw, OmegaConf.create(overrides) if overrides else {})
    except ConfigKeyError as e:   # omegaconf names the key but not what it could have been
        parent = e.full_key.rpartition(".")[0]
        keys = [f.name for f in dataclasses.fields(e.object_type)]
        raise ValueError(f"task.{e.full_key}: no such key in task {name}"
                         f"{' ' + parent if parent else ''}; its keys: {', '.join(keys)}") from None
    except ValidationError as e:   # a value of the wrong type: omegaconf names the field without its task.
        raise ValueError(f"task.{e.full_key}: {str(e.msg).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


def make_task(cfg, num_envs: int = 1, nthread: int = 1):
    cls = _registry()[cfg.name][0]
    return cls(cfg, num_envs=num_envs, nthread=nthread)


def task_world(cfg, seed: int | None = None):
    """The task's world for the emulated firmware (sim.emulated_firmware.World: its objects placed
    as the task draws them from `seed`, and its goal), or None where the robot works alone."""
    import importlib
    make = getattr(importlib.import_module(f"sim.tasks.{cfg.name}"), "world", None)
    return None if make is None else make(cfg, np.random.default_rng(seed))


class TaskEnv(gym.Env):
    """One environment of a task (the gymnasium.Env API). Privileged critic observations are in
    info['critic_obs']; energy and tracking figures in info as well."""
    metadata = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(self, task: str | Any = "humanoid_walk", render_mode: str | None = None, **overrides):
        cfg = task_config(task, **overrides) if isinstance(task, (str, dict, DictConfig)) else task
        self.task = make_task(cfg, num_envs=1)
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.task.obs_size,), np.float32)
        self.action_space = gym.spaces.Box(self.task.action_low, self.task.action_high,
                                           (self.task.action_size,), np.float32)
        self._renderer = None
        self._ids = np.array([0])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.task.seed(seed)
        self.task.reset(self._ids)
        obs, critic = self.task.observe()
        return obs[0], {"critic_obs": critic[0]}

    def step(self, action):
        reward, terminated, info = self.task.step(np.asarray(action)[None])
        obs, critic = self.task.observe()
        truncated = bool(self.task.steps[0] >= self.task.episode_steps and not terminated[0])
        out = {k: v[0] for k, v in info.items()}
        out["critic_obs"] = critic[0]
        return obs[0], float(reward[0]), bool(terminated[0]), truncated, out

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return render_frame(self.task, 0, self)

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def render_frame(task, i: int, owner, width: int = 480, height: int = 360) -> np.ndarray:
    """An RGB frame of env i from MuJoCo's own offscreen renderer (EGL/OSMesa; no screen needed)."""
    import mujoco
    if owner._renderer is None:
        owner._renderer = mujoco.Renderer(task.model, height, width)
    d = task.sim.data_of(i)
    cam = "track" if mujoco.mj_name2id(task.model, mujoco.mjtObj.mjOBJ_CAMERA, "track") >= 0 else -1
    owner._renderer.update_scene(d, camera=cam)
    return owner._renderer.render()


class TaskVectorEnv(VectorEnv):
    """num_envs copies stepped together. Autoreset is same-step: a finished env is reset inside
    step(); its last observation is in info['final_obs'] (rows where info['_final_obs'])."""
    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": ["rgb_array"]}

    def __init__(self, task: str | Any = "humanoid_walk", num_envs: int = 8, nthread: int = 2, **overrides):
        cfg = task_config(task, **overrides) if isinstance(task, (str, dict, DictConfig)) else task
        self.cfg = cfg
        self.task = make_task(cfg, num_envs=num_envs, nthread=nthread)
        self.num_envs = num_envs
        t = self.task
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (t.obs_size,), np.float32)
        self.single_action_space = gym.spaces.Box(t.action_low, t.action_high, (t.action_size,), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.episode_return = np.zeros(num_envs)
        self._renderer = None
        self.render_mode = "rgb_array"

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.task.seed(seed)
        self.task.reset(np.arange(self.num_envs))
        self.episode_return[:] = 0.0
        obs, critic = self.task.observe()
        return obs, {"critic_obs": critic}

    def step(self, actions):
        t = self.task
        reward, terminated, info = t.step(actions)
        truncated = (t.steps >= t.episode_steps) & ~terminated
        self.episode_return += reward
        done = terminated | truncated
        obs, critic = t.observe()
        info["critic_obs"] = critic
        if done.any():
            ids = np.flatnonzero(done)
            info["final_obs"], info["final_critic_obs"], info["_final_obs"] = obs.copy(), critic.copy(), done
            info["episode_return"] = np.where(done, self.episode_return, np.nan)
            info["episode_length"] = np.where(done, t.steps, 0)
            self.episode_return[ids] = 0.0
            t.reset(ids)
            obs, critic = t.observe()
            info["critic_obs"] = critic
        return obs, reward, terminated, truncated, info

    def render(self):
        return render_frame(self.task, 0, self)

    def close_extras(self, **kwargs):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def make(task: str = "humanoid_walk", **overrides) -> TaskEnv:
    return TaskEnv(task, **overrides)


def make_vec(task: str = "humanoid_walk", num_envs: int = 8, nthread: int = 2, **overrides) -> TaskVectorEnv:
    return TaskVectorEnv(task, num_envs=num_envs, nthread=nthread, **overrides)
