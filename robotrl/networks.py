"""Networks shared by the algorithms: MLPs, a running observation normaliser, the Gaussian actor
(feed-forward, or reading its observations through a GRU/LSTM memory), and their deploy modules."""
from __future__ import annotations

from typing import Tuple

import numpy as np
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


class GRUMemory(nn.Module):
    """One step of a GRU: (input, state [B, size]) -> (features, next state)."""

    def __init__(self, n_in: int, size: int):
        super().__init__()
        self.cell = nn.GRUCell(n_in, size)
        self.state_size = size

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.cell(x, state)
        return h, h


class LSTMMemory(nn.Module):
    """One step of an LSTM; its state is (h, c) side by side in one tensor [B, 2·size], so every
    memory is carried, stored and reset as one tensor."""

    def __init__(self, n_in: int, size: int):
        super().__init__()
        self.cell = nn.LSTMCell(n_in, size)
        self.size = size
        self.state_size = 2 * size

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h, c = self.cell(x, (state[:, :self.size], state[:, self.size:]))
        return h, torch.cat([h, c], -1)


MEMORIES = {"gru": GRUMemory, "lstm": LSTMMemory}


class ActorCritic(nn.Module):
    """Gaussian actor with a state-independent log-std, and a critic that may see privileged
    observations (asymmetric). Normalisers live here so export carries them.

    With `rnn` ("gru" or "lstm") the actor reads the normalised observation through a recurrent
    memory of `rnn_size` units before its MLP: for what one frame does not show (a payload, the
    terrain, a latency). The critic stays feed-forward: it sees privileged state. Every policy has
    `step(obs, state) -> (mean, state)`; a feed-forward one carries an empty state [B, 0]."""

    def __init__(self, obs_size: int, critic_obs_size: int, action_size: int, actor_hidden: list[int],
                 critic_hidden: list[int], activation: str = "elu", init_std: float = 1.0,
                 rnn: str = "none", rnn_size: int = 64):
        super().__init__()
        if rnn != "none" and rnn not in MEMORIES:
            raise ValueError(f"unknown rnn '{rnn}'; available: none, {', '.join(sorted(MEMORIES))}")
        self.rnn = rnn
        self.obs_norm = RunningNorm(obs_size)
        self.critic_norm = RunningNorm(critic_obs_size)
        self.memory = MEMORIES[rnn](obs_size, rnn_size) if rnn != "none" else None
        actor_in = rnn_size if self.memory is not None else obs_size
        self.actor = mlp([actor_in, *actor_hidden, action_size], activation, out_gain=0.01)
        self.critic = mlp([critic_obs_size, *critic_hidden, 1], activation, out_gain=1.0)
        self.log_std = nn.Parameter(torch.full((action_size,), float(torch.log(torch.tensor(init_std)))))
        self.cost_head = None   # constrained methods add a Linear: cost values from the critic's features

    @property
    def recurrent(self) -> bool:
        return self.memory is not None

    def initial_state(self, batch: int) -> torch.Tensor:
        """The memory of a fresh episode: zeros [batch, state size] (size 0 without a memory)."""
        return torch.zeros(batch, self.memory.state_size if self.memory is not None else 0)

    def action_mean(self, obs: torch.Tensor) -> torch.Tensor:
        """The feed-forward actor on a batch of observations (a recurrent one needs `step`)."""
        if self.memory is not None:
            raise RuntimeError("a recurrent actor needs its memory: call step(obs, state) or sequence_means")
        return self.actor(self.obs_norm(obs))

    def step(self, obs: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One control step: action means and the next memory state."""
        if self.memory is None:
            return self.actor(self.obs_norm(obs)), state
        features, state = self.memory(self.obs_norm(obs), state)
        return self.actor(features), state

    def sequence_means(self, obs: torch.Tensor, state: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Action means over time-major sequences obs [T, B, ·] from memory `state` [B, S], the memory
        zeroed where an episode starts (starts [T, B]), as it was while acting; gradients flow
        through the whole sequence (backpropagation through time)."""
        means = []
        for t in range(obs.shape[0]):
            state = state * (1.0 - starts[t]).unsqueeze(-1)
            mean, state = self.step(obs[t], state)
            means.append(mean)
        return torch.stack(means)

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

    def export(self, path, manifest: dict, parity_obs, episode_starts=None, **kwargs) -> dict:
        """Write this policy as one artifact (normaliser, actor mean, action post-processing; a
        recurrent one also its memory, zeroed by the artifact's reset()). The parity check replays
        `parity_obs` in time order, the memory reset where `episode_starts` is True."""
        from robotrl.export import export_artifact
        clip = float(manifest["action"]["clip"])
        # row 0 always starts from fresh memory (the reference below, and the artifact's first reset)
        starts = np.zeros(len(parity_obs), dtype=bool) if episode_starts is None else np.asarray(episode_starts, bool)
        if self.memory is None:
            deploy = MlpDeployPolicy(self, manifest)
            policy = {"stateful": False}
        else:
            deploy = RecurrentDeployPolicy(self, manifest)
            policy = {"stateful": True, "rnn": self.rnn, "rnn_size": self.memory.cell.hidden_size,
                      "reset": "call reset() at every episode start (zeroes the memory)"}
        manifest = {**manifest, "policy": policy}

        @torch.no_grad()
        def reference(obs: torch.Tensor) -> torch.Tensor:   # the training-time path, one env
            start_rows = torch.as_tensor(starts, dtype=torch.float32)[:, None]
            means = self.sequence_means(obs[:, None], self.initial_state(1), start_rows)[:, 0]
            return torch.clamp(means, -clip, clip)
        return export_artifact(deploy, manifest, path, parity_obs, reference, episode_starts=starts, **kwargs)


class DeployModule(nn.Module):
    """What an artifact's module is (real/artifact.py): forward(obs) -> action, command(action) ->
    joint targets, step(obs) -> both in one call (what a control tick runs), reset()."""

    @torch.jit.export
    def step(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        action = self.forward(obs)
        return action, self.command(action)

    def pure_tick(self) -> nn.Module:
        """The tick as a pure function, the form an ONNX graph takes (robotrl/export.py):
        forward(obs [B, obs]) -> (action, q_target), or with a `memory_layout` forward(obs, memory)
        -> (action, q_target, memory_out), where zeros are the memory that reset() leaves. A deploy
        module without one exports to TorchScript only."""
        raise NotImplementedError(f"{type(self).__name__} has no ONNX form (pure_tick); "
                                  "export it with format=torchscript")


class JointTargetDeploy(DeployModule):
    """A deploy module whose actions set joint position targets as the manifest's `action` says.

    For a joint-target delta (target <- clip(target + scale·action, limits)) `command` needs the
    previous target: `track_target` reads it from the observation's `joint_target` term (target -
    q_default) of the newest frame; without that term the first target is the measured joint
    position (`joint_pos` term) and later ones integrate. Subclasses call `track_target(obs)` in
    forward and clear `has_target` in reset()."""

    def __init__(self, manifest: dict):
        super().__init__()
        act, robot, layout = manifest["action"], manifest["robot"], manifest["observation"]
        n = len(act["joint_names"])
        self.clip = float(act["clip"])
        self.register_buffer("scale", torch.tensor(np.broadcast_to(act["scale"], (n,)).copy(), dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(np.broadcast_to(act["offset"], (n,)).copy(), dtype=torch.float32))
        self.register_buffer("q_lower", torch.tensor(robot["q_lower"], dtype=torch.float32))
        self.register_buffer("q_upper", torch.tensor(robot["q_upper"], dtype=torch.float32))
        self.register_buffer("q_default", torch.tensor(robot["q_default"], dtype=torch.float32))
        frame0 = (int(layout["history"]) - 1) * int(layout["frame_size"])   # newest frame
        offsets, o = {}, frame0
        for t in layout["terms"]:
            offsets[t["name"]] = (o, float(t["scale"]))
            o += int(t["size"])
        self.delta = act.get("type", "joint_position") == "joint_position_delta"
        term = "joint_target" if "joint_target" in offsets else "joint_pos"
        if self.delta and term not in offsets:
            raise ValueError("a joint_position_delta policy needs a joint_target or joint_pos observation term")
        self.from_target = term == "joint_target"
        self.term_at, self.term_scale = offsets.get(term, (0, 1.0))
        self.register_buffer("target", torch.zeros(n), persistent=False)
        self.has_target = False

    def track_target(self, obs: torch.Tensor) -> None:
        if self.delta and (self.from_target or not self.has_target):
            self.target = self.measured_target(obs)
            self.has_target = True

    @torch.jit.export
    def command(self, action: torch.Tensor) -> torch.Tensor:
        q = self.joint_targets(self.target, action)
        if self.delta and not self.from_target:
            self.target = q
        return q

    def measured_target(self, obs: torch.Tensor) -> torch.Tensor:
        """The previous joint target as the observation's newest frame reports it."""
        n = self.q_default.shape[0]
        return obs[..., self.term_at:self.term_at + n] / self.term_scale + self.q_default

    def joint_targets(self, previous: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Action -> joint position targets within the limits: a step from `previous` for a delta
        policy, else offset + scale·action."""
        start = previous if self.delta else self.offset
        return torch.clamp(start + self.scale * action, self.q_lower, self.q_upper)


class MlpDeployPolicy(DeployModule):
    """What runs on the robot: `forward` (observation → clipped actor mean), `command` (action →
    joint position targets: offset + scale·action, clipped to the joint limits) and `step`
    (both in one call, what the control loop runs every tick).

    The normaliser is folded into the first layer that reads the observation (clip the raw
    observation to mean ± clip·std, then W/std): the same function with two fewer ops per tick,
    which matters at ~5 µs per op."""

    def __init__(self, policy: ActorCritic, manifest: dict):
        super().__init__()
        import copy
        act, robot, norm = manifest["action"], manifest["robot"], policy.obs_norm
        std = torch.sqrt(norm.var + norm.eps)
        self.register_buffer("obs_lower", (norm.mean - norm.clip * std).detach().clone())
        self.register_buffer("obs_upper", (norm.mean + norm.clip * std).detach().clone())
        self.actor = copy.deepcopy(policy.actor)
        self.memory = copy.deepcopy(policy.memory)
        first = self.actor[0] if self.memory is None else self.memory.cell
        weight, bias = (first.weight, first.bias) if self.memory is None else (first.weight_ih, first.bias_ih)
        with torch.no_grad():
            weight.div_(std)
            bias.sub_(weight @ norm.mean)
        self.register_buffer("offset", torch.tensor(act["offset"], dtype=torch.float32))
        self.register_buffer("q_lower", torch.tensor(robot["q_lower"], dtype=torch.float32))
        self.register_buffer("q_upper", torch.tensor(robot["q_upper"], dtype=torch.float32))
        # One scale for all joints (the walkers) or one per joint (an arm and its gripper).
        self.register_buffer("scale", torch.tensor(act["scale"], dtype=torch.float32))
        self.clip = float(act["clip"])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.actor(torch.clamp(obs, self.obs_lower, self.obs_upper)), -self.clip, self.clip)

    @torch.jit.export
    def command(self, action: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.addcmul(self.offset, action, self.scale), self.q_lower, self.q_upper)

    @torch.jit.export
    def reset(self) -> None:
        pass

    def pure_tick(self) -> nn.Module:
        return PureTick(self)


class RecurrentDeployPolicy(MlpDeployPolicy):
    """The same, with the actor's memory: the artifact carries the memory state of one robot
    (one observation [obs] per call) and `reset()` zeroes it, which the robot side does at every
    start and the evaluator at every episode start."""

    def __init__(self, policy: ActorCritic, manifest: dict):
        super().__init__(policy, manifest)
        self.register_buffer("state", policy.initial_state(1))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        action, state = self.act_with_memory(obs.reshape(1, -1), self.state)
        self.state.copy_(state)
        return action[0] if obs.dim() == 1 else action

    def act_with_memory(self, obs: torch.Tensor, state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """obs [B, obs], memory [B, state] -> (clipped action [B, A], next memory)."""
        features, state = self.memory(torch.clamp(obs, self.obs_lower, self.obs_upper), state)
        return torch.clamp(self.actor(features), -self.clip, self.clip), state

    @torch.jit.export
    def reset(self) -> None:
        self.state.zero_()


class PureTick(nn.Module):
    """A deploy policy's tick as a pure function, the form an ONNX graph takes:
    forward(obs [B, obs]) -> (action, q_target), or for a policy with memory
    forward(obs, memory [B, state]) -> (action, q_target, next memory): the memory goes out and
    comes back in, and the runtime that holds it zeroes it at every start (real/artifact.py)."""

    def __init__(self, policy: MlpDeployPolicy):
        super().__init__()
        self.policy = policy
        recurrent = isinstance(policy, RecurrentDeployPolicy)
        self.memory_layout = [("rnn_state", int(policy.state.shape[-1]))] if recurrent else []

    def forward(self, obs: torch.Tensor, memory: torch.Tensor | None = None):
        if memory is None:
            return self.policy.step(obs)
        action, memory = self.policy.act_with_memory(obs, memory)
        return action, self.policy.command(action), memory
