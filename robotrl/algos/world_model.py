"""DiWA's world model, state-based variant: learned once from play data, then frozen.

Top to bottom: the config; the model (an encoder of the normalised observation into a latent z,
a residual latent dynamics z' = z + f(z, a), a decoder back to the observation, and a success
classifier on z); the loss over sequences of `horizon` steps, rolled out in latent space from
the first observation only (so that imagination, which never sees another real observation,
is what is trained): observation reconstruction at every step, latent consistency with the
encoder's latent of the real next observation (stop-gradient target), and a class-balanced
binary cross-entropy of "task succeeded" (the play data's sparse success reward).

The model is deterministic: the tabletop twin is, and a state-based model needs no stochastic
latent to represent it. papers/diwa.md's RSSM (GRU + categorical latents, images) is the image
variant; this one keeps its interface (encode a real observation, step on actions, read the
success classifier) so that the fine-tuning in robotrl/algos/diwa.py does not know which.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from robotrl.algos import require_finite


@dataclasses.dataclass
class WorldModelConfig:
    name: str = "world_model"
    play: Any = None              # `robotrl demos` .npz of play data (successes and failures), or a list (required)
    latent: int = 0               # 0: z is the normalised observation itself; > 0: a learned code of that size
    hidden: int = 256             # width of every MLP
    horizon: int = 32             # steps rolled out in latent space per training sequence
    batch: int = 64               # sequences per gradient step
    steps: int = 2500             # gradient steps
    lr: float = 3e-4
    weight_decay: float = 1e-5
    grad_clip: float = 100.0
    latent_weight: float = 1.0    # latent consistency against the encoder's latent of the real observation
    success_weight: float = 1.0   # the success classifier's cross-entropy
    val_fraction: float = 0.1     # of the play episodes held out for the figures
    eval_every: int = 1000        # gradient steps between held-out figures

    def __post_init__(self):
        require_finite(self)
        if self.latent < 0:
            raise ValueError(f"algo.latent must be >= 0, got {self.latent}")
        for key in ("hidden", "horizon", "batch", "steps", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"algo.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"algo.lr must be > 0, got {self.lr}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"algo.val_fraction must be in (0, 1), got {self.val_fraction}")


def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.LayerNorm(hidden), nn.Mish(), nn.Linear(hidden, hidden),
                         nn.LayerNorm(hidden), nn.Mish(), nn.Linear(hidden, out))


class WorldModel(nn.Module):
    """encode(obs) -> z; step(z, action) -> z'; decode(z) -> obs; success_logit(z). Observations in
    env units in and out (the z-score of the play data inside); actions in env units. With
    latent = 0, z is the normalised observation: the dynamics then integrates what the observation
    integrates exactly (joint targets are the sum of delta actions) instead of through a code."""

    def __init__(self, obs_size: int, action_size: int, latent: int, hidden: int):
        super().__init__()
        self.latent_size = latent or obs_size
        self.register_buffer("obs_mean", torch.zeros(obs_size))
        self.register_buffer("obs_std", torch.ones(obs_size))
        # The dynamics is a fixed linear map plus an MLP (z' = z + linear(z, a) + residual_scale * mlp(z, a)).
        # With latent = 0, fit_to_play sets the linear part to the least-squares fit of one-step changes
        # on the play data, and residual_scale to the per-dimension std of what that fit leaves: what is
        # linear in the action (a joint target is the sum of delta actions) is then exact and stays so,
        # and the MLP learns the rest (contacts, kinematics) in units of it. Learned by gradient descent
        # instead, the model settled on predicting the expert's next move from the state and ignored
        # the action (a joint target's response to it was 6 % of the true one after 2,500 steps), so it
        # imagined the expert's motion whatever a policy did.
        self.register_buffer("linear_weight", torch.zeros(self.latent_size, self.latent_size + action_size))
        self.register_buffer("linear_bias", torch.zeros(self.latent_size))
        self.register_buffer("residual_scale", torch.ones(self.latent_size))
        self.encoder = nn.Sequential(mlp(obs_size, hidden, latent), nn.LayerNorm(latent)) if latent else nn.Identity()
        self.dynamics = mlp(self.latent_size + action_size, hidden, self.latent_size)
        nn.init.zeros_(self.dynamics[-1].weight)   # the MLP starts silent: the model starts as the linear fit
        nn.init.zeros_(self.dynamics[-1].bias)
        self.decoder = mlp(latent, hidden, obs_size) if latent else nn.Identity()
        self.success = mlp(self.latent_size, hidden, 1)

    def fit_to_play(self, obs: np.ndarray, actions: np.ndarray | None = None, next_obs: np.ndarray | None = None,
                    min_std: float = 0.01) -> None:
        """The normaliser from play observations; given their one-step transitions (play.next_obs()) and a
        latent that is the normalised observation, also the dynamics' linear part and residual scale."""
        self.obs_mean.copy_(torch.as_tensor(obs.mean(0)))
        self.obs_std.copy_(torch.as_tensor(obs.std(0)).clamp_min(min_std))
        if actions is None or not isinstance(self.encoder, nn.Identity):
            return
        z = self.normalise(torch.as_tensor(obs)).double()
        change = self.normalise(torch.as_tensor(next_obs)).double() - z
        x = torch.cat([z, torch.as_tensor(actions).double(), torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
        # Normal equations with a numerical-only ridge: lstsq's rank-revealing solver fitted nearly
        # constant dimensions (a finger's joint) with an unstable mode (spectral radius 1.7).
        w = torch.linalg.solve(x.T @ x + 1e-8 * len(x) * torch.eye(x.shape[1], dtype=x.dtype), x.T @ change)
        self.linear_weight.copy_(w[:-1].T)
        self.linear_bias.copy_(w[-1])
        self.residual_scale.copy_((change - x @ w).std(0).clamp_min(1e-4))

    def normalise(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalise(obs))

    def step(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        za = torch.cat([z, action], dim=-1)
        linear = nn.functional.linear(za, self.linear_weight, self.linear_bias)
        return z + linear + self.residual_scale * self.dynamics(za)

    def decode_n(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.obs_mean + self.obs_std * self.decoder(z)

    def success_logit(self, z: torch.Tensor) -> torch.Tensor:
        return self.success(z).squeeze(-1)


def success_steps(header: dict) -> int:
    """How many final steps of a successful play episode show success: its hold time plus the step
    that completes it (1 for a task that succeeds on reaching its goal)."""
    return round(header["task_config"].get("hold_s", 0.0) * header["control_hz"]) + 1


# ---- play data as sequences ----
class Sequences:
    """Windows of horizon + 1 observations (the last of an episode is its final_obs), the horizon
    actions between them and the success label after each action, wholly inside one episode.

    The label is "task succeeded" on the last `success_steps` steps of a successful episode: a task
    that succeeds after holding its goal for a while (arm_lift: the cube lifted and held for hold_s)
    looks the same through that hold, so labelling only its last step asks the classifier for a
    distinction the observation does not show (measured: it then missed held-out successes)."""

    def __init__(self, play, episodes: np.ndarray, horizon: int, success_steps: int = 1):
        obs, act, succ, starts = [], [], [], []
        n = 0
        for e in episodes:
            s, t = int(play.episode_starts[e]), int(play.episode_ends[e])
            if t - s < horizon:
                continue
            obs.append(np.concatenate([play.obs[s:t], play.final_obs[e:e + 1]]))
            act.append(play.actions[s:t])
            succ.append((np.arange(s, t) >= t - success_steps) & bool(play.success[e]))
            starts += [(n + i, len(act) - 1) for i in range(t - s - horizon + 1)]
            n += t - s + 1
        if not starts:
            raise ValueError(f"algo.horizon={horizon}: no play episode is that long")
        self.obs = torch.as_tensor(np.concatenate(obs), dtype=torch.float32)
        # actions and labels padded by one row per episode so that one index addresses all three
        self.act = torch.as_tensor(np.concatenate([np.concatenate([a, a[-1:]]) for a in act]), dtype=torch.float32)
        self.succ = torch.as_tensor(np.concatenate([np.append(s, False) for s in succ]), dtype=torch.float32)
        self.first = torch.as_tensor([i for i, _ in starts])
        self.horizon = horizon
        self.positive_fraction = float(np.concatenate(succ).mean())

    def __len__(self) -> int:
        return len(self.first)

    def batch(self, idx: torch.Tensor):
        """obs [B, H + 1, O], actions [B, H, A], success after each action [B, H]."""
        rows = self.first[idx, None] + torch.arange(self.horizon + 1)
        return self.obs[rows], self.act[rows[:, :-1]], self.succ[rows[:, :-1]]


# ---- the loss ----
def world_model_loss(model: WorldModel, obs: torch.Tensor, actions: torch.Tensor, success: torch.Tensor,
                     cfg: WorldModelConfig, pos_weight: float) -> tuple[torch.Tensor, dict]:
    target_n = model.normalise(obs)
    with torch.no_grad():
        target_z = model.encoder(target_n)
    z = model.encoder(target_n[:, 0])
    recon = (model.decode_n(z) - target_n[:, 0]).pow(2).mean()
    pred, latent, logits = [], [], []
    for h in range(cfg.horizon):
        z = model.step(z, actions[:, h])
        pred.append(model.decode_n(z))
        latent.append((z - target_z[:, h + 1]).pow(2).mean(-1))
        logits.append(model.success_logit(z))
    obs_err = (torch.stack(pred, 1) - target_n[:, 1:]).pow(2).mean()
    latent_err = torch.stack(latent, 1).mean()
    # Successes are a few steps of each successful episode: weigh them up to half the loss.
    bce = nn.functional.binary_cross_entropy_with_logits(torch.stack(logits, 1), success,
                                                         pos_weight=torch.tensor(pos_weight))
    loss = recon + obs_err + cfg.latent_weight * latent_err + cfg.success_weight * bce
    return loss, {"loss/world_model": loss.item(), "loss/reconstruction": recon.item(),
                  "loss/prediction": obs_err.item(), "loss/latent": latent_err.item(), "loss/success": bce.item()}


@torch.no_grad()
def held_out_figures(model: WorldModel, seqs: Sequences) -> dict:
    """On held-out windows: the open-loop prediction error at the horizon against copying the
    first observation (how much the model knows about motion), and the success classifier's
    recall and false-positive rate."""
    obs, actions, success = seqs.batch(torch.arange(len(seqs)))
    target_n = model.normalise(obs)
    z = model.encode(obs[:, 0])
    hits = []
    for h in range(seqs.horizon):
        z = model.step(z, actions[:, h])
        hits.append(model.success_logit(z) > 0)
    err = (model.decode_n(z) - target_n[:, -1]).pow(2).mean().item()
    copy = (target_n[:, 0] - target_n[:, -1]).pow(2).mean().item()
    hit = torch.stack(hits, 1)
    pos = success > 0.5
    return {"val/prediction_error": err, "val/copy_error": copy, "val/prediction_over_copy": err / max(copy, 1e-12),
            "val/success_recall": float(hit[pos].float().mean()) if pos.any() else float("nan"),
            "val/success_false_positive": float(hit[~pos].float().mean())}
