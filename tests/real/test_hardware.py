"""FirmwareHardware over real UDP loopback sockets against a minimal fake firmware built from
firmware_bridge alone, so these tests need no MuJoCo (the robot computer has none). The
round trip with the emulated firmware (the MuJoCo twin) is in tests/sim."""
import select
import time
import zlib

import numpy as np
import pytest

from firmware_bridge import (CommandMsg, Mode, ModeRequestMsg, ProtocolVersionError, StateMsg,
                             UdpTransport, encode)
from real.hardware import FirmwareHardware, HardwareError, JointCommand
from real.robot_spec import load_robot
from real.safety import Command

SPEC = load_robot("kid_biped")
N = SPEC.n_joints
# kid_biped's wiring (its YAML): the right leg's pitch motors (hip_pitch_r, knee_r, ankle_r) turn
# against their joints, so the wire carries their angles, velocities and torques negated.
MOTOR_SIGN = np.array([1, 1, 1, 1, 1, 1, 1, -1, -1, -1])


def state(i, n=N, mode=Mode.RUNNING):
    """A StateMsg whose contents identify it by i."""
    return StateMsg(np.full(n, 0.1 * i), np.full(n, -0.5), np.full(n, 2.0), np.full(n, 31.0),
                    [1, 0, 0, 0], [0.1, 0.2, 0.3], [0, 0, 9.81], mode, i, 1000 * i)


def with_version(frame: bytes, version: int) -> bytes:
    """The same frame as another protocol version would send it: intact, with a valid CRC."""
    f = bytearray(frame)
    f[2] = version
    f[-4:] = zlib.crc32(f[:-4]).to_bytes(4, "little")
    return bytes(f)


class FakeFirmware:
    def __init__(self):
        self.transport = UdpTransport(("127.0.0.1", 0))
        self.seq = 0

    def send(self, msg, version=None):
        frame = encode(msg, self.seq)
        self.seq += 1
        self.transport.send(frame if version is None else with_version(frame, version))

    def receive(self, timeout=1.0):
        select.select([self.transport.fileno()], [], [], timeout)
        return self.transport.poll()


@pytest.fixture
def pair():
    fw = FakeFirmware()
    hw = FirmwareHardware.udp(SPEC, fw.transport.address, ("127.0.0.1", 0))
    fw.transport.peer = hw.link.transport.address
    yield hw, fw
    hw.close()
    fw.transport.close()


def test_state_and_command_round_trip(pair):
    hw, fw = pair
    assert hw.read() is None and hw.stale
    fw.send(state(3))
    before = time.monotonic()
    s = hw.start(timeout_s=1.0)
    assert before <= s.stamp_s <= time.monotonic()
    assert s.q.dtype == np.float64 and s.q.shape == (N,)
    np.testing.assert_allclose(s.q, 0.3 * MOTOR_SIGN, rtol=1e-6)
    np.testing.assert_allclose(s.dq, -0.5 * MOTOR_SIGN, rtol=1e-6)
    np.testing.assert_allclose(s.tau, 2.0 * MOTOR_SIGN, rtol=1e-6)
    np.testing.assert_allclose(s.temperature, 31.0)
    np.testing.assert_allclose(s.gyro, [0.1, 0.2, 0.3], rtol=1e-6)
    assert (s.firmware_mode, s.last_command_seq) == (Mode.RUNNING, 3)
    assert hw.read() is s, "no newer state: the same one again, its stamp tells its age"

    cmd = JointCommand(SPEC.q_default, SPEC.kp, SPEC.kd, np.full(N, 0.25))
    hw.request_mode(Mode.RUNNING)
    hw.write(cmd)
    (seq0, mode_req), (seq1, sent) = fw.receive()
    assert isinstance(mode_req, ModeRequestMsg) and mode_req.mode == Mode.RUNNING
    assert isinstance(sent, CommandMsg) and seq1 == seq0 + 1 == hw.last_sent_seq
    for got, want in zip((sent.position, sent.kp, sent.kd, sent.torque_ff),
                         (MOTOR_SIGN * cmd.q_target, cmd.kp, cmd.kd, MOTOR_SIGN * cmd.tau_ff)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert hw.stats.frames_ok == 1 and not hw.stale


def test_motor_zero_offsets_and_directions_are_undone_on_the_robot_side(tmp_path):
    """A joint whose encoder reads zero_offset at the joint's zero, mounted either way: the wire
    carries direction·q + zero_offset; the robot side reads and writes joint angles."""
    import yaml
    raw = yaml.safe_load(open(SPEC.source))
    for j, (direction, offset) in zip(raw["joints"], [(1, 0.5), (-1, -1.25)] + [(1, 0.0)] * (N - 2)):
        j.update(direction=direction, zero_offset=offset)
    (tmp_path / "wired.yaml").write_text(yaml.safe_dump(raw))
    spec = load_robot(tmp_path / "wired.yaml")
    fw = FakeFirmware()
    with FirmwareHardware.udp(spec, fw.transport.address, ("127.0.0.1", 0)) as hw:
        fw.transport.peer = hw.link.transport.address
        fw.send(state(3))   # every motor reads 0.3 rad, -0.5 rad/s, 2 N·m
        s = hw.start()
        np.testing.assert_allclose(s.q[:3], [0.3 - 0.5, -(0.3 + 1.25), 0.3], rtol=1e-6)
        np.testing.assert_allclose(s.dq[:3], [-0.5, 0.5, -0.5], rtol=1e-6)
        np.testing.assert_allclose(s.tau[:3], [2.0, -2.0, 2.0], rtol=1e-6)
        q = np.full(N, 0.1)
        hw.write(JointCommand(q, SPEC.kp, SPEC.kd, np.full(N, 0.25)))
        (_, sent), = fw.receive()
        np.testing.assert_allclose(sent.position[:3], [0.1 + 0.5, -0.1 - 1.25, 0.1], rtol=1e-6)
        np.testing.assert_allclose(sent.torque_ff[:3], [0.25, -0.25, 0.25], rtol=1e-6)
        np.testing.assert_allclose(sent.kp, SPEC.kp, rtol=1e-6)
    fw.transport.close()


@pytest.mark.parametrize("key, value, needle", [("direction", 0.5, "'direction' must be 1 or -1"),
                                                ("direction", 0, "'direction' must be 1 or -1"),
                                                ("zero_offset", "calibrate me", "'zero_offset' must be a finite"),
                                                # YAML's .nan / .inf: a NaN gain, or a torque limit that is none
                                                ("kp", float("nan"), "'kp' must be a finite number, got nan"),
                                                ("torque", float("inf"), "'torque' must be a finite number, got inf"),
                                                ("velocity", float("inf"), "'velocity' must be a finite number")])
def test_a_bad_joint_entry_is_refused_naming_the_joint_and_key(key, value, needle):
    import yaml
    from real.robot_spec import SpecError, spec_from_dict
    raw = yaml.safe_load(open(SPEC.source))
    raw["joints"][3][key] = value
    with pytest.raises(SpecError, match=r"joints\[3\] \(knee_l\)") as e:
        spec_from_dict(raw, SPEC.source)
    assert needle in str(e.value) and "kid_biped.yaml" in str(e.value)


def test_read_returns_the_newest_of_queued_states(pair):
    hw, fw = pair
    for i in range(1, 6):
        fw.send(state(i))
    hw.start()
    assert hw.read().last_command_seq == 5


def test_joint_command_from_safety_command_and_wrong_size(pair):
    hw, _ = pair
    cmd = JointCommand(*Command(SPEC.q_default, SPEC.kp, SPEC.kd, np.zeros(N)))
    assert cmd.q_target.dtype == np.float64
    with pytest.raises(ValueError, match="expected shape"):
        JointCommand(np.zeros(N), np.zeros(N), np.zeros(N - 1), np.zeros(N))
    with pytest.raises(ValueError, match="command has 9 joints, robot 'kid_biped' has 10"):
        hw.write(JointCommand(np.zeros(9), np.zeros(9), np.zeros(9), np.zeros(9)))


def test_refuses_firmware_of_another_protocol_version(pair):
    hw, fw = pair
    fw.send(state(1), version=2)
    with pytest.raises(ProtocolVersionError, match="speaks firmware protocol v2, this bridge speaks v1"):
        hw.start(timeout_s=1.0)
    assert hw.stats.bad_version == 1


def test_refuses_firmware_with_another_motor_count(pair):
    hw, fw = pair
    fw.send(state(1, n=12))
    with pytest.raises(HardwareError, match="firmware reports 12 motors, robot 'kid_biped' has 10 joints"):
        hw.start(timeout_s=1.0)


def test_start_times_out_without_firmware(pair):
    hw, _ = pair
    t0 = time.monotonic()
    with pytest.raises(HardwareError, match="no STATE from the firmware of 'kid_biped' within 0.1 s"):
        hw.start(timeout_s=0.1)
    assert 0.09 <= time.monotonic() - t0 < 0.5
