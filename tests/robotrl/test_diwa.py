"""DiWA: the world model learned from arm_lift play data, PPO over the denoising chain inside a
world model (on a small synthetic one, where learning is checked: imagined success rises), and
the offline pipeline on arm_lift end to end: play data -> world model -> diffusion BC -> DiWA ->
one TorchScript artifact with parity, with no environment step taken while learning."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from real.artifact import load_artifact
from robotrl.cli import main

TASK = ["task=arm_lift", "progress=false", "video=false", "task.episode_s=3.0"]
TINY_WM = ["algo=world_model", "algo.hidden=128", "algo.horizon=4", "algo.batch=32",
           "algo.steps=600", "algo.eval_every=600"]
TINY_BASE = ["algo=bc", "algo.policy=diffusion", "algo.hidden=[64,64]", "algo.denoise_steps=8", "algo.steps=200",
             "algo.eval_every=200", "algo.eval_episodes=2", "algo.eval_envs=2"]
TINY_DIWA = ["algo=diwa", "algo.envs=8", "algo.decisions=6", "algo.iterations=2", "algo.finetune_steps=4",
             "algo.critic_hidden=[32,32]", "algo.critic_warmup=1", "algo.epochs=2", "algo.minibatch=64",
             "algo.eval_every=2", "algo.eval_episodes=2", "algo.eval_envs=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("diwa")
    play, wander, demos = d / "play.npz", d / "wander.npz", d / "demos.npz"
    assert main(["demos", "task=arm_lift", "n=8", "noise=0.3", "failures=8", "seed=5", f"out={play}",
                 "task.episode_s=3.0"]) == 0
    assert main(["demos", "task=arm_lift", "n=2", "noise=0.15", "noise_steps=10", "failures=4", "aim=0.03", "seed=6",
                 f"out={wander}", "task.episode_s=3.0"]) == 0
    assert main(["demos", "task=arm_lift", "n=4", "seed=3", f"out={demos}", "task.episode_s=3.0"]) == 0
    assert main(["train", *TASK, *TINY_WM, f"algo.play=[{play},{wander}]", f"run_dir={d / 'wm'}"]) == 0
    assert main(["train", *TASK, *TINY_BASE, f"algo.demos={demos}", f"run_dir={d / 'base'}"]) == 0
    assert main(["train", *TASK, *TINY_DIWA, f"algo.base={d / 'base'}", f"algo.world_model={d / 'wm'}",
                 f"run_dir={d / 'diwa'}"]) == 0
    return d


def test_world_model_predicts_held_out_play_and_recognises_success(runs):
    """600 steps on 16 play episodes: open-loop prediction 4 steps ahead on held-out episodes is
    far better than copying the first observation, and the classifier fires on held-out successes
    and rarely elsewhere (an untrained model's decoder is not even close to copying)."""
    from robotrl.algos.world_model import Sequences, WorldModel, held_out_figures
    from robotrl.datasets import load_demos
    s = json.loads((runs / "wm" / "summary.json").read_text())
    assert s["play_episodes"] == 16 + 6          # both recordings of algo.play=[…]
    assert s["val_prediction_over_copy"] < 0.5
    assert s["val_success_recall"] >= 0.5 and s["val_success_false_positive"] < 0.1
    play = load_demos(runs / "play.npz")
    untrained = WorldModel(play.obs.shape[1], play.actions.shape[1], 32, 128)
    untrained.fit_to_play(play.obs)
    assert held_out_figures(untrained, Sequences(play, np.arange(play.num_episodes), 4))["val/prediction_over_copy"] > 1


def test_a_world_model_without_a_latent_code_steps_the_normalised_observation():
    from robotrl.algos.world_model import WorldModel
    wm = WorldModel(5, 2, latent=0, hidden=16)
    wm.fit_to_play(np.random.default_rng(0).normal(3.0, 2.0, (100, 5)).astype(np.float32))
    obs = torch.randn(4, 5) * 2 + 3
    z = wm.encode(obs)
    assert wm.latent_size == 5
    torch.testing.assert_close(z, (obs - wm.obs_mean) / wm.obs_std)
    torch.testing.assert_close(wm.decode(z), obs)
    assert wm.step(z, torch.zeros(4, 2)).shape == (4, 5) and wm.success_logit(z).shape == (4,)


def test_the_dynamics_starts_as_the_least_squares_fit_and_keeps_what_it_explains_exact():
    """Play where part of the observation integrates the action exactly (as arm_lift's joint targets
    do) and the rest moves on its own: fit_to_play's linear part predicts the first exactly before any
    training, and the MLP's scale there is the floor, so training cannot trade it away."""
    from robotrl.algos.world_model import WorldModel
    rng = np.random.default_rng(0)
    obs, actions = rng.normal(0.0, 1.0, (500, 4)).astype(np.float32), rng.uniform(-1, 1, (500, 2)).astype(np.float32)
    nxt = obs.copy()
    nxt[:, :2] += 0.05 * actions                                                  # exact and linear in the action
    nxt[:, 2:] = np.sin(3 * obs[:, 2:]) + rng.normal(0.0, 0.1, (500, 2))         # neither
    wm = WorldModel(4, 2, latent=0, hidden=16)
    wm.fit_to_play(obs, actions, nxt)
    pred = wm.decode(wm.step(wm.encode(torch.as_tensor(obs)), torch.as_tensor(actions))).detach().numpy()
    np.testing.assert_allclose(pred[:, :2], nxt[:, :2], atol=1e-4)
    assert np.abs(pred[:, 2:] - nxt[:, 2:]).mean() > 0.1                        # left to the MLP
    assert (wm.residual_scale[:2] <= 1e-4).all() and (wm.residual_scale[2:] > 0.1).all()
    assert not any(name.startswith("linear") for name, _ in wm.named_parameters())   # not trained


class LineWorld(nn.Module):
    """A world model by hand: z = position on a line (the observation), each action moves it by
    half the action, success past 1.0. From 0 with 8 actions, the policy must push forward."""
    latent_size = 2

    def encode(self, obs):
        return obs.clone()

    def decode(self, z):
        return z

    def step(self, z, action):
        return z + torch.cat([0.5 * action[:, :1], torch.zeros_like(z[:, 1:])], 1)

    def success_logit(self, z):
        return 10 * (z[:, 0] - 1.0)


def _line_learner(**overrides):
    from robotrl.algos.bc import BasePolicy, DiffusionChunk, Normalizer
    from robotrl.algos.diwa import DiWA, DiWAConfig
    torch.manual_seed(0)
    base = BasePolicy(Normalizer(2, 1), DiffusionChunk(2, 1, 2, [32], denoise_steps=5), execute=2, action_size=1)
    cfg = DiWAConfig(envs=16, decisions=8, max_model_steps=8, finetune_steps=3, min_std=0.3, epochs=4,
                     minibatch=128, actor_lr=3e-3, critic_lr=3e-3, critic_hidden=[32], critic_warmup=1,
                     **overrides)
    return DiWA(cfg, base, LineWorld(), np.zeros((4, 2), np.float32), execute=2, clip=1.0, seed=0)


def test_chain_log_likelihoods_are_gaussian_steps_and_the_first_ratio_is_one():
    """Each fine-tuned step's log-likelihood is the Gaussian denoising step's (clamped, averaged
    over the chunk); before any update the policy's and the rollout's agree (ratio 1)."""
    learner = _line_learner()
    batch = learner.rollout()
    p, K1 = learner.policy, learner.cfg.finetune_steps
    assert batch["chain"].shape == (16 * 8, K1 + 1, 2)
    row = 5
    obs_n, chain = batch["obs_n"][row:row + 1], batch["chain"][row:row + 1]
    for j in range(K1):
        mean, std = p.denoise(chain[:, j], K1 - 1 - j, obs_n)
        want = torch.distributions.Normal(mean, std).log_prob(chain[:, j + 1]).clamp(-5, 2).mean()
        assert float(std.min()) >= 0.3 - 1e-6
        torch.testing.assert_close(batch["old_logp"][row, j], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(learner._logp(p, batch["obs_n"], batch["chain"]), batch["old_logp"])


def test_bc_regulariser_is_the_pretrained_chains_negative_log_likelihood():
    """With algo.bc_weight > 0 the actor's loss adds −log π_pre of the same chain steps under a
    frozen copy of the pretrained policy: equal to the policy's own before it moves."""
    learner = _line_learner(bc_weight=0.05)
    batch = learner.rollout()
    assert learner.pretrained is not None and _line_learner().pretrained is None
    torch.testing.assert_close(learner._logp(learner.pretrained, batch["obs_n"], batch["chain"]), batch["old_logp"])
    learner.update(batch)                     # the critic's warm-up iteration
    stats = learner.update(learner.rollout())
    assert np.isfinite(stats["loss/bc"]) and np.isfinite(stats["loss/policy"])
    moved = learner._logp(learner.policy, batch["obs_n"], batch["chain"])
    assert not torch.allclose(moved, learner._logp(learner.pretrained, batch["obs_n"], batch["chain"]))


def test_clip_range_grows_from_the_noisiest_fine_tuned_step_to_the_last():
    from robotrl.algos.diwa import DiWAConfig, clip_ranges
    c = clip_ranges(DiWAConfig(finetune_steps=10))
    assert float(c[0]) == pytest.approx(0.001) and float(c[-1]) == pytest.approx(0.01)
    assert bool((c[1:] > c[:-1]).all())


def test_ppo_over_the_denoising_chain_learns_inside_a_world_model():
    """On LineWorld the untrained diffusion policy reaches the goal in 15 % of its imagined
    episodes; 30 iterations of DiWA take it to about 75 % (clip ranges 10× the default's, for a
    small budget)."""
    learner = _line_learner(clip_first=0.01, clip_last=0.1)
    first = learner.rollout()["imagined_success_rate"]
    rates = []
    for _ in range(30):
        batch = learner.rollout()
        rates.append(batch["imagined_success_rate"])
        learner.update(batch)
    assert first < 0.3 and np.mean(rates[-10:]) > 0.6, (first, rates)


def test_diwa_run_learns_offline_and_exports_one_artifact_with_parity(runs, tmp_path, capsys):
    s = json.loads((runs / "diwa" / "summary.json").read_text())
    assert s["env_steps"] == 0 and s["model_steps"] == 8 * 6 * 10 * 2
    rows = (runs / "diwa" / "metrics.csv").read_text().splitlines()
    assert "imagined/success_rate" in rows[0] and len(rows) == 1 + 3   # iteration 0 (evaluation) and 2 iterations
    out = tmp_path / "diwa.pt"
    assert main(["export", f"run={runs / 'diwa'}", f"out={out}"]) == 0
    assert "parity max" in capsys.readouterr().out
    art = load_artifact(out)
    assert art.manifest["policy"]["family"] == "diwa" and art.manifest["policy"]["policy"] == "diffusion"
    assert art.act(np.zeros(art.manifest["observation"]["size"], np.float32)).shape == (8,)


@pytest.mark.parametrize("args, needle", [
    (["export", "run={wm}"], "is a world model, not a policy"),
    (["train", *TASK, "algo=diwa", "algo.world_model={wm}"], "algo.base: give the `algo=bc algo.policy=diffusion` run"),
    (["train", *TASK, "algo=diwa", "algo.base={base}", "algo.world_model={base}"],
     "algo.world_model: .* is not an algo=world_model run"),
    (["train", *TASK, "algo=diwa", "algo.base={base}", "algo.world_model={wm}", "algo.finetune_steps=9"],
     r"algo.finetune_steps \(9\) must be <= the base's denoise_steps \(8\)"),
    (["train", *TASK, "algo=diwa", "algo.min_std=0"], "algo.min_std must be > 0"),
    (["train", *TASK, "algo=world_model"], "algo.play: give a demos file"),
])
def test_bad_diwa_input_is_named(runs, args, needle, tmp_path, capsys):
    import re
    args = [a.format(wm=runs / "wm", base=runs / "base", demos=runs / "demos.npz") for a in args]
    assert main([*args, f"run_dir={tmp_path / 'r'}"] if args[0] == "train" else args) == 2
    err = capsys.readouterr().err
    assert re.search(needle, err), err
    assert not (tmp_path / "r").exists()


def test_diwa_refuses_a_base_that_is_not_a_diffusion_policy(runs, tmp_path, capsys):
    mlp = tmp_path / "mlp"
    assert main(["train", *TASK, "algo=bc", "algo.hidden=[16]", "algo.steps=10", "algo.eval_every=10",
                 "algo.eval_episodes=1", "algo.eval_envs=1", f"algo.demos={runs / 'demos.npz'}", f"run_dir={mlp}"]) == 0
    assert main(["train", *TASK, "algo=diwa", f"algo.base={mlp}", f"algo.world_model={runs / 'wm'}",
                 f"run_dir={tmp_path / 'r'}"]) == 2
    assert "DiWA fine-tunes a diffusion policy" in capsys.readouterr().err


def test_play_data_aim_makes_the_expert_grasp_beside_the_cube():
    """aim=σ: each episode the expert closes on the cube plus an offset ~ N(0, σ²) drawn at its
    start. At 6 cm the offsets miss the cube and nothing is lifted, but the empty gripper is lifted
    (play data must show a closed gripper rising without the cube); at 0 the same episodes lift it."""
    from robotrl.datasets import make_expert
    from sim.envs import TaskVectorEnv, task_config
    lifted = {}
    for aim in (0.0, 0.06):
        env = TaskVectorEnv(task_config("arm_lift"), num_envs=4, nthread=1)
        expert = make_expert(env.task, seed=1, aim=aim)
        env.reset(seed=2)
        succeeded, ended = np.zeros(4, dtype=bool), np.zeros(4, dtype=bool)
        terms = env.task.manifest()["observation"]["terms"]
        start = dict(zip([t["name"] for t in terms], np.cumsum([0] + [t["size"] for t in terms])))
        tcp_z, cube_z, width = start["tcp_pos"], start["cube_pos"], start["gripper_width"]
        empty_lifts = 0
        for _ in range(160):   # each env's first episode
            obs, _, terminated, truncated, info = env.step(expert())
            empty = (obs[:, tcp_z + 2] > 0.12) & (obs[:, cube_z + 2] < 0.04) & (obs[:, width] < 0.05)
            empty_lifts += int(empty.sum())
            succeeded |= (info["success"] > 0) & ~ended
            ended |= terminated | truncated
        assert np.abs(expert.aim_offset[:, :2]).max() > (0.02 if aim else -1) and not expert.aim_offset[:, 2].any()
        lifted[aim] = int(succeeded.sum())
        env.close()
        if aim:
            assert empty_lifts > 0
    assert lifted[0.0] >= 3 and lifted[0.06] <= 1, lifted
    with pytest.raises(ValueError, match="aim= is an option of arm_lift's expert"):
        make_expert(type("T", (), {"cfg": type("C", (), {"name": "arm_place"})})(), aim=0.01)


@pytest.mark.parametrize("noise_steps", [0, 10])
def test_play_noise_is_correlated_over_noise_steps(noise_steps):
    """noise_steps=T: the expert's added noise keeps its std and is correlated over about T control
    steps (lag-1 correlation exp(-1/T)); 0 keeps it independent per step. Read off as the difference
    between a noisy and a clean expert on the same states (the expert is stateless)."""
    from robotrl.datasets import make_expert
    from sim.envs import TaskVectorEnv, task_config
    env = TaskVectorEnv(task_config("arm_lift"), num_envs=2, nthread=1)
    noisy = make_expert(env.task, noise=0.05, seed=3, noise_steps=noise_steps)
    clean = make_expert(env.task)
    env.reset(seed=4)
    added = []
    for _ in range(120):
        action = clean()
        added.append(noisy() - action)
        env.step(action)
    env.close()
    added = np.array(added)[:, :, :7]          # arm joints (away from the clip; the gripper sits at it)
    lag1 = np.mean(added[1:] * added[:-1]) / np.mean(added ** 2)
    assert 0.04 < added.std() < 0.06
    want = np.exp(-1 / noise_steps) if noise_steps else 0.0
    assert abs(lag1 - want) < 0.1, (lag1, want)
