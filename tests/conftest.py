import os
import warnings

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
warnings.filterwarnings("ignore", message=".*torch.jit.*")


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


@pytest.fixture(scope="session")
def drive_controller():
    """drive(artifact, ticks) -> the actions one loaded artifact takes through real.Controller on a
    fresh kid_biped twin in lock-step (those of the RUNNING ticks, after a short ramp)."""
    import numpy as np
    from real.controller import Controller
    from real.robot_spec import load_robot
    from real.state_machine import Mode
    from sim.twin_hardware import TwinHardware
    spec = load_robot("kid_biped")

    def drive(art, ticks: int) -> np.ndarray:
        clock = {"t": 0.0}
        twin = TwinHardware(spec, clock=lambda: clock["t"])
        ctl = Controller(art, spec, twin, clock=lambda: clock["t"], ramp_s=0.1)
        ctl.start()
        actions = []
        for _ in range(ticks):
            ctl.tick()
            twin.step()
            clock["t"] += 1.0 / spec.control_hz
            if ctl.mode is Mode.RUNNING:
                actions.append(ctl.last_action.copy())
        return np.array(actions)
    return drive
