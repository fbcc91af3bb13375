"""Fault injection on the real-robot graph (launch/real.launch.yaml: bridge_node + policy_node
processes) driving the emulated firmware in this process over UDP loopback. In every case the
firmware's applied-command log must hold only commands inside the robot's limits."""
import json
import math
import signal
import time

import numpy as np
import pytest
import torch
from sensor_msgs.msg import Imu
from std_msgs.msg import Float64MultiArray

from firmware_bridge import Mode
from real.artifact import weights_sha256
from robotrl.deploy import NodeSpec
from real.hardware import JointCommand
from robotrl_ros.messages import CONTROL_QOS, command_to_msg
from hil_rig import FIRMWARE_WATCHDOG_MS, RAMP_S, SPEC, TIMING, free_udp_port, wait_for

def assert_damped_within_watchdog(fw, probe, t_fault) -> None:
    """The firmware went passive within its watchdog time (+2 physics steps to notice it) of
    the last command it applied."""
    delay = probe.entered(Mode.DAMPING, after=t_fault) - fw.applied_commands()[-1].t
    assert delay <= FIRMWARE_WATCHDOG_MS / 1e3 + 2 * fw.sim.dt + 1e-9, f"damped {delay * 1e3:.0f} ms after"
    print(f"firmware damped {delay * 1e3:.0f} ms after the last command")


def test_stale_state_damps(hil, artifact):
    fw, probe, _ = hil.running_robot(artifact)
    t_fault = fw.sim.time
    fw.peer = ("127.0.0.1", free_udp_port())   # STATE frames now go nowhere: the robot computer hears nothing
    hil.expect_policy("DAMPING", "stale state")
    # Commands still flow to the firmware: the policy's DAMPING request reaches it.
    probe.entered(Mode.DAMPING, after=t_fault)
    probe.check_applied()


def test_nan_observation_damps(hil, artifact):
    fw, probe, _ = hil.running_robot(artifact)
    # A corrupted IMU message: gyro is observation only, so the NaN goes through the policy.
    t_fault = fw.sim.time
    pub = hil.ros.node.create_publisher(Imu, "imu", CONTROL_QOS)
    bad = Imu()
    bad.orientation.w = 1.0
    bad.angular_velocity.x = math.nan
    end = time.monotonic() + 0.3
    while time.monotonic() < end:   # faster than the bridge, so a tick surely reads it
        bad.header.stamp = hil.ros.node.get_clock().now().to_msg()
        pub.publish(bad)
        time.sleep(0.002)
    hil.expect_policy("DAMPING", "non-finite desired target")   # it went through the network
    probe.entered(Mode.DAMPING, after=t_fault)
    probe.check_applied()


@pytest.fixture(scope="module")
def nan_artifact(artifact, tmp_path_factory):
    """The artifact with NaN weights (as after a diverged training run), re-hashed so it loads."""
    extra = {"manifest.json": ""}
    module = torch.jit.load(str(artifact), _extra_files=extra)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(math.nan)
    manifest = json.loads(extra["manifest.json"])
    manifest["hashes"]["weights_sha256"] = weights_sha256(module)
    path = tmp_path_factory.mktemp("nan") / "nan_policy.pt"
    torch.jit.save(module, str(path), _extra_files={"manifest.json": json.dumps(manifest)})
    return path


def test_nan_policy_output_damps(hil, nan_artifact):
    fw, probe, port = hil.firmware()
    hil.real_graph(nan_artifact, port, fw)
    hil.start()
    # The ramp does not use the network; its first RUNNING tick does and must be refused.
    hil.expect_policy("DAMPING", "non-finite desired target", timeout=5.0)
    probe.entered(Mode.DAMPING, after=probe.entered(Mode.RUNNING, after=0.0))
    probe.check_applied(min_count=10)   # the ramp's commands


def test_policy_killed_firmware_damps_within_its_watchdog(hil, artifact):
    fw, probe, graph = hil.running_robot(artifact)
    t_fault, trips = fw.sim.time, hil.output().count("no joint command from the policy")
    graph.procs["policy"].send_signal(signal.SIGKILL)
    assert_damped_within_watchdog(fw, probe, t_fault)   # the bridge's watchdog is the faster one
    wait_for(lambda: hil.output().count("no joint command from the policy") > trips, 2.0, "the bridge's watchdog",
             hil.output)
    probe.check_applied()


def test_bridge_killed_firmware_and_policy_damp(hil, artifact):
    fw, probe, graph = hil.running_robot(artifact)
    t_fault = fw.sim.time
    graph.procs["bridge"].send_signal(signal.SIGKILL)
    assert_damped_within_watchdog(fw, probe, t_fault)   # only the firmware's own watchdog is left
    hil.expect_policy("DAMPING", "stale state")
    probe.check_applied()


def test_estop_while_running_is_latched(hil, artifact):
    fw, probe, _ = hil.running_robot(artifact)
    t_fault = fw.sim.time
    assert hil.ros.call("/policy/estop").success
    t_estop = probe.entered(Mode.ESTOP, after=t_fault)
    hil.expect_policy("ESTOP")
    for service in ("/policy/start", "/policy/damp"):
        response = hil.ros.call(service)
        assert not response.success and "ESTOP is latched" in response.message, response.message
    assert hil.ros.call("/policy/reset").success   # the policy may reset; the firmware stays latched
    response = hil.ros.call("/policy/start")
    assert not response.success and "firmware is in ESTOP" in response.message, response.message
    time.sleep(0.5)
    assert fw.mode == Mode.ESTOP
    assert all(c.t <= t_estop for c in fw.applied_commands()), "a command was applied after the e-stop"
    probe.check_applied()


def test_a_rogue_command_outside_the_limits_never_reaches_the_firmware(hil, artifact):
    """Another node publishing on joint_commands (a teleop script, a second policy): the bridge
    checks every command against the robot's limits and drops what is outside them."""
    fw, probe, _ = hil.running_robot(artifact)
    rogue = JointCommand(SPEC.q_upper + 1.0, SPEC.kp * 10, SPEC.kd, np.full(SPEC.n_joints, 20.0))
    pub = hil.ros.node.create_publisher(Float64MultiArray, "joint_commands", CONTROL_QOS)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pub.publish(command_to_msg(rogue, SPEC.joint_names))
        time.sleep(0.005)
    wait_for(lambda: int(hil.ros.status["bridge: firmware link"]["bad_commands"]) > 0, 3.0,
             "the bridge to count the rogue commands", hil.output)
    assert "dropping joint command: outside the limits of kid_biped: q_target of hip_yaw_l" in hil.output()
    assert hil.policy() == "RUNNING"   # the policy's own commands went on
    probe.check_applied()   # none applied, and none reached the firmware to be rejected there


def test_policy_drives_firmware_directly_over_udp(hil, artifact):
    """hardware=udp: the policy node speaks the firmware protocol itself, no bridge hop."""
    fw, probe, port = hil.firmware()
    spec = NodeSpec("robotrl_ros", "policy_node", "policy", params=[
        ("artifact", str(artifact)), ("hardware", "udp"), ("firmware_port", str(fw.address[1])),
        ("bind_host", "127.0.0.1"), ("bind_port", str(port)), ("ramp_s", str(RAMP_S)),
        ("max_state_age", str(TIMING["max_state_age"]))])
    hil.nodes(spec)
    hil.run_robot(fw)
    probe.check_applied()
