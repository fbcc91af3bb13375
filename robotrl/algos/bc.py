"""Behaviour cloning with action chunking: the frozen base policy of ResFiT, and DiWA's diffusion policy.

Top to bottom: the config; the fixed normaliser (observation mean/std and action min/max from
the demos, the action range widened by (1 + action_scale) so the base fills about ±0.83 and a
residual has room up to ±1); three chunk policies (an MLP; an ACT-style small transformer:
observation tokens -> encoder, `chunk` learned queries -> decoder, no CVAE latent; and a DDPM
over the chunk); the chunk queue that executes `execute` actions open-loop before asking for
the next chunk; and the BC loss (L1 on normalised actions, or the diffusion policy's noise
prediction error, masked past the end of an episode), with an optional weight average (EMA).

Default: chunk 10 at 25 Hz (0.4 s), all 10 executed open-loop. Everything in the modules below
is TorchScript-compatible: the same ChunkQueue runs in training (batched over environments)
and inside the exported artifact (one environment).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import List, Optional

import numpy as np
import torch
from torch import nn

from robotrl.algos import require_finite

POLICIES = ("mlp", "act", "diffusion")
SAMPLINGS = ("deterministic", "ddpm")


@dataclasses.dataclass
class BCConfig:
    name: str = "bc"
    demos: Optional[str] = None      # path of a `robotrl demos` .npz file (required)
    max_demos: Optional[int] = None  # use only the first N episodes (a deliberately weak base: few demos)
    successes_only: bool = True      # drop the failed episodes a dataset may hold
    policy: str = "mlp"              # mlp | act | diffusion
    chunk: int = 10                  # actions predicted per chunk (0.4 s at 25 Hz)
    execute: int = 10                # actions executed open-loop from each chunk before re-planning (<= chunk)
    action_scale: float = 0.2        # demo min/max widened by (1 + action_scale) -> base fills ±1/1.2
    min_obs_std: float = 0.1         # floor of the observation std (a near-constant demo feature must not
                                     # blow up online)
    min_action_range: float = 0.1    # floor of (max - min) per action dimension
    hidden: List[int] = dataclasses.field(default_factory=lambda: [512, 512])   # mlp; diffusion: equal widths
    denoise_steps: int = 20          # diffusion: DDPM steps K
    sampling: str = "deterministic"  # diffusion: deterministic (each step's mean, from a random start) | ddpm
    ema: float = 0.0                 # decay of an exponential moving average of the weights that is
                                     # evaluated and exported (0: off; diffusion policies: 0.995)
    d_model: int = 128               # act
    n_heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    ff: int = 256
    obs_tokens: int = 4              # the observation is embedded as this many tokens
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch: int = 256
    steps: int = 4000                # gradient steps
    grad_clip: float = 1.0
    obs_noise: float = 0.0           # Gaussian noise on normalised observations during training (augmentation)
    eval_every: int = 1000           # gradient steps between evaluations in the twin
    eval_episodes: int = 20
    eval_envs: int = 10

    def __post_init__(self):
        require_finite(self)
        if self.policy not in POLICIES:
            raise ValueError(f"algo.policy must be one of {list(POLICIES)}, got '{self.policy}'")
        if self.chunk < 1 or not 1 <= self.execute <= self.chunk:
            raise ValueError(f"algo.chunk must be >= 1 and 1 <= algo.execute <= algo.chunk, "
                             f"got chunk={self.chunk}, execute={self.execute}")
        if self.action_scale < 0:
            raise ValueError(f"algo.action_scale must be >= 0, got {self.action_scale}")
        for key in ("batch", "steps", "eval_every", "eval_episodes", "eval_envs"):
            if getattr(self, key) < 1:
                raise ValueError(f"algo.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"algo.lr must be > 0, got {self.lr}")
        if self.policy == "diffusion" and (not self.hidden or len(set(self.hidden)) != 1):
            raise ValueError(f"algo.hidden of a diffusion policy is residual blocks of one width, e.g. [512,512,512]; "
                             f"got {list(self.hidden)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"algo.sampling must be one of {list(SAMPLINGS)}, got '{self.sampling}'")
        if self.denoise_steps < 1:
            raise ValueError(f"algo.denoise_steps must be >= 1, got {self.denoise_steps}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"algo.ema must be in [0, 1), got {self.ema}")
        if self.d_model % self.n_heads:
            raise ValueError(f"algo.d_model ({self.d_model}) must be divisible by algo.n_heads ({self.n_heads})")


class Normalizer(nn.Module):
    """Observation z-score and action min/max -> [-1, 1] (widened by 1 + action_scale), fixed
    from the demos. `action` <-> `normalised action`: a = center + half * a_n."""

    def __init__(self, obs_size: int, action_size: int):
        super().__init__()
        self.register_buffer("obs_mean", torch.zeros(obs_size))
        self.register_buffer("obs_std", torch.ones(obs_size))
        self.register_buffer("act_center", torch.zeros(action_size))
        self.register_buffer("act_half", torch.ones(action_size))

    @torch.no_grad()
    def fit(self, obs: np.ndarray, actions: np.ndarray, action_scale: float, min_obs_std: float = 0.1,
            min_action_range: float = 0.1) -> None:
        self.obs_mean.copy_(torch.as_tensor(obs.mean(0)))
        self.obs_std.copy_(torch.as_tensor(obs.std(0)).clamp_min(min_obs_std))
        lo, hi = torch.as_tensor(actions.min(0)), torch.as_tensor(actions.max(0))
        self.act_center.copy_((hi + lo) / 2)
        self.act_half.copy_(((hi - lo) / 2).clamp_min(min_action_range / 2) * (1.0 + action_scale))

    def obs(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.clamp((obs - self.obs_mean) / self.obs_std, -10.0, 10.0)

    def action(self, action: torch.Tensor) -> torch.Tensor:
        return (action - self.act_center) / self.act_half

    def unaction(self, action_n: torch.Tensor) -> torch.Tensor:
        return self.act_center + self.act_half * action_n


class MlpChunk(nn.Module):
    """Normalised observation -> a chunk of normalised actions [B, chunk, A]."""

    def __init__(self, obs_size: int, action_size: int, chunk: int, hidden: List[int]):
        super().__init__()
        layers: List[nn.Module] = []
        sizes = [obs_size, *hidden]
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.LayerNorm(sizes[i + 1]), nn.GELU()]
        layers.append(nn.Linear(sizes[-1], chunk * action_size))
        self.net = nn.Sequential(*layers)
        self.chunk, self.action_size = chunk, action_size

    def forward(self, obs_n: torch.Tensor) -> torch.Tensor:
        return self.net(obs_n).reshape(obs_n.shape[0], self.chunk, self.action_size)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float, cross: bool):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True) if cross else None
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        cross = self.cross
        if cross is not None and memory is not None:
            h = self.ln2(x)
            x = x + self.drop(cross(h, memory, memory, need_weights=False)[0])
        return x + self.drop(self.mlp(self.ln3(x)))


class ActChunk(nn.Module):
    """ACT-style chunk policy without the CVAE: the observation becomes `obs_tokens` tokens
    (one linear map + learned positions) for an encoder; `chunk` learned queries attend to the
    encoded tokens in a decoder; a linear head reads one action per query."""

    def __init__(self, obs_size: int, action_size: int, chunk: int, d_model: int, n_heads: int,
                 enc_layers: int, dec_layers: int, ff: int, obs_tokens: int, dropout: float):
        super().__init__()
        self.tokens, self.d = obs_tokens, d_model
        self.embed = nn.Linear(obs_size, obs_tokens * d_model)
        self.obs_pos = nn.Parameter(torch.randn(1, obs_tokens, d_model) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, chunk, d_model) * 0.02)
        self.encoder = nn.ModuleList([Block(d_model, n_heads, ff, dropout, False) for _ in range(enc_layers)])
        self.decoder = nn.ModuleList([Block(d_model, n_heads, ff, dropout, True) for _ in range(dec_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, action_size)

    def forward(self, obs_n: torch.Tensor) -> torch.Tensor:
        B = obs_n.shape[0]
        memory = self.embed(obs_n).reshape(B, self.tokens, self.d) + self.obs_pos
        for blk in self.encoder:
            memory = blk(memory, None)
        x = self.queries.expand(B, -1, -1)
        for blk in self.decoder:
            x = blk(x, memory)
        return self.head(self.ln(x))


def cosine_alpha_bars(steps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ_k of the cosine noise schedule (Nichol & Dhariwal), k = 1..steps, each step's β ≤ 0.999."""
    t = torch.linspace(0, steps, steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * torch.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Mish(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class DiffusionChunk(nn.Module):
    """A DDPM over a chunk of normalised actions, conditioned on the normalised observation
    (Diffusion Policy; DiWA's base): ε-prediction, cosine schedule, K denoising steps, an MLP of
    residual blocks on [noisy chunk, observation, step embedding]. Sampling starts from N(0, I);
    each step's predicted clean chunk is clipped to [-1, 1]. `forward` samples: DDPM adds each
    step's posterior noise; `deterministic` takes each step's mean (DPPO's evaluation: on arm_lift
    it succeeded more often, 30/30 against 25/30 episodes). It draws from the global torch
    generator: seed it for a reproducible chunk. `denoise` is one step of the chain as a Gaussian
    (mean, std), the form a policy gradient over the chain needs."""

    def __init__(self, obs_size: int, action_size: int, chunk: int, hidden: List[int], denoise_steps: int,
                 sampling: str = "deterministic", step_dim: int = 32):
        super().__init__()
        self.chunk, self.action_size, self.steps = chunk, action_size, denoise_steps
        ab = cosine_alpha_bars(denoise_steps)
        ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
        beta = 1 - ab / ab_prev
        for name, value in {"sqrt_ab": ab.sqrt(), "sqrt_1m_ab": (1 - ab).sqrt(),
                            "coef_x0": beta * ab_prev.sqrt() / (1 - ab),               # posterior mean of
                            "coef_xk": (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab),   # x_{k-1} given x_k, x0
                            "post_std": (beta * (1 - ab_prev) / (1 - ab)).sqrt(),
                            "freqs": torch.exp(-torch.arange(step_dim // 2) * (9.21 / (step_dim // 2 - 1)))}.items():
            self.register_buffer(name, value.float())
        # A floor on every step's std, 0 for BC; DiWA fine-tunes the chain with one, so that its last
        # steps explore and have a log-likelihood (a ddpm-sampling artifact then samples with it too).
        self.register_buffer("min_std", torch.zeros(()))
        self.register_buffer("step_noise", torch.tensor(1.0 if sampling == "ddpm" else 0.0))
        width, n = hidden[0], chunk * action_size
        self.inp = nn.Linear(n + obs_size + step_dim, width)
        self.blocks = nn.Sequential(*[ResBlock(width) for _ in hidden])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n))

    def eps(self, x: torch.Tensor, k: torch.Tensor, obs_n: torch.Tensor) -> torch.Tensor:
        """The noise in x [B, chunk·A] at steps k [B] (0-based: k = 0 is the last, least noisy)."""
        angle = k.float()[:, None] * self.freqs
        h = self.inp(torch.cat([x, obs_n, torch.sin(angle), torch.cos(angle)], dim=1))
        return self.out(self.blocks(h))

    @torch.jit.export
    def denoise(self, x: torch.Tensor, k: int, obs_n: torch.Tensor):
        """p(x_{k-1} | x_k) as (mean, std) [B, chunk·A]; the std is the DDPM posterior's (0 at the
        last step, k = 0) or min_std, whichever is larger."""
        return self.denoise_rows(x, torch.full([x.shape[0]], k, dtype=torch.long), obs_n)

    def denoise_rows(self, x: torch.Tensor, k: torch.Tensor, obs_n: torch.Tensor):
        """denoise with a step per row, k [B]."""
        eps = self.eps(x, k, obs_n)
        k = k[:, None]
        x0 = torch.clamp((x - self.sqrt_1m_ab[k] * eps) / self.sqrt_ab[k], -1.0, 1.0)
        std = torch.maximum(self.post_std[k], self.min_std).expand_as(x)
        return self.coef_x0[k] * x0 + self.coef_xk[k] * x, std

    def forward(self, obs_n: torch.Tensor) -> torch.Tensor:
        B = obs_n.shape[0]
        x = torch.randn([B, self.chunk * self.action_size], device=obs_n.device)
        for k in range(self.steps - 1, -1, -1):
            mean, std = self.denoise(x, k, obs_n)
            x = mean + self.step_noise * std * torch.randn_like(mean)
        return x.reshape(B, self.chunk, self.action_size)

    def denoising_loss(self, obs_n: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                       gen: torch.Generator) -> torch.Tensor:
        """‖ε − ε̂(√ᾱ_k·a + √(1−ᾱ_k)·ε, k, o)‖² at a random step per row, masked past episode ends."""
        B = obs_n.shape[0]
        k = torch.randint(0, self.steps, (B,), generator=gen)
        noise = torch.randn(target.shape, generator=gen).reshape(B, -1)
        x = self.sqrt_ab[k, None] * target.reshape(B, -1) + self.sqrt_1m_ab[k, None] * noise
        err = (self.eps(x, k, obs_n) - noise).pow(2).reshape(target.shape).mean(-1)
        return (err * mask).sum() / mask.sum()


def make_chunk_policy(cfg: BCConfig, obs_size: int, action_size: int) -> nn.Module:
    if cfg.policy == "mlp":
        return MlpChunk(obs_size, action_size, cfg.chunk, cfg.hidden)
    if cfg.policy == "diffusion":
        return DiffusionChunk(obs_size, action_size, cfg.chunk, cfg.hidden, cfg.denoise_steps, cfg.sampling)
    return ActChunk(obs_size, action_size, cfg.chunk, cfg.d_model, cfg.n_heads, cfg.enc_layers, cfg.dec_layers,
                    cfg.ff, cfg.obs_tokens, cfg.dropout)


class ChunkQueue(nn.Module):
    """Open-loop execution of action chunks for B environments: each env pops one action per
    call and asks the policy for a new chunk (on its current observation) when its queue is
    empty. `reset(mask)` empties the queues of the envs that start a new episode. The queue is
    runtime state (non-persistent buffers): not in state_dict, not in the weights hash."""

    def __init__(self, policy: nn.Module, execute: int, action_size: int, batch: int = 1):
        super().__init__()
        self.policy = policy
        self.execute = execute
        self.register_buffer("queue", torch.zeros(batch, execute, action_size), persistent=False)
        self.register_buffer("index", torch.full((batch,), execute, dtype=torch.long), persistent=False)

    def _refill(self, obs_n: torch.Tensor) -> None:
        need = (self.index >= self.execute).nonzero().squeeze(1)
        if need.numel() > 0:
            chunk = self.policy(obs_n.index_select(0, need))[:, :self.execute]
            self.queue[need] = chunk
            self.index[need] = 0

    def forward(self, obs_n: torch.Tensor) -> torch.Tensor:
        """obs_n [B, obs] -> the next normalised base action of every env [B, A]."""
        self._refill(obs_n)
        rows = torch.arange(self.queue.shape[0], device=obs_n.device)
        action = self.queue[rows, self.index]
        self.index += 1
        return action

    @torch.jit.export
    def peek(self, obs_n: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """What forward would return for envs `rows` at obs_n [len(rows), obs], without changing
        any queue (the base action at a time-out's final observation, for bootstrapping)."""
        idx = self.index.index_select(0, rows)
        out = self.queue.index_select(0, rows)[torch.arange(rows.numel()), idx.clamp_max(self.execute - 1)]
        empty = idx >= self.execute
        if bool(empty.any()):
            out = torch.where(empty[:, None], self.policy(obs_n)[:, 0], out)
        return out

    @torch.jit.export
    def reset(self, mask: Optional[torch.Tensor] = None) -> None:
        if mask is None:
            self.index.fill_(self.execute)
        else:
            self.index[mask] = self.execute

    def resize(self, batch: int) -> "ChunkQueue":
        self.queue = torch.zeros(batch, self.execute, self.queue.shape[2])
        self.index = torch.full((batch,), self.execute, dtype=torch.long)
        return self


class BasePolicy(nn.Module):
    """Frozen BC base = normaliser + chunk queue. `forward` gives normalised actions; the
    residual learner works in that space, `norm.unaction` maps back to env actions."""

    def __init__(self, norm: Normalizer, policy: nn.Module, execute: int, action_size: int, batch: int = 1):
        super().__init__()
        self.norm = norm
        self.chunks = ChunkQueue(policy, execute, action_size, batch)

    @staticmethod
    def build(cfg: BCConfig, obs_size: int, action_size: int, batch: int = 1) -> "BasePolicy":
        return BasePolicy(Normalizer(obs_size, action_size), make_chunk_policy(cfg, obs_size, action_size),
                          cfg.execute, action_size, batch)

    def with_batch(self, batch: int) -> "BasePolicy":
        """Another base for `batch` envs with its own queues, sharing this one's weights."""
        return BasePolicy(self.norm, self.chunks.policy, self.chunks.execute, self.chunks.queue.shape[2], batch)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.chunks(self.norm.obs(obs)), -1.0, 1.0)

    @torch.jit.export
    def peek(self, obs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.chunks.peek(self.norm.obs(obs), rows), -1.0, 1.0)

    @torch.jit.export
    def reset(self, mask: Optional[torch.Tensor] = None) -> None:
        self.chunks.reset(mask)


# ---- training ----
def chunk_targets(demos, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """For every demo step t: actions[t : t + chunk] inside its episode [T, chunk, A] and a
    mask [T, chunk] that is False past the episode's end (those entries are not learned)."""
    T, A = demos.actions.shape
    targets = np.zeros((T, chunk, A), dtype=np.float32)
    mask = np.zeros((T, chunk), dtype=bool)
    for s, e in demos.episodes():
        for k in range(chunk):
            n = max(0, e - s - k)
            targets[s:s + n, k] = demos.actions[s + k:e]
            mask[s:s + n, k] = True
    return targets, mask


class BC:
    """The learner: fit the normaliser on the demos, then L1 on normalised action chunks."""

    def __init__(self, cfg: BCConfig, demos, seed: int = 0):
        self.cfg = cfg
        self.demos = demos
        obs_size, action_size = demos.obs.shape[1], demos.actions.shape[1]
        self.base = BasePolicy.build(cfg, obs_size, action_size).eval()
        self.base.norm.fit(demos.obs, demos.actions, cfg.action_scale, cfg.min_obs_std, cfg.min_action_range)
        targets, mask = chunk_targets(demos, cfg.chunk)
        with torch.no_grad():
            self.obs_n = self.base.norm.obs(torch.as_tensor(demos.obs))
            self.targets = self.base.norm.action(torch.as_tensor(targets))
        self.mask = torch.as_tensor(mask, dtype=torch.float32)
        # What the optimiser trains; with `ema` the base (evaluated, checkpointed, exported) holds the average.
        self.net = copy.deepcopy(self.base.chunks.policy) if cfg.ema > 0 else self.base.chunks.policy
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, cfg.steps, eta_min=cfg.lr * 0.05)
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        obs_n = self.obs_n[idx]
        if self.cfg.obs_noise > 0:
            obs_n = obs_n + self.cfg.obs_noise * torch.randn(obs_n.shape, generator=self.gen)
        if isinstance(self.net, DiffusionChunk):
            return self.net.denoising_loss(obs_n, self.targets[idx], self.mask[idx], self.gen)
        err = (self.net(obs_n) - self.targets[idx]).abs().mean(-1)          # L1 per (step, chunk entry)
        m = self.mask[idx]
        return (err * m).sum() / m.sum()

    def update(self) -> dict[str, float]:
        self.net.train()
        idx = torch.randint(0, len(self.obs_n), (self.cfg.batch,), generator=self.gen)
        loss = self.loss(idx)
        self.opt.zero_grad()
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.net is not self.base.chunks.policy:
            with torch.no_grad():
                for avg, p in zip(self.base.chunks.policy.parameters(), self.net.parameters()):
                    avg.lerp_(p, 1.0 - self.cfg.ema)
        self.step += 1
        self.net.eval()
        return {"loss/bc": loss.item(), "grad_norm": float(grad), "lr": self.sched.get_last_lr()[0]}
