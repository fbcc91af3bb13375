"""The shipped walking artifact, as TorchScript and as ONNX, and the shipped GRU walker, on the
real-robot graph (launch/real.launch.yaml: bridge_node + policy_node processes) driving the
emulated firmware (STATE at the robot's state_hz) in this process over UDP loopback, for 10 s of
real time at a commanded 0.25 m/s: it stays upright,
tracks the command, and earns the task's return within 10 % of the same artifact evaluated in
process."""
import dataclasses
import json
import threading

import numpy as np
import pytest
from geometry_msgs.msg import Twist

from real.artifact import load_artifact
from real.observations import projected_gravity
from robotrl import WALK_ARTIFACT
from robotrl.evaluate import evaluate_artifact
from sim.envs import make
from sim.randomization import Randomization
from sim.tasks.humanoid_walk import quat_rotate_inverse
from hil_rig import RAMP_S, SPEC

SECONDS = 10.0
COMMAND = np.array([0.25, 0.0, 0.0])
# The emulated firmware is the nominal twin: compare with the task without randomisation.
NOMINAL = {f.name: getattr(Randomization(), f.name) for f in dataclasses.fields(Randomization)}


def in_process(artifact, episodes: int = 4) -> dict:
    overrides = [f"task.randomization.{k}={json.dumps(v)}" for k, v in NOMINAL.items()]
    return evaluate_artifact(artifact, episodes=episodes, command=[0.25, 0, 0], num_envs=episodes,
                             overrides=[*overrides, f"task.episode_s={SECONDS}"])


@pytest.mark.parametrize("artifact", [WALK_ARTIFACT, WALK_ARTIFACT.with_suffix(".onnx"),
                                      WALK_ARTIFACT.with_name("kid_biped_walk_ppo_gru.pt")],
                         ids=["torchscript", "onnx", "gru"])
def test_walks_through_the_deploy_graph_like_in_process(hil, artifact):
    art = load_artifact(artifact)
    fw, probe, port = hil.firmware(gantry_s=RAMP_S)   # hangs until the ramp is done, then stands
    hil.real_graph(artifact, port, fw)
    pub = hil.ros.node.create_publisher(Twist, "cmd_vel", 10)
    twist = Twist()
    twist.linear.x = float(COMMAND[0])
    stop = threading.Event()

    def command():   # the operator's joystick: the velocity command, held
        while not stop.is_set():
            pub.publish(twist)
            stop.wait(0.05)
    joystick = threading.Thread(target=command, daemon=True)
    joystick.start()
    try:
        hil.run_robot(fw, seconds=SECONDS + 1.0, attempts=1)   # a fallen robot is not restarted
    finally:
        stop.set()
        joystick.join(1.0)
    probe.check_applied()

    # The policy's ticks: the firmware applied the ramp's commands first (ramp_s at the robot's
    # rate, the last one at the default pose), then one command per policy tick.
    applied = fw.applied_commands()
    ramp = round(RAMP_S * SPEC.control_hz)
    np.testing.assert_allclose(applied[ramp - 1].q_target, SPEC.q_default, atol=0.05)
    steps = round(SECONDS * SPEC.control_hz)
    assert len(applied) >= ramp + steps + 1, f"{len(applied)} commands applied"
    ticks = applied[ramp:ramp + steps + 1]
    # State reached after each command = the twin's state when the next command arrived.
    qpos = np.array([probe.base[c.seq][0] for c in ticks[1:]])
    qvel = np.array([probe.base[c.seq][1] for c in ticks[1:]])
    act = art.manifest["action"]
    actions = np.clip((np.array([c.q_target for c in ticks[:-1]]) - SPEC.q_default) / act["scale"],
                      -act["clip"], act["clip"])
    period = art.manifest["task"]["gait_period_s"]
    phases = (np.arange(1, steps + 1) / SPEC.control_hz / period) % 1.0   # the controller's clock, advanced

    env = make("humanoid_walk", randomization=NOMINAL)
    cfg = env.task.cfg
    tilt = np.arccos(np.clip(-projected_gravity(qpos[:, 3:7])[:, 2], -1.0, 1.0))
    assert qpos[:, 2].min() > cfg.terminate_height and tilt.max() < cfg.terminate_tilt, "the robot fell"
    v_body = quat_rotate_inverse(qpos[:, 3:7], qvel[:, :3])
    vel_error = float(np.linalg.norm(COMMAND[:2] - v_body[:, :2], axis=1).mean())
    ret = float(env.task.score(qpos, qvel, actions, phases, COMMAND).sum())

    ref = in_process(artifact)
    print(f"HIL: return {ret:.2f}, velocity error {vel_error:.3f} m/s, mean vx {v_body[:, 0].mean():.3f} m/s; "
          f"in process: return {ref['return_mean']:.2f} ± {ref['return_std']:.2f}, "
          f"velocity error {ref['vel_tracking_error']:.3f} m/s")
    assert ref["falls"] == 0
    assert abs(v_body[:, 0].mean() - COMMAND[0]) < 0.1, "does not walk at the commanded speed"
    assert vel_error < ref["vel_tracking_error"] + 0.05
    assert abs(ret - ref["return_mean"]) <= 0.10 * abs(ref["return_mean"])
