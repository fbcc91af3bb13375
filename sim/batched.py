"""N copies of one MuJoCo model stepped together in C, across threads, by mujoco.rollout.

The task never loops over physics substeps in Python: one call advances every environment by
a whole control period and returns the sensors at every substep (so energy is integrated at
the physics rate). Each environment owns its MjModel copy, so domain randomisation of masses,
friction and gains is per environment.
"""
from __future__ import annotations

import copy

import mujoco
import numpy as np
from mujoco import rollout

STATE_SPEC = mujoco.mjtState.mjSTATE_FULLPHYSICS


class BatchedSim:
    def __init__(self, model: mujoco.MjModel, num_envs: int, substeps: int, nthread: int = 1):
        self.model = model
        self.num_envs = num_envs
        self.substeps = substeps
        self.models = [copy.copy(model) for _ in range(num_envs)]
        self.nthread = max(0, int(nthread)) if num_envs > 1 else 0
        self.datas = [mujoco.MjData(model) for _ in range(max(1, self.nthread))]
        self._rollout = rollout.Rollout(nthread=self.nthread)
        self.nstate = mujoco.mj_stateSize(model, STATE_SPEC)
        self.state = np.zeros((num_envs, self.nstate))
        self.warmstart = np.zeros((num_envs, model.nv))
        self.substep_states = np.zeros((num_envs, substeps, self.nstate))   # of the last step, in order
        self.last_ctrl: np.ndarray | None = None                            # what the last step applied
        self.sensordata = np.zeros((num_envs, substeps, model.nsensordata))
        self._scratch = mujoco.MjData(model)
        # a state row: time, qpos, qvel, … (mjSTATE_FULLPHYSICS)
        self._qpos_cols, self._qvel_cols = slice(1, 1 + model.nq), slice(1 + model.nq, 1 + model.nq + model.nv)
        self.qpos = self.state[:, self._qpos_cols]           # views into the current state
        self.qvel = self.state[:, self._qvel_cols]

    def step(self, ctrl: np.ndarray) -> None:
        """ctrl: (num_envs, substeps, nu). Advances every env by `substeps` physics steps."""
        self.last_ctrl = ctrl
        self._rollout.rollout(self.models, self.datas, self.state, ctrl, nstep=self.substeps,
                              initial_warmstart=self.warmstart, state=self.substep_states,
                              sensordata=self.sensordata, skip_checks=True)
        self.state[:] = self.substep_states[:, -1]

    def state_before(self, lag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(qpos, qvel) of each env `lag[i]` physics steps before the end of the last step."""
        rows = self.substep_states[np.arange(self.num_envs), self.substeps - 1 - lag]
        return rows[:, self._qpos_cols], rows[:, self._qvel_cols]

    def set_state(self, i: int, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """Put env i at (qpos, qvel); returns its sensor readings at that state."""
        d = self._scratch
        mujoco.mj_resetData(self.models[i], d)
        d.qpos[:] = qpos
        d.qvel[:] = qvel
        mujoco.mj_forward(self.models[i], d)
        mujoco.mj_getState(self.models[i], d, self.state[i], STATE_SPEC)
        self.warmstart[i] = 0.0
        return d.sensordata.copy()

    def data_of(self, i: int) -> mujoco.MjData:
        """A MjData holding env i's current state with kinematics computed (for rendering)."""
        d = self._scratch
        mujoco.mj_setState(self.models[i], d, self.state[i], STATE_SPEC)
        mujoco.mj_forward(self.models[i], d)
        return d
