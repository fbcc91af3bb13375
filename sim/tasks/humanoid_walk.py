"""humanoid_walk: track a (vx, vy, yaw-rate) command with a periodic gait.

A task is the robot's twin, a few named reward and observation functions, and one default
config (configs/task/humanoid_walk.yaml). Everything here is batched over environments.
Mechanical power sum_j |tau_j * dq_j| is integrated at the physics rate and reported in info
(power_w, energy_j, and per joint joint_power_w, in the robot config's joint order); it is never
part of the reward (ECO constrains it instead).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import mujoco
import numpy as np

from real.observations import ObsLayout, RobotState, projected_gravity
from real.robot_spec import load_robot
from sim.batched import BatchedSim
from sim.randomization import Randomization, Randomizer
from sim.twin import add_floor, joint_indices, robot_spec_editable


@dataclasses.dataclass
class CommandRanges:
    vx: list[float]
    vy: list[float]
    yaw_rate: list[float]
    resample_s: float


@dataclasses.dataclass
class HumanoidWalkConfig:
    name: str
    robot: str
    episode_s: float
    gait_period_s: float
    action_scale: float
    action_clip: float
    history: int
    command: CommandRanges
    observation: dict[str, float]
    reward: dict[str, float]
    nominal_height: float
    foot_clearance_m: float
    terminate_height: float
    terminate_tilt: float
    randomization: Randomization
    physics_hz: Optional[float] = None   # sim-to-sim: simulate at another rate than the robot's

    def __post_init__(self):
        for key in ("episode_s", "gait_period_s", "action_scale", "action_clip", "nominal_height"):
            if not 0 < getattr(self, key) < math.inf:   # NaN fails too
                raise ValueError(f"task.{key} must be a finite number > 0, got {getattr(self, key)}")
        if self.history < 1:
            raise ValueError(f"task.history must be >= 1, got {self.history}")
        if self.physics_hz is not None and not 0 < self.physics_hz < math.inf:
            raise ValueError(f"task.physics_hz must be > 0 (or null: the robot's rate), got {self.physics_hz}")
        c = self.command
        for key in ("vx", "vy", "yaw_rate"):
            lo_hi = getattr(c, key)
            if len(lo_hi) != 2 or not -math.inf < lo_hi[0] <= lo_hi[1] < math.inf:
                raise ValueError(f"task.command.{key} must be [low, high] with low <= high, got {list(lo_hi)}")
        if not 0 < c.resample_s < math.inf:
            raise ValueError(f"task.command.resample_s must be a finite number > 0, got {c.resample_s}")
        unknown = sorted(set(self.reward) - set(REWARDS))
        if unknown:
            raise ValueError(f"task.reward: unknown term(s) {unknown}; available: {sorted(REWARDS)}")


def quat_rotate_inverse(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotate world vectors v (N, 3) into the frames of unit quaternions q (N, 4; w, x, y, z)."""
    w, x, y, z = q[:, 0:1], q[:, 1:2], q[:, 2:3], q[:, 3:4]
    vx, vy, vz = v[:, 0:1], v[:, 1:2], v[:, 2:3]
    cross = np.concatenate([y * vz - z * vy, z * vx - x * vz, x * vy - y * vx], axis=1)
    return v * (2 * w * w - 1) - cross * (2 * w) + q[:, 1:] * (2 * (x * vx + y * vy + z * vz))


# ---- reward terms: each a function of the step's quantities `s`, batched ----
def track_lin_vel(s):
    err = np.sum((s["command"][:, :2] - s["lin_vel"][:, :2]) ** 2, axis=1)
    return np.exp(-err / 0.05)


def track_yaw_rate(s):
    return np.exp(-(s["command"][:, 2] - s["ang_vel"][:, 2]) ** 2 / 0.1)


def alive(s):
    return np.ones(len(s["command"]))


def upright(s):
    return np.sum(s["gravity"][:, :2] ** 2, axis=1)


def base_height(s):
    return (s["height"] - s["nominal_height"]) ** 2


def gait_contact(s):
    return np.sum(s["stance"] == s["contact"], axis=1) / 2.0


def foot_clearance(s):
    lift = np.clip(s["foot_height"] / s["clearance"], 0.0, 1.0)
    return np.sum(~s["stance"] * lift, axis=1) / 2.0


def action_rate(s):
    return np.sum((s["action"] - s["last_action"]) ** 2, axis=1)


def joint_deviation(s):
    # Keep the yaw and roll joints near default unless turning or side-stepping.
    return np.sum(s["joint_offset"][:, s["lateral_joints"]] ** 2, axis=1)


REWARDS = {f.__name__: f for f in (track_lin_vel, track_yaw_rate, alive, upright, base_height, gait_contact,
                                   foot_clearance, action_rate, joint_deviation)}


class HumanoidWalk:
    """Batched task core; sim/envs.py wraps it in the gymnasium Env and VectorEnv APIs."""
    measures_energy = True   # info["energy_j"]: Σ|τ·q̇| integrated at the physics rate (what ECO constrains)

    def __init__(self, cfg: HumanoidWalkConfig, num_envs: int = 1, nthread: int = 1):
        self.cfg = cfg
        self.robot = load_robot(cfg.robot)
        if not self.robot.foot_bodies:
            raise ValueError(f"task {cfg.name} needs a legged robot (foot_bodies in its YAML); "
                             f"'{self.robot.name}' has none ({self.robot.source})")
        if cfg.physics_hz is not None:
            ratio = cfg.physics_hz / self.robot.control_hz
            if abs(ratio - round(ratio)) > 1e-9 or ratio < 1:   # else each control step would be longer or shorter
                raise ValueError(f"task.physics_hz={cfg.physics_hz:g} must be a whole multiple of the robot's control "
                                 f"rate, {self.robot.control_hz:g} Hz")
            self.robot = dataclasses.replace(self.robot, physics_hz=float(cfg.physics_hz))
        r = self.robot
        mj = robot_spec_editable(r)
        add_floor(mj)
        for foot in r.foot_bodies:  # a sole site per foot for contact and clearance
            body = mj.body(foot)
            body.add_site(name=f"{foot}_sole", pos=[0.01, 0, -0.025], size=[0.065, 0.03, 0.012],
                          type=mujoco.mjtGeom.mjGEOM_BOX)
        for foot in r.foot_bodies:
            mj.add_sensor(name=f"{foot}_touch", type=mujoco.mjtSensor.mjSENS_TOUCH,
                          objtype=mujoco.mjtObj.mjOBJ_SITE, objname=f"{foot}_sole")
        for foot in r.foot_bodies:
            mj.add_sensor(name=f"{foot}_pos", type=mujoco.mjtSensor.mjSENS_FRAMEPOS,
                          objtype=mujoco.mjtObj.mjOBJ_SITE, objname=f"{foot}_sole")
        for name in r.joint_names:
            mj.add_sensor(name=f"{name}_tau", type=mujoco.mjtSensor.mjSENS_ACTUATORFRC,
                          objtype=mujoco.mjtObj.mjOBJ_ACTUATOR, objname=name)
        for name in r.joint_names:
            mj.add_sensor(name=f"{name}_dq", type=mujoco.mjtSensor.mjSENS_JOINTVEL,
                          objtype=mujoco.mjtObj.mjOBJ_JOINT, objname=name)
        self.model = mj.compile()
        m, n, nf = self.model, r.n_joints, len(r.foot_bodies)
        self.n_feet = nf
        self.qadr, self.dadr, self.act_ids = joint_indices(m, r)
        self.sensor_touch = slice(0, nf)
        self.sensor_foot_z = slice(nf + 2, 4 * nf, 3)  # z of each framepos triple
        self.sensor_tau = slice(4 * nf, 4 * nf + n)
        self.sensor_dq = slice(4 * nf + n, 4 * nf + 2 * n)
        self.dt = 1.0 / r.control_hz
        self.substeps = r.decimation
        self.episode_steps = int(round(cfg.episode_s * r.control_hz))
        self.layout = ObsLayout.make(dict(cfg.observation), n, cfg.history)
        self.obs_size = self.layout.size
        self.critic_obs_size = self.layout.frame_size + 9
        self.action_size = n
        self.action_low, self.action_high = -cfg.action_clip, cfg.action_clip
        self.lateral_joints = np.array([i for i, j in enumerate(r.joint_names) if "yaw" in j or "roll" in j])
        base = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, r.base_body)
        floor = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "floor")
        self.randomizer = Randomizer(cfg.randomization, m, self.act_ids, r.kp, r.kd, r.tau_max, base, floor)
        if cfg.randomization.obs_delay_steps[1] >= self.substeps:
            raise ValueError(f"randomization.obs_delay_steps {list(cfg.randomization.obs_delay_steps)}: at most "
                             f"{self.substeps - 1} (the physics steps in one control step, {r.physics_hz:g} Hz / "
                             f"{r.control_hz:g} Hz, less one)")
        self.sim = BatchedSim(m, num_envs, self.substeps, nthread)
        self.num_envs = num_envs
        self.init_qpos = self._standing_qpos()
        B = num_envs
        self.action = np.zeros((B, n))
        self.last_action = np.zeros((B, n))
        self.target = np.tile(r.q_default, (B, 1))
        self.command = np.zeros((B, 3))
        self.phase = np.zeros(B)
        self.delay = np.zeros(B, dtype=np.int64)
        self.dr_params = np.ones((B, 3))  # friction, mass scale, motor strength (privileged)
        self.steps = np.zeros(B, dtype=np.int64)
        self.episode_energy = np.zeros(B)
        self.history = np.zeros((B, cfg.history, self.layout.frame_size), dtype=np.float32)
        self.contact = np.zeros((B, nf), dtype=bool)
        self.foot_z = np.zeros((B, nf))
        self._ctrl = np.zeros((B, self.substeps, m.nu))
        self._substep_index = np.arange(self.substeps)[None, :, None]
        self.rng = np.random.default_rng()

    def _standing_qpos(self) -> np.ndarray:
        """Default pose with the soles just touching the floor."""
        m, d = self.model, mujoco.MjData(self.model)
        d.qpos[self.qadr] = self.robot.q_default
        mujoco.mj_kinematics(m, d)
        soles = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, f"{f}_sole") for f in self.robot.foot_bodies]
        lowest = min(d.site_xpos[s][2] for s in soles) - 0.012  # the site's half height
        qpos = d.qpos.copy()
        qpos[2] -= lowest - 0.001
        return qpos

    # ---- episode bookkeeping ----
    def seed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def reset(self, ids: np.ndarray) -> None:
        r, rng = self.robot, self.rng
        for i in ids:
            sample = self.randomizer.apply(self.sim.models[i], rng)
            self.dr_params[i] = (sample["friction"], sample["mass_scale"], sample["motor_strength"])
            self.delay[i] = sample["action_delay"]
            qpos = self.init_qpos.copy()
            qpos[self.qadr] += rng.uniform(-0.05, 0.05, r.n_joints)
            yaw = rng.uniform(-np.pi, np.pi)
            qpos[3:7] = [np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]
            sensors = self.sim.set_state(i, qpos, np.zeros(self.model.nv))
            self.contact[i] = sensors[self.sensor_touch] > 0
            self.foot_z[i] = sensors[self.sensor_foot_z]
        self._sample_commands(ids)
        self.phase[ids] = rng.uniform(0, 1, len(ids))
        self.action[ids] = 0.0
        self.last_action[ids] = 0.0
        self.target[ids] = r.q_default
        self.steps[ids] = 0
        self.episode_energy[ids] = 0.0
        frame = self._frame()[ids]
        self.history[ids] = frame[:, None, :]

    def _sample_commands(self, ids) -> None:
        c, u = self.cfg.command, self.rng.uniform
        k = len(ids)
        self.command[ids] = np.stack([u(*c.vx, k), u(*c.vy, k), u(*c.yaw_rate, k)], axis=1)

    # ---- observation ----
    def _robot_state(self, noisy: bool, lag: np.ndarray | None = None) -> RobotState:
        """What the policy sees; `lag` (physics steps, per env): the sensors' latency."""
        sim, r = self.sim, self.robot
        qpos, qvel = (sim.qpos, sim.qvel) if lag is None else sim.state_before(lag)
        q, dq = qpos[:, self.qadr], qvel[:, self.dadr]
        quat, gyro = qpos[:, 3:7], qvel[:, 3:6]   # free-joint angular velocity is in the body frame
        if noisy and self.cfg.randomization.obs_noise > 0:
            k, u = self.cfg.randomization.obs_noise, self.rng.uniform
            q = q + u(-0.01, 0.01, q.shape) * k
            dq = dq + u(-0.5, 0.5, dq.shape) * k
            gyro = gyro + u(-0.1, 0.1, gyro.shape) * k
        return RobotState(q=q, dq=dq, quat=quat, gyro=gyro, command=self.command, phase=self.phase,
                          last_action=self.action, q_default=r.q_default)

    def _frame(self, noisy: bool = True, lag: np.ndarray | None = None) -> np.ndarray:
        return self.layout.frame(self._robot_state(noisy, lag))

    def observe(self) -> tuple[np.ndarray, np.ndarray]:
        obs = self.history.reshape(self.num_envs, -1)
        clean = self._frame(noisy=False)
        lin_vel = quat_rotate_inverse(self.sim.qpos[:, 3:7], self.sim.qvel[:, :3])
        critic = np.concatenate([clean, lin_vel, self.sim.qpos[:, 2:3], self.contact, self.dr_params,
                                 ], axis=1).astype(np.float32)
        return obs.copy(), critic

    # ---- step ----
    def step(self, actions: np.ndarray):
        r, c, sim = self.robot, self.cfg, self.sim
        actions = np.clip(np.asarray(actions, dtype=np.float64).reshape(self.num_envs, -1),
                          -c.action_clip, c.action_clip)
        self.last_action[:] = self.action
        self.action[:] = actions
        new_target = r.q_default + c.action_scale * actions
        # Action delay: the previous target holds for the first `delay` physics steps.
        delayed = self._substep_index < self.delay[:, None, None]
        self._ctrl[:] = np.where(delayed, self.target[:, None, :], new_target[:, None, :])
        self.target[:] = new_target
        self._push()
        sim.step(self._ctrl)
        sd = sim.sensordata
        joint_power = np.abs(sd[:, :, self.sensor_tau] * sd[:, :, self.sensor_dq])   # (B, substeps, joints) W
        power = joint_power.sum(axis=2)  # (B, substeps) W
        energy = power.sum(axis=1) / r.physics_hz
        self.episode_energy += energy
        self.contact[:] = sd[:, -1, self.sensor_touch] > 0
        self.foot_z[:] = sd[:, -1, self.sensor_foot_z]
        self.phase[:] = (self.phase + self.dt / c.gait_period_s) % 1.0
        self.steps += 1
        resample = self.steps % max(1, int(round(c.command.resample_s / self.dt))) == 0
        if resample.any():
            self._sample_commands(np.flatnonzero(resample))

        reward, terms, gravity, lin_vel = self._reward()
        tilt = np.arccos(np.clip(-gravity[:, 2], -1.0, 1.0))
        terminated = ((sim.qpos[:, 2] < c.terminate_height) | (tilt > c.terminate_tilt)
                      | ~np.isfinite(sim.state).all(axis=1))
        lo, hi = c.randomization.obs_delay_steps
        lag = self.rng.integers(lo, hi + 1, self.num_envs) if hi > 0 else None
        self.history[:, :-1] = self.history[:, 1:]
        self.history[:, -1] = self._frame(lag=lag)
        info = {"power_w": power.mean(axis=1), "joint_power_w": joint_power.mean(axis=1), "energy_j": energy,
                "episode_energy_j": self.episode_energy.copy(),
                "vel_error": np.linalg.norm(self.command[:, :2] - lin_vel[:, :2], axis=1),
                "yaw_rate_error": np.abs(self.command[:, 2] - sim.qvel[:, 5]),
                **{f"reward/{k}": v * self.dt for k, v in terms.items()}}
        return reward, terminated, info

    def _reward(self):
        """The step's reward from the current state, contacts, gait phase, command and actions."""
        r, c, sim = self.robot, self.cfg, self.sim
        quat = sim.qpos[:, 3:7]
        gravity = projected_gravity(quat)
        lin_vel = quat_rotate_inverse(quat, sim.qvel[:, :3])
        q = sim.qpos[:, self.qadr]
        left_stance = self.phase < 0.5   # the clock's first half (sin >= 0): left foot down, right swings
        s = {"stance": np.stack([left_stance, ~left_stance], axis=1), "command": self.command, "lin_vel": lin_vel,
             "ang_vel": sim.qvel[:, 3:6], "gravity": gravity, "height": sim.qpos[:, 2],
             "nominal_height": c.nominal_height,
             "contact": self.contact, "foot_height": self.foot_z, "clearance": c.foot_clearance_m,
             "action": self.action, "last_action": self.last_action, "joint_offset": q - r.q_default,
             "lateral_joints": self.lateral_joints}
        terms = {name: w * REWARDS[name](s) for name, w in c.reward.items()}
        return sum(terms.values()) * self.dt, terms, gravity, lin_vel

    def score(self, qpos: np.ndarray, qvel: np.ndarray, actions: np.ndarray, phases: np.ndarray,
              command: np.ndarray) -> np.ndarray:
        """This task's per-step reward of a trajectory run outside it (on a robot, through the
        deploy graph): row t is the state reached after actions[t], with the gait clock at
        phases[t] (after its advance, as in step). Uses env 0 as scratch."""
        out = np.zeros(len(qpos))
        for t in range(len(qpos)):
            sensors = self.sim.set_state(0, qpos[t], qvel[t])
            self.contact[0] = sensors[self.sensor_touch] > 0
            self.foot_z[0] = sensors[self.sensor_foot_z]
            self.last_action[0] = actions[t - 1] if t else 0.0
            self.action[0], self.phase[0], self.command[0] = actions[t], phases[t], command
            out[t] = self._reward()[0][0]
        return out

    def _push(self) -> None:
        c = self.cfg.randomization
        if c.push_interval_s <= 0 or c.push_velocity <= 0:
            return
        every = max(1, int(round(c.push_interval_s / self.dt)))
        push = (self.steps % every == every - 1)
        if push.any():
            k = int(push.sum())
            self.sim.qvel[push, :2] += self.rng.uniform(-c.push_velocity, c.push_velocity, (k, 2))

    # ---- what the artifact needs to know about this task ----
    def manifest(self) -> dict:
        c = self.cfg
        return {"observation": self.layout.to_manifest(),
                "action": {"joint_names": list(self.robot.joint_names), "scale": c.action_scale,
                           "offset": self.robot.q_default.tolist(), "clip": c.action_clip, "type": "joint_position"},
                "task": {"name": c.name, "gait_period_s": c.gait_period_s, "control_hz": self.robot.control_hz}}
