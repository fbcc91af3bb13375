"""VLA-RL (papers/vlarl.md): supervised fine-tuning of an autoregressive VLA on demonstrations, then
online PPO on it, an episode being a conversation whose every turn answers with one action's tokens.

    robotrl train task=arm_reach algo=vla_bc algo.demos=<demos .npz>
    robotrl train task=arm_reach algo=vla_rl algo.base=<vla_bc run>

The PPO here is the paper's: the ratio is per action (the sum of its tokens' log-probabilities,
at the sampling temperature), one advantage per env step (GAE), a clipped value loss, the critic
alone for the first `critic_warmup` iterations, gradient clipping, no KL penalty to a reference.
The curriculum draws each episode's instruction by its recent success rate s: weight
exp(-|s - 0.5| / tau), the learning frontier. The model is robotrl/vla.py; the runs robotrl/vla_runner.py.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F

from robotrl.algos import require_finite
from robotrl.algos.ppo import check_finite, gae
from robotrl.vla import VLA, VLACritic


@dataclasses.dataclass
class VLAModelConfig:
    """The model's size (robotrl/vla.py)."""
    width: int = 64
    layers: int = 2
    heads: int = 4
    patch: int = 8          # image pixels per patch side; it must divide the camera image
    bins: int = 64          # per action dimension, spanning [-action_clip, action_clip]


@dataclasses.dataclass
class VLABCConfig(VLAModelConfig):
    name: str = "vla_bc"
    demos: Optional[str] = None
    successes_only: bool = True
    max_demos: Optional[int] = None
    steps: int = 4000
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    eval_every: int = 1000
    eval_episodes: int = 30
    eval_envs: int = 10
    privileged_weight: float = 0.0   # > 0: also predict the demos' privileged critic observations (beyond the
                                     # policy's own) from the prompt, an auxiliary task for the image tokenizer

    def __post_init__(self):
        require_finite(self)
        check_model(self)
        if self.privileged_weight < 0:
            raise ValueError(f"algo.privileged_weight must be >= 0, got {self.privileged_weight}")
        for key in ("steps", "batch", "eval_every", "eval_episodes", "eval_envs"):
            if getattr(self, key) < 1:
                raise ValueError(f"algo.{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"algo.lr must be > 0, got {self.lr}")


def check_model(c: VLAModelConfig) -> None:
    for key in ("width", "layers", "heads", "patch"):
        if getattr(c, key) < 1:
            raise ValueError(f"algo.{key} must be >= 1, got {getattr(c, key)}")
    if c.bins < 2:
        raise ValueError(f"algo.bins must be >= 2, got {c.bins}")


CURRICULA = ("uniform", "frontier")


@dataclasses.dataclass
class VLARLConfig:
    name: str = "vla_rl"
    base: Optional[str] = None        # the `algo=vla_bc` run to start from (required)
    envs: int = 32
    steps: int = 64                   # env steps per env per iteration
    iterations: int = 60
    temperature: float = 0.5          # sampling temperature of rollouts (the paper: 1.5 on OpenVLA-7B)
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    epochs: int = 2
    minibatch: int = 512
    lr: float = 2e-5
    critic_lr: float = 3e-4
    critic_warmup: int = 5            # iterations that train only the critic
    max_grad_norm: float = 1.0
    curriculum: str = "frontier"      # uniform | frontier: exp(-|success - 0.5| / curriculum_tau) per instruction
    curriculum_tau: float = 0.25
    critic_hidden: list = dataclasses.field(default_factory=lambda: [256])
    eval_every: int = 10
    eval_episodes: int = 30
    eval_envs: int = 10

    def __post_init__(self):
        require_finite(self)
        for key in ("envs", "steps", "iterations", "epochs", "minibatch", "eval_every", "eval_episodes", "eval_envs"):
            if getattr(self, key) < 1:
                raise ValueError(f"algo.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"algo.{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("clip", "value_clip", "lr", "critic_lr", "max_grad_norm", "curriculum_tau"):
            if not getattr(self, key) > 0:
                raise ValueError(f"algo.{key} must be > 0, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ValueError(f"algo.temperature must be > 0 (rollouts sample), got {self.temperature}")
        if self.critic_warmup < 0:
            raise ValueError(f"algo.critic_warmup must be >= 0, got {self.critic_warmup}")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"algo.curriculum must be one of {list(CURRICULA)}, got {self.curriculum!r}")


# ---------------------------------------------------------------- supervised fine-tuning
def bc_loss(policy: VLA, obs: torch.Tensor, actions: torch.Tensor, privileged: Optional[torch.Tensor] = None,
            privileged_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the demonstrated actions' bins, every token teacher-forced; with `privileged`
    (normalised numbers the policy does not observe, e.g. where the named cube is) also their squared
    error as predicted from the prompt, weighted by `privileged_weight`."""
    tokens = policy.encode(actions)
    logits, summary = policy.logits_and_summary(obs, tokens)
    loss = F.cross_entropy(logits.reshape(-1, policy.bins), tokens.reshape(-1))
    accuracy = (logits.argmax(-1) == tokens).float().mean()
    stats = {"loss/bc": loss.item(), "bc/token_accuracy": accuracy.item()}
    if privileged is not None and policy.privileged_head is not None:
        aux = F.mse_loss(policy.privileged_head(summary), privileged)
        stats["loss/privileged"] = aux.item()
        loss = loss + privileged_weight * aux
    return loss, stats


# ---------------------------------------------------------------- the curriculum
def curriculum_weights(success: np.ndarray, tau: float) -> np.ndarray:
    """Instruction weights that favour those nearest 50 % success (the learning frontier)."""
    w = np.exp(-np.abs(success - 0.5) / tau)
    return w / w.sum()


# ---------------------------------------------------------------- PPO on the VLA
class VLAPPO:
    def __init__(self, cfg: VLARLConfig, policy: VLA, critic: VLACritic):
        self.cfg, self.policy, self.critic = cfg, policy, critic
        self.opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0)
        self.iteration = 0

    def advantages(self, batch: dict) -> None:
        """GAE over the (T, N) rollout, one advantage per action; truncations were bootstrapped into the reward."""
        c = self.cfg
        batch["advantages"], batch["returns"] = gae(batch["rewards"], batch["values"], batch["dones"],
                                                    batch["last_value"], c.gamma, c.lam)

    def update(self, batch: dict) -> dict:
        c = self.cfg
        self.iteration += 1
        self.advantages(batch)
        flat = {k: batch[k].reshape(-1, *batch[k].shape[2:]) for k in ("obs", "tokens", "logp", "values",
                                                                       "advantages", "returns")}
        n = flat["obs"].shape[0]
        train_policy = self.iteration > c.critic_warmup
        stats = {"loss/policy": [], "loss/value": [], "clip_fraction": [], "approx_kl": [], "entropy_proxy": []}
        for _ in range(c.epochs):
            for idx in torch.randperm(n).tensor_split(max(1, round(n / c.minibatch))):
                obs, ret, old_v = flat["obs"][idx], flat["returns"][idx], flat["values"][idx]
                # the value loss, clipped around the rollout's values
                v = self.critic(obs)
                v_clipped = old_v + torch.clamp(v - old_v, -c.value_clip, c.value_clip)
                value_loss = 0.5 * torch.max((v - ret) ** 2, (v_clipped - ret) ** 2).mean()
                check_finite("value loss", value_loss, self.iteration)
                self.critic_opt.zero_grad()
                value_loss.backward()
                torch.nn.utils.clip_grad_norm_(self.critic.parameters(), c.max_grad_norm)
                self.critic_opt.step()
                stats["loss/value"].append(value_loss.item())
                if not train_policy:
                    continue
                # the policy loss: PPO's clipped ratio per action (the sum of its tokens' log-probabilities)
                adv = flat["advantages"][idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                logp = self.policy.token_logprobs(obs, flat["tokens"][idx], c.temperature).sum(-1)
                log_ratio = logp - flat["logp"][idx]
                ratio = torch.exp(log_ratio)
                policy_loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - c.clip, 1 + c.clip) * adv).mean()
                check_finite("policy loss", policy_loss, self.iteration)
                self.opt.zero_grad()
                policy_loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.opt.step()
                with torch.no_grad():
                    stats["loss/policy"].append(float(policy_loss))
                    stats["clip_fraction"].append(float(((ratio - 1).abs() > c.clip).float().mean()))
                    stats["approx_kl"].append(float(((ratio - 1) - log_ratio).mean()))
                    stats["entropy_proxy"].append(float(-logp.mean()))
        return {k: (float(np.mean(v)) if v else float("nan")) for k, v in stats.items()}
