"""A small autoregressive vision-language-action model: VLA-RL's policy at a scale that trains on a CPU.

It keeps the code path of the big ones (papers/vlarl.md; OpenVLA): the prompt is the camera
image as patch tokens, the robot state as one token and the instruction's words; the answer is
the action as one token per action dimension, generated left to right, each one of `bins` bins
spanning [-clip, clip] and stored as the last `bins` ids of the vocabulary. A transformer reads
the prompt in both directions and the answer causally (a prefix language model). Its output
head scores the bins only, so every answer decodes to an action (a 7B model's full vocabulary
can answer with words, which VLA-RL penalises instead).

The interface is the one an OpenVLA + LoRA backend on a GPU would implement:
    generate(obs, temperature)          -> tokens [B, A], log-probability of each action [B]
    token_logprobs(obs, tokens, temp.)  -> log-probability of each token [B, A]
    decode(tokens) / encode(actions)       bins <-> actions in the task's action units
and the critic `VLACritic(obs) -> value [B]`, its own copy of the backbone with an MLP head on
the last prompt token (as in VLA-RL). Observations are the task's flat vectors; `VLAInputs`
says where the image, the instruction and the state are in them (from the task's layout).
"""
from __future__ import annotations

import dataclasses
import copy
from typing import List, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from robotrl.networks import JointTargetDeploy


@dataclasses.dataclass(frozen=True)
class VLAInputs:
    """Where the model's inputs are in a flat observation: the image (start, height, width; HxWx3
    row-major, in [0, 1]), the instruction's word ids (start, length) and the state's slices."""
    image: Tuple[int, int, int]
    words: Tuple[int, int]
    state: Tuple[Tuple[int, int], ...]
    vocabulary: Tuple[str, ...]

    @property
    def state_size(self) -> int:
        return sum(n for _, n in self.state)

    @classmethod
    def from_layout(cls, terms, sizes, history: int, camera: dict, vocabulary) -> "VLAInputs":
        """From an observation layout (its terms and sizes; history 1) with `camera_rgb` and `instruction` terms."""
        missing = [t for t in ("camera_rgb", "instruction") if t not in terms]
        if missing:
            raise ValueError(f"a VLA reads the observation terms camera_rgb and instruction; the task's "
                             f"observation has no {', '.join(missing)} (its terms: {', '.join(terms)})")
        if history != 1:
            raise ValueError(f"a VLA reads one frame: task.history must be 1, got {history}")
        image, words, state, at = None, None, [], 0
        for term, size in zip(terms, sizes):
            if term == "camera_rgb":
                image = (at, int(camera["height"]), int(camera["width"]))
            elif term == "instruction":
                words = (at, size)
            else:
                state.append((at, size))
            at += size
        return cls(image, words, tuple(state), tuple(vocabulary))


def sincos_2d(rows: int, cols: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes [rows * cols, width] (row-major): half the width codes the row."""
    def code(n: int, dims: int) -> torch.Tensor:
        freq = 1.0 / (100.0 ** (torch.arange(dims // 2) / max(1, dims // 2)))
        angle = torch.arange(n)[:, None] * freq[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)
    half = width // 2
    r, c = code(rows, half), code(cols, width - half)
    return torch.cat([r[:, None].expand(rows, cols, half), c[None].expand(rows, cols, width - half)], dim=2) \
        .reshape(rows * cols, width) * 0.5


class Block(nn.Module):
    """A pre-norm transformer block that can extend a sequence whose keys and values it has cached."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, width], the cached keys/values [B, heads, m, d] -> (x', keys, values of all m + n).
        The new tokens see every cached one, and each other (causal: only the earlier ones)."""
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        m = k.shape[2] - n
        mask = torch.ones(n, m + n, dtype=torch.bool, device=x.device)
        if causal:
            mask[:, m:] = torch.tril(mask[:, m:])
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.ln2(x)), k, v


class Backbone(nn.Module):
    """The prompt (image patches, state, words) read in both directions, then answer tokens read
    causally, with the keys and values cached: generating A tokens costs one prompt pass and A
    one-token passes (batched decoding), not A passes over the whole sequence."""

    def __init__(self, inputs: VLAInputs, vocab: int, answer: int, width: int, layers: int, heads: int, patch: int):
        super().__init__()
        _, h, w = inputs.image
        if h % patch or w % patch:
            raise ValueError(f"algo.patch={patch} must divide the camera image ({h}x{w})")
        if width % heads:
            raise ValueError(f"algo.heads={heads} must divide algo.width={width}")
        self.image_start, self.height, self.width = inputs.image
        self.words_start, self.words_len = inputs.words
        self.register_buffer("state_index", torch.cat([torch.arange(s, s + n) for s, n in inputs.state])
                             if inputs.state else torch.zeros(0, dtype=torch.long), persistent=False)
        self.heads, self.head_dim = heads, width // heads
        self.patches = (h // patch) * (w // patch)
        self.prompt_len = self.patches + 1 + self.words_len
        # The image tokenizer: a small convolution over the pixels and their coordinates (CoordConv),
        # modulated by the instruction (FiLM, as RT-1's language-conditioned image tokenizer), then one
        # token per patch, whose position embedding starts as a fixed 2-D sine-cosine code (as in MAE).
        # Without the coordinates and that code, where a ~3-pixel cube is had to be learnt from random
        # position embeddings, and a probe regressing the named cube's position learnt it 2-3x slower.
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)
        self.stem = nn.Conv2d(5, 32, 3, padding=1)
        self.film = nn.Linear(width, 2 * 32)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.patch_embed = nn.Conv2d(32, width, patch, patch)
        self.state_embed = nn.Sequential(nn.Linear(max(1, inputs.state_size), width), nn.LayerNorm(width))
        self.token_embed = nn.Embedding(vocab, width)
        pos = torch.randn(1, self.prompt_len + answer, width) * 0.02
        pos[0, :self.patches] = sincos_2d(h // patch, w // patch, width)
        self.pos = nn.Parameter(pos)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)

    def embed_prompt(self, obs: torch.Tensor) -> torch.Tensor:
        b = obs.shape[0]
        img = obs[:, self.image_start:self.image_start + self.height * self.width * 3]
        img = img.reshape(b, self.height, self.width, 3).permute(0, 3, 1, 2)
        words = obs[:, self.words_start:self.words_start + self.words_len].round().long()
        word_embeddings = self.token_embed(words)
        present = (words > 0).float()[:, :, None]                    # id 0 is padding
        sentence = (word_embeddings * present).sum(1) / present.sum(1).clamp(min=1.0)
        scale, shift = self.film(sentence)[:, :, None, None].chunk(2, dim=1)
        pixels = torch.cat([img * 2.0 - 1.0, self.coords.expand(b, -1, -1, -1)], dim=1)
        features = F.gelu(self.stem(pixels) * (1.0 + scale) + shift)
        patches = self.patch_embed(features).flatten(2).transpose(1, 2)
        state = obs[:, self.state_index] if self.state_index.numel() > 0 else obs.new_zeros(b, 1)
        return torch.cat([patches, self.state_embed(state)[:, None], word_embeddings], dim=1)

    def forward(self, x: torch.Tensor, cache: List[Tuple[torch.Tensor, torch.Tensor]],
                causal: bool) -> Tuple[torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor]]]:
        """Token embeddings x [B, n, width] placed after the `cache`d ones (empty list: x is the start)
        -> (hidden [B, n, width], the cache extended by x)."""
        start = cache[0][0].shape[2] if len(cache) > 0 else 0
        x = x + self.pos[:, start:start + x.shape[1]]
        out: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for i, block in enumerate(self.blocks):
            if len(cache) > 0:
                pk, pv = cache[i]
            else:
                pk = x.new_zeros(x.shape[0], self.heads, 0, self.head_dim)
                pv = pk
            x, k, v = block(x, pk, pv, causal)
            out.append((k, v))
        return self.norm(x), out


class VLA(nn.Module):
    def __init__(self, inputs: VLAInputs, action_dims: int, bins: int = 256, clip: float = 1.0, width: int = 64,
                 layers: int = 2, heads: int = 4, patch: int = 4, privileged: int = 0):
        super().__init__()
        self.inputs = inputs
        self.action_dims, self.bins, self.clip = action_dims, bins, float(clip)
        self.n_words = len(inputs.vocabulary)
        self.config = {"action_dims": action_dims, "bins": bins, "clip": float(clip), "width": width,
                       "layers": layers, "heads": heads, "patch": patch, "privileged": privileged}
        self.backbone = Backbone(inputs, self.n_words + bins, action_dims, width, layers, heads, patch)
        self.head = nn.Linear(width, bins)
        # training only: predicts `privileged` numbers the policy does not observe (an auxiliary task
        # for supervised fine-tuning, robotrl/algos/vla_rl.py); the artifact never calls it
        self.privileged_head = nn.Linear(width, privileged) if privileged > 0 else None
        self.register_buffer("centres", torch.linspace(-clip, clip, bins))

    # ---- bins <-> actions ----
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Action bins [B, A] (0 .. bins-1) -> actions [B, A] at the bins' centres."""
        return self.centres[tokens]

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions [B, A] -> the nearest bins."""
        step = 2 * self.clip / (self.bins - 1)
        return torch.clamp(torch.round((actions + self.clip) / step), 0, self.bins - 1).long()

    # ---- the language model ----
    def _answer_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.token_embed(tokens + self.n_words)   # action bins are the last `bins` ids

    def logits(self, obs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the logits of every answer position [B, A, bins] given the answer `tokens` [B, A]."""
        return self.logits_and_summary(obs, tokens)[0]

    def logits_and_summary(self, obs: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """`logits`, and the last prompt token's hidden state [B, width] (what the answer starts from)."""
        h_prompt, cache = self.backbone(self.backbone.embed_prompt(obs), [], False)
        h_answer, _ = self.backbone(self._answer_embeddings(tokens[:, :-1]), cache, True)
        return self.head(torch.cat([h_prompt[:, -1:], h_answer], dim=1)), h_prompt[:, -1]

    def token_logprobs(self, obs: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log pi(token_i | prompt, tokens_<i) at this sampling temperature, [B, A]."""
        logp = F.log_softmax(self.logits(obs, tokens) / max(temperature, 1e-6), dim=-1)
        return logp.gather(-1, tokens[..., None])[..., 0]

    def generate(self, obs: torch.Tensor, temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample one action's tokens [B, A] left to right (temperature 0: the most likely bin) and the
        action's log-probability [B] (the sum over its tokens, at this temperature; at 0, at 1)."""
        with torch.no_grad():
            h, cache = self.backbone(self.backbone.embed_prompt(obs), [], False)
            tokens = torch.zeros(obs.shape[0], self.action_dims, dtype=torch.long, device=obs.device)
            logp = torch.zeros(obs.shape[0], device=obs.device)
            for i in range(self.action_dims):
                logits = self.head(h[:, -1])
                if temperature > 0:
                    logits = logits / temperature
                    nxt = torch.multinomial(F.softmax(logits, -1), 1)
                else:
                    nxt = logits.argmax(-1, keepdim=True)
                logp += F.log_softmax(logits, -1).gather(-1, nxt)[:, 0]
                tokens[:, i] = nxt[:, 0]
                if i + 1 < self.action_dims:
                    h, cache = self.backbone(self._answer_embeddings(nxt), cache, True)
        return tokens, logp

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic policy: greedy tokens, decoded."""
        return self.decode(self.generate(obs, 0.0)[0])

    def export(self, path, manifest: dict, parity_obs: np.ndarray, parity_starts: np.ndarray) -> dict:
        """One TorchScript artifact (robotrl/export.py) answering greedily, parity-checked against `act`."""
        from robotrl.export import export_artifact
        manifest = {**manifest, "policy": {"family": "vla", **self.config, "decoding": "greedy",
                                           "vocabulary": list(self.inputs.vocabulary), "stateful": False}}
        return export_artifact(VLADeployPolicy(self, manifest), manifest, path, parity_obs,
                               lambda x: torch.clamp(self.act(x), -self.clip, self.clip),
                               episode_starts=parity_starts)


class VLACritic(nn.Module):
    """V(obs): its own backbone (the paper's critic is a separate copy of the VLA) and an MLP head
    on the last prompt token's hidden state."""

    def __init__(self, inputs: VLAInputs, width: int = 64, layers: int = 2, heads: int = 4, patch: int = 4,
                 hidden: List[int] = (256,)):
        super().__init__()
        self.backbone = Backbone(inputs, len(inputs.vocabulary), 0, width, layers, heads, patch)
        sizes = [width, *hidden, 1]
        mods: List[nn.Module] = []
        for i in range(len(sizes) - 1):
            mods += [nn.Linear(sizes[i], sizes[i + 1])] + ([nn.GELU()] if i < len(sizes) - 2 else [])
        self.head = nn.Sequential(*mods)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h, _ = self.backbone(self.backbone.embed_prompt(obs), [], False)
        return self.head(h[:, -1])[:, 0]


class VLADeployPolicy(JointTargetDeploy):
    """The VLA as an artifact's module for one robot: forward(obs [obs]) -> the greedy answer decoded
    (action [A], clipped); command(action) -> joint position targets (robotrl/networks.py).
    Stateless between ticks: each answer is generated from the current observation alone."""

    def __init__(self, policy: VLA, manifest: dict):
        super().__init__(manifest)
        self.vla = copy.deepcopy(policy).eval()
        self.vla.privileged_head = None     # training's auxiliary head: the robot does not need it

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """One robot's observation [obs] -> action [A]; a batch [B, obs] -> [B, A] (evaluation: no command)."""
        tokens, _ = self.vla.generate(obs.reshape(-1, obs.shape[-1]), 0.0)
        action = torch.clamp(self.vla.decode(tokens), -self.clip, self.clip)
        if obs.dim() > 1:
            return action
        self.track_target(obs)
        return action[0]

    @torch.jit.export
    def reset(self) -> None:
        self.has_target = False
