"""The shipped walking artifacts through the robot-side stack — Controller (observation from the
manifest, safety filter, state machine) driving the MuJoCo twin's firmware — walk: the ECO MLP
that deploys by default, and the recurrent (GRU) PPO walker, whose memory the controller resets;
each as TorchScript and as ONNX (onnxruntime, the memory kept by the loaded artifact)."""
from pathlib import Path

import numpy as np
import pytest

from real.artifact import load_artifact
from real.controller import Controller
from real.robot_spec import load_robot
from real.state_machine import Mode
from robotrl import WALK_ARTIFACT
from sim.twin_hardware import TwinHardware


GRU_WALKER = Path(WALK_ARTIFACT).with_name("kid_biped_walk_ppo_gru.pt")


@pytest.mark.parametrize("artifact", [WALK_ARTIFACT, GRU_WALKER, Path(WALK_ARTIFACT).with_suffix(".onnx"),
                                      GRU_WALKER.with_suffix(".onnx")],
                         ids=["eco_mlp", "ppo_gru", "eco_mlp_onnx", "ppo_gru_onnx"])
def test_shipped_policy_walks_through_the_controller(artifact):
    spec = load_robot("kid_biped")
    clock = {"t": 0.0}
    twin = TwinHardware(spec, clock=lambda: clock["t"])
    ctl = Controller(load_artifact(artifact), spec, twin, clock=lambda: clock["t"], ramp_s=0.5)
    ctl.start()
    ctl.set_velocity_command(0.25, 0.0, 0.0)
    pos, heights = [], []
    for _ in range(int(11 * spec.control_hz)):
        ctl.tick()
        twin.step()
        clock["t"] += 1.0 / spec.control_hz
        base = twin.sim.base_state()
        pos.append(base.pos.copy())
        heights.append(base.pos[2])
    assert ctl.mode is Mode.RUNNING
    assert min(heights) > 0.3                      # upright the whole time
    walked = np.linalg.norm(pos[-1][:2] - pos[50][:2])  # after the ramp, over 10 s
    assert 0.15 * 10 < walked < 0.35 * 10, walked    # commanded 0.25 m/s
    for c in twin.sim.applied_commands():
        assert np.all(c.q_target >= spec.q_lower - 1e-6) and np.all(c.q_target <= spec.q_upper + 1e-6)
