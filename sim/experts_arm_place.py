"""Scripted expert for arm_place (sim/tasks/arm_place.py): demonstrations and a yardstick.

Grasps like sim/experts.py's ArmLiftExpert (and moves with its Jacobian IK step, `_ik`), then lifts
straight up to a carry height, moves over the target, lowers the cube onto it, opens, and backs
off upwards. Stateless: the phase follows from the geometry every step, so it recovers from a
slipped grasp without being told about resets.
"""
from __future__ import annotations

import numpy as np

from sim.experts import ArmLiftExpert


class ArmPlaceExpert(ArmLiftExpert):
    def __init__(self, task, noise: float = 0.0, seed: int | None = None, max_step_m: float = 0.02,
                 damping: float = 0.05, carry_height: float = 0.08, noise_steps: float = 0.0):
        super().__init__(task, noise=noise, seed=seed, max_step_m=max_step_m, damping=damping, noise_steps=noise_steps)
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
