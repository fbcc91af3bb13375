"""ResFiT: residual off-policy RL on top of a frozen behaviour-cloned chunk policy.

Reads top to bottom: the config (every ablation knob of the paper is a key); the networks (a
residual actor whose last layer starts at zero, so step 0 executes the base exactly, and a
critic ensemble whose heads are ONE batched layer: weights [heads, in, out], one baddbmm per
layer); n-step returns (one accumulator for online steps and demo episodes alike); the replay
with symmetric demo/online sampling; and the learner: act → critic update (REDQ target) →
delayed actor update (mean over heads) → Polyak averaging.

All actions here are normalised (the base's demo min/max widened by 1 + bc.action_scale), so the
base fills about ±0.83; the executed action is clamp(a_base + a_res, -1, 1).

Conventions of the replay: `discount` = γ^k for a k-step return that bootstraps (mid-episode,
or the episode timed out: truncation), and 0 when the episode terminated (success). The TD
target is y = R + discount · min_{2 random target heads} Q'(s_{t+k}, a'), a' = clamp(a_base' +
π'(s_{t+k}, a_base') + clip(ε), -1, 1).

`use_base: false` turns this learner into the RLPD-style baseline (no base, the actor outputs
the whole action; same critic, replay and demo sampling).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robotrl.algos import require_finite
from robotrl.checkpoint import save_atomic
from robotrl.networks import JointTargetDeploy

CRITIC_LOSSES = ("mse", "hl_gauss")


@dataclasses.dataclass
class ResFiTConfig:
    name: str = "resfit"
    base: Optional[str] = None       # run folder of an `algo=bc` run (the frozen base); required if use_base
    demos: Optional[str] = None      # demos .npz for the offline half of each batch; null = the base run's demos
    max_demos: Optional[int] = None  # null = the same demo episodes the base was trained on
    use_base: bool = True            # false: RLPD-style learner from scratch (the actor outputs the whole action)
    base_bias: Optional[List[float]] = None  # stress test: a constant added to the base's normalised action
    use_demos: bool = True           # ablation: demos in the replay on/off
    demo_ratio: float = 0.5          # fraction of each batch drawn from the demos (RLPD symmetric sampling)
    num_envs: int = 1
    env_steps: int = 50000           # training budget in environment steps
    buffer_size: int = 300000
    batch: int = 256
    utd: int = 4                     # critic updates per environment step
    actor_updates: int = 1           # (delayed) actor updates per environment step
    nstep: int = 3
    gamma: float = 0.99
    actor_lr: float = 3e-6
    critic_lr: float = 1e-4
    weight_decay: float = 0.0        # AdamW
    tau: float = 0.005               # Polyak averaging of the targets
    target_actor: bool = True        # TD3-style target actor (false: the online actor gives a')
    action_scale: float = 0.2        # |residual| <= action_scale (tanh · scale), normalised units
    zero_init_last: bool = True      # last actor layer = 0: the policy starts as the base exactly
    actor_hidden: List[int] = dataclasses.field(default_factory=lambda: [256, 256])
    critic_hidden: List[int] = dataclasses.field(default_factory=lambda: [256, 256])
    layer_norm: bool = True          # ablation: LayerNorm in actor and critic
    num_q: int = 10                  # critic heads
    num_min_q: int = 2               # REDQ: the target is the min over this many random target heads
    explore_noise: float = 0.05      # σ of the Gaussian exploration noise on the residual
    explore_clip: float = 0.1        # ... truncated at ±explore_clip
    target_noise: float = 0.05       # target policy smoothing σ
    target_noise_clip: float = 0.3
    learning_starts: int = 2000      # env steps acting as base + U(-warmup_noise, warmup_noise), no updates
    warmup_noise: float = 0.2
    critic_warmup: int = 2000        # env steps of critic-only updates after learning_starts
    grad_clip: float = 1.0
    action_l2: float = 0.0           # actor loss += action_l2 · mean ||residual||² (0 = off)
    clip_q_target: bool = True       # clamp the TD target to [v_min, v_max] (sparse 0/1 rewards: Q in [0, 1])
    critic_loss: str = "mse"         # mse | hl_gauss (distributional: HL-Gauss over [v_min, v_max])
    hl_bins: int = 51
    v_min: float = 0.0
    v_max: float = 1.0
    hl_sigma_bins: float = 0.75      # HL-Gauss smoothing σ in bin widths
    eval_every: int = 2500           # env steps between evaluations
    eval_episodes: int = 20
    eval_envs: int = 10
    log_every: int = 500             # env steps between metric rows

    def __post_init__(self):
        require_finite(self)
        if self.critic_loss not in CRITIC_LOSSES:
            raise ValueError(f"algo.critic_loss must be one of {list(CRITIC_LOSSES)}, got '{self.critic_loss}'")
        if not 1 <= self.num_min_q <= self.num_q:
            raise ValueError(f"algo.num_min_q must be in [1, algo.num_q={self.num_q}], got {self.num_min_q}")
        if not 0.0 <= self.demo_ratio < 1.0:
            raise ValueError(f"algo.demo_ratio must be in [0, 1), got {self.demo_ratio}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"algo.gamma must be in (0, 1], got {self.gamma}")
        for key in ("num_envs", "env_steps", "buffer_size", "batch", "utd", "nstep", "eval_every", "eval_episodes",
                    "eval_envs", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"algo.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("actor_updates", "learning_starts", "critic_warmup"):
            if getattr(self, key) < 0:
                raise ValueError(f"algo.{key} must be >= 0, got {getattr(self, key)}")
        if self.actor_lr <= 0 or self.critic_lr <= 0 or not 0 < self.tau <= 1:
            raise ValueError("algo.actor_lr, algo.critic_lr must be > 0 and algo.tau in (0, 1]")
        if self.action_scale <= 0:
            raise ValueError(f"algo.action_scale must be > 0, got {self.action_scale}")


# ---------------------------------------------------------------- networks
class EnsembleLinear(nn.Module):
    """`heads` independent linear layers as one: weight [heads, in, out], x [heads, B, in];
    `heads` (indices) evaluates only those heads (the REDQ target needs 2 of 10)."""

    def __init__(self, heads: int, fan_in: int, fan_out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, per head
        self.weight = nn.Parameter(torch.empty(heads, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(heads, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, heads: Optional[torch.Tensor] = None) -> torch.Tensor:
        if heads is None:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.baddbmm(self.bias[heads], x, self.weight[heads])


class EnsembleLayerNorm(nn.Module):
    """LayerNorm with per-head affine parameters [heads, 1, size]."""

    def __init__(self, heads: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, 1, size))
        self.bias = nn.Parameter(torch.zeros(heads, 1, size))

    def forward(self, x: torch.Tensor, heads: Optional[torch.Tensor] = None) -> torch.Tensor:
        w, b = (self.weight, self.bias) if heads is None else (self.weight[heads], self.bias[heads])
        return F.layer_norm(x, x.shape[-1:]) * w + b


class EnsembleCritic(nn.Module):
    """Q(s, a) for `heads` heads at once: [B, obs] × [B, A] -> [heads, B] (or [heads, B, bins]
    logits for a distributional critic). Every layer is batched over the heads."""

    def __init__(self, obs_size: int, action_size: int, hidden: List[int], heads: int, layer_norm: bool = True,
                 out: int = 1):
        super().__init__()
        self.heads, self.out = heads, out
        sizes = [obs_size + action_size, *hidden]
        layers: List[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(EnsembleLinear(heads, sizes[i], sizes[i + 1]))
            if layer_norm:
                layers.append(EnsembleLayerNorm(heads, sizes[i + 1]))
            layers.append(nn.ReLU())
        layers.append(EnsembleLinear(heads, sizes[-1], out))
        self.net = nn.Sequential(*layers)

    def forward(self, obs_n: torch.Tensor, action_n: torch.Tensor,
                heads: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = torch.cat([obs_n, action_n], -1).expand(self.heads if heads is None else len(heads), -1, -1)
        for layer in self.net:
            x = layer(x, heads) if isinstance(layer, (EnsembleLinear, EnsembleLayerNorm)) else layer(x)
        return x.squeeze(-1) if self.out == 1 else x

    def to_naive(self) -> "NaiveCritic":
        """The same heads as a Python loop over separate MLPs (for the benchmark and tests)."""
        return NaiveCritic(self)


class NaiveCritic(nn.Module):
    """Reference ensemble: one nn.Sequential per head, evaluated in a loop. Same numbers as
    EnsembleCritic (weights copied), kept only to measure what batching the heads buys."""

    def __init__(self, ens: EnsembleCritic):
        super().__init__()
        self.heads_ = nn.ModuleList()
        for h in range(ens.heads):
            layers: List[nn.Module] = []
            for m in ens.net:
                if isinstance(m, EnsembleLinear):
                    lin = nn.Linear(m.weight.shape[1], m.weight.shape[2])
                    lin.weight.data.copy_(m.weight.data[h].T)
                    lin.bias.data.copy_(m.bias.data[h, 0])
                    layers.append(lin)
                elif isinstance(m, EnsembleLayerNorm):
                    ln = nn.LayerNorm(m.weight.shape[-1])
                    ln.weight.data.copy_(m.weight.data[h, 0])
                    ln.bias.data.copy_(m.bias.data[h, 0])
                    layers.append(ln)
                else:
                    layers.append(nn.ReLU())
            self.heads_.append(nn.Sequential(*layers))
        self.out = ens.out

    def forward(self, obs_n: torch.Tensor, action_n: torch.Tensor,
                heads: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = torch.cat([obs_n, action_n], -1)
        which = range(len(self.heads_)) if heads is None else heads.tolist()
        y = torch.stack([self.heads_[h](x) for h in which])
        return y.squeeze(-1) if self.out == 1 else y


class ResidualActor(nn.Module):
    """(normalised obs, normalised base action) -> residual = tanh(MLP) · scale. With
    zero_init_last the last layer's weights and bias are 0: the residual is exactly 0."""

    def __init__(self, obs_size: int, action_size: int, hidden: List[int], scale: float, layer_norm: bool = True,
                 zero_init_last: bool = True):
        super().__init__()
        sizes = [obs_size + action_size, *hidden]
        layers: List[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if layer_norm:
                layers.append(nn.LayerNorm(sizes[i + 1]))
            layers.append(nn.ReLU())
        last = nn.Linear(sizes[-1], action_size)
        if zero_init_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        self.scale = scale

    def forward(self, obs_n: torch.Tensor, base_n: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(torch.cat([obs_n, base_n], -1))) * self.scale


class ZeroBase(nn.Module):
    """The 'base' of the RLPD-style baseline: always 0, so the actor's output is the action."""

    def __init__(self, norm: nn.Module, action_size: int):
        super().__init__()
        self.norm = norm
        self.action_size = action_size

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(obs.shape[0], self.action_size, dtype=obs.dtype, device=obs.device)

    @torch.jit.export
    def peek(self, obs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros(obs.shape[0], self.action_size, dtype=obs.dtype, device=obs.device)

    @torch.jit.export
    def reset(self, mask: Optional[torch.Tensor] = None) -> None:
        pass

    def with_batch(self, batch: int) -> "ZeroBase":
        return self


class OffsetBase(nn.Module):
    """A base whose normalised action is offset by a constant: a miscalibrated base (stress
    test, `base_bias`). Same interface as the base it wraps; the offset ships in the artifact."""

    def __init__(self, base: nn.Module, offset: torch.Tensor):
        super().__init__()
        self.base = base
        self.norm = base.norm
        self.register_buffer("offset", torch.as_tensor(offset, dtype=torch.float32).clone())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.base(obs) + self.offset, -1.0, 1.0)

    @torch.jit.export
    def peek(self, obs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.base.peek(obs, rows) + self.offset, -1.0, 1.0)

    @torch.jit.export
    def reset(self, mask: Optional[torch.Tensor] = None) -> None:
        self.base.reset(mask)

    def with_batch(self, batch: int) -> "OffsetBase":
        return OffsetBase(self.base.with_batch(batch), self.offset)


# ---------------------------------------------------------------- n-step returns
class NStep:
    """Turns single steps into n-step transitions, per environment.

    add(i, obs, base, action, reward) each step; when env i holds n pending steps, ready(i,
    next_obs, next_base) emits the oldest with R = Σ_{k<n} γ^k r_k and discount γ^n. When an
    episode ends, end(i, final_obs, final_base, terminated) emits every pending step j with the
    return to the end, R = Σ_k γ^(k-j) r_k, and discount 0 if terminated (success: nothing
    follows) or γ^(m-j) if truncated (time-out: bootstrap from the final observation)."""

    def __init__(self, n: int, gamma: float, num_envs: int):
        self.n, self.gamma = n, gamma
        self.pending: list[list[tuple]] = [[] for _ in range(num_envs)]

    def add(self, i: int, obs, base, action, reward: float) -> None:
        self.pending[i].append((obs, base, action, float(reward)))

    def _emit(self, steps: list[tuple], next_obs, next_base, terminated: bool) -> dict:
        R = sum(self.gamma ** k * s[3] for k, s in enumerate(steps))
        discount = 0.0 if terminated else self.gamma ** len(steps)
        obs, base, action, _ = steps[0]
        return {"obs": obs, "base": base, "action": action, "reward": R, "next_obs": next_obs,
                "next_base": next_base, "discount": discount, "done": float(terminated)}

    def ready(self, i: int, next_obs, next_base) -> list[dict]:
        p = self.pending[i]
        if len(p) < self.n:
            return []
        out = self._emit(p, next_obs, next_base, False)
        p.pop(0)
        return [out]

    def end(self, i: int, final_obs, final_base, terminated: bool) -> list[dict]:
        p, out = self.pending[i], []
        while p:
            out.append(self._emit(p, final_obs, final_base, terminated))
            p.pop(0)
        return out


# ---------------------------------------------------------------- replay
FIELDS = ("obs", "base", "action", "reward", "next_obs", "next_base", "discount", "done")


class Replay:
    """A ring of n-step transitions, preallocated as float32 tensors (see `bytes_per_transition`).
    The transition added g-th (from 0) lives in slot g % capacity until overwritten."""

    def __init__(self, capacity: int, obs_size: int, action_size: int):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        self.total = 0        # transitions ever added
        self.saved = 0        # of which a checkpoint segment holds the first `saved`
        self.segments: list[tuple[int, int, str]] = []   # (first, end, file) of the saved ones still live
        shapes = {"obs": (obs_size,), "base": (action_size,), "action": (action_size,), "reward": (),
                  "next_obs": (obs_size,), "next_base": (action_size,), "discount": (), "done": ()}
        self.data = {k: torch.zeros((capacity, *shapes[k])) for k in FIELDS}

    def add(self, transitions: list[dict]) -> None:
        for t in transitions:
            for k in FIELDS:
                self.data[k][self.ptr] = torch.as_tensor(t[k])
            self.ptr = (self.ptr + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)
            self.total += 1

    def add_batch(self, batch: dict[str, torch.Tensor]) -> None:
        n = len(batch["obs"])
        idx = (self.ptr + torch.arange(n)) % self.capacity
        for k in FIELDS:
            self.data[k][idx] = batch[k].to(self.data[k].dtype)
        self.ptr = int((self.ptr + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)
        self.total += n

    def sample(self, n: int, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (n,), generator=gen)
        return {k: v[idx] for k, v in self.data.items()}

    # A checkpoint of the replay is append-only: each one writes the transitions added since the
    # one before as a new segment file, instead of the whole buffer (454 MiB per million).
    def save(self, folder: Path) -> dict:
        """Write what is new as one segment in `folder` (atomically); return the checkpoint's state:
        the segments that still hold live transitions, oldest first. Call `prune` after the
        checkpoint that holds this state is written."""
        first = max(self.saved, self.total - self.capacity)   # older new rows were overwritten already
        if self.total > first:
            slots = torch.arange(first, self.total) % self.capacity
            name = f"replay_{first:012d}_{self.total:012d}.pt"
            save_atomic({k: v[slots] for k, v in self.data.items()}, folder / name)
            self.segments.append((first, self.total, name))
        self.saved = self.total
        oldest_live = self.total - self.size
        self.segments = [s for s in self.segments if s[1] > oldest_live]
        return {"total": self.total, "capacity": self.capacity, "segments": [list(s) for s in self.segments]}

    def prune(self, folder: Path) -> None:
        """Delete segment files that the last saved state no longer lists."""
        keep = {name for _, _, name in self.segments}
        for f in folder.glob("replay_*.pt"):
            if f.name not in keep:
                f.unlink()

    def load(self, state: dict, folder: Path) -> None:
        """Rebuild the ring from a saved state and its segments in `folder`."""
        if "data" in state:   # checkpoints written before segments held the filled part inline
            self.size, self.ptr = state["size"], state["ptr"]
            self.total = self.size if self.size < self.capacity else self.capacity + self.ptr  # slot = g % capacity
            self.saved = self.total - self.size   # the next save writes them all as one segment
            for k, v in state["data"].items():
                self.data[k][:self.size] = v
            return
        if state["capacity"] != self.capacity:
            raise ValueError(f"the checkpoint's replay holds {state['capacity']} transitions, algo.buffer_size is "
                             f"{self.capacity}; resume with the run's own buffer_size")
        self.total = self.saved = int(state["total"])
        self.size, self.ptr = min(self.total, self.capacity), self.total % self.capacity
        oldest_live = self.total - self.size
        for first, end, name in state["segments"]:
            path = folder / name
            if not path.is_file():
                raise ValueError(f"replay segment {path} is missing: the checkpoint needs every file listed "
                                 f"in its replay state ({len(state['segments'])} in {folder})")
            seg = torch.load(path, map_location="cpu")
            live = torch.arange(first, end) >= oldest_live
            slots = torch.arange(first, end)[live] % self.capacity
            for k in FIELDS:
                self.data[k][slots] = seg[k][live]
        self.segments = [tuple(s) for s in state["segments"]]

    def bytes_per_transition(self) -> int:
        return sum(v[0].numel() * v.element_size() for v in self.data.values())


def sample_mixed(online: Replay, demos: Optional[Replay], batch: int, demo_ratio: float,
                 gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """RLPD symmetric sampling: round(batch · demo_ratio) rows from the demos, the rest online
    (all online without demos; all demos while nothing online exists yet). Adds `is_demo`."""
    n_demo = 0 if demos is None or demos.size == 0 else int(round(batch * demo_ratio))
    if online.size == 0:
        n_demo = batch
    parts = []
    if n_demo:
        parts.append(demos.sample(n_demo, gen))
    if batch - n_demo:
        parts.append(online.sample(batch - n_demo, gen))
    out = {k: torch.cat([p[k] for p in parts]) for k in FIELDS}
    out["is_demo"] = torch.cat([torch.full((n_demo,), True), torch.full((batch - n_demo,), False)])
    return out


@torch.no_grad()
def demo_transitions(demos, base, norm, nstep: int, gamma: float) -> Replay:
    """Demo episodes as n-step transitions: the demo action (normalised), the base action
    recomputed on the demo observations (the base's chunk queue run along each episode, as it
    would execute there), reward 1 only on the final success frame (the env's sparse reward)."""
    E = demos.num_episodes
    lengths = demos.episode_ends - demos.episode_starts
    L = int(lengths.max()) if E else 0
    q = base.with_batch(E)
    q.reset()
    obs_pad = np.zeros((E, L, demos.obs.shape[1]), dtype=np.float32)
    for k, (s, e) in enumerate(demos.episodes()):
        obs_pad[k, :e - s] = demos.obs[s:e]
        obs_pad[k, e - s:] = demos.final_obs[k]
    bases = torch.stack([q(torch.as_tensor(obs_pad[:, t])) for t in range(L)], 1) if L else torch.zeros(E, 0, 1)
    final_base = q.peek(torch.as_tensor(demos.final_obs), torch.arange(E)) if E else None
    acc = NStep(nstep, gamma, 1)
    out: list[dict] = []
    obs_n_all = norm.obs(torch.as_tensor(demos.obs))
    final_n = norm.obs(torch.as_tensor(demos.final_obs))
    act_n_all = norm.action(torch.as_tensor(demos.actions))
    for k, (s, e) in enumerate(demos.episodes()):
        for t in range(e - s):
            if t > 0:
                out += acc.ready(0, obs_n_all[s + t], bases[k, t])
            acc.add(0, obs_n_all[s + t], bases[k, t], act_n_all[s + t], float(demos.rewards[s + t]))
        out += acc.end(0, final_n[k], final_base[k], bool(demos.terminated[e - 1]))
    rb = Replay(max(1, len(out)), demos.obs.shape[1], demos.actions.shape[1])
    if out:
        rb.add_batch({k: torch.stack([torch.as_tensor(t[k], dtype=torch.float32) for t in out]) for k in FIELDS})
    return rb


# ---------------------------------------------------------------- HL-Gauss (optional distributional critic)
def hl_gauss_target(y: torch.Tensor, v_min: float, v_max: float, bins: int, sigma_bins: float) -> torch.Tensor:
    """Histogram-loss target: the probability mass of N(y, σ) in each bin [.., bins]."""
    edges = torch.linspace(v_min, v_max, bins + 1, device=y.device)
    sigma = sigma_bins * (v_max - v_min) / bins
    cdf = torch.special.ndtr((edges - y.clamp(v_min, v_max)[..., None]) / sigma)
    p = cdf[..., 1:] - cdf[..., :-1]
    return p / p.sum(-1, keepdim=True).clamp_min(1e-8)


# ---------------------------------------------------------------- the learner
class ResFiT:
    def __init__(self, cfg: ResFiTConfig, base: nn.Module, obs_size: int, action_size: int, seed: int = 0):
        self.cfg = c = cfg
        self.base = base                    # frozen: BasePolicy (bc.py) or ZeroBase (RLPD-style)
        self.norm = base.norm
        for p in base.parameters():
            p.requires_grad_(False)
        scale = c.action_scale if c.use_base else 1.0
        self.actor = ResidualActor(obs_size, action_size, c.actor_hidden, scale, c.layer_norm,
                                   c.zero_init_last and c.use_base)
        out = c.hl_bins if c.critic_loss == "hl_gauss" else 1
        self.critic = EnsembleCritic(obs_size, action_size, c.critic_hidden, c.num_q, c.layer_norm, out)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.AdamW(self.actor.parameters(), lr=c.actor_lr, weight_decay=c.weight_decay)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=c.critic_lr, weight_decay=c.weight_decay)
        self.register_bins()
        self.gen = torch.Generator().manual_seed(seed)
        self.critic_updates = self.actor_updates = 0

    def register_bins(self) -> None:
        c = self.cfg
        edges = torch.linspace(c.v_min, c.v_max, c.hl_bins + 1)
        self.bin_centers = (edges[1:] + edges[:-1]) / 2

    def q_values(self, critic: nn.Module, obs_n: torch.Tensor, action_n: torch.Tensor,
                 heads: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[heads, B] expected Q (the distributional critic's mean over its bins)."""
        out = critic(obs_n, action_n, heads)
        return out if self.cfg.critic_loss == "mse" else (out.softmax(-1) * self.bin_centers).sum(-1)

    # ---- acting ----
    @torch.no_grad()
    def act(self, obs: torch.Tensor, base: nn.Module, phase: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """obs [B, obs] -> (normalised obs, normalised base action, executed normalised action).
        phase: 'warmup' (base + U(±warmup_noise)), 'explore' (base + π + clipped N(0, σ)), 'eval'."""
        c = self.cfg
        obs_n = self.norm.obs(obs)
        a_base = base(obs)
        if phase == "warmup":
            res = (torch.rand(a_base.shape, generator=self.gen) * 2 - 1) * c.warmup_noise
        else:
            res = self.actor(obs_n, a_base)
            if phase == "explore":
                res = res + (torch.randn(res.shape, generator=self.gen) * c.explore_noise).clamp(-c.explore_clip,
                                                                                                 c.explore_clip)
        return obs_n, a_base, torch.clamp(a_base + res, -1.0, 1.0)

    # ---- the critic: REDQ TD target, MSE (or HL-Gauss cross-entropy) over every head ----
    @torch.no_grad()
    def td_target(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        actor = self.actor_target if c.target_actor else self.actor
        noise = (torch.randn(b["next_base"].shape, generator=self.gen) * c.target_noise).clamp(-c.target_noise_clip,
                                                                                              c.target_noise_clip)
        next_a = torch.clamp(b["next_base"] + actor(b["next_obs"], b["next_base"]) + noise, -1.0, 1.0)
        heads = torch.randperm(c.num_q, generator=self.gen)[:c.num_min_q]              # REDQ: a random subset ...
        q_next = self.q_values(self.critic_target, b["next_obs"], next_a, heads).min(0).values   # ... and its min
        y = b["reward"] + b["discount"] * q_next          # discount = γ^k, or 0 after a termination
        return y.clamp(c.v_min, c.v_max) if c.clip_q_target else y

    def update_critic(self, b: dict[str, torch.Tensor]) -> dict[str, float]:
        c = self.cfg
        y = self.td_target(b)
        out = self.critic(b["obs"], b["action"])
        if c.critic_loss == "mse":
            q = out
            loss = ((q - y) ** 2).mean(1).sum()            # mean over the batch, summed over the heads
        else:
            target = hl_gauss_target(y, c.v_min, c.v_max, c.hl_bins, c.hl_sigma_bins)
            loss = -(target * out.log_softmax(-1)).sum(-1).mean(1).sum()
            q = (out.softmax(-1) * self.bin_centers).sum(-1)
        self.critic_opt.zero_grad()
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), c.grad_clip)
        self.critic_opt.step()
        self.critic_updates += 1
        return {"loss/critic": loss.item() / c.num_q, "q/mean": q.mean().item(), "q/target": y.mean().item(),
                "grad_norm/critic": float(grad)}

    # ---- the actor: maximise the mean over heads of Q(s, clamp(a_base + π(s, a_base))) ----
    def update_actor(self, b: dict[str, torch.Tensor]) -> dict[str, float]:
        c = self.cfg
        res = self.actor(b["obs"], b["base"])
        a = torch.clamp(b["base"] + res, -1.0, 1.0)
        self.critic.requires_grad_(False)
        q = self.q_values(self.critic, b["obs"], a).mean(0)                 # mean over the heads
        loss = -q.mean() + c.action_l2 * (res ** 2).sum(-1).mean()
        self.actor_opt.zero_grad()
        loss.backward()
        self.critic.requires_grad_(True)
        grad = torch.nn.utils.clip_grad_norm_(self.actor.parameters(), c.grad_clip)
        self.actor_opt.step()
        self.actor_updates += 1
        return {"loss/actor": loss.item(), "residual/abs_mean": res.abs().mean().item(),
                "grad_norm/actor": float(grad)}

    @torch.no_grad()
    def polyak(self, net: nn.Module, target: nn.Module) -> None:
        torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), self.cfg.tau)

    def update(self, online: Replay, demos: Optional[Replay], env_steps: int, train_actor: bool) -> dict[str, float]:
        """One environment step's worth of learning: `utd`·env_steps critic updates, then
        `actor_updates`·env_steps delayed actor updates (unless still in critic warm-up)."""
        c = self.cfg
        stats: dict[str, float] = {}
        ratio = c.demo_ratio if c.use_demos else 0.0
        for _ in range(c.utd * env_steps):
            b = sample_mixed(online, demos if c.use_demos else None, c.batch, ratio, self.gen)
            stats = self.update_critic(b)
            self.polyak(self.critic, self.critic_target)
        if train_actor:
            for _ in range(c.actor_updates * env_steps):
                b = sample_mixed(online, demos if c.use_demos else None, c.batch, ratio, self.gen)
                stats.update(self.update_actor(b))
                self.polyak(self.actor, self.actor_target)
        return stats

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "gen": self.gen.get_state(), "critic_updates": self.critic_updates, "actor_updates": self.actor_updates}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt"):
            getattr(self, k).load_state_dict(sd[k])
        self.gen.set_state(sd["gen"])
        self.critic_updates, self.actor_updates = sd["critic_updates"], sd["actor_updates"]


# ---------------------------------------------------------------- what runs on the robot
class NoResidual(nn.Module):
    """The residual of a BC-only artifact: always 0."""

    def forward(self, obs_n: torch.Tensor, base_n: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(base_n)


class DeployPolicy(JointTargetDeploy):
    """Base chunk queue + residual as one TorchScript module for one robot: forward(obs [obs])
    -> action [A] (env units, clipped); command(action) -> joint position targets; step(obs) ->
    both in one call; reset() empties the chunk queue (call it at every episode start)."""

    def __init__(self, base: nn.Module, residual: nn.Module, manifest: dict):
        super().__init__(manifest)
        self.base = copy.deepcopy(base.with_batch(1))
        self.residual = copy.deepcopy(residual)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.unsqueeze(0)
        action = self.env_action(self.base.norm.obs(x), self.base(x))[0]
        self.track_target(obs)
        return action

    def env_action(self, obs_n: torch.Tensor, a_base: torch.Tensor) -> torch.Tensor:
        """Base + residual (normalised) -> the task's action, clipped."""
        a = torch.clamp(a_base + self.residual(obs_n, a_base), -1.0, 1.0)
        return torch.clamp(self.base.norm.unaction(a), -self.clip, self.clip)

    @torch.jit.export
    def reset(self) -> None:
        self.base.reset(None)
        self.has_target = False

    def pure_tick(self) -> nn.Module:
        from robotrl.algos.bc import DiffusionChunk
        if isinstance(self.base.chunks.policy, DiffusionChunk):   # onnxruntime's noise is not torch's
            raise NotImplementedError("a diffusion chunk policy samples noise in its denoising loop, and its ONNX "
                                      "graph could not be parity-checked against torch; export it with "
                                      "format=torchscript")
        return ChunkTick(self)


class ChunkTick(nn.Module):
    """DeployPolicy's tick as a pure function, the form an ONNX graph takes: forward(obs [B, obs],
    memory [B, M]) -> (action, q_target, memory_out). The memory carries what the TorchScript
    module keeps in buffers, laid out (`memory_layout`) so that all zeros is the state reset()
    leaves: the chunk queue, how many of its actions are left (0: empty), the previous joint
    target and whether there is one. The chunk policy runs inside an If node of the graph only on
    a tick where some queue is empty, as in the TorchScript module."""

    def __init__(self, policy: DeployPolicy):
        super().__init__()
        self.policy = policy
        chunks = policy.base.chunks
        self.execute, self.n_action = chunks.execute, int(chunks.queue.shape[2])
        self.n_joint = int(policy.q_lower.numel())
        self.memory_layout = [("chunk_queue", self.execute * self.n_action), ("actions_left", 1),
                              ("joint_target", self.n_joint), ("has_joint_target", 1)]

    def forward(self, obs: torch.Tensor, memory: torch.Tensor):
        p, E, A = self.policy, self.execute, self.n_action
        B = obs.shape[0]
        stored, left, target, has_target = memory.split([size for _, size in self.memory_layout], dim=1)
        stored = stored.reshape(B, E, A)
        obs_n = p.base.norm.obs(obs)
        empty = left < 0.5
        fresh = torch.cond(empty.any(), lambda o, q: p.base.chunks.policy(o)[:, :E].contiguous(),
                           lambda o, q: q.clone(), (obs_n, stored))
        queue = torch.where(empty[:, :, None], fresh, stored)
        left = torch.where(empty, torch.full_like(left, E), left)
        at = (E - left).long()[:, :, None].expand(B, 1, A)   # the queue's next action
        action = p.env_action(obs_n, torch.clamp(queue.gather(1, at)[:, 0], -1.0, 1.0))
        if p.delta:
            measured = p.measured_target(obs)
            target = measured if p.from_target else torch.where(has_target > 0.5, target, measured)
        q_target = p.joint_targets(target, action)
        if p.delta and not p.from_target:
            target = q_target
        memory_out = torch.cat([queue.reshape(B, E * A), left - 1.0, target, torch.ones_like(has_target)], dim=1)
        return action, q_target, memory_out
