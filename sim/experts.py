"""Scripted experts: demonstrations for behaviour cloning, and a yardstick for the tasks.

An expert reads the simulator's true state (not the observation) and returns one batch of
actions in the task's own action space, so its rollouts are valid demonstrations.
"""
from __future__ import annotations

import mujoco
import numpy as np


class ArmLiftExpert:
    """Approach above the cube -> descend -> close -> lift, for sim/tasks/arm_lift.py.

    Each step picks the phase from the geometry, so it recovers by itself when a grasp slips.
    Only the play options keep state per env (the aim offset, the empty lift, correlated noise),
    renewed when the task's step counter shows a new episode. A Cartesian goal for the tool centre point
    (position, and orientation pointing down with the fingers across two cube faces) is turned
    into joint targets by one damped-least-squares step on MuJoCo's site Jacobian.
    """

    def __init__(self, task, noise: float = 0.0, seed: int | None = None, max_step_m: float = 0.02,
                 damping: float = 0.05, aim: float = 0.0, noise_steps: float = 0.0):
        self.task = task
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        # noise_steps > 0: the noise is correlated over about that many control steps (an Ornstein-
        # Uhlenbeck process of the same std), so an episode drifts off the expert's path and back, as
        # play does; independent noise averages out within a few steps.
        self.noise_steps = noise_steps
        self.noise_state = np.zeros((task.num_envs, task.action_size))
        # Play data: each episode grasps at the cube plus an offset ~ N(0, aim²) in x and y (drawn when
        # the episode starts), so it holds grasps that miss by a little, as a learner's do.
        self.aim = aim
        self.aim_offset = np.zeros((task.num_envs, 3))
        # ... and when such a grasp closes on nothing, it lifts anyway for `empty_lift_steps` before
        # reopening to try again, as a person playing does: without it no play episode shows a
        # gripper rising empty, and a world model learns that a closed gripper rising carries the cube.
        self.empty_lift_steps = 25
        self.empty_lift = np.zeros(task.num_envs, dtype=int)
        self.max_step_m = max_step_m      # Cartesian distance asked for per control step
        self.damping = damping
        m, r = task.model, task.robot
        self.site = m.site(r.extra["ee_site"]).id
        self.arm = np.arange(r.n_joints) != task.gripper
        self.arm_dofs = task.dadr[self.arm]
        self._jacp = np.zeros((3, m.nv))
        self._jacr = np.zeros((3, m.nv))

    def __call__(self) -> np.ndarray:
        t = self.task
        new = np.flatnonzero(t.steps == 0)
        if self.aim > 0:
            self.aim_offset[new, :2] = self.rng.normal(0.0, self.aim, (len(new), 2))
            self.empty_lift[new] = 0
        actions = np.stack([self._act(i) for i in range(t.num_envs)])
        self.clean = np.clip(actions, t.action_low, t.action_high)   # this step's action before the noise
        if self.noise > 0:
            noise = self.rng.normal(0.0, self.noise, actions.shape)
            if self.noise_steps > 0:
                rho = np.exp(-1.0 / self.noise_steps)
                self.noise_state = rho * self.noise_state + np.sqrt(1 - rho * rho) * noise
                self.noise_state[new] = noise[new]     # each episode starts from a stationary draw
                noise = self.noise_state
            actions += noise
        return np.clip(actions, t.action_low, t.action_high)

    def _act(self, i: int) -> np.ndarray:
        t, c = self.task, self.task.cfg
        d = t.sim.data_of(i)
        cube = d.qpos[t.cube_qadr:t.cube_qadr + 3].copy()
        tcp = d.site_xpos[self.site].copy()
        grasped = t.pad_contact[i].all()
        cube = cube + (0.0 if grasped else self.aim_offset[i])
        offset = cube - tcp
        gripper_target = t.target[i, t.gripper]
        squeezing = grasped and gripper_target < d.qpos[t.qadr[t.gripper]] - 0.005
        if self.aim > 0 and not grasped:
            shut = t.robot.q_lower[t.gripper] + 0.002
            closed_on_nothing = gripper_target <= shut and d.qpos[t.qadr[t.gripper]] <= shut
            if closed_on_nothing and self.empty_lift[i] == 0:
                self.empty_lift[i] = self.empty_lift_steps
            if self.empty_lift[i] > 0:    # lift the empty gripper, then reopen (close=False) and retry
                self.empty_lift[i] -= 1
                tcp_goal = np.array([tcp[0], tcp[1], c.cube.size / 2 + c.lift_height + 0.05])
                return self._ik(i, d, tcp_goal, self.empty_lift[i] > 0)
        if squeezing:            # lift
            goal = np.array([cube[0], cube[1], c.cube.size / 2 + c.lift_height + 0.05])
        else:                    # come down onto the cube along a funnel: higher while off to the side
            goal = cube + [0.0, 0.0, min(0.1, 4.0 * np.linalg.norm(offset[:2]))]
        close = squeezing or np.linalg.norm(offset) < 0.015

        return self._ik(i, d, goal, close)

    def _ik(self, i: int, d, goal: np.ndarray, close: bool) -> np.ndarray:
        """One damped-least-squares step of the tcp towards `goal`, pointing down with the fingers
        across two cube faces, with a null-space pull to the default posture; gripper closed or open."""
        t, r = self.task, self.task.robot
        tcp = d.site_xpos[self.site].copy()
        # Orientation goal: tcp z down, finger axis (tcp y) along the cube face normal nearest to it.
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
        # Null-space pull towards the default posture keeps the redundant elbow out of trouble.
        q = d.qpos[t.qadr[self.arm]]
        null = np.eye(len(dq)) - np.linalg.pinv(J) @ J
        dq += null @ (0.1 * (r.q_default[self.arm] - q))

        desired = t.target[i].copy()
        desired[self.arm] = q + dq
        desired[t.gripper] = r.q_lower[t.gripper] if close else r.q_upper[t.gripper]
        return t.action_for(i, desired)
