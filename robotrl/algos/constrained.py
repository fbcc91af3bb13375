"""ECO's baselines on the same constraint machinery (robotrl/algos/eco.py): the same task, costs,
budget keys and estimates J_C; each class is one way to enforce J_Ci ≤ b_i, its loss in one place.

    ppo_shaping     energy as a reward term, the motion term with a fixed weight (no constraint)
    ipo             log barrier at the budget (Liu et al. 2020)
    p3o             exact ReLU penalty on the clipped cost surrogate (Zhang et al. 2022)
    crpo            a reward step while every constraint holds, else a step on a violated one (Xu et al. 2021)
    pid_lagrangian  ECO's loss with a PID-controlled multiplier (Stooke et al. 2020)

Violations are relative, (J − b)/b, so one set of coefficients fits watts, joules and rad².
Each method logs its effective weights as constraint/lambda<i>_<name>.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from robotrl.algos.eco import ConstrainedConfig, ConstrainedPPO


def pessimistic_cost_surrogate(ratio: torch.Tensor, cost_adv: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate for a cost (lower is better): mean(max(ρ·Â_c, clip(ρ)·Â_c)) per cost."""
    ratio = ratio[:, None]
    return torch.max(ratio * cost_adv, torch.clamp(ratio, 1 - clip, 1 + clip) * cost_adv).mean(0)


# ---- ppo_shaping ----
@dataclasses.dataclass
class ShapingConfig(ConstrainedConfig):
    name: str = "ppo_shaping"
    # ECO's shaping baseline adds −0.001·Σ|τq̇| at every 1 kHz physics sample: 0.001 per W-millisecond
    # = 1.0 per J. Our energy_j is that power integrated over the control step, so r −= 1.0·energy_j.
    energy_weight: float = 1.0     # 1/J
    mirror_weight: float = 1.0     # motion=symmetry: fixed weight of the mirror loss (λ2 held constant)
    reference_weight: float = 10.0  # motion=reference_gait: r −= reference_weight·c2·dt (1/(rad²·s), like the
                                    # task's terms)


class ShapingPPO(ConstrainedPPO):
    """PPO with energy in the reward; the budgets are only reported, never enforced."""
    uses_cost_advantages = False

    @torch.no_grad()
    def record(self, rewards, terminated, truncated, truncated_value, info) -> None:
        c = self.cfg
        cost = self.step_costs(info, self.buffer.obs[self.buffer.t - 1])
        penalty = c.energy_weight * cost[:, 0]
        if self.reference is not None:
            penalty = penalty + c.reference_weight * cost[:, 1] * self.dt
        super().record(rewards - penalty, terminated, truncated, truncated_value, info)

    def update_weights(self, J):
        motion = {"symmetry": [self.cfg.mirror_weight], "reference_gait": [self.cfg.reference_weight], "none": []}
        return torch.tensor([self.cfg.energy_weight, *motion[self.cfg.motion]])

    def constraint_loss(self, idx, dist, ratio, mirrored):
        if self.mirror_obs is None:
            return torch.zeros(()), 1.0
        return self.cfg.mirror_weight * self.mirror_loss(dist.mean, mirrored), 1.0


# ---- ipo ----
@dataclasses.dataclass
class IPOConfig(ConstrainedConfig):
    name: str = "ipo"
    kappa: float = 0.01        # barrier strength (OmniSafe's default)
    penalty_max: float = 1.0   # the weight when the barrier is undefined (J ≥ b) or steeper than this


class IPO(ConstrainedPPO):
    """Interior-point PO: maximise J_R + κ·Σ_i log(1 − J_i/b_i). The barrier's slope weights each
    constraint's term by κ/(1 − J_i/b_i), which grows without bound at the budget; capped at
    penalty_max, and at penalty_max outside the feasible set, where the barrier is undefined."""

    def update_weights(self, J):
        c, slack = self.cfg, 1 - J / self.budgets
        return torch.where(slack > 0, c.kappa / slack, torch.tensor(c.penalty_max)).clamp(max=c.penalty_max)

    def constraint_loss(self, idx, dist, ratio, mirrored):
        w = self.weights
        return (w * self.surrogates(idx, dist, ratio, mirrored)).sum(), 1.0 + w.sum()


# ---- p3o ----
@dataclasses.dataclass
class P3OConfig(ConstrainedConfig):
    name: str = "p3o"
    kappa: float = 20.0   # penalty factor; exact when above the optimal multiplier (P3O reference code: 20)


class P3O(ConstrainedPPO):
    """Penalised PPO: L = L_clip + κ·Σ_i ReLU(predicted relative excess of constraint i). For a cost,
    the excess is its pessimistic clipped surrogate plus (J − b)/b (the standardised surrogate plus
    the measured violation, as in the reference code); for symmetry, L_mirror/b − 1. While a
    constraint holds with margin its gradient is zero; once it binds it pulls with κ."""

    def update_weights(self, J):
        return self.cfg.kappa * (J > self.budgets).float()   # logged only: the ReLU decides per minibatch

    def constraint_loss(self, idx, dist, ratio, mirrored):
        c, K = self.cfg, len(self.cost_names)
        excess = (pessimistic_cost_surrogate(ratio, self.cost_adv[idx], c.clip)
                  + (self.J[:K] - self.budgets[:K]) / self.budgets[:K])
        if self.mirror_obs is not None:
            excess = torch.cat([excess, (self.mirror_loss(dist.mean, mirrored) / self.budgets[K:]) - 1])
        return c.kappa * torch.relu(excess).sum(), 1.0


# ---- crpo ----
@dataclasses.dataclass
class CRPOConfig(ConstrainedConfig):
    name: str = "crpo"
    tolerance: float = 0.0   # relative slack η: a constraint counts as violated when J > (1 + η)·b


# PPO's hook computes (L_clip + loss) / scale; with scale = CRPO_SWITCH and loss = CRPO_SWITCH·L_cost
# the step is L_cost's alone (the reward's weight 1e-6).
CRPO_SWITCH = 1e6


class CRPO(ConstrainedPPO):
    """Constraint-rectified PO: while every constraint holds, a plain PPO step on the reward; otherwise
    the iteration's step descends the most (relatively) violated constraint instead: its pessimistic
    clipped cost surrogate, or the mirror loss."""

    def update_weights(self, J):
        excess = (J - self.budgets) / self.budgets
        w = torch.zeros_like(J)   # 1 marks the constraint this iteration descends
        if excess.max() > self.cfg.tolerance:
            w[excess.argmax()] = 1.0
        return w

    def constraint_loss(self, idx, dist, ratio, mirrored):
        if not self.weights.any():
            return torch.zeros(()), 1.0
        i = int(self.weights.argmax())
        if self.names[i] == "symmetry":
            cost = self.mirror_loss(dist.mean, mirrored)
        else:
            cost = pessimistic_cost_surrogate(ratio, self.cost_adv[idx, i:i + 1], self.cfg.clip)[0]
        return CRPO_SWITCH * cost, CRPO_SWITCH


# ---- pid_lagrangian ----
@dataclasses.dataclass
class PIDLagrangianConfig(ConstrainedConfig):
    name: str = "pid_lagrangian"
    kp: float = 0.1    # OmniSafe's CPPOPID gains, on the relative violation
    ki: float = 0.01
    kd: float = 0.01


class PIDMultipliers(nn.Module):
    """λ = max(0, Kp·e + Ki·I + Kd·max(0, ΔJ/b)) with e = (J − b)/b and I = max(0, I + e): the integral
    is plain Lagrangian ascent; the proportional and derivative terms damp its overshoot. Buffers, so
    checkpoints carry the controller's state."""

    def __init__(self, n: int, kp: float, ki: float, kd: float):
        super().__init__()
        self.kp, self.ki, self.kd = kp, ki, kd
        self.register_buffer("lam", torch.zeros(n))
        self.register_buffer("integral", torch.zeros(n))
        self.register_buffer("last_J", torch.full((n,), float("nan")))   # no derivative on the first update

    @torch.no_grad()
    def update(self, J: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        error = (J - b) / b
        self.integral.copy_((self.integral + error).clamp(min=0))
        rise = torch.nan_to_num((J - self.last_J) / b).clamp(min=0)
        self.last_J.copy_(J)
        self.lam.copy_((self.kp * error + self.ki * self.integral + self.kd * rise).clamp(min=0))
        return self.lam.clone()


class PIDLagrangian(ConstrainedPPO):
    """ECO's normalised Lagrangian loss; only the multiplier update differs."""

    def __init__(self, obs_size, critic_size, action_size, cfg: PIDLagrangianConfig, num_envs):
        super().__init__(obs_size, critic_size, action_size, cfg, num_envs)
        self.model.multipliers = PIDMultipliers(len(self.names), cfg.kp, cfg.ki, cfg.kd)

    def update_weights(self, J):
        return self.model.multipliers.update(J, self.budgets)

    def constraint_loss(self, idx, dist, ratio, mirrored):
        lam = self.weights
        return (lam * self.surrogates(idx, dist, ratio, mirrored)).sum(), 1.0 + lam.sum()


BASELINES = {"ppo_shaping": (ShapingPPO, ShapingConfig), "ipo": (IPO, IPOConfig), "p3o": (P3O, P3OConfig),
             "crpo": (CRPO, CRPOConfig), "pid_lagrangian": (PIDLagrangian, PIDLagrangianConfig)}
