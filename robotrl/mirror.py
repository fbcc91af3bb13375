"""Left/right mirror maps of observations and actions, for ECO's symmetry constraint
‖π(s) − M_a π(M_s s)‖². Both maps are derived from the robot config's `mirror` section (joint
partners and signs) and the observation layout (term names, sizes, history); nothing is re-typed
per robot. A map is a permutation with signs: (M x)[i] = sign[i] · x[perm[i]].

Mirroring reflects the robot through its sagittal (x-z) plane and advances the gait clock by half
a period, so that the mirrored state is the other leg's turn of the same gait.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from real.observations import ObsLayout
from real.robot_spec import RobotSpec

# How each observation term (real/observations.py TERMS) transforms under the mirror:
# "joints" = the robot's joint partners and signs, otherwise one sign per component.
TERM_MIRROR: dict[str, str | tuple[float, ...]] = {
    "gait_clock": (-1.0, -1.0),          # (sin, cos) of 2π(φ + ½) = −(sin, cos) of 2πφ
    "command": (1.0, -1.0, -1.0),        # vx stays; vy and the yaw rate flip
    "joint_pos": "joints",
    "joint_vel": "joints",
    "last_action": "joints",
    "base_ang_vel": (-1.0, 1.0, -1.0),   # an axial vector: roll and yaw rates flip, pitch rate stays
    "projected_gravity": (1.0, -1.0, 1.0),  # a polar vector: its y component flips
}


@dataclasses.dataclass(frozen=True)
class Mirror:
    perm: np.ndarray   # (M x)[i] = sign[i] * x[perm[i]]
    sign: np.ndarray

    def __post_init__(self):   # the torch copies, made once: the mirror runs in every PPO minibatch
        object.__setattr__(self, "_perm_t", torch.as_tensor(self.perm))
        object.__setattr__(self, "_sign_t", torch.as_tensor(self.sign, dtype=torch.float32))

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            return x[..., self._perm_t] * self._sign_t.to(x.dtype)
        return x[..., self.perm] * self.sign.astype(np.asarray(x).dtype)


def action_mirror(spec: RobotSpec) -> Mirror:
    """M_a: swap each joint with its partner and flip the lateral (yaw, roll) axes."""
    if spec.mirror_perm is None:
        raise ValueError(f"robot '{spec.name}' has no 'mirror' section in {spec.source}; "
                         "the symmetry constraint needs one (joint partners and signs)")
    perm, sign = spec.mirror_perm, spec.mirror_sign
    n = spec.n_joints
    if not (np.array_equal(perm[perm], np.arange(n)) and np.allclose(sign * sign[perm], 1.0)):
        raise ValueError(f"robot '{spec.name}': 'mirror' is not an involution (mirroring twice must give the "
                         f"same joint with the same sign); joints {list(spec.joint_names)}")
    # joint_pos and last_action are offsets from the default pose, so that pose must be its own mirror.
    if not np.allclose(spec.q_default[perm] * sign, spec.q_default):
        raise ValueError(f"robot '{spec.name}': the default pose is not left/right symmetric under 'mirror'")
    return Mirror(perm.astype(np.int64), sign.astype(np.float64))


def obs_mirror(spec: RobotSpec, layout: ObsLayout) -> Mirror:
    """M_s: each term of each history frame mapped by its TERM_MIRROR rule (scales commute with it)."""
    joints = action_mirror(spec)
    perm, sign, start = [], [], 0
    for _ in range(layout.history):
        for term, size in zip(layout.terms, layout.sizes):
            rule = TERM_MIRROR.get(term)
            if rule is None:
                raise ValueError(f"observation term '{term}' has no mirror rule; add it to robotrl/mirror.py "
                                 "TERM_MIRROR")
            p, s = (joints.perm, joints.sign) if rule == "joints" else (np.arange(size), np.asarray(rule))
            if len(p) != size:
                raise ValueError(f"observation term '{term}': mirror rule has {len(p)} entries, the term {size}")
            perm.append(start + p)
            sign.append(s)
            start += size
    return Mirror(np.concatenate(perm).astype(np.int64), np.concatenate(sign).astype(np.float64))
