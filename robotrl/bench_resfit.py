"""`robotrl bench resfit`: ResFiT learner throughput with the critic ensemble as ONE batched
layer against a naive Python loop over the same heads, in the same process (ratios are what to
compare on a noisy machine), and the replay's memory per million transitions."""
from __future__ import annotations

import time

import torch


def _learner(critic_kind: str, obs_size: int, action_size: int, cfg):
    from robotrl.algos.bc import Normalizer
    from robotrl.algos.resfit import ResFiT, ZeroBase
    torch.manual_seed(0)
    learner = ResFiT(cfg, ZeroBase(Normalizer(obs_size, action_size), action_size), obs_size, action_size, seed=0)
    if critic_kind == "naive":   # the same heads and weights, evaluated one nn.Sequential at a time
        learner.critic = learner.critic.to_naive()
        learner.critic_target = learner.critic_target.to_naive().requires_grad_(False)
        learner.critic_opt = torch.optim.AdamW(learner.critic.parameters(), lr=cfg.critic_lr,
                                               weight_decay=cfg.weight_decay)
    return learner


def bench_one(seconds: float, utd: int, heads: int, hidden: int, batch: int, obs_size: int = 46,
              action_size: int = 8) -> dict:
    """Learner env-steps/s (utd critic updates + 1 actor update each) for the batched ensemble
    and for the naive loop, interleaved in short rounds so that both see the same machine load."""
    from robotrl.algos.resfit import FIELDS, Replay, ResFiTConfig
    cfg = ResFiTConfig(utd=utd, num_q=heads, actor_hidden=[hidden, hidden], critic_hidden=[hidden, hidden], batch=batch)
    online, demos = Replay(20000, obs_size, action_size), Replay(5000, obs_size, action_size)
    for rb in (online, demos):
        rb.add_batch({k: torch.rand(rb.capacity, *rb.data[k].shape[1:]) for k in FIELDS})
    learners = {kind: _learner(kind, obs_size, action_size, cfg) for kind in ("batched", "naive")}
    steps, spent = {k: 0 for k in learners}, {k: 0.0 for k in learners}
    for learner in learners.values():
        learner.update(online, demos, 1, train_actor=True)      # warm-up
    rounds = 6
    for _ in range(rounds):
        for kind, learner in learners.items():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds / (2 * rounds):
                learner.update(online, demos, 1, train_actor=True)    # one env step's worth of learning
                steps[kind] += 1
            spent[kind] += time.perf_counter() - t0
    res = {"utd": utd, "heads": heads, "hidden": [hidden, hidden], "batch": batch}
    for kind in learners:
        res[f"{kind}_env_steps_per_s"] = steps[kind] / spent[kind]
        res[f"{kind}_critic_updates_per_s"] = steps[kind] * utd / spent[kind]
    res["batched_over_naive"] = res["batched_env_steps_per_s"] / res["naive_env_steps_per_s"]
    res["replay_bytes_per_transition"] = online.bytes_per_transition()
    res["replay_layout"] = {k: list(v.shape[1:]) + [str(v.dtype).replace("torch.", "")] for k, v in online.data.items()}
    return res


# (hidden, batch): the test/experiment sizes and resfit.yaml's default
SIZES = ((32, 64), (64, 128), (256, 256))


def bench_resfit(seconds: float = 3.0, utd: int = 4, heads: int = 10, sizes=SIZES) -> dict:
    from robotrl.bench import _table
    from robotrl.offpolicy import keep_freed_memory
    torch.set_num_threads(1)
    keep_freed_memory()
    runs = [bench_one(2 * seconds, utd, heads, h, b) for h, b in sizes]
    per = runs[0]["replay_bytes_per_transition"]
    res = {"utd": utd, "heads": heads, "threads": 1, "runs": runs, "replay_bytes_per_transition": per,
           "replay_mib_per_million_transitions": per * 1e6 / 2 ** 20, "replay_layout": runs[0]["replay_layout"]}
    rows = []
    for r in runs:
        rows.append((f"{r['hidden'][0]}x{r['hidden'][1]} critic, batch {r['batch']}",
                     f"{r['batched_env_steps_per_s']:,.1f} vs {r['naive_env_steps_per_s']:,.1f} env-steps/s",
                     f"{r['batched_over_naive']:.2f}x  ({r['batched_critic_updates_per_s']:,.0f} vs "
                     f"{r['naive_critic_updates_per_s']:,.0f} critic updates/s; goal >= 2x)"))
    rows.append(("replay memory (float32 ring)", f"{per} B/transition",
                 f"{res['replay_mib_per_million_transitions']:,.0f} MiB per 1M transitions"))
    _table(f"bench resfit: learner at UTD {utd}, {heads} Q heads as one batched layer vs a loop over heads "
           f"(same process, interleaved; 1 thread)", rows)
    return res
