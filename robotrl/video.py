"""Rollout videos from MuJoCo's own offscreen renderer (EGL or OSMesa: no screen, no GPU needed)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from robotrl.files import atomic_write


def record_video(task_cfg, policy: Callable[[np.ndarray], np.ndarray], path: Path, seconds: float = 6.0,
                 seed: int = 0, fps: int = 25, on_reset: Callable[[], None] | None = None) -> Path | None:
    """Render `policy` in the task for `seconds`; `on_reset` (a stateful policy's reset) is called at
    every episode start."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    import imageio.v2 as imageio

    from sim.envs import TaskEnv
    env = TaskEnv(task_cfg, render_mode="rgb_array")
    try:
        obs, _ = env.reset(seed=seed)
        every = max(1, int(round(env.task.robot.control_hz / fps)))
        frames = []
        for t in range(int(seconds * env.task.robot.control_hz)):
            obs, _, terminated, truncated, _ = env.step(policy(obs))
            if t % every == 0:
                frames.append(env.render())
            if terminated or truncated:
                obs, _ = env.reset()
                if on_reset is not None:
                    on_reset()
        with atomic_write(path) as tmp:
            imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=8)
        return path
    except Exception as e:  # a missing GL backend must not lose the run; say why and go on
        print(f"video skipped: offscreen rendering failed ({type(e).__name__}: {e}); "
              "set MUJOCO_GL=egl or osmesa and install libegl1 or libosmesa6")
        return None
    finally:
        env.close()
