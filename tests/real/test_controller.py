"""The control tick against the in-process MuJoCo twin (lock-step: one tick, one control period)."""
import numpy as np
import pytest

from firmware_bridge import Mode as FirmwareMode
from real.artifact import ManifestMismatch, load_artifact
from real.controller import Controller
from real.hardware import HardwareInterface
from real.robot_spec import load_robot
from real.state_machine import Mode
from sim.twin_hardware import TwinHardware


class Faulty(HardwareInterface):
    """Fault injection around a real twin: corrupt or freeze what the controller reads."""

    def __init__(self, inner):
        self.inner, self.nan_q, self.frozen = inner, False, None

    def read(self):
        s = self.frozen or self.inner.read()
        if self.nan_q:
            s.q = s.q.copy()
            s.q[3] = np.nan
        return s

    def write(self, cmd):
        self.inner.write(cmd)

    def request_mode(self, mode):
        self.inner.request_mode(mode)

    def close(self):
        self.inner.close()


def assert_within_limits(spec, twin):
    log = twin.sim.applied_commands()
    assert log, "no command reached the firmware"
    for c in log:
        assert np.all(c.q_target >= spec.q_lower - 1e-6) and np.all(c.q_target <= spec.q_upper + 1e-6)
        assert np.all(np.isfinite(c.q_target)) and np.all(c.kp >= 0) and np.all(c.kd >= 0)


def make(artifact_path, **kw):
    spec = load_robot("kid_biped")
    sim_time = {"t": 0.0}
    twin = TwinHardware(spec, clock=lambda: sim_time["t"])
    hw = Faulty(twin)
    ctl = Controller(load_artifact(artifact_path), spec, hw, clock=lambda: sim_time["t"], ramp_s=0.2, **kw)

    def tick(n=1):
        for _ in range(n):
            ctl.tick()
            twin.step()
            sim_time["t"] += 1.0 / spec.control_hz
    return spec, twin, hw, ctl, tick


def test_refuses_another_robot(tiny_artifact):
    with pytest.raises(ManifestMismatch, match="joints in the artifact"):
        Controller(load_artifact(tiny_artifact), load_robot("arm7"), TwinHardware(load_robot("kid_biped")))


def test_idle_ramp_run_and_commands_reach_firmware_within_limits(tiny_artifact):
    spec, twin, hw, ctl, tick = make(tiny_artifact)
    tick(3)
    assert ctl.mode is Mode.IDLE and not twin.sim.applied_commands()  # IDLE never drives the motors
    ctl.start()
    tick(15)
    assert ctl.mode is Mode.RUNNING and twin.sim.mode == FirmwareMode.RUNNING
    ctl.set_velocity_command(0.2, 0.0, 0.0)
    tick(20)
    assert ctl.mode is Mode.RUNNING
    assert_within_limits(spec, twin)


def test_velocity_command_is_held_in_the_range_the_policy_was_trained_on(tiny_artifact):
    """A teleop's 5 m/s to a walker trained up to 0.4 m/s reaches the policy as 0.4; a NaN is
    ignored (the previous command stays) instead of damping the robot through the safety filter."""
    _, _, _, ctl, tick = make(tiny_artifact)
    trained = load_artifact(tiny_artifact).manifest["task"]["config"]["command"]
    low, high = ctl.command_range
    assert low.tolist() == [trained[k][0] for k in ("vx", "vy", "yaw_rate")]
    assert high.tolist() == [trained[k][1] for k in ("vx", "vy", "yaw_rate")]
    assert ctl.velocity_command.tolist() == [0, 0, 0]
    assert ctl.set_velocity_command(5.0, -5.0, 0.1).tolist() == [high[0], low[1], 0.1]
    assert ctl.set_velocity_command(float("nan"), 0.0, 0.0) is None
    assert ctl.set_velocity_command(0.1, 0.0, float("inf")) is None
    assert ctl.velocity_command.tolist() == [high[0], low[1], 0.1]
    ctl.start()
    tick(60)
    assert ctl.mode is Mode.RUNNING, ctl.machine.safety.fault_reason


def test_nan_observation_damps_and_latches(tiny_artifact):
    spec, twin, hw, ctl, tick = make(tiny_artifact)
    ctl.start()
    tick(15)
    hw.nan_q = True
    tick(2)
    assert ctl.mode is Mode.DAMPING and twin.sim.mode == FirmwareMode.DAMPING
    hw.nan_q = False
    tick(5)
    assert ctl.mode is Mode.DAMPING  # latched until an explicit reset
    assert any("non-finite" in e.reason for _, e in ctl.events)
    assert_within_limits(spec, twin)


def test_nan_policy_output_damps(tiny_artifact):
    spec, twin, hw, ctl, tick = make(tiny_artifact)
    ctl.start()
    tick(15)
    nan = np.full(spec.n_joints, np.nan)
    ctl.artifact.step = lambda obs: (nan.astype(np.float32), nan)  # a broken network
    tick(2)
    assert ctl.mode is Mode.DAMPING
    assert_within_limits(spec, twin)


def test_stale_state_damps(tiny_artifact):
    spec, twin, hw, ctl, tick = make(tiny_artifact, max_state_age=0.05)
    ctl.start()
    tick(15)
    hw.frozen = twin.read()
    tick(5)
    assert ctl.mode is Mode.DAMPING
    assert any("stale" in e.reason for _, e in ctl.events)


def test_estop_while_running_is_latched(tiny_artifact):
    spec, twin, hw, ctl, tick = make(tiny_artifact)
    ctl.start()
    tick(15)
    ctl.estop()
    tick(2)
    assert ctl.mode is Mode.ESTOP and twin.sim.mode == FirmwareMode.ESTOP
    with pytest.raises(Exception, match="latched"):
        ctl.start()
    n = len(twin.sim.applied_commands())
    tick(5)
    assert len(twin.sim.applied_commands()) == n  # the firmware applies nothing after an e-stop


def test_firmware_watchdog_stops_the_controller(tiny_artifact):
    spec, twin, hw, ctl, tick = make(tiny_artifact)
    ctl.start()
    tick(15)
    for _ in range(10):  # the controller stalls: physics goes on without commands
        twin.step()
    assert twin.sim.mode == FirmwareMode.DAMPING
    tick(1)
    assert ctl.mode is Mode.DAMPING


def test_a_firmware_that_drops_to_idle_is_not_pushed_back_into_running(tiny_artifact):
    """A firmware restart (or any node's IDLE request) while walking: the controller stops too,
    instead of asking for RUNNING again and applying policy targets without a ramp."""
    spec, twin, hw, ctl, tick = make(tiny_artifact)
    ctl.start()
    tick(15)
    assert ctl.mode is Mode.RUNNING
    twin.sim.request_mode(FirmwareMode.IDLE)
    n = len(twin.sim.applied_commands())
    tick(5)
    assert ctl.mode is Mode.DAMPING and "firmware reports IDLE" in ctl.machine.safety.fault_reason
    assert twin.sim.mode == FirmwareMode.DAMPING and len(twin.sim.applied_commands()) == n


def test_start_is_refused_while_the_firmware_is_latched_in_estop(tiny_artifact):
    spec, twin, hw, ctl, tick = make(tiny_artifact)
    twin.sim.request_mode(FirmwareMode.ESTOP)   # pressed on the robot before the controller started
    tick(2)
    with pytest.raises(Exception, match="the firmware is in ESTOP"):
        ctl.start()
    assert ctl.mode is Mode.IDLE


def test_a_non_finite_object_pose_is_refused_and_the_last_one_stays():
    spec = load_robot("arm7")
    twin = TwinHardware(spec)
    ctl = Controller(load_artifact("docs/artifacts/arm_lift_resfit.pt"), spec, twin)
    assert ctl.set_object_pose([0.5, 0.0, 0.03], [1, 0, 0, 0]) is None
    assert "not finite" in ctl.set_object_pose([np.nan, 0.0, 0.03], [1, 0, 0, 0])
    assert "not finite" in ctl.set_object_pose([0.5, 0.0, 0.03], [np.inf, 0, 0, 0])
    np.testing.assert_array_equal(ctl.object_position, [0.5, 0.0, 0.03])
