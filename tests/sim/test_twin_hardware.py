"""TwinHardware: the in-process twin behind real.hardware.HardwareInterface, time owned by step()."""
import numpy as np

from firmware_bridge import Mode
from real.hardware import HardwareInterface, JointCommand
from real.robot_spec import load_robot
from sim.emulated_firmware import FirmwareConfig
from sim.twin_hardware import TwinHardware

SPEC = load_robot("kid_biped")
N = SPEC.n_joints
HOLD = JointCommand(SPEC.q_default, SPEC.kp, SPEC.kd, np.zeros(N))


def test_holds_the_default_pose_and_damps_when_writes_stop():
    hw = TwinHardware(SPEC, FirmwareConfig(watchdog_ms=100))
    assert isinstance(hw, HardwareInterface)
    assert hw.read().firmware_mode == Mode.IDLE
    hw.request_mode(Mode.RUNNING)
    for _ in range(100):  # 2 s
        hw.write(HOLD)
        s = hw.step()
    assert s.firmware_mode == Mode.RUNNING and s.last_command_seq == 99
    assert hw.sim.base_state().pos[2] > 0.4
    np.testing.assert_allclose(s.q, SPEC.q_default, atol=0.1)
    assert hw.read() is s and hw.read() is s, "read() never advances time"
    # The last command took effect 20 ms before s; the watchdog trips once 100 ms have passed
    # since then, i.e. during the 5th write-less period (100..120 ms).
    modes = [hw.step().firmware_mode for _ in range(6)]
    assert modes == [Mode.RUNNING] * 4 + [Mode.DAMPING] * 2


def test_is_deterministic_with_a_sim_clock():
    def run():
        hw = TwinHardware(SPEC, clock=lambda: 0.0)
        hw.request_mode(Mode.RUNNING)
        out = []
        for k in range(40):
            hw.write(JointCommand(SPEC.q_default + 0.1 * np.sin(0.2 * k), SPEC.kp, SPEC.kd, np.zeros(N)))
            out.append(hw.step())
        return out

    for a, b in zip(run(), run()):
        for f in ("q", "dq", "tau", "temperature", "quat_wxyz", "gyro", "accel"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
