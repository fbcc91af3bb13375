"""Networks shared by the algorithms: MLPs, a running observation normaliser, the Gaussian actor."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def mlp(sizes: list[int], activation: str = "elu", out_gain: float = 1.0) -> nn.Sequential:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'; available: {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        nn.init.orthogonal_(lin.weight, out_gain if last else 2 ** 0.5)
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if not last:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class RunningNorm(nn.Module):
    """Observation normaliser with running mean and variance (Chan's parallel update).
    It is part of the policy, so it is saved in checkpoints and baked into the artifact."""

    def __init__(self, size: int, eps: float = 1e-2, clip: float = 10.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.ones(size))
        self.register_buffer("count", torch.tensor(0.0))
        self.eps, self.clip = eps, clip

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            return
        mean, var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
        self.count = total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp((x - self.mean) / torch.sqrt(self.var + self.eps), -self.clip, self.clip)


class ActorCritic(nn.Module):
    """Gaussian actor with a state-independent log-std, and a critic that may see privileged
    observations (asymmetric). Normalisers live here so export carries them."""

    def __init__(self, obs_size: int, critic_obs_size: int, action_size: int, actor_hidden: list[int],
                 critic_hidden: list[int], activation: str = "elu", init_std: float = 1.0):
        super().__init__()
        self.obs_norm = RunningNorm(obs_size)
        self.critic_norm = RunningNorm(critic_obs_size)
        self.actor = mlp([obs_size, *actor_hidden, action_size], activation, out_gain=0.01)
        self.critic = mlp([critic_obs_size, *critic_hidden, 1], activation, out_gain=1.0)
        self.log_std = nn.Parameter(torch.full((action_size,), float(torch.log(torch.tensor(init_std)))))
        self.cost_head = None   # constrained methods add a Linear: cost values from the critic's features

    def action_mean(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.obs_norm(obs))

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Normal:
        return self.gaussian(self.action_mean(obs))

    def gaussian(self, mean: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(mean, self.log_std.exp().expand(mean.shape[0], -1))

    def value(self, critic_obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.critic_norm(critic_obs)).squeeze(-1)

    def values(self, critic_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The value and, with a cost head, the cost values [..., K]: one pass through the critic."""
        features = self.critic[:-1](self.critic_norm(critic_obs))
        costs = self.cost_head(features) if self.cost_head is not None else None
        return self.critic[-1](features).squeeze(-1), costs

    def export(self, path, manifest: dict, parity_obs, **kwargs) -> dict:
        """Write this policy as one artifact (normaliser, actor mean, action post-processing)."""
        from robotrl.export import export_artifact
        deploy = MlpDeployPolicy(self, manifest)

        def reference(obs: torch.Tensor) -> torch.Tensor:
            clip = float(manifest["action"]["clip"])
            return torch.clamp(self.action_mean(obs), -clip, clip)
        return export_artifact(deploy, manifest, path, parity_obs, reference, **kwargs)


class DeployModule(nn.Module):
    """What an artifact's module is (real/artifact.py): forward(obs) -> action, command(action) ->
    joint targets, step(obs) -> both in one call (what a control tick runs), reset()."""

    @torch.jit.export
    def step(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        action = self.forward(obs)
        return action, self.command(action)


class MlpDeployPolicy(DeployModule):
    """What runs on the robot: `forward` (observation → clipped actor mean), `command` (action →
    joint position targets: offset + scale·action, clipped to the joint limits) and `step`
    (both in one call, what the control loop runs every tick).

    The normaliser is folded into the first layer (clip the raw observation to mean ± clip·std,
    then W/std): the same function with two fewer ops per tick, which matters at ~5 µs per op."""

    def __init__(self, policy: ActorCritic, manifest: dict):
        super().__init__()
        import copy
        act, robot, norm = manifest["action"], manifest["robot"], policy.obs_norm
        std = torch.sqrt(norm.var + norm.eps)
        self.register_buffer("obs_lower", (norm.mean - norm.clip * std).detach().clone())
        self.register_buffer("obs_upper", (norm.mean + norm.clip * std).detach().clone())
        self.actor = copy.deepcopy(policy.actor)
        first = self.actor[0]
        with torch.no_grad():
            first.weight.div_(std)
            first.bias.sub_(first.weight @ norm.mean)
        self.register_buffer("offset", torch.tensor(act["offset"], dtype=torch.float32))
        self.register_buffer("q_lower", torch.tensor(robot["q_lower"], dtype=torch.float32))
        self.register_buffer("q_upper", torch.tensor(robot["q_upper"], dtype=torch.float32))
        self.scale = float(act["scale"])
        self.clip = float(act["clip"])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.actor(torch.clamp(obs, self.obs_lower, self.obs_upper)), -self.clip, self.clip)

    @torch.jit.export
    def command(self, action: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.add(self.offset, action, alpha=self.scale), self.q_lower, self.q_upper)

    @torch.jit.export
    def reset(self) -> None:
        pass
