"""PPO, top to bottom: rollout storage, GAE, the clipped surrogate with clipped value loss,
observation normalisation, adaptive (KL-targeted) or scheduled learning rate, an asymmetric
critic, and an optional recurrent actor (`rnn=gru|lstm`). ECO and VLA-RL build on
`RolloutBuffer`, `gae` and `PPO.update`.

A recurrent actor's memory is carried per env while acting (zeroed when an episode ends) and
stored with each step; an update replays whole env sequences from the stored memory at the
rollout's start, zeroing it where episodes started, so the gradient flows through time (BPTT
over the rollout) and the probabilities are those of the policy that acted.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from robotrl.algos import require_finite
from robotrl.networks import ActorCritic


@dataclasses.dataclass
class PPOConfig:
    name: str = "ppo"
    steps_per_env: int = 32          # rollout length per environment per iteration
    epochs: int = 5
    minibatches: int = 4
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 1.0
    entropy_coef: float = 0.005
    lr: float = 1e-3
    lr_schedule: str = "adaptive"    # adaptive | linear | constant
    desired_kl: float = 0.01
    max_grad_norm: float = 1.0
    actor_hidden: list[int] = dataclasses.field(default_factory=lambda: [256, 128, 64])
    critic_hidden: list[int] = dataclasses.field(default_factory=lambda: [256, 128, 64])
    activation: str = "elu"
    init_std: float = 1.0
    normalize_advantages: bool = True
    rnn: str = "none"                # none | gru | lstm: a recurrent memory before the actor's MLP
    rnn_size: int = 64

    def __post_init__(self):
        require_finite(self)   # here and in ECO's configs built on this one
        for key in ("desired_kl", "max_grad_norm", "init_std"):
            if getattr(self, key) <= 0:
                raise ValueError(f"algo.{key} must be > 0, got {getattr(self, key)}")
        for key in ("value_clip", "value_coef", "entropy_coef"):
            if getattr(self, key) < 0:
                raise ValueError(f"algo.{key} must be >= 0, got {getattr(self, key)}")
        if self.lr_schedule not in ("adaptive", "linear", "constant"):
            raise ValueError(f"algo.lr_schedule must be one of adaptive, linear, constant; got '{self.lr_schedule}'")
        for key in ("steps_per_env", "epochs", "minibatches"):
            if getattr(self, key) < 1:
                raise ValueError(f"algo.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("gamma", "lam"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ValueError(f"algo.{key} must be in (0, 1], got {getattr(self, key)}")
        if self.rnn not in ("none", "gru", "lstm"):
            raise ValueError(f"algo.rnn must be one of none, gru, lstm; got '{self.rnn}'")
        if self.rnn_size < 1:
            raise ValueError(f"algo.rnn_size must be >= 1, got {self.rnn_size}")
        if self.lr <= 0 or self.clip <= 0:
            raise ValueError(f"algo.lr and algo.clip must be > 0, got lr={self.lr}, clip={self.clip}")


class NonFiniteError(RuntimeError):
    """A NaN or Inf reached the learner; the message says where and at which step."""


def check_finite(name: str, x: torch.Tensor, step: int) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise NonFiniteError(f"non-finite value in {name} at env step {step} (first bad index {bad})")


class RolloutBuffer:
    def __init__(self, steps: int, num_envs: int, obs_size: int, critic_size: int, action_size: int,
                 memory_size: int = 0):
        T, N = steps, num_envs
        self.obs = torch.zeros(T, N, obs_size)
        self.critic_obs = torch.zeros(T, N, critic_size)
        self.actions = torch.zeros(T, N, action_size)
        self.logp = torch.zeros(T, N)
        self.values = torch.zeros(T, N)
        self.rewards = torch.zeros(T, N)
        self.dones = torch.zeros(T, N)       # episode ended after this step (terminated or truncated)
        self.mu = torch.zeros(T, N, action_size)
        self.sigma = torch.zeros(T, N, action_size)
        self.memory = torch.zeros(T, N, memory_size)   # a recurrent actor's memory before each step
        self.t = 0

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            getattr(self, k)[self.t] = v
        self.t += 1


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a (T, N) rollout; returns (advantages, returns).
    Truncated episodes are bootstrapped by the caller (it adds gamma * V(final obs) to the reward)."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(last_value)
    for t in reversed(range(T)):
        next_value = last_value if t == T - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        last = delta + gamma * lam * not_done * last
        adv[t] = last
    return adv, adv + values


class PPO:
    supports_rnn = True   # subclasses whose losses read single rows (ECO's mirror loss) say False

    def __init__(self, obs_size: int, critic_size: int, action_size: int, cfg: PPOConfig, num_envs: int):
        self.cfg = cfg
        if cfg.rnn != "none" and not self.supports_rnn:
            raise ValueError(f"algo.rnn={cfg.rnn}: algo={cfg.name} has no recurrent policy; "
                             "algo.rnn is available with algo=ppo")
        self.model = ActorCritic(obs_size, critic_size, action_size, cfg.actor_hidden, cfg.critic_hidden,
                                 cfg.activation, cfg.init_std, cfg.rnn, cfg.rnn_size)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.lr = cfg.lr
        self.cost_values = None   # of the last act(), when the model has a cost head
        self.memory = self.model.initial_state(num_envs)   # the actor's memory per env ([N, 0] without rnn)
        self.buffer = RolloutBuffer(cfg.steps_per_env, num_envs, obs_size, critic_size, action_size,
                                    self.memory.shape[1])

    def training_state(self) -> dict:
        """What a resumed run needs beyond the model's weights (checkpointed beside them)."""
        return {"opt": self.opt.state_dict(), "lr": self.lr}

    def load_training_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.lr = state["lr"]

    def continue_learning_rate(self, source_state: dict) -> bool:
        """Fine-tuning another run's policy: an adaptive learning rate starts where the source's
        schedule ended (True if it did). A fresh Adam at algo.lr (1e-3) on a policy whose action std
        has shrunk to ~0.1 moved it by a KL of ~30 in the first update and toppled a trained walker
        for ~35 iterations."""
        if self.cfg.lr_schedule != "adaptive" or "lr" not in source_state:
            return False
        self.lr = float(source_state["lr"])
        return True

    @torch.no_grad()
    def act(self, obs: torch.Tensor, critic_obs: torch.Tensor) -> torch.Tensor:
        self.model.obs_norm.update(obs)
        self.model.critic_norm.update(critic_obs)
        mean, next_memory = self.model.step(obs, self.memory)
        dist = self.model.gaussian(mean)
        action = dist.sample()
        value, self.cost_values = self.model.values(critic_obs)   # cost values: None without a cost head
        self.buffer.add(obs=obs, critic_obs=critic_obs, actions=action, logp=dist.log_prob(action).sum(-1),
                        values=value, mu=dist.mean, sigma=dist.stddev, memory=self.memory)
        self.memory = next_memory
        return action

    @torch.no_grad()
    def record(self, rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
               truncated_value: torch.Tensor, info: dict) -> None:
        """The step's outcome, per env. A time-out (truncated) is bootstrapped: `truncated_value`
        holds V(final observation) there, which the caller computes (its critic input may differ)."""
        t = self.buffer.t - 1
        self.buffer.rewards[t] = rewards + self.cfg.gamma * torch.where(truncated, truncated_value, 0.0)
        self.buffer.dones[t] = (terminated | truncated).float()
        self.memory[terminated | truncated] = 0.0   # a new episode starts with an empty memory

    def env_step(self, env, obs: np.ndarray, critic_obs: np.ndarray):
        """One step of collection on a vector env (robotrl's TaskVectorEnv API): act, step,
        bootstrap time-outs from the final critic observation, record. Returns env.step's tuple."""
        action = self.act(torch.as_tensor(obs), torch.as_tensor(critic_obs))
        obs, reward, terminated, truncated, info = env.step(action.numpy())
        value = torch.zeros(env.num_envs)
        if truncated.any():  # bootstrap time-outs, not failures
            value[truncated] = self.value(torch.as_tensor(info["final_critic_obs"][truncated]))
        self.record(torch.as_tensor(reward, dtype=torch.float32), torch.as_tensor(terminated),
                    torch.as_tensor(truncated), value, info)
        return obs, reward, terminated, truncated, info

    @torch.no_grad()
    def value(self, critic_obs: torch.Tensor) -> torch.Tensor:
        return self.model.value(critic_obs)

    def minibatches(self) -> list[torch.Tensor]:
        """One epoch's minibatches, as row indices into the flattened (T·N) rollout: random rows for a
        feed-forward actor; for a recurrent one, all T steps of a random subset of envs, time-major
        (row t·n + i is step t of the subset's env i), so its memory can be replayed; then there are
        at most N minibatches. Every row is in one minibatch (sizes differ by one where k does not divide)."""
        T, N = self.buffer.rewards.shape
        k = self.cfg.minibatches
        if not self.model.recurrent:
            return list(torch.randperm(T * N).tensor_split(k))
        steps = torch.arange(T)[:, None] * N
        return [(steps + envs).reshape(-1) for envs in torch.randperm(N).tensor_split(min(k, N))]

    def minibatch_distribution(self, obs: torch.Tensor,
                               idx: torch.Tensor) -> tuple[torch.distributions.Normal, torch.Tensor | None]:
        """The policy on a minibatch's observations (rows `idx` of the rollout), and what a subclass
        computed on more rows folded into the same actor pass (handed to its extra_loss; PPO folds
        none). A recurrent actor replays its memory over the minibatch's env sequences."""
        if not self.model.recurrent:
            return self.model.distribution(obs), None
        b = self.buffer
        T = b.rewards.shape[0]
        envs = idx[:len(idx) // T]
        starts = torch.cat([torch.zeros(1, len(envs)), b.dones[:-1, envs]])   # memory zeroed after a done
        means = self.model.sequence_means(obs.reshape(T, len(envs), -1), b.memory[0, envs], starts)
        return self.model.gaussian(means.reshape(T * len(envs), -1)), None

    def parity_sequences(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Recorded observations for export's parity check: whole env sequences of the last rollout
        in time order, and where each starts (a recurrent artifact is checked from fresh memory)."""
        T, N = self.buffer.rewards.shape
        k = max(1, min(N, rows // T))
        obs = self.buffer.obs[:, :k].transpose(0, 1).reshape(k * T, -1).numpy().copy()
        starts = np.zeros(k * T, dtype=bool)
        starts[::T] = True
        return obs, starts

    def update(self, last_critic_obs: torch.Tensor, progress: float, step: int,
               extra_loss=None, cost_returns: torch.Tensor | None = None) -> dict[str, float]:
        """One PPO update on the filled buffer. `extra_loss(batch_idx, dist, ratio, folded) -> (loss,
        scale)` lets constrained variants add their terms (`folded`: minibatch_distribution's second
        output); `scale` divides the reward surrogate (ECO's normalised combined loss).
        `cost_returns` [T·N, K]: targets of the model's cost head, fitted with the value in the same
        passes."""
        c, b, m = self.cfg, self.buffer, self.model
        check_finite("rewards", b.rewards, step)
        check_finite("observations", b.obs, step)
        with torch.no_grad():
            adv, returns = gae(b.rewards, b.values, b.dones, m.value(last_critic_obs), c.gamma, c.lam)
        T, N = b.rewards.shape
        flat = lambda x: x.reshape(T * N, *x.shape[2:])  # noqa: E731
        obs, cobs, act, old_logp, old_v = flat(b.obs), flat(b.critic_obs), flat(b.actions), flat(b.logp), flat(b.values)
        old_mu, old_sigma, adv, returns = flat(b.mu), flat(b.sigma), flat(adv), flat(returns)
        if c.lr_schedule == "linear":
            self.lr = c.lr * max(1.0 - progress, 0.05)
        stats = {"loss/policy": 0.0, "loss/value": 0.0, "loss/entropy": 0.0, "kl": 0.0, "clip_frac": 0.0}
        n_updates = 0
        for _ in range(c.epochs):
            for idx in self.minibatches():
                dist, folded = self.minibatch_distribution(obs[idx], idx)
                logp = dist.log_prob(act[idx]).sum(-1)
                entropy = dist.entropy().sum(-1).mean()
                with torch.no_grad():  # KL(old || new) of diagonal Gaussians, for the adaptive lr
                    mu, sigma = dist.mean, dist.stddev
                    kl = (torch.log(sigma / old_sigma[idx]) + (old_sigma[idx] ** 2 + (old_mu[idx] - mu) ** 2)
                          / (2 * sigma ** 2) - 0.5).sum(-1).mean()
                if c.lr_schedule == "adaptive":
                    if kl > 2 * c.desired_kl:
                        self.lr = max(1e-5, self.lr / 1.5)
                    elif kl < c.desired_kl / 2:
                        self.lr = min(1e-2, self.lr * 1.5)
                for g in self.opt.param_groups:
                    g["lr"] = self.lr
                a = adv[idx]
                if c.normalize_advantages:
                    a = (a - a.mean()) / (a.std() + 1e-8)
                ratio = torch.exp(logp - old_logp[idx])
                surrogate = -torch.min(ratio * a, torch.clamp(ratio, 1 - c.clip, 1 + c.clip) * a).mean()
                policy_loss, scale = surrogate, 1.0
                if extra_loss is not None:
                    extra, scale = extra_loss(idx, dist, ratio, folded)
                    policy_loss = (surrogate + extra) / scale
                v, cost_v = m.values(cobs[idx])
                v_clipped = old_v[idx] + torch.clamp(v - old_v[idx], -c.value_clip, c.value_clip)
                value_loss = torch.max((v - returns[idx]) ** 2, (v_clipped - returns[idx]) ** 2).mean()
                if cost_returns is not None:
                    cost_loss = ((cost_v - cost_returns[idx]) ** 2).mean()
                    stats["loss/cost_value"] = stats.get("loss/cost_value", 0.0) + cost_loss.item()
                    value_loss = value_loss + cost_loss
                loss = policy_loss + c.value_coef * value_loss - c.entropy_coef * entropy
                check_finite("loss", loss.detach(), step)
                self.opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), c.max_grad_norm)
                self.opt.step()
                stats["loss/policy"] += surrogate.item()
                stats["loss/value"] += value_loss.item()
                stats["loss/entropy"] += entropy.item()
                stats["kl"] += kl.item()
                stats["clip_frac"] += ((ratio - 1).abs() > c.clip).float().mean().item()
                n_updates += 1
        b.t = 0
        out = {k: v / n_updates for k, v in stats.items()}
        out["lr"] = self.lr
        out["action_std"] = m.log_std.exp().mean().item()
        return out
