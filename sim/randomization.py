"""Domain randomisation as config: what varies between episodes, and by how much.

The defaults randomise nothing; a task's YAML states its ranges. Ranges are [low, high] and
sampled uniformly per environment at every reset.
"""
from __future__ import annotations

import dataclasses
import math

import mujoco
import numpy as np

from sim.twin import set_pd_gains


@dataclasses.dataclass
class Randomization:
    friction: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])        # floor friction
    mass_scale: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])      # every link's mass
    com_offset_m: float = 0.0                                                             # base CoM shift, ±m
    motor_strength: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])  # torque-limit scale
    kp_scale: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])        # PD gain error
    kd_scale: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])
    action_delay_steps: list[int] = dataclasses.field(default_factory=lambda: [0, 0])   # physics steps
    # Sensor latency: each policy step observes the state this many physics steps before the tick,
    # drawn anew every step (a real loop's state stream is not in step with its control clock).
    obs_delay_steps: list[int] = dataclasses.field(default_factory=lambda: [0, 0])
    obs_noise: float = 0.0                                                                # scale on sensor noise
    push_interval_s: float = 0.0                                                          # 0: no pushes
    push_velocity: float = 0.0                                                            # m/s added to the base

    def __post_init__(self):
        for name in ("friction", "mass_scale", "motor_strength", "kp_scale", "kd_scale", "action_delay_steps",
                     "obs_delay_steps"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] < math.inf:   # NaN fails too
                raise ValueError(f"randomization.{name} must be [low, high] with 0 <= low <= high, got {list(lo_hi)}")
        for name in ("com_offset_m", "obs_noise", "push_interval_s", "push_velocity"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"randomization.{name} must be a finite number >= 0, got {getattr(self, name)}")


class Randomizer:
    """Applies a Randomization to one environment's private MjModel copy."""

    def __init__(self, cfg: Randomization, base: mujoco.MjModel, actuator_ids: np.ndarray,
                 kp: np.ndarray, kd: np.ndarray, tau_max: np.ndarray, base_body: int, floor_geom: int):
        self.cfg = cfg
        self.base = base
        self.act, self.kp, self.kd, self.tau_max = actuator_ids, kp, kd, tau_max
        self.base_body, self.floor_geom = base_body, floor_geom

    def apply(self, model: mujoco.MjModel, rng: np.random.Generator) -> dict:
        c, u = self.cfg, rng.uniform
        sample = {"friction": u(*c.friction), "mass_scale": u(*c.mass_scale),
                  "motor_strength": u(*c.motor_strength),
                  "action_delay": int(rng.integers(c.action_delay_steps[0], c.action_delay_steps[1] + 1))}
        model.geom_friction[self.floor_geom, 0] = self.base.geom_friction[self.floor_geom, 0] * sample["friction"]
        model.body_mass[:] = self.base.body_mass * sample["mass_scale"]
        model.body_inertia[:] = self.base.body_inertia * sample["mass_scale"]
        model.body_ipos[self.base_body] = (self.base.body_ipos[self.base_body]
                                           + u(-c.com_offset_m, c.com_offset_m, 3) * (c.com_offset_m > 0))
        n = len(self.act)
        set_pd_gains(model, self.act, self.kp * u(*c.kp_scale, n), self.kd * u(*c.kd_scale, n))
        limit = self.tau_max * sample["motor_strength"]
        model.actuator_forcerange[self.act] = np.stack([-limit, limit], axis=1)
        return sample
