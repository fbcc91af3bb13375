"""DiWA: fine-tune a diffusion policy with PPO over its denoising chain, entirely inside a
frozen world model (papers/diwa.md). No environment step is taken while learning; the twin is
used only to evaluate.

Top to bottom: the config; the dream (imagined environments started from real reset
observations encoded by the world model; each decision samples an action chunk through the
denoising chain, with a floor on every step's std, and executes it open-loop in the model;
the success classifier gives the binary reward and ends the episode; time-outs bootstrap);
GAE over decisions with running reward scaling; and the loss: PPO on every one of the last
K' denoising steps, each a Gaussian policy step whose log-likelihood (clamped, averaged over
the chunk) gives the ratio, sharing its decision's advantage discounted by γ_denoise per step
from the chain's end, with a clip range that grows from the noisiest fine-tuned step to the
last; a value loss on the latent; and optionally a BC regulariser, the pretrained chain's
log-likelihood of the same steps.

The policy acts on observations (the world model's decoded ones in the dream, the robot's on
the robot), so the artifact is the diffusion policy alone: it needs no world model to run.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import List, Optional

import numpy as np
import torch
from torch import nn

from robotrl.algos import require_finite


@dataclasses.dataclass
class DiWAConfig:
    name: str = "diwa"
    base: Optional[str] = None           # an `algo=bc algo.policy=diffusion` run: the pretrained policy (required)
    world_model: Optional[str] = None    # an `algo=world_model` run (required)
    envs: int = 50                       # imagined environments
    decisions: int = 36                  # chunk decisions per environment per iteration
    max_model_steps: int = 72            # an imagined episode is truncated after this many actions
    iterations: int = 100
    finetune_steps: int = 10             # K': the last K' denoising steps are trained
    min_std: float = 0.1                 # floor of every denoising step's std (sampling and log-likelihood)
    logprob_min: float = -5.0            # per-dimension log-likelihood clamp
    logprob_max: float = 2.0
    gamma: float = 0.999                 # per decision
    lam: float = 0.95
    gamma_denoise: float = 0.99          # advantage discount per denoising step back from the chain's end
    clip_first: float = 0.001            # PPO clip range at the noisiest fine-tuned step ...
    clip_last: float = 0.01              # ... growing (exponentially, rate 3) to this at the last one
    epochs: int = 10
    minibatch: int = 500                 # (decision, denoising step) samples per gradient step
    actor_lr: float = 1e-5
    critic_lr: float = 1e-3
    critic_hidden: List[int] = dataclasses.field(default_factory=lambda: [256, 256, 256])
    critic_warmup: int = 2               # iterations that train only the critic
    bc_weight: float = 0.0               # α_BC: the pretrained chain's log-likelihood as a regulariser
    max_grad_norm: float = 1.0
    eval_every: int = 10                 # iterations between evaluations in the twin
    eval_episodes: int = 20
    eval_envs: int = 10

    def __post_init__(self):
        require_finite(self)
        for key in ("envs", "decisions", "max_model_steps", "iterations", "finetune_steps", "epochs", "minibatch",
                    "eval_every", "eval_episodes", "eval_envs"):
            if getattr(self, key) < 1:
                raise ValueError(f"algo.{key} must be >= 1, got {getattr(self, key)}")
        if self.min_std <= 0:
            raise ValueError(f"algo.min_std must be > 0 (the chain's log-likelihood needs it), got {self.min_std}")
        if not self.logprob_min < self.logprob_max:
            raise ValueError(f"algo.logprob_min must be < algo.logprob_max, got {self.logprob_min}, {self.logprob_max}")
        for key in ("gamma", "lam", "gamma_denoise"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"algo.{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 < self.clip_first <= self.clip_last:
            raise ValueError(f"algo.clip_first and algo.clip_last must be 0 < first <= last, "
                             f"got {self.clip_first}, {self.clip_last}")
        for key in ("actor_lr", "critic_lr", "max_grad_norm"):
            if getattr(self, key) <= 0:
                raise ValueError(f"algo.{key} must be > 0, got {getattr(self, key)}")
        if self.bc_weight < 0 or self.critic_warmup < 0:
            raise ValueError(f"algo.bc_weight and algo.critic_warmup must be >= 0, "
                             f"got {self.bc_weight}, {self.critic_warmup}")


def clip_ranges(cfg: DiWAConfig) -> torch.Tensor:
    """The PPO clip range of each fine-tuned step, noisiest first (DPPO's exponential ramp)."""
    t = torch.linspace(0, 1, cfg.finetune_steps)
    return cfg.clip_first + (cfg.clip_last - cfg.clip_first) * (torch.exp(3 * t) - 1) / (math.exp(3) - 1)


def critic(latent: int, hidden: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for a, b in zip([latent, *hidden], hidden):
        layers += [nn.Linear(a, b), nn.Mish()]
    return nn.Sequential(*layers, nn.Linear(hidden[-1], 1))


class RunningScale:
    """DPPO's running reward scaling: rewards divided by the std of the discounted return."""

    def __init__(self, gamma: float, envs: int):
        self.gamma, self.ret = gamma, np.zeros(envs)
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """rewards, dones [T, N] in time order -> scaled rewards."""
        for r, d in zip(rewards, dones):
            self.ret = self.ret * self.gamma + r
            for x in self.ret:   # Welford
                self.count += 1
                delta = x - self.mean
                self.mean += delta / self.count
                self.m2 += delta * (x - self.mean)
            self.ret[d] = 0.0
        std = math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0
        return rewards / max(std, 1e-8)


class DiWA:
    """The learner: the diffusion chunk policy being fine-tuned (inside `base`, a BasePolicy),
    a frozen copy of it (the BC regulariser), the frozen world model, and a critic on its latent."""

    def __init__(self, cfg: DiWAConfig, base, world_model, starts: np.ndarray, execute: int, clip: float,
                 seed: int = 0):
        from robotrl.algos.bc import DiffusionChunk
        self.cfg, self.base, self.wm = cfg, base, world_model.eval()
        self.policy = base.chunks.policy
        if not isinstance(self.policy, DiffusionChunk):
            raise ValueError("algo.base: DiWA fine-tunes a diffusion policy (algo=bc algo.policy=diffusion); "
                             f"this base is {type(self.policy).__name__}")
        if cfg.finetune_steps > self.policy.steps:
            raise ValueError(f"algo.finetune_steps ({cfg.finetune_steps}) must be <= the base's denoise_steps "
                             f"({self.policy.steps})")
        self.policy.min_std.fill_(cfg.min_std)
        self.pretrained = copy.deepcopy(self.policy).eval().requires_grad_(False) if cfg.bc_weight > 0 else None
        self.wm.requires_grad_(False)
        self.critic = critic(world_model.latent_size, cfg.critic_hidden)
        self.actor_opt = torch.optim.Adam(self.policy.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.starts = torch.as_tensor(starts, dtype=torch.float32)   # real reset observations
        self.execute, self.clip = execute, clip
        self.gen = torch.Generator().manual_seed(seed)
        self.scale = RunningScale(cfg.gamma, cfg.envs)
        self.clips = clip_ranges(cfg)
        self.iteration = 0
        with torch.no_grad():
            self.z = self._new_latents(cfg.envs)
        self.model_steps = torch.zeros(cfg.envs, dtype=torch.long)

    # ---- the dream ----
    def _new_latents(self, n: int) -> torch.Tensor:
        rows = torch.randint(0, len(self.starts), (n,), generator=self.gen)
        return self.wm.encode(self.starts[rows])

    @torch.no_grad()
    def _sample_chain(self, obs_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk (normalised) and the last K'+1 points of its chain [N, K'+1, chunk·A]."""
        p, K1 = self.policy, self.cfg.finetune_steps
        x = torch.randn(obs_n.shape[0], p.chunk * p.action_size, generator=self.gen)
        kept = [x] if p.steps == K1 else []
        for k in range(p.steps - 1, -1, -1):
            mean, std = p.denoise(x, k, obs_n)
            x = mean + std * torch.randn(mean.shape, generator=self.gen)
            if k == K1:
                kept = [x]
            elif k < K1:
                kept.append(x)
        return x.clamp(-1.0, 1.0).reshape(-1, p.chunk, p.action_size), torch.stack(kept, 1)

    @torch.no_grad()
    def rollout(self) -> dict:
        """`decisions` chunk decisions of every imagined environment."""
        c, N = self.cfg, self.cfg.envs
        T = c.decisions
        obs_n, chains, latents = [], [], []
        rewards, dones, boot = np.zeros((T, N)), np.zeros((T, N), dtype=bool), np.zeros((T, N))
        successes, episodes = 0, 0
        for t in range(T):
            latents.append(self.z)
            o_n = self.base.norm.obs(self.wm.decode(self.z))
            chunk, chain = self._sample_chain(o_n)
            obs_n.append(o_n)
            chains.append(chain)
            actions = torch.clamp(self.base.norm.unaction(chunk[:, :self.execute]), -self.clip, self.clip)
            alive = torch.ones(N, dtype=torch.bool)
            succeeded = torch.zeros(N, dtype=torch.bool)
            z = self.z
            for i in range(self.execute):
                z_next = self.wm.step(z, actions[:, i])
                z = torch.where(alive[:, None], z_next, z)
                self.model_steps += alive.long()
                hit = alive & (self.wm.success_logit(z) > 0)
                succeeded |= hit
                alive &= ~hit
            timeout = ~succeeded & (self.model_steps >= c.max_model_steps)
            rewards[t] = succeeded.numpy()
            dones[t] = (succeeded | timeout).numpy()
            if timeout.any():   # a time-out is not a failure: bootstrap from the state it stopped in
                boot[t, timeout.numpy()] = self.critic(z[timeout]).squeeze(-1).numpy()
            successes += int(succeeded.sum())
            episodes += int((succeeded | timeout).sum())
            ended = succeeded | timeout
            if ended.any():
                z = z.clone()
                z[ended] = self._new_latents(int(ended.sum()))
                self.model_steps[ended] = 0
            self.z = z
        values = self.critic(torch.stack(latents)).squeeze(-1).numpy()            # [T, N]
        last_value = self.critic(self.z).squeeze(-1).numpy()
        scaled = self.scale(rewards, dones)
        adv = np.zeros((T, N))
        gae = np.zeros(N)
        for t in range(T - 1, -1, -1):
            next_value = last_value if t == T - 1 else values[t + 1]
            # a time-out bootstraps from its own final state (boot, scaled like the critic's targets)
            target = scaled[t] + c.gamma * np.where(dones[t], boot[t], next_value)
            delta = target - values[t]
            gae = delta + c.gamma * c.lam * np.where(dones[t], 0.0, gae)
            adv[t] = gae
        chains_t = torch.stack(chains)                                              # [T, N, K'+1, n]
        obs_t = torch.stack(obs_n)
        old_logp = self._logp(self.policy, obs_t.reshape(T * N, -1), chains_t.reshape(T * N, *chains_t.shape[2:]))
        return {"obs_n": obs_t.reshape(T * N, -1), "latent": torch.stack(latents).reshape(T * N, -1),
                "chain": chains_t.reshape(T * N, *chains_t.shape[2:]), "old_logp": old_logp,
                "adv": torch.as_tensor(adv, dtype=torch.float32).reshape(-1),
                "ret": torch.as_tensor(adv + values, dtype=torch.float32).reshape(-1),
                "imagined_success_rate": successes / max(episodes, 1), "imagined_episodes": episodes}

    def _logp(self, policy, obs_n: torch.Tensor, chain: torch.Tensor, steps: Optional[torch.Tensor] = None):
        """Clamped mean log-likelihood of each fine-tuned step x_k -> x_{k-1} [B, K'] (or of the
        steps `steps` [B], one per row)."""
        K1 = self.cfg.finetune_steps
        if steps is None:
            return torch.stack([self._logp(policy, obs_n, chain, torch.full((len(obs_n),), j)) for j in range(K1)], 1)
        rows = torch.arange(len(obs_n))
        x_in, x_out = chain[rows, steps], chain[rows, steps + 1]
        mean, std = policy.denoise_rows(x_in, K1 - 1 - steps, obs_n)
        logp = torch.distributions.Normal(mean, std).log_prob(x_out)
        return logp.clamp(self.cfg.logprob_min, self.cfg.logprob_max).mean(-1)

    # ---- the loss ----
    def update(self, batch: dict) -> dict:
        c, K1 = self.cfg, self.cfg.finetune_steps
        B = len(batch["adv"])
        adv = batch["adv"]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        weight = c.gamma_denoise ** (K1 - 1 - torch.arange(K1, dtype=torch.float32))   # 1 at the chain's end
        train_actor = self.iteration >= c.critic_warmup
        stats = {"loss/policy": [], "loss/value": [], "loss/bc": [], "clip_fraction": [], "approx_kl": []}
        for _ in range(c.epochs):
            order = torch.randperm(B * K1, generator=self.gen)
            for mb in order.split(c.minibatch):
                rows, steps = mb // K1, mb % K1
                value = self.critic(batch["latent"][rows]).squeeze(-1)
                v_loss = 0.5 * (value - batch["ret"][rows]).pow(2).mean()
                self.critic_opt.zero_grad()
                v_loss.backward()
                nn.utils.clip_grad_norm_(self.critic.parameters(), c.max_grad_norm)
                self.critic_opt.step()
                stats["loss/value"].append(v_loss.item())
                if not train_actor:
                    continue
                obs_n, chain = batch["obs_n"][rows], batch["chain"][rows]
                logp = self._logp(self.policy, obs_n, chain, steps)
                ratio = torch.exp(logp - batch["old_logp"][rows, steps])
                a = adv[rows] * weight[steps]
                eps = self.clips[steps]
                pg = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a).mean()
                loss = pg
                if self.pretrained is not None:
                    bc = -self._logp(self.pretrained, obs_n, chain, steps).mean()
                    loss = loss + c.bc_weight * bc
                    stats["loss/bc"].append(bc.item())
                self.actor_opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.actor_opt.step()
                with torch.no_grad():
                    stats["loss/policy"].append(pg.item())
                    stats["clip_fraction"].append(((ratio - 1).abs() > eps).float().mean().item())
                    stats["approx_kl"].append(((ratio - 1) - torch.log(ratio)).mean().item())
        self.iteration += 1
        return {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}

