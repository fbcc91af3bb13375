"""The diffusion chunk policy (algo=bc algo.policy=diffusion): the DDPM chain's arithmetic, BC
on arm_lift demos past a success rate its untrained self misses, and one TorchScript artifact
with the denoising loop inside, parity-checked on the same noise."""
import numpy as np
import pytest
import torch

from real.artifact import load_artifact
from robotrl.cli import main

TASK = ["task=arm_lift", "progress=false", "video=false"]
DIFFUSION = ["algo=bc", "algo.policy=diffusion", "algo.hidden=[128,128]", "algo.ema=0.99", "algo.batch=128",
             "algo.eval_episodes=10", "algo.eval_envs=10"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusion")
    demos = d / "demos.npz"
    assert main(["demos", "task=arm_lift", "n=10", "seed=3", f"out={demos}", "task.episode_s=3.0"]) == 0
    assert main(["train", *TASK, *DIFFUSION, f"algo.demos={demos}", "algo.steps=1200", "algo.eval_every=1200",
                 f"run_dir={d / 'run'}"]) == 0
    return d / "run"


def test_denoising_chain_recovers_the_clean_chunk_with_a_perfect_noise_predictor():
    """With ε̂ = the true noise, every step's mean is the DDPM posterior mean of x_{k-1} given
    (x_k, x0), and the last step returns x0 exactly: the schedule's coefficients are consistent."""
    from robotrl.algos.bc import DiffusionChunk
    torch.manual_seed(0)
    pol = DiffusionChunk(3, 2, 4, [16], denoise_steps=10)
    x0 = torch.rand(5, 8) * 1.6 - 0.8
    noise = torch.randn(5, 8)
    pol.eps = lambda x, k, obs: noise
    ab = pol.sqrt_ab ** 2
    for k in (9, 4, 1):
        xk = pol.sqrt_ab[k] * x0 + pol.sqrt_1m_ab[k] * noise
        mean, std = pol.denoise(xk, k, torch.zeros(5, 3))
        a_prev, beta = ab[k - 1], 1 - ab[k] / ab[k - 1]
        want = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * xk) / (1 - ab[k])
        torch.testing.assert_close(mean, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(std, (beta * (1 - a_prev) / (1 - ab[k])).sqrt().expand_as(xk))
    xk = pol.sqrt_ab[0] * x0 + pol.sqrt_1m_ab[0] * noise
    mean, std = pol.denoise(xk, 0, torch.zeros(5, 3))
    torch.testing.assert_close(mean, x0, atol=1e-5, rtol=1e-5)
    assert float(std.abs().max()) == 0.0


def test_diffusion_bc_learns_arm_lift_from_ten_demos(diffusion_run):
    """1,200 gradient steps on 10 demos: at least 4 of 10 evaluation episodes lift the cube (7 of
    10 measured); the same policy with its initial weights lifts none."""
    import json

    from omegaconf import OmegaConf

    from robotrl.algos.bc import BasePolicy
    from robotrl.offpolicy import _task_cfg, algo_config, base_act_fn, evaluate, load_base
    summary = json.loads((diffusion_run / "summary.json").read_text())
    assert summary["policy"] == "diffusion"
    assert summary["eval_success_rate"] >= 0.4
    trained, bcfg, ckpt = load_base(diffusion_run)
    untrained = BasePolicy.build(algo_config(ckpt["config"]["algo"]), ckpt["obs_size"], ckpt["action_size"])
    untrained.norm.load_state_dict(trained.norm.state_dict())   # the same normaliser: only the weights differ
    base = untrained.eval().with_batch(10)
    ev = evaluate(_task_cfg(OmegaConf.create(ckpt["config"])), base_act_fn(base, None, 1.0), base.reset,
                  episodes=10, num_envs=10, seed=0)
    assert ev["success_rate"] == 0.0


def test_diffusion_artifact_samples_inside_torchscript_with_parity(diffusion_run, tmp_path, capsys):
    out = tmp_path / "diffusion.pt"
    assert main(["export", f"run={diffusion_run}", f"out={out}"]) == 0
    assert "parity max" in capsys.readouterr().out
    art = load_artifact(out)
    assert art.manifest["policy"]["policy"] == "diffusion"
    obs = np.zeros(art.manifest["observation"]["size"], dtype=np.float32)
    torch.manual_seed(1)
    art.reset()
    a1 = art.act(obs)
    art.reset()
    a2 = art.act(obs)     # another draw of noise: another sample of the chunk
    assert np.all(np.abs(a1) <= 1.0) and not np.allclose(a1, a2)
    assert main(["export", f"run={diffusion_run}", f"out={tmp_path / 'diffusion.onnx'}"]) != 0
    assert "format=torchscript" in capsys.readouterr().err
    assert not (tmp_path / "diffusion.onnx").exists()


@pytest.mark.parametrize("override, needle", [
    ("algo.hidden=[128,64]", "algo.hidden of a diffusion policy"),
    ("algo.denoise_steps=0", "algo.denoise_steps"),
    ("algo.ema=1.0", "algo.ema"),
])
def test_bad_diffusion_settings_are_named(override, needle, tmp_path, capsys):
    assert main(["train", *TASK, *DIFFUSION, "algo.demos=unused.npz", override, f"run_dir={tmp_path / 'r'}"]) != 0
    assert needle in capsys.readouterr().err
