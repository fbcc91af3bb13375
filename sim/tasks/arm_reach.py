"""arm_reach: move the tool over the cube that the instruction names, among cubes of other colours.

The language-conditioned task of VLA-RL (robotrl/algos/vla_rl.py; papers/vlarl.md): which cube
to reach is said only in words ("reach the green cube"), and where it is is shown only in the
camera image, so a policy must read both. One instruction per colour; each episode draws one
(uniformly, or by `instruction_weights`: the curriculum over instructions). Built on arm_lift
(sim/tasks/arm_lift.py): the same twin, action (joint-target deltas) and randomisation, with one
cube per colour placed apart on the table. Success: the tool centre point within
`reach_tolerance` of the point `reach_height` above the named cube's top, for `hold_s`. Sparse 0/1
success reward by default (it ends the episode); `reward_mode: dense` adds an approach term.

Observation terms beyond the joint terms:
- `camera_rgb`: the ray-cast image of `camera` (sim/camera.py), height x width x 3 in [0, 1];
- `instruction`: the instruction's word ids (the task manifest's `vocabulary`), padded with 0;
- `tcp_pos`, `target_pos` (the point to reach: what a state-based policy is told instead).
"""
from __future__ import annotations

import dataclasses
import math

import mujoco
import numpy as np

from real.observations import TERMS as ROBOT_TERMS
from real.observations import ObsLayout
from sim.camera import RayCamera
from sim.tasks import arm_lift
from sim.tasks.arm_place import CameraConfig

REACH_TERMS = {
    "joint_target": arm_lift.OBJECT_TERMS["joint_target"],
    "gripper_width": arm_lift.OBJECT_TERMS["gripper_width"],
    "tcp_pos": arm_lift.OBJECT_TERMS["tcp_pos"],
    "target_pos": "the point to reach (reach_height above the named cube's top), base frame, m",
    "camera_rgb": "ray-cast RGB image of task.camera (sim/camera.py), height x width x 3 row-major, in [0, 1]",
    "instruction": "the instruction's word ids in the manifest's vocabulary, padded with 0 to instruction_length",
}


def approach(s):
    return 1.0 - np.tanh(10.0 * s["tcp_to_target"])


REWARDS = {"approach": approach, "success": arm_lift.success}


@dataclasses.dataclass(kw_only=True)
class ArmReachConfig(arm_lift.TabletopConfig):
    colours: dict[str, list[float]]  # colour word -> RGB of its cube; one instruction per colour
    instruction: str                 # the template, with {colour}
    reach_height: float              # m above the named cube's top
    reach_tolerance: float           # m
    min_spacing: float               # between cube centres on the table, m
    camera: CameraConfig = dataclasses.field(default_factory=CameraConfig)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.reach_tolerance < math.inf:
            raise ValueError(f"task.reach_tolerance must be a finite number > 0, got {self.reach_tolerance}")
        for key in ("reach_height", "min_spacing"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ValueError(f"task.{key} must be a finite number >= 0, got {getattr(self, key)}")
        if not self.colours:
            raise ValueError("task.colours: name at least one colour (colour word: [r, g, b])")
        for colour, rgb in self.colours.items():
            if len(rgb) != 3 or not all(0 <= v <= 1 for v in rgb) or " " in colour:
                raise ValueError(f"task.colours.{colour}: a one-word name and [r, g, b] in [0, 1], got {list(rgb)}")
        if "{colour}" not in self.instruction:
            raise ValueError(f"task.instruction must contain {{colour}}, got {self.instruction!r}")
        if self.camera.width < 1 or self.camera.height < 1:
            raise ValueError(f"task.camera: width and height must be >= 1, "
                             f"got {self.camera.width}x{self.camera.height}")

    def known_terms(self) -> tuple[dict, dict]:
        return REWARDS, REACH_TERMS

    def instructions(self) -> list[str]:
        """One instruction per colour, in the config's order (an episode's instruction id indexes this)."""
        return [self.instruction.format(colour=c) for c in self.colours]

    def vocabulary(self) -> list[str]:
        """The words of every instruction; id 0 is padding."""
        return ["<pad>"] + sorted({w for text in self.instructions() for w in text.split()})

    def instruction_length(self) -> int:
        return max(len(text.split()) for text in self.instructions())


def cube_name(index: int) -> str:
    return "cube" if index == 0 else f"cube{index}"     # the first is arm_lift's cube


class ArmReach(arm_lift.ArmLift):
    def __init__(self, cfg: ArmReachConfig, num_envs: int = 1, nthread: int = 1):
        joint_terms = {k: v for k, v in cfg.observation.items() if k in ROBOT_TERMS and k != "target_pos"}
        lift_cfg = arm_lift.ArmLiftConfig(
            name=cfg.name, robot=cfg.robot, episode_s=cfg.episode_s, action_scale=cfg.action_scale,
            gripper_scale=cfg.gripper_scale, action_clip=cfg.action_clip, history=cfg.history,
            reward_mode=cfg.reward_mode, observation=joint_terms or {"joint_pos": 1.0}, reward={},
            cube=cfg.cube, lift_height=1.0, hold_s=cfg.hold_s, randomization=cfg.randomization,
            action_type=cfg.action_type)   # (lift_height: of arm_lift's lift term, not a term here)
        self.reach_cfg = cfg
        super().__init__(lift_cfg, num_envs=num_envs, nthread=nthread)
        self.cfg = cfg
        m = self.model
        self.cube_qadrs = np.array([m.joint(cube_name(k)).qposadr[0] for k in range(len(cfg.colours))])
        self.words = {w: i for i, w in enumerate(cfg.vocabulary())}
        self.instruction_ids = np.zeros((len(cfg.colours), cfg.instruction_length()), dtype=np.float32)
        for k, text in enumerate(cfg.instructions()):
            ids = [self.words[w] for w in text.split()]
            self.instruction_ids[k, :len(ids)] = ids
        self.instruction_weights = np.full(len(cfg.colours), 1.0 / len(cfg.colours))
        c = cfg.camera
        self.camera = RayCamera(m, c.lookat, c.distance, c.azimuth, c.elevation, c.width, c.height)
        self.goal = np.zeros(num_envs, dtype=np.int64)     # the named cube of each env
        self._images = None
        self.target_pos = np.zeros((num_envs, 3))
        terms = tuple(cfg.observation)
        sizes = tuple(self._term_size(t) for t in terms)
        self.layout = ObsLayout(terms, tuple(float(v) for v in cfg.observation.values()), sizes, cfg.history)
        self.obs_size = self.layout.size
        # privileged: arm_lift's (the first cube's velocity, pad contacts, randomisation) + the point to reach
        self.critic_obs_size = self.layout.frame_size + 6 + len(self.sensor_pads) + 3 + 3
        self.history = np.zeros((num_envs, cfg.history, self.layout.frame_size), dtype=np.float32)

    def _add_objects(self, mj: mujoco.MjSpec) -> None:
        for k, rgb in enumerate(self.reach_cfg.colours.values()):
            arm_lift.add_cube(mj, self.reach_cfg.cube, cube_name(k), rgba=(*rgb, 1.0))

    def _term_size(self, term: str) -> int:
        c = self.cfg
        if term == "camera_rgb":
            return c.camera.width * c.camera.height * 3
        if term == "instruction":
            return c.instruction_length()
        return ROBOT_TERMS[term].size(self.robot.n_joints)

    def set_instruction_weights(self, weights) -> None:
        """How often each instruction is drawn at a reset from now on (the curriculum's handle)."""
        w = np.asarray(weights, dtype=float)
        if w.shape != self.instruction_weights.shape or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"instruction weights: {len(self.instruction_weights)} non-negative numbers "
                             f"with a positive sum, got {w.tolist()}")
        self.instruction_weights = w / w.sum()

    def reset(self, ids: np.ndarray) -> None:
        c = self.cfg
        self._images = None
        super().reset(ids)          # robot, the first cube, randomisation (and a provisional history)
        for i in ids:
            qpos = self.sim.qpos[i].copy()
            placed = [qpos[self.cube_qadrs[0]:self.cube_qadrs[0] + 2]]
            for adr in self.cube_qadrs[1:]:
                for _ in range(100):   # rejection sampling; the last draw after 100 tries
                    pose = arm_lift.cube_pose(c.cube, self.rng)
                    if all(np.hypot(*(pose[:2] - xy)) >= c.min_spacing for xy in placed):
                        break
                qpos[adr:adr + 7] = pose
                placed.append(pose[:2])
            self._read_sensors(i, self.sim.set_state(i, qpos, np.zeros(self.model.nv)))
            self.goal[i] = self.rng.choice(len(c.colours), p=self.instruction_weights)
        self._images = None
        self._update_target()
        self.history[ids] = self._frame()[ids][:, None, :]

    def _update_target(self) -> None:
        adr = self.cube_qadrs[self.goal]
        cube = self.sim.qpos[np.arange(self.num_envs)[:, None], adr[:, None] + np.arange(3)]
        self.target_pos[:] = cube + [0.0, 0.0, self.cfg.cube.size / 2 + self.cfg.reach_height]

    def images(self) -> np.ndarray:
        """Every env's camera image, (num_envs, height, width, 3) uint8, cast once per state."""
        if self._images is None:
            self._images = np.stack([self.camera.image(self.sim.data_of(i)) for i in range(self.num_envs)])
        return self._images

    def _advance(self, actions: np.ndarray) -> dict:
        self._images = None
        return super()._advance(actions)

    def _quantities(self, noisy: bool) -> dict:
        s = super()._quantities(noisy)
        s["target_pos"] = self.target_pos
        if "camera_rgb" in self.layout.terms:   # not robot state: these come as they are (times their scale)
            s["camera_rgb"] = self.images().reshape(self.num_envs, -1) / 255.0
        if "instruction" in self.layout.terms:
            s["instruction"] = self.instruction_ids[self.goal]
        return s

    def observe(self) -> tuple[np.ndarray, np.ndarray]:
        obs, critic = super().observe()
        return obs, np.concatenate([critic, self.target_pos], axis=1).astype(np.float32)

    def _goal_held(self, s) -> np.ndarray:
        self._update_target()    # the named cube may have been pushed
        s["tcp_to_target"] = np.linalg.norm(s["tcp"] - self.target_pos, axis=1)
        return s["tcp_to_target"] <= self.cfg.reach_tolerance

    def _step_info(self, s) -> dict:
        return {"tcp_to_target": s["tcp_to_target"], "instruction_id": self.goal.astype(np.float64)}

    def _task_manifest(self) -> dict:
        c = self.cfg
        return {**self._tabletop_facts(), "instructions": c.instructions(), "vocabulary": c.vocabulary(),
                "camera": dataclasses.asdict(c.camera), "reach_height": c.reach_height,
                "reach_tolerance": c.reach_tolerance}
