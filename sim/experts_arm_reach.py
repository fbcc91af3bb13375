"""Scripted expert for arm_reach (sim/tasks/arm_reach.py): demonstrations and a yardstick."""
from __future__ import annotations

import numpy as np

from sim.experts import ArmLiftExpert


class ArmReachExpert(ArmLiftExpert):
    """For sim/tasks/arm_reach.py: the tool straight to the point over the named cube (ArmLiftExpert's
    IK step, descending along its funnel so the fingers clear the other cubes), gripper open."""

    def _act(self, i: int) -> np.ndarray:
        d = self.task.sim.data_of(i)
        target = self.task.target_pos[i]
        offset = target - d.site_xpos[self.site]
        goal = target + [0.0, 0.0, min(0.05, 2.0 * np.linalg.norm(offset[:2]))]
        return self._ik(i, d, goal, close=False)
