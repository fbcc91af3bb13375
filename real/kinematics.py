"""Forward kinematics of a fixed-base arm, from the chain its artifact carries.

The robot side needs the tool centre point (the `tcp_pos` observation term) without MuJoCo. The
exporter writes the chain from the robot's base body down to the tool site out of the compiled
twin (sim/twin.py, `kinematic_chain`) into the manifest's `kinematics`, and this file replays it
as MuJoCo's mj_kinematics does: per body its offset (pos, quat) from its parent, then per joint a
turn about its axis through its anchor (hinge) or a shift along its axis (slide), by the joint
value minus its reference. So the robot computes what the simulator computed, to rounding.
Quaternions are (w, x, y, z).
"""
from __future__ import annotations

import numpy as np


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw])


def quat_rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    w, u = q[0], q[1:]
    return v + 2.0 * np.cross(u, np.cross(u, v) + w * v)


class KinematicChain:
    def __init__(self, kinematics: dict, joint_names: tuple[str, ...] | list[str]):
        """kinematics: the manifest's `kinematics`; joint_names: the robot's joints in order (the
        chain's joints are looked up in it). Raises ValueError naming what does not fit."""
        names = list(joint_names)
        self.bodies = []
        for body in kinematics["bodies"]:
            joints = []
            for j in body["joints"]:
                if j["name"] not in names:
                    raise ValueError(f"kinematics: joint '{j['name']}' of body '{body['body']}' is not a robot joint "
                                     f"(robot joints: {names})")
                if j["type"] not in ("hinge", "slide"):
                    raise ValueError(f"kinematics: joint '{j['name']}' has type '{j['type']}'; "
                                     "allowed: hinge, slide")
                axis = np.asarray(j["axis"], dtype=np.float64)
                joints.append((names.index(j["name"]), j["type"] == "hinge", axis / np.linalg.norm(axis),
                               np.asarray(j["anchor"], dtype=np.float64), float(j["ref"])))
            self.bodies.append((np.asarray(body["pos"], dtype=np.float64),
                                np.asarray(body["quat"], dtype=np.float64), joints))
        self.site_pos = np.asarray(kinematics["site_pos"], dtype=np.float64)

    def site_position(self, q: np.ndarray) -> np.ndarray:
        """The site (tool centre point) in the base body's frame, m, at joint positions q (robot order)."""
        pos, quat = np.zeros(3), np.array([1.0, 0.0, 0.0, 0.0])
        for offset, turn, joints in self.bodies:
            pos = pos + quat_rotate(quat, offset)
            quat = quat_mul(quat, turn)
            for index, hinge, axis, anchor, ref in joints:
                angle = q[index] - ref
                if hinge:
                    anchor_world = pos + quat_rotate(quat, anchor)
                    quat = quat_mul(quat, np.concatenate([[np.cos(angle / 2)], np.sin(angle / 2) * axis]))
                    pos = anchor_world - quat_rotate(quat, anchor)
                else:
                    pos = pos + quat_rotate(quat, axis) * angle
        return pos + quat_rotate(quat, self.site_pos)


class FixedFrames:
    """Frames fixed to the robot's base (a mounted camera, a marker on the table), each with its
    pose in the base frame, as an extrinsic calibration gives it: `to_base` turns a position (and
    orientation) given in one of them into the base frame. The base frame itself is one of them.
    Where a full ROS 2 install runs tf2, this is the static part of its tree without tf2."""

    def __init__(self, base: str, poses: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        self.base = base
        self.poses = {base: (np.zeros(3), np.array([1.0, 0.0, 0.0, 0.0])), **(poses or {})}

    @classmethod
    def parse(cls, base: str, text: str) -> "FixedFrames":
        """text: entries 'name x y z qw qx qy qz' (metres; a unit quaternion, w first) separated
        by ';'. Raises ValueError naming the entry that does not fit."""
        poses = {}
        for entry in filter(None, (e.strip() for e in text.split(";"))):
            name, *values = entry.split()
            try:
                numbers = np.array([float(v) for v in values])
            except ValueError:
                numbers = np.array([])
            if len(numbers) != 7 or not np.all(np.isfinite(numbers)):
                raise ValueError(f"fixed frame '{entry}': expected 'name x y z qw qx qy qz' (7 numbers after the name)")
            if abs(np.linalg.norm(numbers[3:]) - 1.0) > 1e-3:
                raise ValueError(f"fixed frame '{name}': quaternion {numbers[3:].tolist()} is not of unit length")
            if name in poses or name == base:
                raise ValueError(f"fixed frame '{name}' given twice (or it is the base frame '{base}')")
            poses[name] = (numbers[:3], numbers[3:] / np.linalg.norm(numbers[3:]))
        return cls(base, poses)

    def to_base(self, frame: str, pos, quat=None) -> tuple[np.ndarray, np.ndarray | None]:
        """(position, orientation or None) in the base frame; KeyError for a frame not known here."""
        origin, turn = self.poses[frame]
        pos = origin + quat_rotate(turn, np.asarray(pos, dtype=np.float64))
        return pos, None if quat is None else quat_mul(turn, np.asarray(quat, dtype=np.float64))
