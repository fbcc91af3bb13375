"""Observation terms, shared by the simulator and the robot so that neither re-types them.

A term is a small named function of the robot state; the observation is the terms in a fixed
order, each multiplied by its scale, stacked over `history` frames (oldest first). The layout
(names, sizes, scales, history) travels inside every artifact's manifest; the robot side builds
the exact vector the policy was trained on from it. Functions work on a single state or on a
batch (leading dimensions are kept). Quaternions are (w, x, y, z) everywhere inside robotrl;
`quat_from_xyzw` converts at the edge, once.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import numpy as np


@dataclasses.dataclass
class RobotState:
    """What one control tick knows. Arrays may carry a leading batch dimension."""
    q: np.ndarray              # joint positions, rad, robot config order
    dq: np.ndarray             # joint velocities, rad/s
    quat: np.ndarray           # base orientation, (w, x, y, z), world from base
    gyro: np.ndarray           # base angular velocity in the base frame, rad/s
    command: np.ndarray        # (vx, vy, yaw rate) in the heading frame
    phase: np.ndarray          # gait-clock phase in [0, 1)
    last_action: np.ndarray    # the previous policy action (before scaling)
    q_default: np.ndarray      # default pose (the action's offset)
    # Tabletop quantities (None where a robot has none); all in the robot base frame.
    joint_target: np.ndarray | None = None   # the joint targets in force (the integrated action)
    gripper_width: np.ndarray | None = None  # distance between the finger pads, m
    tcp: np.ndarray | None = None            # tool centre point, m
    object_pos: np.ndarray | None = None     # the manipulated object's centre, m (perception)
    object_quat: np.ndarray | None = None    # its orientation, (w, x, y, z)
    goal_pos: np.ndarray | None = None       # where the object should go, m (the operator's goal)


def quat_from_xyzw(q_xyzw: np.ndarray) -> np.ndarray:
    return np.concatenate([q_xyzw[..., 3:4], q_xyzw[..., :3]], axis=-1)


def projected_gravity(quat_wxyz: np.ndarray) -> np.ndarray:
    """World gravity direction (0, 0, -1) expressed in the base frame: R(q)^T g."""
    w, x, y, z = (quat_wxyz[..., i] for i in range(4))
    # third row of R(q), negated: R^T (0,0,-1) = -(R[2,0], R[2,1], R[2,2])
    gx = -2.0 * (x * z - w * y)
    gy = -2.0 * (y * z + w * x)
    gz = -(1.0 - 2.0 * (x * x + y * y))
    return np.stack([gx, gy, gz], axis=-1)


def _clock(s: RobotState) -> np.ndarray:
    angle = 2.0 * np.pi * np.asarray(s.phase)
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1)


class Term(NamedTuple):
    fn: Callable[[RobotState], np.ndarray]   # the term from a state
    size: Callable[[int], int]               # its size given the number of joints
    needs: frozenset[str] = frozenset()      # what a robot side must supply beyond the joint state:
    # "kinematics" (the manifest's chain), "gripper" (its width map), "object" (a perceived pose), "goal"


TERMS: dict[str, Term] = {
    "gait_clock": Term(_clock, lambda n: 2),
    "command": Term(lambda s: s.command, lambda n: 3),
    "joint_pos": Term(lambda s: s.q - s.q_default, lambda n: n),
    "joint_vel": Term(lambda s: s.dq, lambda n: n),
    "last_action": Term(lambda s: s.last_action, lambda n: n),
    "base_ang_vel": Term(lambda s: s.gyro, lambda n: 3),
    "projected_gravity": Term(lambda s: projected_gravity(s.quat), lambda n: 3),
    # tabletop terms (named after the cube the tasks train with)
    "joint_target": Term(lambda s: s.joint_target - s.q_default, lambda n: n),
    "gripper_width": Term(lambda s: np.asarray(s.gripper_width)[..., None], lambda n: 1, frozenset({"gripper"})),
    "tcp_pos": Term(lambda s: s.tcp, lambda n: 3, frozenset({"kinematics"})),
    "cube_pos": Term(lambda s: s.object_pos, lambda n: 3, frozenset({"object"})),
    "cube_quat": Term(lambda s: s.object_quat, lambda n: 4, frozenset({"object"})),
    "cube_to_tcp": Term(lambda s: s.tcp - s.object_pos, lambda n: 3, frozenset({"kinematics", "object"})),
    "target_pos": Term(lambda s: s.goal_pos, lambda n: 3, frozenset({"goal"})),
    "cube_to_target": Term(lambda s: s.goal_pos - s.object_pos, lambda n: 3, frozenset({"object", "goal"})),
}


@dataclasses.dataclass(frozen=True)
class ObsLayout:
    terms: tuple[str, ...]
    scales: tuple[float, ...]
    sizes: tuple[int, ...]
    history: int = 1

    @classmethod
    def make(cls, terms: dict[str, float], n_joints: int, history: int = 1) -> "ObsLayout":
        unknown = [t for t in terms if t not in TERMS]
        if unknown:
            raise ValueError(f"unknown observation term(s) {unknown}; available: {sorted(TERMS)}")
        if history < 1:
            raise ValueError(f"observation history must be >= 1, got {history}")
        return cls(tuple(terms), tuple(float(v) for v in terms.values()),
                   tuple(TERMS[t].size(n_joints) for t in terms), int(history))

    @property
    def frame_size(self) -> int:
        return sum(self.sizes)

    @property
    def size(self) -> int:
        return self.frame_size * self.history

    def frame(self, state: RobotState) -> np.ndarray:
        parts = [TERMS[t].fn(state) * k for t, k in zip(self.terms, self.scales)]
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def to_manifest(self) -> dict:
        return {"terms": [{"name": t, "size": n, "scale": k} for t, n, k in zip(self.terms, self.sizes, self.scales)],
                "history": self.history, "frame_size": self.frame_size, "size": self.size,
                "history_order": "oldest_first", "quaternion_order": "wxyz"}

    @classmethod
    def from_manifest(cls, m: dict) -> "ObsLayout":
        return cls(tuple(t["name"] for t in m["terms"]), tuple(float(t["scale"]) for t in m["terms"]),
                   tuple(int(t["size"]) for t in m["terms"]), int(m["history"]))


class ObservationBuilder:
    """Builds the stacked observation of one robot, tick by tick (robot side)."""

    def __init__(self, layout: ObsLayout):
        self.layout = layout
        self._frames = np.zeros((layout.history, layout.frame_size), dtype=np.float32)
        self._filled = False

    def reset(self) -> None:
        self._filled = False

    def __call__(self, state: RobotState) -> np.ndarray:
        frame = self.layout.frame(state)
        if not self._filled:  # a fresh history repeats the first frame, as the simulator does at reset
            self._frames[:] = frame
            self._filled = True
        else:
            self._frames[:-1] = self._frames[1:]
            self._frames[-1] = frame
        return self._frames.reshape(-1)
