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
