"""`robotrl bench sim|infer|loop|resfit [--json FILE]`: figures against a baseline measured in the same run
(these machines are noisy, so ratios are what to compare)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from robotrl.files import output_place, write_text


def _rate(fn, seconds: float) -> float:
    """Calls of fn per second over at least `seconds` (fn returns how many steps it did)."""
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n / (time.perf_counter() - t0)


# Pushes change velocities between control steps and delays split a period's control: both off,
# so that a recorded (state, control) pair is exactly one control period of physics.
REPLAYABLE = {"randomization": {"push_velocity": 0.0, "action_delay_steps": [0, 0]}}


def env_against_raw(num_envs: int, seconds: float) -> dict:
    """Step humanoid_walk's env (physics on this thread; one env = the gymnasium Env) with zero
    actions, recording every control step's start state and control; then replay exactly that
    physics with raw `mj_step(m, d, substeps)` on the same per-env models. Same work, same thread:
    the ratio is what the env's observation, reward and bookkeeping cost."""
    import mujoco
    from sim.batched import STATE_SPEC
    from sim.envs import make, make_vec
    env = make("humanoid_walk", **REPLAYABLE) if num_envs == 1 else \
        make_vec("humanoid_walk", num_envs=num_envs, nthread=0, **REPLAYABLE)
    task = env.task
    env.reset(seed=0)
    zero = np.zeros(task.action_size) if num_envs == 1 else np.zeros((num_envs, task.action_size))
    states, ctrls, after, spent = [], [], [], 0.0
    while spent < seconds:
        states.append(task.sim.state.copy())
        t0 = time.perf_counter()
        _, _, term, trunc, _ = env.step(zero)
        spent += time.perf_counter() - t0
        ctrls.append(task.sim.last_ctrl[:, -1].copy())
        after.append(task.sim.substep_states[:, -1].copy())   # before any autoreset
        if num_envs == 1 and (term or trunc):
            env.reset()
    d, models = mujoco.MjData(task.model), task.sim.models
    t0 = time.perf_counter()
    for state, ctrl in zip(states, ctrls):
        for i, m in enumerate(models):
            mujoco.mj_setState(m, d, state[i], STATE_SPEC)
            d.qacc_warmstart[:] = 0.0        # the env's rollout starts every period from zero too
            d.ctrl[:] = ctrl[i]
            mujoco.mj_step(m, d, task.substeps)
    raw_s = time.perf_counter() - t0
    last = np.zeros(task.sim.nstate)
    mujoco.mj_getState(models[-1], d, last, STATE_SPEC)
    n = len(states) * num_envs
    return {"env_steps_per_s": n / spent, "raw_steps_per_s": n / raw_s, "over_raw": raw_s / spent,
            "replay_max_abs_diff": float(np.abs(last - after[-1][-1]).max())}


def bench_sim(seconds: float, num_envs: int, ppo_steps: int) -> dict:
    from sim.envs import make_vec
    single = env_against_raw(1, seconds)
    batched = env_against_raw(num_envs, seconds)
    venv = make_vec("humanoid_walk", num_envs=num_envs, nthread=2)
    venv.reset(seed=0)
    zeros = np.zeros((num_envs, venv.task.action_size))

    def vec():
        for _ in range(5):
            venv.step(zeros)
        return 5 * num_envs
    vec_rate = _rate(vec, seconds)
    train, sb3 = bench_ppo(ppo_steps)
    ours, eco = train["ppo"], train["eco"]
    walker, _ = bench_ppo(ppo_steps // 2, hidden="[256,128,64]", sb3=False)   # the shipped walkers' networks
    raw = batched["raw_steps_per_s"]
    res = {"substeps": venv.task.substeps, "num_envs": num_envs,
           "raw_mj_steps_per_s": raw, "env_steps_per_s": batched["env_steps_per_s"],
           "env_over_raw": batched["over_raw"],
           "single_env_steps_per_s": single["env_steps_per_s"], "single_raw_mj_steps_per_s": single["raw_steps_per_s"],
           "single_env_over_raw": single["over_raw"],
           "replay_max_abs_diff": max(single["replay_max_abs_diff"], batched["replay_max_abs_diff"]),
           "vec_env_steps_per_s": vec_rate, "vec_over_raw": vec_rate / raw,
           "ppo_env_steps_per_s": ours, "sb3_env_steps_per_s": sb3,
           "eco_env_steps_per_s": eco, "eco_overhead": train["eco_overhead"],
           "eco_overhead_walker_net": walker["eco_overhead"],
           "ppo_over_sb3": (ours / sb3) if sb3 else None, "threads": {"torch": torch.get_num_threads(), "physics": 2}}
    rows = [(f"raw mj_step replay, {num_envs} envs' states, 1 thread", f"{raw:,.0f} /s", ""),
            (f"vector env.step, {num_envs} envs, 1 thread", f"{res['env_steps_per_s']:,.0f} /s",
             f"{res['env_over_raw']:.2f}× raw (goal ≥ 0.9)"),
            ("raw mj_step replay, one env", f"{res['single_raw_mj_steps_per_s']:,.0f} /s", ""),
            ("gymnasium Env.step, one env", f"{res['single_env_steps_per_s']:,.0f} /s",
             f"{res['single_env_over_raw']:.2f}× raw"),
            (f"vector env.step, {num_envs} envs, 2 threads", f"{vec_rate:,.0f} /s",
             f"{res['vec_over_raw']:.2f}× raw 1 thread"),
            ("robotrl PPO training", f"{ours:,.0f} env-steps/s", ""),
            ("robotrl ECO training (same core, interleaved)", f"{eco:,.0f} env-steps/s",
             f"{res['eco_overhead']:+.1%} time vs PPO (goal < 10 %)"),
            ("ECO vs PPO with the walkers' 256-128-64 networks", "",
             f"{res['eco_overhead_walker_net']:+.1%} time vs PPO"),
            ("stable-baselines3 PPO training", f"{sb3:,.0f} env-steps/s" if sb3 else "not installed",
             f"{res['ppo_over_sb3']:.2f}× sb3" if sb3 else "")]
    _table(f"bench sim (humanoid_walk, kid_biped, {venv.task.substeps} physics steps per env step; "
           f"replay max |Δstate| {res['replay_max_abs_diff']:.1e})", rows)
    return res


def bench_ppo(steps: int, hidden: str = "[64,64]", sb3: bool = True) -> tuple[dict[str, float], float | None]:
    """Env-steps/s of the training loop: our PPO and ECO (the same PPO core plus costs, cost critic,
    multipliers and mirror loss), interleaved iteration by iteration so that both see the same
    machine, and ECO's overhead as the median over iterations of ECO's time / PPO's time (a burst of
    machine noise then spoils one pair, not the figure); then stable-baselines3's PPO on the same task."""
    from robotrl.cli import compose_train_config
    from robotrl.runner import build
    torch.set_num_threads(1)
    common = ["num_envs=64", f"algo.actor_hidden={hidden}", f"algo.critic_hidden={hidden}", "algo.steps_per_env=32"]
    runs = {}
    for name in ("ppo", "eco"):
        env, algo = build(compose_train_config([f"algo={name}", *common]))
        obs, info = env.reset(seed=0)
        runs[name] = {"env": env, "algo": algo, "obs": obs, "info": info, "seconds": [], "steps": 0}

    def iteration(r: dict) -> None:
        env, algo, obs, info = r["env"], r["algo"], r["obs"], r["info"]
        t0 = time.perf_counter()
        for _ in range(algo.cfg.steps_per_env):
            obs, _, _, _, info = algo.env_step(env, obs, info["critic_obs"])
        algo.update(torch.as_tensor(info["critic_obs"]), 0.0, r["steps"])
        r["seconds"].append(time.perf_counter() - t0)
        r["steps"] += env.num_envs * algo.cfg.steps_per_env
        r["obs"], r["info"] = obs, info
    while runs["ppo"]["steps"] < steps:
        for r in runs.values():
            iteration(r)
    ours = {name: r["steps"] / sum(r["seconds"]) for name, r in runs.items()}
    ours["eco_overhead"] = float(np.median(np.divide(runs["eco"]["seconds"], runs["ppo"]["seconds"]))) - 1.0
    if not sb3:
        return ours, None
    try:
        from stable_baselines3 import PPO as SB3PPO
        from stable_baselines3.common.env_util import make_vec_env
    except ImportError:
        return ours, None
    from sim.envs import TaskEnv
    venv = make_vec_env(lambda: TaskEnv("humanoid_walk"), n_envs=8, seed=0)
    from stable_baselines3.common.logger import Logger
    model = SB3PPO("MlpPolicy", venv, n_steps=256, batch_size=512, n_epochs=5, verbose=0, device="cpu",
                   policy_kwargs={"net_arch": [64, 64]})
    model.set_logger(Logger(folder=None, output_formats=[]))   # its default logger leaves /tmp/SB3-* folders
    sb3_steps = max(2048, steps // 4)
    t0 = time.perf_counter()
    model.learn(total_timesteps=sb3_steps)
    return ours, model.num_timesteps / (time.perf_counter() - t0)


class _BareRecurrent(torch.nn.Module):
    """The floor for a recurrent artifact: its memory cell and MLP of the same sizes, nothing else."""

    def __init__(self, memory: torch.nn.Module, actor: torch.nn.Module):
        super().__init__()
        self.memory, self.actor = memory, actor

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h, state = self.memory(x, state)
        return self.actor(h), state


def bench_infer(artifact: str | None, calls: int) -> dict:
    """Latency of one control tick's policy call (`Artifact.step`: observation → action and joint
    targets), interleaved in blocks with its baselines: the same policy in the other file format
    when a sibling file (.pt ↔ .onnx) is there, and the bare scripted network of the same sizes (an
    MLP, or a recurrent cell and MLP), the floor for this network in TorchScript on this machine."""
    from real.artifact import SUFFIXES, artifact_format, load_artifact
    from robotrl import WALK_ARTIFACT
    from robotrl.networks import MEMORIES, mlp
    path = Path(artifact or WALK_ARTIFACT)
    torch.set_num_threads(1)
    arts = {artifact_format(path): load_artifact(path)}
    for fmt, suffix in SUFFIXES.items():
        if fmt not in arts and path.with_suffix(suffix).is_file():
            arts[fmt] = load_artifact(path.with_suffix(suffix))
    art = arts[artifact_format(path)]
    obs = np.zeros(art.manifest["observation"]["size"], dtype=np.float32)
    variants = {f"{fmt} artifact": (lambda a=a: a.step(obs)) for fmt, a in arts.items()}
    scripted = arts.get("torchscript")
    weights = [] if scripted is None else [v for k, v in scripted.module.state_dict().items()
                                           if k.startswith("actor.") and k.endswith(".weight")]
    rnn = art.manifest.get("policy", {}).get("rnn")
    if weights:
        sizes = [weights[0].shape[1], *[w.shape[0] for w in weights]]
        x = torch.as_tensor(obs)
        if rnn is None:
            bare = torch.jit.script(mlp(sizes).eval().requires_grad_(False))

            def baseline():   # as Artifact.step runs: no grad context, parameters without requires_grad
                bare(x).numpy()
        else:
            memory = MEMORIES[rnn](len(obs), sizes[0])
            net = torch.jit.script(_BareRecurrent(memory, mlp(sizes)).eval().requires_grad_(False))
            state = [torch.zeros(1, memory.state_size)]
            x = x[None]

            def baseline():
                y, state[0] = net(x, state[0])
                y.numpy()
        variants["bare network"] = baseline
    lat = {k: np.empty(calls) for k in variants}
    for fn in variants.values():
        for _ in range(200):
            fn()
    block = 500
    for start in range(0, calls, block):   # interleaved, so all see the same machine noise
        for k, fn in variants.items():
            for i in range(start, min(start + block, calls)):
                t0 = time.perf_counter_ns()
                fn()
                lat[k][i] = (time.perf_counter_ns() - t0) / 1e3
    a = lat[f"{artifact_format(path)} artifact"]
    res = {"artifact": str(path), "format": artifact_format(path), "calls": calls,
           "latency_median_us": float(np.median(a)), "latency_p99_us": float(np.percentile(a, 99)),
           "latency_max_us": float(a.max())}
    rows = []
    goal = " (goal ≤ 150)" if art.manifest["task"]["name"] == "humanoid_walk" else ""   # the walker's goal
    for fmt in arts:
        f = lat[f"{fmt} artifact"]
        res.update({f"{fmt}_latency_median_us": float(np.median(f)),
                    f"{fmt}_latency_p99_us": float(np.percentile(f, 99))})
        rows.append((f"{fmt} artifact `step`", f"{np.median(f):.1f} µs median",
                     f"p99 {np.percentile(f, 99):.1f} µs{goal}, max {f.max():.0f} µs"))
    if len(arts) == 2:
        res["onnx_over_torchscript_median"] = res["onnx_latency_median_us"] / res["torchscript_latency_median_us"]
        rows.append(("onnx / torchscript", f"{res['onnx_over_torchscript_median']:.2f}× median",
                     "same weights, same call"))
    if "bare network" in lat:
        b = lat["bare network"]
        res.update(network=f"{rnn} {sizes[0]} + MLP" if rnn else "MLP", bare_network_median_us=float(np.median(b)),
                   bare_network_p99_us=float(np.percentile(b, 99)),
                   artifact_over_bare_median=float(np.median(a) / np.median(b)))
        rows.append((f"bare scripted {res['network']}, same sizes", f"{res['bare_network_median_us']:.1f} µs median",
                     f"p99 {res['bare_network_p99_us']:.1f} µs; {res['format']} artifact/bare "
                     f"{res['artifact_over_bare_median']:.2f}×"))
    _table("bench infer (observation → action + joint targets, one tick)", rows)
    return res


def _table(title: str, rows: list[tuple[str, str, str]]) -> None:
    w = max(len(r[0]) for r in rows)
    print(f"\n{title}\n" + "-" * (w + 40))
    for a, b, c in rows:
        print(f"{a:<{w}}  {b:>22}  {c}")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="robotrl bench", description="Figures against a baseline measured in the same "
                                "run, printed as a table (docs/benchmarks.md says what each measures).")
    p.add_argument("what", choices=["sim", "infer", "loop", "resfit"],
                   help="sim: env and PPO throughput; infer: artifact latency; loop: control-loop timing "
                        "with and without ROS 2; resfit: the off-policy learner")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--seconds", default=3.0,
                   help="time per measurement (sim, loop: per case; resfit: twice it per case)")
    p.add_argument("--num-envs", default=64, help="sim: envs of the vector env")
    p.add_argument("--ppo-steps", default=32768,
                   help="sim: env steps of each PPO run (ours and stable-baselines3's)")
    p.add_argument("--artifact", default=None, help="infer, loop: the artifact (default: the shipped ECO walker)")
    p.add_argument("--calls", default=5000, help="infer: policy calls per file")
    a = p.parse_args(argv)
    from robotrl.cli import number_option   # the CLI's one number check, which names the option
    opts = {f"--{k.replace('_', '-')}": v for k, v in vars(a).items()}
    seconds, calls = number_option(opts, "--seconds", 0.1, integer=False), number_option(opts, "--calls", 100)
    num_envs, ppo_steps = number_option(opts, "--num-envs", 2), number_option(opts, "--ppo-steps", 1)
    output_place(a.json, "--json")
    if a.what == "sim":
        res = bench_sim(seconds, num_envs, ppo_steps)
    elif a.what == "infer":
        res = bench_infer(a.artifact, calls)
    elif a.what == "resfit":
        from robotrl.bench_resfit import bench_resfit
        res = bench_resfit(seconds)
    else:
        from robotrl.bench_loop import bench_loop
        res = bench_loop(seconds, artifact=a.artifact)
    if a.json:
        write_text(a.json, json.dumps(res, indent=1))
        print(f"\nwrote {a.json}")
