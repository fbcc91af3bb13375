"""Scripted expert for arm_place (sim/tasks/arm_place.py): demonstrations and a yardstick.

Grasps like sim/experts.py's ArmLiftExpert (whose Jacobian IK step it reuses), then lifts
straight up to a carry height, moves over the target, lowers the cube onto it, opens, and backs
off upwards. Stateless: the phase follows from the geometry every step, so it recovers from a
slipped grasp without being told about resets.
"""
from __future__ import annotations

import mujoco
import numpy as np

from sim.experts import ArmLiftExpert


class ArmPlaceExpert(ArmLiftExpert):
    def __init__(self, task, noise: float = 0.0, seed: int | None = None, max_step_m: float = 0.02,
                 damping: float = 0.05, carry_height: float = 0.08):
        super().__init__(task, noise=noise, seed=seed, max_step_m=max_step_m, damping=damping)
        self.carry_height = carry_height   # cube bottom above the table while carrying, m

    def _act(self, i: int) -> np.ndarray:
        t, c = self.task, self.task.cfg
        d = t.sim.data_of(i)
        cube = d.qpos[t.cube_qadr:t.cube_qadr + 3].copy()
        tcp = d.site_xpos[self.site].copy()
        target = t.target_pos[i]
        half = c.cube.size / 2
        grasped = t.pad_contact[i].all()
        squeezing = grasped and t.target[i, t.gripper] < d.qpos[t.qadr[t.gripper]] - 0.005
        to_target = np.linalg.norm(target[:2] - cube[:2])
        grip = tcp - cube                       # keep the grasp offset while carrying
        width = d.qpos[t.qadr[t.gripper]] + d.qpos[t.mimic_qadr]
        if to_target < 0.5 * c.place_tolerance and cube[2] - half < (0.004 if squeezing else 0.01):
            close = False                       # down on the target: open, then back off upwards
            goal = tcp if width < c.cube.size + 0.01 else np.array([tcp[0], tcp[1], half + 0.15])
        elif squeezing:
            if to_target > 0.05 and cube[2] - half < 0.8 * self.carry_height:
                goal = np.array([cube[0], cube[1], half + self.carry_height]) + grip   # lift straight up first
            else:                               # over the target, coming down along a funnel
                z = half + min(self.carry_height, 4.0 * max(to_target - 0.003, 0.0))
                goal = np.array([target[0], target[1], z]) + grip
            close = True
        else:                                   # approach and grasp, as the lift expert does
            offset = cube - tcp
            goal = cube + [0.0, 0.0, min(0.1, 4.0 * np.linalg.norm(offset[:2]))]
            close = np.linalg.norm(offset) < 0.015
        return self._ik(i, d, goal, close)

    def _ik(self, i: int, d, goal: np.ndarray, close: bool) -> np.ndarray:
        """One damped-least-squares step of the tcp towards `goal` (pointing down, fingers across
        two cube faces), with a null-space pull to the default posture; as in ArmLiftExpert."""
        t, r = self.task, self.task.robot
        tcp = d.site_xpos[self.site].copy()
        w, x, y, z = d.qpos[t.cube_qadr + 3:t.cube_qadr + 7]
        cube_x = np.array([1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 0.0])
        R = d.site_xmat[self.site].reshape(3, 3)
        axis = cube_x / np.linalg.norm(cube_x)
        candidates = [axis, -axis, np.array([-axis[1], axis[0], 0.0]), np.array([axis[1], -axis[0], 0.0])]
        y_goal = max(candidates, key=lambda v: v @ R[:, 1])
        R_goal = np.column_stack([np.cross(y_goal, [0.0, 0.0, -1.0]), y_goal, [0.0, 0.0, -1.0]])
        rot_err = 0.5 * sum(np.cross(R[:, k], R_goal[:, k]) for k in range(3))
        pos_err = goal - tcp
        dist = np.linalg.norm(pos_err)
        if dist > self.max_step_m:
            pos_err *= self.max_step_m / dist
        mujoco.mj_jacSite(t.model, d, self._jacp, self._jacr, self.site)
        J = np.vstack([self._jacp, self._jacr])[:, self.arm_dofs]
        err = np.concatenate([pos_err, 0.5 * rot_err])
        dq = J.T @ np.linalg.solve(J @ J.T + self.damping ** 2 * np.eye(6), err)
        q = d.qpos[t.qadr[self.arm]]
        null = np.eye(len(dq)) - np.linalg.pinv(J) @ J
        dq += null @ (0.1 * (r.q_default[self.arm] - q))
        desired = t.target[i].copy()
        desired[self.arm] = q + dq
        desired[t.gripper] = r.q_lower[t.gripper] if close else r.q_upper[t.gripper]
        return (desired - t.target[i]) / t.scale
