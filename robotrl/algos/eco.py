"""ECO: energy-constrained PPO for humanoid walking (PPO-Lagrangian), plus the constraint machinery
its baselines share (robotrl/algos/constrained.py). Recipe and numbers: papers/eco.md.

    maximise J_R   subject to   J_C1 ≤ b1 (energy)   and   J_C2 ≤ b2 (reference motion)

C1 energy. Per-step cost c1 = info["energy_j"], the task's Σ_legs |τ·q̇| integrated at the physics
  rate over the control step (J). J_C1 = mean over the last `cost_window` finished episodes of
  episode energy / episode duration, in W (energy_unit=W); with energy_unit=J, of the episode
  energy itself (J per episode; note that an early fall then looks cheap). Until the first
  episode ends, the running episodes stand in. With cost_estimate=rollout, J_C1 is this
  iteration's rollout energy / its duration instead: the same rate without the episodes' lag
  (a 1,000-step episode trails the policy by tens of iterations).
C2 reference motion (algo.motion):
  symmetry        J_C2 = mean over the rollout of ‖π(s) − M_a π(M_s s)‖² on the action means, mean
                  over joints (action units²); M_s, M_a from robotrl/mirror.py (gait clock + ½ period).
                  Estimated on a random `mirror_fraction` of the rollout and of each minibatch.
  reference_gait  c2 = mean over joints of (q − q_ref(φ))², a sinusoidal gait on the gait clock;
                  J_C2 = its per-step mean over an episode (rad²).
  none            energy only.
Each per-step cost has a cost-critic head; cost GAE over the discounted cost-to-go gives cost
advantages Â_c, standardised. A fall ends the episode but not the rate a constraint is measured at:
its cost-to-go continues at J_C per step (W·dt, or the mean), so falling never looks cheap to the
cost advantage of a W or mean constraint (cut to zero, it did: a policy far over its budget learnt
to fall). With energy_unit=J a fall really does end the episode's energy, and the cost-to-go ends.
With ρ the probability ratio, PPO's extra_loss hook builds
    L = [L_clip + Σ_i λ_i·mean(Â_ci·ρ) + λ_sym·L_mirror] / (1 + Σ λ) + L_V − c_H·H
and the multipliers follow λ_i ← max(0, λ_i + lr_λ·(J_Ci − b_i)/b_i) with Adam, init 0, once
per iteration.
"""
from __future__ import annotations

import collections
import dataclasses

import torch
from torch import nn

from real.observations import ObsLayout
from real.robot_spec import load_robot
from robotrl.algos.ppo import PPO, PPOConfig, gae
from robotrl.mirror import action_mirror, obs_mirror

ENERGY_UNITS = ("W", "J")
COST_ESTIMATES = ("episodes", "rollout")
MOTIONS = ("symmetry", "reference_gait", "none")


@dataclasses.dataclass
class ConstrainedConfig(PPOConfig):
    """Keys shared by ECO and its baselines, so every method runs the same task against the same
    budgets. The PPO defaults are ECO's recipe (papers/eco.md) where it gives one."""
    gamma: float = 0.99                  # ECO's 0.994 at 100 Hz ≈ 0.99 at our 50 Hz (a ~2 s horizon)
    entropy_coef: float = 0.001
    actor_hidden: list[int] = dataclasses.field(default_factory=lambda: [512, 256, 128])
    critic_hidden: list[int] = dataclasses.field(default_factory=lambda: [768, 256, 128])
    # The task's robot and observation layout (configs/algo/shared/constrained.yaml takes them from the task).
    robot: str = ""
    observation: dict[str, float] = dataclasses.field(default_factory=dict)
    history: int = 1
    # C1: b1 in W of average mechanical power over an episode, or J per episode (energy_unit=J).
    energy_budget: float = 30.0
    energy_unit: str = "W"
    # C2: its form, and b2 in action units² (symmetry) or rad² (reference_gait).
    motion: str = "symmetry"
    motion_budget: float = 0.05
    # The mirror loss is computed on this fraction of each minibatch (and of the rollout, for J):
    # an unbiased estimate; the extra actor pass on mirrored states is most of what symmetry costs.
    mirror_fraction: float = 0.25
    # The reference gait: in the clock's first half the leg whose joint names end in ref_first_swing
    # lifts, each joint named by a ref_pattern prefix bending by ref_amplitude · factor · sin(2πφ).
    ref_amplitude: float = 0.2           # rad
    ref_pattern: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"hip_pitch": -1.0, "knee": 2.0, "ankle": -1.0})   # keeps the sole level
    ref_first_swing: str = "_r"          # humanoid_walk: left stance while phase < ½
    cost_window: int = 100               # finished episodes behind each J_C
    cost_estimate: str = "episodes"      # J_C of the per-step costs: the last cost_window episodes, or this rollout

    def __post_init__(self):
        super().__post_init__()
        if self.energy_unit not in ENERGY_UNITS:
            raise ValueError(f"algo.energy_unit must be one of {', '.join(ENERGY_UNITS)}; got '{self.energy_unit}'")
        if self.motion not in MOTIONS:
            raise ValueError(f"algo.motion: unknown constraint '{self.motion}'; available: {', '.join(MOTIONS)}")
        for key in ("energy_budget", "motion_budget"):
            if not getattr(self, key) > 0:
                raise ValueError(f"algo.{key} must be > 0 (a budget on a non-negative cost), got {getattr(self, key)}")
        if not 0.0 < self.mirror_fraction <= 1.0:
            raise ValueError(f"algo.mirror_fraction must be in (0, 1], got {self.mirror_fraction}")
        if self.cost_window < 1:
            raise ValueError(f"algo.cost_window must be >= 1, got {self.cost_window}")
        if self.cost_estimate not in COST_ESTIMATES:
            raise ValueError(f"algo.cost_estimate must be one of {', '.join(COST_ESTIMATES)}; "
                             f"got '{self.cost_estimate}'")
        if self.cost_estimate == "rollout" and self.energy_unit == "J":
            raise ValueError("algo.cost_estimate=rollout measures a rate, and a rollout holds no whole episodes: "
                             "with algo.energy_unit=J (energy per episode) use algo.cost_estimate=episodes")
        if not self.robot or not self.observation:
            raise ValueError("algo.robot and algo.observation are empty; configs/algo/shared/constrained.yaml "
                             "fills them from the task (${task.robot}, ${task.observation}, ${task.history})")


class ReferenceGait:
    """A sinusoidal reference gait synchronised with the gait clock, read from the newest observation
    frame: the swing leg's pattern joints bend by amplitude·factor·max(0, ±sin 2πφ), the stance leg
    stays at the default pose. Cost = mean over joints of (q − q_ref)², in rad² (the observation's
    joint noise adds ~3e-5)."""

    def __init__(self, robot, layout: ObsLayout, cfg: ConstrainedConfig):
        for term in ("gait_clock", "joint_pos"):
            if term not in layout.terms:
                raise ValueError(f"algo.motion=reference_gait needs the '{term}' observation term")
        newest = (layout.history - 1) * layout.frame_size
        starts = dict(zip(layout.terms, (newest + sum(layout.sizes[:i]) for i in range(len(layout.terms)))))
        sizes = dict(zip(layout.terms, layout.sizes))
        self.clock = slice(starts["gait_clock"], starts["gait_clock"] + 2)
        self.joints = slice(starts["joint_pos"], starts["joint_pos"] + sizes["joint_pos"])
        self.joint_scale = layout.scales[layout.terms.index("joint_pos")]
        self.first = torch.zeros(robot.n_joints)   # offsets at sin = 1: the first-half swing leg
        self.second = torch.zeros(robot.n_joints)  # offsets at sin = -1: the other leg
        for prefix, factor in cfg.ref_pattern.items():
            hits = [j for j, name in enumerate(robot.joint_names) if name.startswith(prefix)]
            if not hits:
                raise ValueError(f"algo.ref_pattern: '{prefix}' matches no joint of {robot.name} "
                                 f"({', '.join(robot.joint_names)})")
            for j in hits:
                leg = self.first if robot.joint_names[j].endswith(cfg.ref_first_swing) else self.second
                leg[j] = cfg.ref_amplitude * factor

    def cost(self, obs: torch.Tensor) -> torch.Tensor:
        clock = obs[:, self.clock]
        s = clock[:, 0] / clock.norm(dim=1).clamp(min=1e-6)   # sin 2πφ, whatever the term's scale
        q_ref = self.first * s.clamp(min=0)[:, None] + self.second * (-s).clamp(min=0)[:, None]
        q = obs[:, self.joints] / self.joint_scale                 # q − q_default
        return ((q - q_ref) ** 2).mean(1)


class EpisodeCosts:
    """Per-env running cost sums and the statistics of the last `window` finished episodes, which are
    what the weights of the constraints see. Per cost, an episode's statistic is its sum divided by
    its duration ("rate": J → W), by its steps ("mean") or by nothing ("total")."""

    def __init__(self, num_envs: int, modes: list[str], dt: float, window: int):
        self.modes, self.dt = modes, dt
        self.sums = torch.zeros(num_envs, len(modes))
        self.steps = torch.zeros(num_envs)
        self.finished: collections.deque = collections.deque(maxlen=window)

    def statistic(self, sums: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        per = {"rate": steps * self.dt, "mean": steps, "total": torch.ones_like(steps)}
        return torch.stack([sums[:, k] / per[m] for k, m in enumerate(self.modes)], dim=1)

    def add(self, cost: torch.Tensor, done: torch.Tensor) -> None:
        self.sums += cost
        self.steps += 1
        done = done.bool()
        if done.any():
            self.finished.extend(self.statistic(self.sums[done], self.steps[done]))
            self.sums[done] = 0.0
            self.steps[done] = 0.0

    def per_step(self, J: torch.Tensor) -> torch.Tensor:
        """The per-step cost at which each statistic J continues forever: W·dt for a rate, the mean
        itself, and 0 for a total (an episode's total ends with the episode)."""
        per = {"rate": self.dt, "mean": 1.0, "total": 0.0}
        return J * torch.tensor([per[m] for m in self.modes])

    def rollout_estimate(self, costs: torch.Tensor) -> torch.Tensor:
        """The statistics of a rollout's costs (T, N, K), as if each env's T steps were one episode
        (for a rate or a mean: the same quantity as the episodes', measured on the current policy)."""
        T, N, _ = costs.shape
        return self.statistic(costs.sum(0), torch.full((N,), float(T))).mean(0)

    def estimate(self) -> torch.Tensor:
        if self.finished:
            return torch.stack(list(self.finished)).mean(0)
        return self.statistic(self.sums, self.steps.clamp(min=1)).mean(0)   # before the first episode ends


class ConstrainedPPO(PPO):
    """PPO plus what every method of the ECO family shares: per-step costs, the cost critic, cost GAE,
    the estimates J_C and the mirror loss. A method says how the weights of its constraints move
    (`update_weights`, once per iteration) and how the constraints enter the loss (`constraint_loss`,
    PPO's extra_loss hook: (loss, scale) with the policy loss = (L_clip + loss) / scale; `mirrored`
    is the policy's means on the mirrored states that minibatch_distribution folded into its pass)."""
    uses_cost_advantages = True
    supports_rnn = False   # the mirror loss compares single rows: a memory would need mirrored histories

    def __init__(self, obs_size: int, critic_size: int, action_size: int, cfg: ConstrainedConfig, num_envs: int):
        super().__init__(obs_size, critic_size, action_size, cfg, num_envs)
        robot = load_robot(cfg.robot)
        layout = ObsLayout.make(dict(cfg.observation), robot.n_joints, cfg.history)
        if layout.size != obs_size:
            raise ValueError(f"algo.observation and algo.history give {layout.size} observations, the task {obs_size}; "
                             "they must come from the task (${task.observation}, ${task.history})")
        self.dt = 1.0 / robot.control_hz
        symmetry = cfg.motion == "symmetry"
        self.mirror_obs = obs_mirror(robot, layout) if symmetry else None
        self.mirror_act = action_mirror(robot) if symmetry else None
        self.reference = ReferenceGait(robot, layout, cfg) if cfg.motion == "reference_gait" else None
        # Constraints in order: the per-step costs (they have critic heads), then the loss-defined symmetry.
        self.cost_names = ["energy"] + (["reference_gait"] if self.reference else [])
        self.names = self.cost_names + (["symmetry"] if symmetry else [])
        self.budget_values = [cfg.energy_budget] + ([cfg.motion_budget] if cfg.motion != "none" else [])
        self.budgets = torch.tensor(self.budget_values)
        K, T = len(self.cost_names), cfg.steps_per_env
        self.costs = torch.zeros(T, num_envs, K)
        energy_stat = "rate" if cfg.energy_unit == "W" else "total"
        self.episodes = EpisodeCosts(num_envs, [energy_stat] + ["mean"] * (K - 1), self.dt, cfg.cost_window)
        self.J = torch.zeros(len(self.names))
        self.weights = torch.zeros(len(self.names))
        if self.uses_cost_advantages:
            self.cost_bonus = torch.zeros(T, num_envs, K)   # γ·V_c(final observation) at time-outs
            self.falls = torch.zeros(T, num_envs)            # terminated (not timed out) after this step
            self.cost_rollout_values = torch.zeros(T, num_envs, K)   # V_c(s_t), from the acting pass
            # The cost values are K more outputs on the critic's features, fitted in PPO's own passes:
            # a separate cost critic with its own epochs cost ECO ~15 % of its training time.
            self.model.cost_head = nn.Linear(cfg.critic_hidden[-1], K)
            self.opt.add_param_group({"params": self.model.cost_head.parameters()})

    def training_state(self) -> dict:
        e = self.episodes
        return {**super().training_state(), "J": self.J, "weights": self.weights,
                "episodes": {"sums": e.sums, "steps": e.steps, "finished": list(e.finished)}}

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        self.J, self.weights = state["J"], state["weights"]
        e, saved = self.episodes, state["episodes"]
        e.sums, e.steps = saved["sums"], saved["steps"]
        e.finished.clear()
        e.finished.extend(saved["finished"])

    # ---- rollout ----
    def step_costs(self, info: dict, obs: torch.Tensor) -> torch.Tensor:
        """This step's costs (N, K): the task's energy in J, the reference-gait deviation in rad²."""
        costs = [torch.as_tensor(info["energy_j"], dtype=torch.float32)]
        if self.reference is not None:
            costs.append(self.reference.cost(obs))
        return torch.stack(costs, dim=1)

    @torch.no_grad()
    def record(self, rewards, terminated, truncated, truncated_value, info) -> None:
        super().record(rewards, terminated, truncated, truncated_value, info)
        t = self.buffer.t - 1
        self.costs[t] = self.step_costs(info, self.buffer.obs[t])
        self.episodes.add(self.costs[t], self.buffer.dones[t])
        if self.uses_cost_advantages:
            self.cost_rollout_values[t] = self.cost_values
            self.falls[t] = (terminated & ~truncated).float()
            if truncated.any():   # time-outs bootstrap the cost critic too
                final = torch.as_tensor(info["final_critic_obs"], dtype=torch.float32)[truncated]
                self.cost_bonus[t, truncated] = self.cfg.gamma * self.cost_value(final)

    def cost_value(self, critic_obs: torch.Tensor) -> torch.Tensor:
        return self.model.values(critic_obs)[1]

    # ---- the constraints' terms ----
    def mirror_rows(self, n: int) -> int:
        return max(1, round(n * self.cfg.mirror_fraction))

    def minibatch_distribution(self, obs: torch.Tensor,
                               idx: torch.Tensor) -> tuple[torch.distributions.Normal, torch.Tensor | None]:
        """With symmetry, ONE actor pass over the minibatch and the mirror of its first mirror_rows
        states (the rows are in random order): PPO's distribution, and the policy's means on those
        mirrored states (`mirrored`, for the mirror loss). Two passes cost ECO more than the loss's
        arithmetic on a small network."""
        if self.mirror_obs is None:
            return super().minibatch_distribution(obs, idx)
        means = self.model.action_mean(torch.cat([obs, self.mirror_obs(obs[:self.mirror_rows(len(obs))])]))
        return self.model.gaussian(means[:len(obs)]), means[len(obs):]

    def mirror_loss(self, mean: torch.Tensor, mirrored_mean: torch.Tensor) -> torch.Tensor:
        """‖π(s) − M_a π(M_s s)‖² on the action means, mean over joints and over the states whose
        mirrors were evaluated (the first len(mirrored_mean) rows of `mean`)."""
        return ((mean[:len(mirrored_mean)] - self.mirror_act(mirrored_mean)) ** 2).mean()

    def surrogates(self, idx: torch.Tensor, dist, ratio: torch.Tensor, mirrored) -> torch.Tensor:
        """One differentiable term per constraint, in `names` order: mean(Â_c·ρ) for each per-step cost,
        the mirror loss itself for symmetry."""
        terms = (ratio[:, None] * self.cost_adv[idx]).mean(0)
        if self.mirror_obs is not None:
            terms = torch.cat([terms, self.mirror_loss(dist.mean, mirrored)[None]])
        return terms

    def update_weights(self, J: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def constraint_loss(self, idx, dist, ratio, mirrored) -> tuple[torch.Tensor, float | torch.Tensor]:
        raise NotImplementedError

    # ---- update ----
    def update(self, last_critic_obs, progress: float, step: int, extra_loss=None) -> dict[str, float]:
        b = self.buffer
        T, N = b.rewards.shape
        rollout_obs = b.obs.reshape(T * N, -1)
        with torch.no_grad():
            rollout = self.cfg.cost_estimate == "rollout"
            self.J = self.episodes.rollout_estimate(self.costs) if rollout else self.episodes.estimate()
            if self.mirror_obs is not None:
                rows = rollout_obs[torch.randperm(T * N)[:self.mirror_rows(T * N)]]
                means = self.model.action_mean(torch.cat([rows, self.mirror_obs(rows)]))   # one pass, as in PPO's
                self.J = torch.cat([self.J, self.mirror_loss(means[:len(rows)], means[len(rows):])[None]])
            if self.uses_cost_advantages:
                adv, cost_returns = self.cost_gae(self.cost_value(last_critic_obs))
                adv = adv.reshape(T * N, -1)
                self.cost_adv = (adv - adv.mean(0)) / (adv.std(0) + 1e-8)
        self.weights = self.update_weights(self.J)
        stats = super().update(last_critic_obs, progress, step, extra_loss=self.constraint_loss,
                               cost_returns=cost_returns.reshape(T * N, -1) if self.uses_cost_advantages else None)
        if self.uses_cost_advantages:
            self.cost_bonus.zero_()
        return {**stats, **self.constraint_stats()}

    def cost_gae(self, last_cost_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cost advantages and returns (T, N, K) of the rollout, given this iteration's J. (1 − γ)·cost
        makes the critic's target a discounted mean cost per step, of one step's scale whatever the
        horizon (the advantages are standardised, so only conditioning changes). Time-outs bootstrap
        with the critic (cost_bonus, already in those units); falls with the cost rate J_C per step,
        whose discounted mean is itself."""
        c, K = self.cfg, len(self.cost_names)
        fall_bonus = c.gamma * self.falls[..., None] * self.episodes.per_step(self.J[:K])
        scaled = (1 - c.gamma) * self.costs + self.cost_bonus + fall_bonus
        return gae(scaled, self.cost_rollout_values, self.buffer.dones[..., None], last_cost_value, c.gamma, c.lam)

    def constraint_stats(self) -> dict[str, float]:
        """constraint/lambda<i>_<name>, J<i>_<name>, b<i>_<name> (energy: _W or _J), i = 1 energy, 2 motion."""
        out = {}
        for i, name in enumerate(self.names):
            key = f"{i + 1}_{name}" + (f"_{self.cfg.energy_unit}" if name == "energy" else "")
            out[f"constraint/lambda{i + 1}_{name}"] = float(self.weights[i])
            out[f"constraint/J{key}"] = float(self.J[i])
            out[f"constraint/b{key}"] = self.budget_values[i]
        return out


class LagrangeMultipliers(nn.Module):
    """λ ≥ 0, one per constraint: projected gradient ascent on the Lagrangian with Adam,
    λ ← max(0, λ + lr·(J − b)/b). Dividing by b makes the step unit-free: early in training J − b in
    watts can be tens, and Adam's second-moment memory of that would hide a later small slack for
    thousands of iterations. With Adam each step moves λ by about lr whatever the scale."""

    def __init__(self, n: int, lr: float):
        super().__init__()
        self.lam = nn.Parameter(torch.zeros(n))
        self.opt = torch.optim.Adam([self.lam], lr=lr)

    def update(self, J: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.lam.grad = -(J - b) / b   # Adam descends, so descend −λ·(J − b)
        self.opt.step()
        self.lam.grad = None           # PPO clips the gradient norm over all model parameters
        with torch.no_grad():
            self.lam.clamp_(min=0.0)
        return self.lam.detach().clone()


@dataclasses.dataclass
class ECOConfig(ConstrainedConfig):
    name: str = "eco"
    lambda_lr: float = 1e-3   # Adam on the multipliers; the paper's value


class ECO(ConstrainedPPO):
    """PPO-Lagrangian: the constraint terms weighted by learned multipliers, the whole policy loss
    normalised by 1 + Σλ so that a large λ does not also mean a large step."""

    def __init__(self, obs_size, critic_size, action_size, cfg: ECOConfig, num_envs):
        super().__init__(obs_size, critic_size, action_size, cfg, num_envs)
        self.model.multipliers = LagrangeMultipliers(len(self.names), cfg.lambda_lr)   # checkpointed with the model
        self.weights = self.model.multipliers.lam.detach().clone()

    def training_state(self) -> dict:
        return {**super().training_state(), "lambda_opt": self.model.multipliers.opt.state_dict()}

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        self.model.multipliers.opt.load_state_dict(state["lambda_opt"])

    def update_weights(self, J):
        return self.model.multipliers.update(J, self.budgets)

    def constraint_loss(self, idx, dist, ratio, mirrored):
        lam = self.weights
        return (lam * self.surrogates(idx, dist, ratio, mirrored)).sum(), 1.0 + lam.sum()
