import os
import warnings

os.environ.setdefault("MUJOCO_GL", "egl")
warnings.filterwarnings("ignore", message=".*torch.jit.*")

import pytest


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """A real (barely trained) walking artifact from the real pipeline: train → export."""
    from robotrl.cli import main
    d = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "num_envs=4", "algo.steps_per_env=16", "algo.actor_hidden=[32,32]",
                 "algo.critic_hidden=[32,32]", "total_steps=64", "video=false", "progress=false",
                 f"run_dir={d}"]) == 0
    assert main(["export", f"run={d}", f"out={d}/policy.pt"]) == 0
    return d / "policy.pt"
