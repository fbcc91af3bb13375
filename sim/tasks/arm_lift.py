"""arm_lift: grasp a cube on the table and lift it, with a 7-DoF arm and a parallel gripper.

A task is the robot's twin, a few named reward and observation functions, and one default
config (configs/task/arm_lift.yaml). Everything here is batched over environments.
`action_type: delta` (arm_lift's default): the action moves the joint targets,
target <- clip(target + scale * action, limits), which keeps a held pose at action 0.
`action_type: absolute` (arm_place's default): the action is the target itself, [-1, 1] spanning
each joint's range, as ACT-style chunk policies predict it; a residual on top of it corrects
the target rather than integrating into it. The default
reward is a sparse 0/1 success (cube lifted by `lift_height` and held in the gripper for
`hold_s`), which also ends the episode; `reward_mode: dense` adds reach/grasp/lift shaping.
"""
from __future__ import annotations

import dataclasses
import math

import mujoco
import numpy as np

from real.observations import TERMS as ROBOT_TERMS
from real.observations import ObsLayout, RobotState
from real.robot_spec import load_robot
from sim.batched import BatchedSim
from sim.randomization import Randomization, Randomizer
from sim.emulated_firmware import World
from sim.twin import add_floor, apply_joint_equalities, joint_indices, kinematic_chain, robot_spec_editable

REWARD_MODES = ("sparse", "dense")
ACTION_TYPES = ("delta", "absolute")


@dataclasses.dataclass
class CubeConfig:
    size: float            # edge length, m
    mass: float            # kg
    friction: float        # sliding friction of every cube contact (the cube's geom has priority)
    x: list[float]         # initial position range in the robot base frame, m
    y: list[float]
    yaw: list[float]       # rad


@dataclasses.dataclass
class TabletopConfig:
    """What every arm tabletop task's config has (arm_lift, arm_place, arm_reach); each task adds its
    own keys and names its reward and object observation terms in `known_terms`."""
    name: str
    robot: str
    episode_s: float
    action_scale: float
    gripper_scale: float
    action_clip: float
    history: int
    reward_mode: str
    observation: dict[str, float]
    reward: dict[str, float]
    cube: CubeConfig          # arm_reach: every cube
    hold_s: float             # the goal must hold this long to count as success
    randomization: Randomization
    action_type: str = "delta"   # delta: target += scale * action; absolute: target = mid + half_range * action

    def __post_init__(self):
        for key in ("episode_s", "action_scale", "gripper_scale", "action_clip"):
            if not 0 < getattr(self, key) < math.inf:   # NaN fails too
                raise ValueError(f"task.{key} must be a finite number > 0, got {getattr(self, key)}")
        if not 0 <= self.hold_s < math.inf:
            raise ValueError(f"task.hold_s must be >= 0, got {self.hold_s}")
        if self.history < 1:
            raise ValueError(f"task.history must be >= 1, got {self.history}")
        if self.action_type not in ACTION_TYPES:
            raise ValueError(f"task.action_type must be one of {list(ACTION_TYPES)}, got {self.action_type!r}")
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"task.reward_mode must be one of {list(REWARD_MODES)}, got {self.reward_mode!r}")
        rewards, object_terms = self.known_terms()
        unknown = sorted(set(self.reward) - set(rewards))
        if unknown:
            raise ValueError(f"task.reward: unknown term(s) {unknown}; available: {sorted(rewards)}")
        unknown = sorted(set(self.observation) - set(JOINT_TERMS) - set(object_terms))
        if unknown:
            raise ValueError(f"task.observation: unknown term(s) {unknown}; "
                             f"available: {sorted(JOINT_TERMS + tuple(object_terms))}")
        for key in ("size", "mass", "friction"):
            if getattr(self.cube, key) <= 0:
                raise ValueError(f"task.cube.{key} must be > 0, got {getattr(self.cube, key)}")
        for key in ("x", "y", "yaw"):
            lo_hi = getattr(self.cube, key)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ValueError(f"task.cube.{key} must be [low, high] with low <= high, got {list(lo_hi)}")

    def known_terms(self) -> tuple[dict, dict]:
        """This task's reward terms and object observation terms."""
        raise NotImplementedError


@dataclasses.dataclass(kw_only=True)
class ArmLiftConfig(TabletopConfig):
    lift_height: float

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.lift_height < math.inf:
            raise ValueError(f"task.lift_height must be a finite number > 0, got {self.lift_height}")

    def known_terms(self) -> tuple[dict, dict]:
        """This task's reward terms and object observation terms (a task built on this one adds its own)."""
        return REWARDS, OBJECT_TERMS


def add_cube(mj: mujoco.MjSpec, c: CubeConfig, name: str = "cube", rgba=(0.85, 0.25, 0.2, 1.0)) -> None:
    """The task's cube, a free body named "cube" (also in the emulated firmware's world, `cube_world`)."""
    cube = mj.worldbody.add_body(name=name)
    cube.add_freejoint(name=name)
    # priority: the cube's friction governs its contacts with the table and the fingers alike,
    # so one number (randomised per episode) sets how hard it is to slide and to hold.
    cube.add_geom(name=name, type=mujoco.mjtGeom.mjGEOM_BOX, size=[c.size / 2] * 3, mass=c.mass,
                  friction=[c.friction, 0.01, 0.001], condim=4, priority=1, contype=1, conaffinity=3,
                  rgba=list(rgba))


def cube_pose(c: CubeConfig, rng: np.random.Generator) -> np.ndarray:
    """A cube placement as the task draws it: resting on the table, (x, y, z, quaternion w first)."""
    x, y = rng.uniform(*c.x), rng.uniform(*c.y)
    yaw = rng.uniform(*c.yaw)
    return np.array([x, y, c.size / 2, np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def cube_world(c: CubeConfig, pose: np.ndarray, goal: np.ndarray | None = None) -> World:
    """The emulated firmware's world for a cube task: the cube, placed at `pose`, is what perception reports."""
    def place(model: mujoco.MjModel, data: mujoco.MjData) -> None:
        adr = model.joint("cube").qposadr[0]
        data.qpos[adr:adr + 7] = pose
    return World(add=lambda mj: add_cube(mj, c), place=place, tracked_body="cube", goal=goal)


def world(cfg: ArmLiftConfig, rng: np.random.Generator) -> World:
    return cube_world(cfg.cube, cube_pose(cfg.cube, rng))


# ---- observation terms ----
# The arm has no floating base, so of the robot terms in real/observations.py only these apply.
JOINT_TERMS = ("joint_pos", "joint_vel", "last_action")
# The task's terms: name -> meaning (it travels in the manifest). Their functions are the tabletop
# terms of real/observations.py, so the robot side builds them the same way: from its joint
# targets, the gripper joint, forward kinematics (the manifest's `kinematics`) and perception.
OBJECT_TERMS = {
    "joint_target": "joint target (integrated action) - q_default",
    "gripper_width": "distance between the finger pads, m",
    "tcp_pos": "tool centre point in the base frame, m",
    "cube_pos": "cube centre in the base frame, m",
    "cube_quat": "cube orientation in the base frame, (w, x, y, z)",
    "cube_to_tcp": "tcp_pos - cube_pos, m",
}


# ---- reward terms (dense mode): each a function of the step's quantities `s`, batched ----
def reach(s):
    return 1.0 - np.tanh(10.0 * np.linalg.norm(s["tcp"] - s["cube_pos"], axis=1))


def grasp(s):
    return s["grasped"].astype(np.float64)


def lift(s):
    return s["grasped"] * np.clip(s["cube_height"] / s["lift_height"], 0.0, 1.0)


def success(s):
    return s["success"].astype(np.float64)


REWARDS = {f.__name__: f for f in (reach, grasp, lift, success)}


class ArmLift:
    """Batched task core; sim/envs.py wraps it in the gymnasium Env and VectorEnv APIs."""

    def __init__(self, cfg: ArmLiftConfig, num_envs: int = 1, nthread: int = 1):
        self.cfg = cfg
        self.robot = load_robot(cfg.robot)
        r = self.robot
        for key in ("ee_site", "gripper_joint", "finger_pads"):
            if key not in r.extra:
                raise ValueError(f"task arm_lift: robot '{r.name}' ({r.source}) needs '{key}'")
        mj = robot_spec_editable(r)
        add_floor(mj)  # the table top, at the robot base's height (z = 0)
        self._add_objects(mj)
        mj.add_sensor(name="tcp_pos", type=mujoco.mjtSensor.mjSENS_FRAMEPOS, objtype=mujoco.mjtObj.mjOBJ_SITE,
                      objname=r.extra["ee_site"])
        for pad in r.extra["finger_pads"]:  # number of contacts between each finger pad and the cube
            mj.add_sensor(name=f"{pad}_cube", type=mujoco.mjtSensor.mjSENS_CONTACT, objtype=mujoco.mjtObj.mjOBJ_GEOM,
                          objname=pad, reftype=mujoco.mjtObj.mjOBJ_GEOM, refname="cube", intprm=[1, 1, 1])
        self.model = m = mj.compile()
        n = r.n_joints
        self.qadr, self.dadr, self.act_ids = joint_indices(m, r)
        self.sensor_tcp = slice(m.sensor("tcp_pos").adr[0], m.sensor("tcp_pos").adr[0] + 3)
        self.sensor_pads = [m.sensor(f"{pad}_cube").adr[0] for pad in r.extra["finger_pads"]]
        self.gripper = r.joint_names.index(r.extra["gripper_joint"])
        self.mimic_qadr = self._mimic_qadr(m, self.qadr[self.gripper])
        cube_joint = m.joint("cube")
        self.cube_qadr, self.cube_dadr = cube_joint.qposadr[0], cube_joint.dofadr[0]
        self.dt = 1.0 / r.control_hz
        self.substeps = r.decimation
        self.episode_steps = int(round(cfg.episode_s * r.control_hz))
        self.hold_steps = max(1, int(round(cfg.hold_s * r.control_hz)))
        self.lift_height = cfg.lift_height   # what the dense `lift` term reads (also in tasks built on this one)
        terms = tuple(cfg.observation)
        sizes = tuple(ROBOT_TERMS[t].size(n) for t in terms)
        self.layout = ObsLayout(terms, tuple(float(v) for v in cfg.observation.values()), sizes, cfg.history)
        self.obs_size = self.layout.size
        # privileged: + cube velocity (6), pad contacts, randomisation sample (3)
        self.critic_obs_size = self.layout.frame_size + 6 + len(self.sensor_pads) + 3
        self.action_size = n
        self.action_low, self.action_high = -cfg.action_clip, cfg.action_clip
        self.absolute = cfg.action_type == "absolute"
        if self.absolute:   # [-1, 1] spans each joint's range
            self.offset = (r.q_upper + r.q_lower) / 2
            self.scale = (r.q_upper - r.q_lower) / 2
        else:
            self.offset = np.zeros(n)
            self.scale = np.full(n, cfg.action_scale)
            self.scale[self.gripper] = cfg.gripper_scale
        # Randomization's "floor" friction and base CoM offset act on the cube, the object that matters here.
        cube_body, cube_geom = m.body("cube").id, m.geom("cube").id
        self.randomizer = Randomizer(cfg.randomization, m, self.act_ids, r.kp, r.kd, r.tau_max, cube_body, cube_geom)
        if any(cfg.randomization.obs_delay_steps):
            raise ValueError(f"randomization.obs_delay_steps is not modelled by {cfg.name} (humanoid_walk has it); "
                             "leave it [0, 0]")
        self.sim = BatchedSim(m, num_envs, self.substeps, nthread)
        self.num_envs = B = num_envs
        self.action = np.zeros((B, n))
        self.target = np.tile(r.q_default, (B, 1))
        self.delay = np.zeros(B, dtype=np.int64)
        self.dr_params = np.ones((B, 3))  # friction, mass scale, motor strength (privileged)
        self.steps = np.zeros(B, dtype=np.int64)
        self.held = np.zeros(B, dtype=np.int64)  # consecutive control steps lifted and grasped
        self.tcp = np.zeros((B, 3))
        self.pad_contact = np.zeros((B, len(self.sensor_pads)), dtype=bool)
        self.history = np.zeros((B, cfg.history, self.layout.frame_size), dtype=np.float32)
        self._ctrl = np.zeros((B, self.substeps, m.nu))
        self._substep_index = np.arange(self.substeps)[None, :, None]
        self.rng = np.random.default_rng()

    def _add_objects(self, mj: mujoco.MjSpec) -> None:
        """The task's objects on the table (a task built on this one adds its own)."""
        add_cube(mj, self.cfg.cube)

    @staticmethod
    def _mimic_qadr(m: mujoco.MjModel, gripper_qadr: int) -> int:
        """qpos address of the finger that the MJCF's joint equality couples to the driven one."""
        return int(m.jnt_qposadr[m.eq_obj1id[ArmLift._mimic_equality(m, gripper_qadr)]])

    @staticmethod
    def _mimic_equality(m: mujoco.MjModel, gripper_qadr: int) -> int:
        for e in range(m.neq):
            if m.eq_type[e] == mujoco.mjtEq.mjEQ_JOINT and m.jnt_qposadr[m.eq_obj2id[e]] == gripper_qadr:
                return e
        raise ValueError("arm_lift: the MJCF needs a joint equality coupling a second finger to the gripper joint")

    def gripper_width_map(self) -> dict:
        """width = offset + per_position * q_gripper: the robot measures one finger, the second one
        follows it by the MJCF's joint equality (mimic - mimic0 = c0 + c1 (q - q0))."""
        m, qadr = self.model, self.qadr[self.gripper]
        c = m.eq_data[self._mimic_equality(m, qadr)][:5]
        if np.any(c[2:] != 0):
            raise ValueError("arm_lift: the gripper's joint equality must be linear (polycoef a2..a4 = 0)")
        q0, mimic0 = m.qpos0[qadr], m.qpos0[self.mimic_qadr]
        return {"joint": self.robot.extra["gripper_joint"], "offset": float(mimic0 + c[0] - c[1] * q0),
                "per_position": float(1.0 + c[1])}

    def _read_sensors(self, ids, sensordata: np.ndarray) -> None:
        self.tcp[ids] = sensordata[..., self.sensor_tcp]
        self.pad_contact[ids] = sensordata[..., self.sensor_pads] > 0

    # ---- episode bookkeeping ----
    def seed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def reset(self, ids: np.ndarray) -> None:
        r, c, rng = self.robot, self.cfg.cube, self.rng
        for i in ids:
            sample = self.randomizer.apply(self.sim.models[i], rng)
            self.dr_params[i] = (sample["friction"], sample["mass_scale"], sample["motor_strength"])
            self.delay[i] = sample["action_delay"]
            q = r.q_default.copy()
            arm = np.arange(r.n_joints) != self.gripper
            q[arm] += rng.uniform(-0.05, 0.05, arm.sum())
            qpos = self.model.qpos0.copy()
            qpos[self.qadr] = q
            apply_joint_equalities(self.model, qpos)   # the second finger level with the driven one
            qpos[self.cube_qadr:self.cube_qadr + 7] = cube_pose(c, rng)
            self._read_sensors(i, self.sim.set_state(i, qpos, np.zeros(self.model.nv)))
            self.target[i] = q
        self.action[ids] = 0.0
        self.steps[ids] = 0
        self.held[ids] = 0
        self.history[ids] = self._frame()[ids][:, None, :]

    # ---- observation ----
    def _quantities(self, noisy: bool) -> dict:
        """What the observation and reward terms read, batched."""
        sim, r = self.sim, self.robot
        q, dq = sim.qpos[:, self.qadr], sim.qvel[:, self.dadr]
        cube_pos = sim.qpos[:, self.cube_qadr:self.cube_qadr + 3]
        if noisy and self.cfg.randomization.obs_noise > 0:
            k, u = self.cfg.randomization.obs_noise, self.rng.uniform
            q = q + u(-0.002, 0.002, q.shape) * k
            dq = dq + u(-0.05, 0.05, dq.shape) * k
            cube_pos = cube_pos + u(-0.005, 0.005, cube_pos.shape) * k  # perception error
        return {"q": q, "dq": dq, "q_default": r.q_default, "target": self.target,
                "width": sim.qpos[:, self.qadr[self.gripper]] + sim.qpos[:, self.mimic_qadr],
                "tcp": self.tcp, "cube_pos": cube_pos,
                "cube_quat": sim.qpos[:, self.cube_qadr + 3:self.cube_qadr + 7]}

    def _frame(self, noisy: bool = True) -> np.ndarray:
        s = self._quantities(noisy)
        state = RobotState(q=s["q"], dq=s["dq"], quat=None, gyro=None, command=None, phase=None,
                           last_action=self.action, q_default=self.robot.q_default, joint_target=s["target"],
                           gripper_width=s["width"], tcp=s["tcp"], object_pos=s["cube_pos"],
                           object_quat=s["cube_quat"], goal_pos=s.get("target_pos"))
        # camera terms are not robot state: they come as they are from the quantities
        parts = [(ROBOT_TERMS[t].fn(state) if t in ROBOT_TERMS else s[t]) * k
                 for t, k in zip(self.layout.terms, self.layout.scales)]
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def observe(self) -> tuple[np.ndarray, np.ndarray]:
        obs = self.history.reshape(self.num_envs, -1)
        cube_vel = self.sim.qvel[:, self.cube_dadr:self.cube_dadr + 6]
        critic = np.concatenate([self._frame(noisy=False), cube_vel, self.pad_contact, self.dr_params],
                                axis=1).astype(np.float32)
        return obs.copy(), critic

    # ---- step ----
    def _advance(self, actions: np.ndarray) -> dict:
        """Move the joint targets, step one control period, and return the step's quantities
        (shared by every tabletop task built on this one)."""
        r, c, sim = self.robot, self.cfg, self.sim
        actions = np.clip(np.asarray(actions, dtype=np.float64).reshape(self.num_envs, -1),
                          -c.action_clip, c.action_clip)
        self.action[:] = actions
        base = self.offset if self.absolute else self.target
        new_target = np.clip(base + self.scale * actions, r.q_lower, r.q_upper)
        # Action delay: the previous target holds for the first `delay` physics steps.
        delayed = self._substep_index < self.delay[:, None, None]
        self._ctrl[:] = np.where(delayed, self.target[:, None, :], new_target[:, None, :])
        self.target[:] = new_target
        sim.step(self._ctrl)
        self._read_sensors(slice(None), sim.sensordata[:, -1])
        self.steps += 1
        s = self._quantities(noisy=False)
        s["cube_height"] = s["cube_pos"][:, 2] - c.cube.size / 2
        s["lift_height"] = self.lift_height
        s["grasped"] = self.pad_contact.all(axis=1)
        return s

    def action_for(self, i: int, target: np.ndarray) -> np.ndarray:
        """The action of env i that sets these joint targets (what a scripted expert returns)."""
        return (target - (self.offset if self.absolute else self.target[i])) / self.scale

    def step(self, actions: np.ndarray):
        c, sim = self.cfg, self.sim
        s = self._advance(actions)
        self.held = np.where(self._goal_held(s), self.held + 1, 0)
        s["success"] = self.held >= self.hold_steps
        if c.reward_mode == "sparse":
            terms = {}
            reward = s["success"].astype(np.float64)
        else:
            rewards = c.known_terms()[0]
            terms = {name: w * rewards[name](s) for name, w in c.reward.items()}
            reward = sum(terms.values())
        terminated = s["success"] | ~np.isfinite(sim.state).all(axis=1)
        self.history[:, :-1] = self.history[:, 1:]
        self.history[:, -1] = self._frame()
        info = {"success": s["success"].astype(np.float64), "cube_height": s["cube_height"],
                "grasped": s["grasped"].astype(np.float64), **self._step_info(s),
                **{f"reward/{k}": v for k, v in terms.items()}}
        return reward, terminated, info

    def _goal_held(self, s) -> np.ndarray:
        """Where the goal holds this step (success once it has held for hold_s)."""
        return s["grasped"] & (s["cube_height"] >= self.cfg.lift_height)

    def _step_info(self, s) -> dict:
        return {"tcp_to_cube": np.linalg.norm(s["tcp"] - s["cube_pos"], axis=1)}

    # ---- what the artifact needs to know about this task ----
    def manifest(self) -> dict:
        c, r = self.cfg, self.robot
        if self.absolute:
            action_type, target = "joint_position", "clip(offset + scale * action, q_lower, q_upper)"
        else:
            action_type = "joint_position_delta"
            target = ("clip(previous_target + scale * action, q_lower, q_upper); "
                      "the first target is the measured joint position")
        return {"observation": self.layout.to_manifest(),
                "kinematics": kinematic_chain(self.model, r.base_body, r.extra["ee_site"]),
                "action": {"joint_names": list(r.joint_names), "scale": self.scale.tolist(),
                           "offset": self.offset.tolist(), "clip": c.action_clip, "type": action_type,
                           "target": target},
                "task": self._task_manifest()}

    def _task_manifest(self) -> dict:
        return {**self._tabletop_facts(), "lift_height": self.cfg.lift_height}

    def _tabletop_facts(self) -> dict:
        """What every tabletop task (TabletopConfig) puts in the manifest's `task`; each adds its own."""
        c, r = self.cfg, self.robot
        object_terms = c.known_terms()[1]
        return {"name": c.name, "control_hz": r.control_hz, "reward_mode": c.reward_mode, "hold_s": c.hold_s,
                "cube_size": c.cube.size, "ee_site": r.extra["ee_site"], "gripper_width": self.gripper_width_map(),
                "object_terms": {t: object_terms[t] for t in self.layout.terms if t in object_terms}}
