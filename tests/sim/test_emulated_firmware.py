"""The emulated firmware (the biped's MuJoCo twin behind the firmware protocol) driven by
FirmwareHardware over real UDP loopback sockets, in lock-step and in real time; and the world a
task adds to the twin (the tabletop cube, its goal, its pose in the robot's base frame)."""
import os
import select
import signal
import socket
import subprocess
import sys
import time
import zlib

import mujoco
import numpy as np
import pytest

from firmware_bridge import CommandMsg, Mode, encode
from real.hardware import FirmwareHardware, JointCommand
from real.robot_spec import load_robot
from sim.emulated_firmware import EmulatedFirmware, FirmwareConfig, SimulatedFirmware, World
from sim.envs import task_config, task_world
from sim.twin import apply_joint_equalities

SPEC = load_robot("kid_biped")
N = SPEC.n_joints
HOLD = JointCommand(SPEC.q_default, SPEC.kp, SPEC.kd, np.zeros(N))
WATCHDOG_MS = 100.0


@pytest.fixture
def rig():
    """(emulated firmware, FirmwareHardware) talking over 127.0.0.1 on ephemeral ports."""
    fw = EmulatedFirmware(SPEC, ("127.0.0.1", 0), config=FirmwareConfig(watchdog_ms=WATCHDOG_MS))
    hw = FirmwareHardware.udp(SPEC, fw.address, ("127.0.0.1", 0))
    fw.peer = hw.link.transport.address
    yield fw, hw
    fw.close()
    hw.close()


def run_lockstep(fw, hw, cmd, periods):
    """Per period: request RUNNING, send cmd, let the firmware step; returns the states read."""
    states = []
    for _ in range(periods):
        hw.request_mode(Mode.RUNNING)
        hw.write(cmd)
        fw.step_control_period()
        states.append(hw.read())
    return states


def test_round_trip_lockstep(rig):
    fw, hw = rig
    fw.step_control_period()
    s = hw.start(timeout_s=1.0)
    assert s.firmware_mode == Mode.IDLE and s.last_command_seq == 0
    np.testing.assert_allclose(s.q, SPEC.q_default, atol=0.01)  # sagging a little, passive
    np.testing.assert_allclose(s.quat_wxyz, [1, 0, 0, 0], atol=1e-2)
    assert s.accel[2] == pytest.approx(9.81, abs=3.0)  # an IMU at rest reads +g upward

    hw.write(HOLD)  # IDLE: received but not applied
    fw.step_control_period()
    assert fw.applied_commands() == [] and hw.read().last_command_seq == 0

    s = run_lockstep(fw, hw, HOLD, 50)[-1]  # 1 s
    assert s.firmware_mode == Mode.RUNNING and s.last_command_seq == hw.last_sent_seq
    applied = fw.applied_commands()
    assert len(applied) == 50 and applied[-1].seq == hw.last_sent_seq
    np.testing.assert_array_equal(applied[-1].q_target, SPEC.q_default.astype(np.float32))
    np.testing.assert_array_equal(applied[-1].kp, SPEC.kp.astype(np.float32))
    # Joints track the targets (the gravity load on the soft ankles costs a few hundredths).
    np.testing.assert_allclose(s.q, SPEC.q_default, atol=0.1)
    assert np.all(np.abs(s.tau) <= SPEC.tau_max) and np.any(np.abs(s.tau) > 0.1)
    assert np.all(s.temperature >= 30.0)
    base = fw.base_state()
    assert base.pos[2] > 0.4 and np.allclose(base.quat_wxyz, s.quat_wxyz, atol=1e-2)


def test_feed_forward_is_clipped_at_the_torque_limit(rig):
    """PD + feed-forward is clipped at the motor's torque limit as a whole: each at its limit, the
    sum is more, and the motor gives tau_max."""
    fw, hw = rig
    push = JointCommand(SPEC.q_upper, SPEC.kp, np.zeros(N), SPEC.tau_max)   # towards the upper limits
    s = run_lockstep(fw, hw, push, 1)[-1]
    np.testing.assert_allclose(np.abs(s.tau), SPEC.tau_max, rtol=1e-6)
    np.testing.assert_allclose(fw.applied_commands()[-1].tau_ff, SPEC.tau_max, rtol=1e-6)  # in the joints' frame


def test_a_command_outside_the_robots_limits_is_dropped_and_counted(rig):
    """The firmware checks what it is sent against the robot's limits, whoever sent it: a target
    past a joint's range, a stiffer gain than the YAML's, a feed-forward past the torque limit."""
    fw, hw = rig
    good = run_lockstep(fw, hw, HOLD, 2)[-1].last_command_seq
    applied = len(fw.applied_commands())
    for field, value in (("q_target", SPEC.q_upper + 3), ("kp", SPEC.kp * 1000), ("tau_ff", np.full(N, 50.0))):
        bad = JointCommand(**{**vars(HOLD), field: value})
        assert run_lockstep(fw, hw, bad, 1)[-1].last_command_seq == good   # not applied
    assert len(fw.applied_commands()) == applied and fw.sim.rejected == 3


def test_motors_warm_up_under_torque_and_cool_when_passive():
    """The winding temperature follows dT/dt = (ambient + 0.5·tau² - T) / 60 s: 1 s at the torque
    limit warms a motor by ~0.6 °C (to 66 °C in the long run at 8.5 Nm); passive, it cools back."""
    from sim.emulated_firmware import AMBIENT_C, HEAT_C_PER_NM2, THERMAL_TAU_S
    fw = SimulatedFirmware(SPEC)
    fw.request_mode(Mode.RUNNING)
    knee = np.arange(N) == 3   # the left knee pushed to its upper limit at its torque limit, the others limp
    cmd = CommandMsg(SPEC.motor_position(np.where(knee, SPEC.q_upper, SPEC.q_default)).astype(np.float32),
                     np.where(knee, SPEC.kp, 0).astype(np.float32), np.zeros(N, np.float32),
                     np.where(knee, SPEC.tau_max, 0).astype(np.float32))
    steps = int(1.0 / fw.dt)
    for i in range(steps):
        fw.handle_command(cmd, seq=i + 1)   # every physics step, so the watchdog never fires
        fw.step()
    at_limit = 1.0 / THERMAL_TAU_S * HEAT_C_PER_NM2 * SPEC.tau_max[3] ** 2   # 1 s at exactly tau_max
    assert 0.8 * at_limit < fw.temperature[3] - AMBIENT_C <= at_limit   # at the stop, PD eases off a little
    assert np.all(np.delete(fw.temperature, 3) - AMBIENT_C < 0.05 * at_limit)
    fw.request_mode(Mode.DAMPING)
    warm = fw.temperature[3]
    for _ in range(steps):
        fw.step()
    assert AMBIENT_C < fw.temperature[3] < warm   # passive (damping torques are small): cooling toward ambient


def test_frames_carry_the_motors_frame_and_the_twin_the_joints():
    """kid_biped's right-leg pitch motors turn against their joints (its YAML): on the wire their
    angles, velocities, torques and targets are negated; the twin and the log are in joint angles."""
    from sim.emulated_firmware import SimulatedFirmware
    sign = np.array([1, 1, 1, 1, 1, 1, 1, -1, -1, -1])
    fw = SimulatedFirmware(SPEC)
    fw.request_mode(Mode.RUNNING)
    q_motor = (sign * SPEC.q_default).astype(np.float32)
    fw.handle_command(CommandMsg(q_motor, SPEC.kp, SPEC.kd, (sign * 0.2).astype(np.float32)), seq=1)
    for _ in range(20):
        fw.step()
    applied = fw.applied_commands()[-1]
    np.testing.assert_allclose(applied.q_target, SPEC.q_default, atol=1e-6)
    np.testing.assert_allclose(applied.tau_ff, 0.2, atol=1e-6)
    np.testing.assert_allclose(fw.data.ctrl[:N], SPEC.q_default, atol=1e-6)   # the twin's actuators: joint angles
    state = fw.state()
    q_joint, dq_joint = fw.data.sensordata[:N], fw.data.sensordata[N:2 * N]
    tau_joint = fw.data.actuator_force[:N]
    for wire, joint in ((state.position, q_joint), (state.velocity, dq_joint), (state.torque, tau_joint)):
        np.testing.assert_allclose(wire, sign * joint, rtol=1e-6, atol=1e-7)   # float32 on the wire
    assert (q_joint[[8, 3]] > 0.5).all() and state.position[8] < -0.5   # both knees bent; the right one reads negative


def test_standing_in_real_time(rig):
    fw, hw = rig
    fw.start()
    hw.start(timeout_s=1.0)
    period = 1.0 / SPEC.control_hz
    t0 = time.monotonic()
    sim0, frames0 = fw.sim.time, hw.stats.frames_ok
    heights, errors = [], []
    for k in range(int(2.0 * SPEC.control_hz)):  # 2 s at the control rate, absolute deadlines
        hw.request_mode(Mode.RUNNING)
        hw.write(HOLD)
        s = hw.read()
        heights.append(fw.base_state().pos[2])
        errors.append(np.abs(s.q - SPEC.q_default).max())
        time.sleep(max(0.0, t0 + (k + 1) * period - time.monotonic()))
    wall = time.monotonic() - t0
    assert min(heights) > 0.3, f"pelvis fell to {min(heights):.3f} m"
    assert max(errors[10:]) < 0.1
    assert hw.read().firmware_mode == Mode.RUNNING
    assert fw.sim.time - sim0 == pytest.approx(wall, abs=0.1 + fw.lag_s), "sim time follows wall time"
    assert hw.stats.timeouts == 0 and hw.stats.gaps == 0
    # STATE streams at the robot's state_hz (250 Hz), not at the policy's 50 Hz
    assert SPEC.state_hz == 250 and hw.stats.frames_ok - frames0 >= 0.9 * (fw.sim.time - sim0) * SPEC.state_hz


def test_watchdog_damps_when_commands_stop(rig):
    fw, hw = rig
    fw.start()
    hw.start(timeout_s=1.0)
    for _ in range(15):
        hw.request_mode(Mode.RUNNING)
        hw.write(HOLD)
        last_write = time.monotonic()
        time.sleep(0.02)
    assert hw.read().firmware_mode == Mode.RUNNING
    while (s := hw.read()).firmware_mode == Mode.RUNNING and time.monotonic() - last_write < 1.0:
        time.sleep(0.002)
    elapsed = s.stamp_s - last_write
    assert s.firmware_mode == Mode.DAMPING
    # Trips after watchdog_ms, seen within one STATE period (20 ms) plus scheduling slack.
    assert WATCHDOG_MS / 1000 - 0.005 <= elapsed <= WATCHDOG_MS / 1000 + 0.08, elapsed
    # Damping is passive: new commands are not applied until RUNNING is requested again.
    n_applied = len(fw.applied_commands())
    hw.write(HOLD)
    time.sleep(0.05)
    assert len(fw.applied_commands()) == n_applied and hw.read().firmware_mode == Mode.DAMPING


def test_estop_is_latched(rig):
    fw, hw = rig
    run_lockstep(fw, hw, HOLD, 5)
    hw.request_mode(Mode.ESTOP)
    fw.step_control_period()
    n_applied = len(fw.applied_commands())
    for mode in (Mode.RUNNING, Mode.IDLE, Mode.DAMPING):
        hw.request_mode(mode)
        hw.write(HOLD)
        fw.step_control_period()
        assert hw.read().firmware_mode == Mode.ESTOP
    assert len(fw.applied_commands()) == n_applied
    np.testing.assert_array_equal(fw.sim.model.actuator_gainprm[:, 0], 0.0)  # no stiffness


def test_damaged_foreign_and_invalid_commands_are_never_applied(rig):
    fw, hw = rig
    run_lockstep(fw, hw, HOLD, 3)
    before = fw.applied_commands()
    wild = CommandMsg(np.full(N, 3.0), np.full(N, 500.0), np.zeros(N), np.full(N, 40.0))
    # Damaged and foreign frames, from a stray sender (they are dropped before seq checking)...
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bad_crc = bytearray(encode(wild, 0))
    bad_crc[-1] ^= 0xFF
    v2 = bytearray(encode(wild, 0))
    v2[2] = 2
    v2[-4:] = zlib.crc32(v2[:-4]).to_bytes(4, "little")
    for frame in (bad_crc, v2):
        raw.sendto(bytes(frame), fw.address)
    raw.close()
    # ...and intact but invalid commands, in the robot computer's own sequence.
    hw.link.send(CommandMsg(np.full(N, np.nan), SPEC.kp, SPEC.kd, np.zeros(N)))
    hw.link.send(CommandMsg(SPEC.q_default, -SPEC.kp, SPEC.kd, np.zeros(N)))
    hw.link.send(CommandMsg(np.zeros(12), np.zeros(12), np.zeros(12), np.zeros(12)))  # another robot's
    fw.step_control_period()
    assert fw.applied_commands() == before
    assert (fw.stats.bad_crc, fw.stats.bad_version, fw.sim.rejected) == (1, 1, 3)
    # The firmware lives on and keeps taking valid commands.
    run_lockstep(fw, hw, HOLD, 1)
    assert len(fw.applied_commands()) == len(before) + 1


def test_lockstep_is_deterministic():
    def run():
        fw = EmulatedFirmware(SPEC, ("127.0.0.1", 0))
        hw = FirmwareHardware.udp(SPEC, fw.address, ("127.0.0.1", 0))
        fw.peer = hw.link.transport.address
        try:
            states = []
            for k in range(60):
                q = SPEC.q_default + 0.2 * np.sin(0.3 * k) * (SPEC.q_upper - SPEC.q_lower) / 4
                states += run_lockstep(fw, hw, JointCommand(q, SPEC.kp, SPEC.kd, np.full(N, 0.1)), 1)
            return states, fw.base_state()
        finally:
            fw.close()
            hw.close()

    (a, base_a), (b, base_b) = run(), run()
    fields = ("q", "dq", "tau", "temperature", "quat_wxyz", "gyro", "accel")
    for sa, sb in zip(a, b):
        for f in fields:
            np.testing.assert_array_equal(getattr(sa, f), getattr(sb, f))
        assert (sa.firmware_mode, sa.last_command_seq) == (sb.firmware_mode, sb.last_command_seq)
    for xa, xb in zip(base_a, base_b):
        np.testing.assert_array_equal(xa, xb)
    assert np.ptp([s.q[2] for s in a]) > 0.1, "the targets actually moved the robot"


def test_command_line_process(tmp_path):
    hw = FirmwareHardware.udp(SPEC, ("127.0.0.1", 1), ("127.0.0.1", 0))  # firmware port learnt below
    host, port = hw.link.transport.address
    log = tmp_path / "applied.npz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.emulated_firmware", "--robot", "kid_biped", "--port", "0",
         "--peer", f"{host}:{port}", "--watchdog-ms", "200", "--log", str(log)],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "the firmware process did not start"
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, line
        hw.link.transport.peer = ("127.0.0.1", int(line.split("listening on 127.0.0.1:")[1].split(",")[0]))
        hw.start(timeout_s=2.0)
        for _ in range(10):
            hw.request_mode(Mode.RUNNING)
            hw.write(HOLD)
            time.sleep(0.02)
        assert hw.read().firmware_mode == Mode.RUNNING
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        hw.close()
    assert proc.returncode == 0, out
    saved = np.load(log)
    assert 5 <= len(saved["seq"]) <= 10 and saved["q_target"].shape[1] == N
    assert list(saved["joint_names"]) == list(SPEC.joint_names)


def test_gantry_holds_the_base_until_the_ramp_is_done():
    """Without a gantry a passive humanoid collapses before anyone starts it; on one it hangs at
    its standing pose while passive, and is lowered gantry_s after RUNNING, then stands on PD."""
    def idle_then_run(gantry_s):
        fw = EmulatedFirmware(SPEC, ("127.0.0.1", 0), config=FirmwareConfig(gantry_s=gantry_s))
        hw = FirmwareHardware.udp(SPEC, fw.address, ("127.0.0.1", 0))
        fw.peer = hw.link.transport.address
        try:
            z0 = fw.base_state().pos[2]
            for _ in range(50):   # 1 s passive, nobody has started it
                fw.step_control_period()
            z_idle = fw.base_state().pos[2]
            held = []
            for _ in range(50):   # 1 s of RUNNING with the default pose commanded
                run_lockstep(fw, hw, HOLD, 1)
                held.append(fw.sim.on_gantry)
            return z0, z_idle, held, fw.base_state().pos[2]
        finally:
            fw.close()
            hw.close()
    z0, z_idle, held, z_end = idle_then_run(0.0)
    assert z_idle < z0 - 0.05 and not any(held)                   # collapsed while passive
    z0, z_idle, held, z_end = idle_then_run(0.5)
    assert z_idle == pytest.approx(z0, abs=1e-9)                 # hanging, exactly
    assert held[0] and not held[-1] and 20 <= sum(held) <= 30     # lowered 0.5 s into RUNNING
    assert z_end > z0 - 0.03                                      # and stands on its own


@pytest.mark.parametrize("state_hz, needle", [(30, "'state_hz' (30.0)"), (300, "'state_hz' (300.0)"),
                                              (1000, "'state_hz' (1000.0)"), ("fast", "'state_hz' must be a finite")])
def test_a_state_rate_the_firmware_cannot_stream_is_refused_by_name(state_hz, needle):
    """STATE comes every k-th physics step: its rate must divide physics_hz and be at least the
    control rate; the robot file's error says which key and why. Without the key: physics_hz."""
    import yaml
    from real.robot_spec import SpecError, spec_from_dict
    with open(SPEC.source) as f:
        raw = yaml.safe_load(f)
    with pytest.raises(SpecError, match="kid_biped.yaml") as e:
        spec_from_dict({**raw, "state_hz": state_hz}, SPEC.source)
    assert needle in str(e.value)
    del raw["state_hz"]
    assert spec_from_dict(raw).state_hz == SPEC.physics_hz


def test_a_tasks_world_is_placed_as_the_task_draws_it():
    """arm_place's world in the arm's firmware: the cube on the table inside the task's ranges,
    the goal a target spot far enough from it, both from the seed; the second finger where its
    joint equality puts it; humanoid_walk has no world."""
    cfg = task_config("arm_place")
    arm = load_robot("arm7")
    poses = []
    for seed in (4, 4, 5):
        world = task_world(cfg, seed)
        fw = SimulatedFirmware(arm, world=world)
        pos, quat = fw.object_pose()
        poses.append(pos)
        assert cfg.cube.x[0] <= pos[0] <= cfg.cube.x[1] and cfg.cube.y[0] <= pos[1] <= cfg.cube.y[1]
        assert pos[2] == pytest.approx(cfg.cube.size / 2) and quat[1:3] == pytest.approx([0.0, 0.0])
        goal = world.goal
        assert cfg.target.x[0] <= goal[0] <= cfg.target.x[1] and cfg.target.y[0] <= goal[1] <= cfg.target.y[1]
        assert np.hypot(*(goal[:2] - pos[:2])) >= cfg.target.min_distance and goal[2] == 0.0
        m, d = fw.model, fw.data
        assert d.qpos[m.joint("gripper_mimic").qposadr[0]] == d.qpos[m.joint("gripper").qposadr[0]] > 0
    assert np.array_equal(poses[0], poses[1]) and not np.array_equal(poses[0], poses[2])
    assert task_world(task_config("humanoid_walk"), 0) is None
    assert SimulatedFirmware(SPEC).object_pose() is None


def test_object_pose_is_in_the_robots_base_frame():
    """A box placed at a known offset from a tilted, turned floating base reads back as that
    offset and relative rotation, whatever the base's own pose in the world."""
    offset, rel = np.array([0.3, -0.1, 0.2]), np.array([np.cos(0.2), 0.0, np.sin(0.2), 0.0])

    def add(mj):
        box = mj.worldbody.add_body(name="box", pos=[2.0, 0.0, 1.0])
        box.add_freejoint(name="box")
        box.add_geom(type=mujoco.mjtGeom.mjGEOM_BOX, size=[0.02] * 3, contype=0, conaffinity=0)

    def place(model, data):
        base = np.array([0.4, -0.3, 0.9])
        turn = np.array([np.cos(0.6), 0.3 * np.sin(0.6), 0.2 * np.sin(0.6), 0.93 * np.sin(0.6)])
        turn /= np.linalg.norm(turn)
        data.qpos[:7] = np.concatenate([base, turn])
        rot, quat = np.zeros(9), np.zeros(4)
        mujoco.mju_quat2Mat(rot, turn)
        mujoco.mju_mulQuat(quat, turn, rel)
        adr = model.joint("box").qposadr[0]
        data.qpos[adr:adr + 7] = np.concatenate([base + rot.reshape(3, 3) @ offset, quat])

    fw = SimulatedFirmware(SPEC, world=World(add=add, place=place, tracked_body="box"))
    pos, quat = fw.object_pose()
    assert pos == pytest.approx(offset, abs=1e-9) and quat == pytest.approx(rel, abs=1e-9)


def test_joint_equalities_are_applied_as_mujoco_defines_them():
    """y - y0 = c0 + c1 d + c2 d^2 with d = x - x0 (the MJCF's polycoef, with ref offsets): after
    apply_joint_equalities the equality's own constraint violation, as MuJoCo computes it, is 0."""
    model = mujoco.MjModel.from_xml_string("""
    <mujoco><compiler angle="radian"/><worldbody><body><joint name="x" ref="0.2"/><geom size="0.1"/>
      <body><joint name="y" ref="-0.1"/><geom size="0.1"/></body></body></worldbody>
      <equality><joint joint1="y" joint2="x" polycoef="0.1 2 0.5 0 0"/></equality></mujoco>""")
    data = mujoco.MjData(model)
    data.qpos[:] = [0.7, 0.0]
    apply_joint_equalities(model, data.qpos)
    d = 0.7 - 0.2
    assert data.qpos[1] == pytest.approx(-0.1 + 0.1 + 2 * d + 0.5 * d**2)
    mujoco.mj_forward(model, data)
    assert data.nefc >= 1 and abs(data.efc_pos[0]) < 1e-12
