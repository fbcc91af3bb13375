"""Recurrent policies (algo.rnn=gru|lstm): PPO learns what one frame does not show, the memory is
replayed exactly in the update, and the artifact carries its memory (reset() zeroes it) through
export parity, a fresh process, the evaluator and the robot-side controller."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from real.artifact import load_artifact
from robotrl.algos.ppo import PPO, PPOConfig
from robotrl.cli import main
from robotrl.networks import ActorCritic


class RememberGoal:
    """A 2-D point must reach a goal that is shown only on its episode's first step (episodes of
    15–25 steps, so envs reset at different times). A feed-forward policy can do no better than
    stay near the goals' mean (about -0.77 per step); one that remembers heads for the goal."""

    def __init__(self, n, rng):
        self.n, self.rng = n, rng
        self.pos, self.goal = np.zeros((n, 2)), np.zeros((n, 2))
        self.t, self.length = np.zeros(n, dtype=int), np.zeros(n, dtype=int)
        self.reset(np.arange(n))

    def reset(self, ids):
        self.pos[ids] = 0.0
        self.goal[ids] = self.rng.uniform(-1, 1, (len(ids), 2))
        self.t[ids] = 0
        self.length[ids] = self.rng.integers(15, 26, len(ids))

    def obs(self):
        first = (self.t == 0)[:, None]
        return np.concatenate([self.pos, np.where(first, self.goal, 0.0), first], 1).astype(np.float32)

    def step(self, a):
        self.pos += 0.1 * np.clip(a, -1, 1)
        self.t += 1
        return -np.linalg.norm(self.pos - self.goal, axis=1), self.t >= self.length


def run(algo, env, iters, learn):
    """Mean reward per step over the last 3 iterations, acting with the memory as a robot would."""
    per_iter = []
    for it in range(iters):
        rewards = []
        for _ in range(algo.cfg.steps_per_env):
            obs = torch.as_tensor(env.obs())
            if learn:
                action = algo.act(obs, obs)
            else:
                with torch.no_grad():
                    action, algo.memory = algo.model.step(obs, algo.memory)
            r, done = env.step(action.numpy())
            rewards.append(r.mean())
            done_t = torch.as_tensor(done)
            if learn:
                algo.record(torch.as_tensor(r, dtype=torch.float32), done_t, torch.zeros_like(done_t),
                            torch.zeros(env.n), {})
            else:
                algo.memory[done_t] = 0.0
            env.reset(np.flatnonzero(done))
        if learn:
            algo.update(torch.as_tensor(env.obs()), progress=it / iters, step=it)
        per_iter.append(np.mean(rewards))
    return float(np.mean(per_iter[-3:]))


def trained_score(rnn: str) -> tuple[float, float]:
    torch.manual_seed(0)
    cfg = PPOConfig(steps_per_env=25, epochs=5, minibatches=4, actor_hidden=[64], critic_hidden=[64, 64],
                    lr=3e-3, init_std=0.6, entropy_coef=0.0, rnn=rnn, rnn_size=32)
    env = RememberGoal(32, np.random.default_rng(0))
    algo = PPO(5, 5, 2, cfg, num_envs=32)
    untrained = run(algo, env, 3, learn=False)
    algo.buffer.t = 0
    run(algo, env, 40, learn=True)
    return untrained, run(algo, env, 3, learn=False)


def test_gru_ppo_learns_what_one_frame_does_not_show():
    ff_untrained, ff = trained_score("none")
    gru_untrained, gru = trained_score("gru")
    assert ff < -0.65 and gru_untrained < -0.7, (ff, gru_untrained)   # no memory, no way to the goal
    assert gru > -0.5 and gru > ff + 0.2, (ff, gru)


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_sequence_replay_equals_acting_step_by_step(rnn):
    """The update's replay (whole sequences, memory zeroed at episode starts) gives exactly the means
    the policy acted with, so PPO's ratios start at 1."""
    torch.manual_seed(0)
    model = ActorCritic(6, 6, 3, [16], [16], rnn=rnn, rnn_size=8)
    obs, starts = torch.randn(12, 4, 6), torch.rand(12, 4) < 0.2
    starts[5, :2] = True
    state, acted = torch.randn(4, model.memory.state_size), []
    replayed = model.sequence_means(obs, state, starts.float())
    for t in range(12):
        state = torch.where(starts[t, :, None], 0.0, state)
        mean, state = model.step(obs[t], state)
        acted.append(mean)
    torch.testing.assert_close(replayed, torch.stack(acted))
    fresh, _ = model.step(obs[5], model.initial_state(4))
    restarted = starts[5]
    torch.testing.assert_close(replayed[5][restarted], fresh[restarted])   # a start forgets the past


@pytest.mark.parametrize("rnn", ["none", "gru"])
def test_every_rollout_row_is_in_exactly_one_minibatch(rnn):
    """Also where the minibatch count divides neither the rows nor the envs (5 envs, 7 steps, 3
    minibatches): no transition is left out of an epoch; a recurrent minibatch holds whole env sequences."""
    cfg = PPOConfig(steps_per_env=7, minibatches=3, actor_hidden=[8], critic_hidden=[8], rnn=rnn, rnn_size=4)
    algo = PPO(3, 3, 1, cfg, num_envs=5)
    batches = algo.minibatches()
    assert len(batches) == 3
    assert sorted(torch.cat(batches).tolist()) == list(range(35))
    if rnn != "none":
        for idx in batches:   # time-major whole sequences: step t of env i is row t·5 + i
            envs = idx[:len(idx) // 7]
            assert torch.equal(idx, (torch.arange(7)[:, None] * 5 + envs).reshape(-1))


TINY = ["num_envs=4", "algo.steps_per_env=16", "algo.actor_hidden=[32]", "algo.critic_hidden=[32,32]",
        "progress=false", "checkpoint_every=1", "video_seconds=1", "algo.rnn=lstm", "algo.rnn_size=16"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rnn") / "walk"
    assert main(["train", *TINY, "total_steps=128", f"run_dir={run_dir}"]) == 0
    assert (run_dir / "rollout.mp4").stat().st_size > 1000   # the video's policy carries its memory too
    assert main(["export", f"run={run_dir}", f"out={run_dir}/policy.pt"]) == 0
    return run_dir / "policy.pt"


def test_recurrent_artifact_carries_its_memory(artifact):
    art = load_artifact(artifact)
    policy = art.manifest["policy"]
    assert policy["stateful"] and policy["rnn"] == "lstm" and policy["rnn_size"] == 16
    obs = np.random.default_rng(0).normal(size=art.manifest["observation"]["size"]).astype(np.float32)
    first = art.act(obs)
    assert not np.allclose(art.act(obs), first, atol=1e-7)   # the same frame, another memory
    art.reset()
    np.testing.assert_allclose(art.act(obs), first, atol=1e-7)
    code = f"""
import sys, json, numpy as np
from real.artifact import load_artifact
art = load_artifact({str(artifact)!r})
obs = np.random.default_rng(0).normal(size=art.manifest['observation']['size']).astype(np.float32)
a = art.step(obs)[0]
heavy = [m for m in ('mujoco', 'gymnasium', 'hydra', 'omegaconf', 'robotrl', 'sim') if m in sys.modules]
print(json.dumps({{'heavy': heavy, 'a': a.tolist()}}))
"""
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["heavy"] == []
    np.testing.assert_allclose(res["a"], first, atol=1e-6)


def test_recurrent_artifact_evaluates(artifact, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", f"artifact={artifact}", "episodes=2", f"out={out}"]) == 0
    res = json.loads(out.read_text())
    assert res["episodes"] == 2 and np.isfinite(res["return_mean"])


def test_controller_gives_a_recurrent_artifact_a_fresh_memory_at_every_start(artifact, drive_controller):
    """Two identical robots driven in turn by ONE loaded artifact act identically: the second
    controller's start resets the memory the first one left behind."""
    art = load_artifact(artifact)
    first, second = drive_controller(art, 40), drive_controller(art, 40)
    assert len(first) > 20 and np.abs(first).max() > 0
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("args, needle", [
    (["algo=eco", "+algo.rnn=gru"], "algo.rnn=gru: algo=eco has no recurrent policy"),
    (["algo.rnn=transformer"], "algo.rnn must be one of none, gru, lstm"),
    (["algo.rnn=gru", "algo.rnn_size=0"], "algo.rnn_size"),
])
def test_bad_rnn_settings_are_named(args, needle, capsys, tmp_path):
    assert main(["train", "num_envs=2", "progress=false", *args, f"run_dir={tmp_path}/x"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bench_infer_measures_a_recurrent_artifact_against_its_bare_network(artifact, tmp_path):
    out = tmp_path / "infer.json"
    assert main(["bench", "infer", "--artifact", str(artifact), "--calls", "200", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["network"] == "lstm 16 + MLP"
    assert 0 < res["bare_network_median_us"] and 0 < res["latency_median_us"] <= res["latency_p99_us"]
