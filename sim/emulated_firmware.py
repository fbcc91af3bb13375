"""Emulated firmware: the robot's MuJoCo twin behind the firmware protocol.

``SimulatedFirmware`` is what the motor controllers do, with no transport: it applies the last
valid COMMAND as a PD loop at the physics rate (PD + feed-forward inside each joint's position
actuator, so MuJoCo clips the total at the motor's torque limit), handles the modes, runs the
firmware-side watchdog, logs every command it applied, and measures a STATE.
``EmulatedFirmware`` puts it on a UDP socket, either lock-stepped by the caller
(``step_control_period``, deterministic, for tests) or in real time in a thread (``start``) or
process::

    python -m sim.emulated_firmware --robot kid_biped --port 9000 --peer 127.0.0.1:9001

Modes (firmware_bridge.Mode): the firmware boots in IDLE. IDLE, DAMPING and ESTOP are passive:
kp = 0, kd = the spec's kd, no feed-forward; COMMANDs received then are ignored. A MODE_REQUEST
for RUNNING enters RUNNING, which stays passive until the first COMMAND after entering it (an
old target is never resumed). In RUNNING, no valid COMMAND for ``watchdog_ms`` -> DAMPING.
ESTOP is latched until the firmware restarts. A valid COMMAND has the spec's motor count and
stays inside the robot's limits (real.safety.CommandLimits: finite, targets in the joint range,
gains up to the YAML's kp and kd, |feed-forward| up to the torque limit), as motor controllers
configured with the same limits would check; anything else is dropped and counted (`rejected`).
A valid COMMAND is applied exactly as received.

Frames: COMMAND and STATE carry the motors' frame (robot YAML: motor = direction·joint +
zero_offset); the twin and the applied-command log are in the joints' frame, so the log compares
with the YAML's joint limits directly.

World: what the robot works on (a tabletop task's cube, ``sim.envs.task_world``) can be added
to the twin; the firmware then also reports the tracked object's pose in the robot's base frame,
standing in for perception (``object_pose``), and carries the goal an operator would give.
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import threading
import time
from collections import deque
from typing import Callable, NamedTuple

import mujoco
import numpy as np

from firmware_bridge import (CommandMsg, Mode, ModeRequestMsg, ProtocolVersionError, SequenceTracker,
                             StateMsg, UdpTransport, encode)
from firmware_bridge.protocol import SEQ_MASK
from real.files import save_arrays
from real.robot_spec import RobotSpec, load_robot
from real.safety import CommandLimits
from sim.twin import add_floor, apply_joint_equalities, joint_indices, robot_spec_editable, set_pd_gains

# Fake motor temperature: first-order heating by tau^2 towards ambient + HEAT * tau^2.
AMBIENT_C = 30.0
HEAT_C_PER_NM2 = 0.5
THERMAL_TAU_S = 60.0
NO_IMU = np.array([1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # what a robot without an IMU sends


@dataclasses.dataclass
class FirmwareConfig:
    watchdog_ms: float = 100.0      # RUNNING with no valid COMMAND for this long -> DAMPING
    state_hz: float | None = None   # real-time STATE rate; None = the robot's state_hz
    log_capacity: int = 100_000     # applied commands kept in memory (the oldest are dropped)
    # A floating-base robot is started hanging on a gantry and lowered once it stands: > 0 holds
    # the base at its standing pose until this long after entering RUNNING (set it to the
    # controller's ramp time); 0 = no gantry (a passive humanoid then collapses before start).
    gantry_s: float = 0.0


class AppliedCommand(NamedTuple):
    """One COMMAND the motors applied, in the joints' frame."""
    t: float             # firmware (sim) time at which it took effect, s
    seq: int
    q_target: np.ndarray
    kp: np.ndarray
    kd: np.ndarray
    tau_ff: np.ndarray


class BaseState(NamedTuple):
    """Ground truth of the base body, for tests ("stays upright", "tracks the command")."""
    pos: np.ndarray        # world, m
    quat_wxyz: np.ndarray  # world
    lin_vel: np.ndarray    # world frame, m/s
    ang_vel: np.ndarray    # body frame, rad/s (what a gyro on the base reads)


@dataclasses.dataclass(frozen=True)
class World:
    """What the robot works on in the twin: a task's objects, their placement at boot (as the
    task's reset draws it), the body perception reports, and the goal an operator would give."""
    add: Callable[[mujoco.MjSpec], None]                      # adds the objects to the scene
    place: Callable[[mujoco.MjModel, mujoco.MjData], None]   # sets their initial qpos
    tracked_body: str | None = None
    goal: np.ndarray | None = None                           # robot base frame, m


def build_firmware_model(spec: RobotSpec, world: World | None = None) -> mujoco.MjModel:
    """The twin with a floor and the sensors the firmware reads: joint position and velocity
    encoders, then (if the robot has an IMU) orientation, gyro and accelerometer, in the
    STATE frame's order; and the world's objects."""
    mj = robot_spec_editable(spec)
    add_floor(mj)
    if world is not None:
        world.add(mj)
    for kind in (mujoco.mjtSensor.mjSENS_JOINTPOS, mujoco.mjtSensor.mjSENS_JOINTVEL):
        for name in spec.joint_names:
            mj.add_sensor(type=kind, objtype=mujoco.mjtObj.mjOBJ_JOINT, objname=name)
    if spec.imu_body:
        mj.body(spec.imu_body).add_site(name="imu")
        for kind in (mujoco.mjtSensor.mjSENS_FRAMEQUAT, mujoco.mjtSensor.mjSENS_GYRO,
                     mujoco.mjtSensor.mjSENS_ACCELEROMETER):
            mj.add_sensor(type=kind, objtype=mujoco.mjtObj.mjOBJ_SITE, objname="imu")
    return mj.compile()


def standing_qpos(model: mujoco.MjModel, spec: RobotSpec) -> np.ndarray:
    """Default joint pose (joints coupled by an equality where it puts them); a floating base is
    lowered until its lowest geom is 1 mm above the floor (the same placement as
    HumanoidWalk._standing_qpos, for any geometry)."""
    data = mujoco.MjData(model)
    qadr, _, _ = joint_indices(model, spec)
    data.qpos[qadr] = spec.q_default
    apply_joint_equalities(model, data.qpos)
    if model.jnt_type[0] == mujoco.mjtJoint.mjJNT_FREE:
        mujoco.mj_kinematics(model, data)
        floor = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, "floor")
        fromto = np.zeros(6)
        gap = min(mujoco.mj_geomDistance(model, data, floor, g, 100.0, fromto)
                  for g in range(model.ngeom) if model.geom_bodyid[g] != 0)
        data.qpos[2] -= gap - 0.001
    return data.qpos.copy()


class SimulatedFirmware:
    """The motor controllers' behaviour on the twin. Not thread-safe: one caller at a time."""

    def __init__(self, spec: RobotSpec, config: FirmwareConfig | None = None, world: World | None = None):
        self.spec = spec
        self.config = config or FirmwareConfig()
        self.world = world
        self.model = build_firmware_model(spec, world)
        self.data = mujoco.MjData(self.model)
        _, _, self._aids = joint_indices(self.model, spec)
        self._base = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, spec.base_body)
        self._tracked = None if world is None or world.tracked_body is None else self.model.body(world.tracked_body).id
        self.dt = self.model.opt.timestep
        self.data.qpos[:] = standing_qpos(self.model, spec)
        if world is not None:
            world.place(self.model, self.data)
        mujoco.mj_forward(self.model, self.data)  # sensors read the initial pose
        floating = self.model.jnt_type[0] == mujoco.mjtJoint.mjJNT_FREE
        self._gantry = self.data.qpos[:7].copy() if floating and self.config.gantry_s > 0 else None
        self._running_since = 0.0
        self.temperature = np.full(spec.n_joints, AMBIENT_C)
        self.mode = Mode.IDLE
        self.steps = 0
        self.last_command_seq = 0
        self.limits = CommandLimits(spec)
        self.rejected = 0  # COMMANDs dropped: wrong motor count, non-finite, or outside the robot's limits
        self._log: deque[AppliedCommand] = deque(maxlen=self.config.log_capacity)
        self._last_command_t = 0.0
        self._passive()

    @property
    def time(self) -> float:
        return self.steps * self.dt

    # ---- inputs ----
    def handle_command(self, msg: CommandMsg, seq: int) -> None:
        if msg.position.shape[0] != self.spec.n_joints:
            self.rejected += 1
            return
        q_target, tau_ff = self.spec.joint_position(msg.position), self.spec.motor_direction * msg.torque_ff
        if self.limits.violation(q_target, msg.kp, msg.kd, tau_ff):   # non-finite, or beyond the robot's limits
            self.rejected += 1
            return
        if self.mode != Mode.RUNNING:
            return  # motors are passive outside RUNNING
        self._output(q_target, msg.kp, msg.kd, tau_ff)
        self._last_command_t = self.time
        self.last_command_seq = seq
        self._log.append(AppliedCommand(self.time, seq, q_target, msg.kp.copy(), msg.kd.copy(), tau_ff))

    def request_mode(self, mode: Mode) -> None:
        mode = Mode(mode)
        if self.mode == Mode.ESTOP or mode == self.mode:
            return  # e-stop is latched; repeated requests are idempotent
        self.mode = mode
        self._passive()  # RUNNING too: stay passive until its first command arrives
        self._last_command_t = self._running_since = self.time  # the watchdog counts from entering RUNNING

    # ---- physics ----
    def step(self) -> None:
        """One physics step of the PD loop; the watchdog is checked at the same rate."""
        if self.mode == Mode.RUNNING and self.time - self._last_command_t > self.config.watchdog_ms / 1000:
            self.mode = Mode.DAMPING
            self._passive()
        mujoco.mj_step(self.model, self.data)
        self.steps += 1
        tau = self.data.actuator_force[self._aids]   # first-order winding temperature, heated by tau²
        self.temperature += self.dt / THERMAL_TAU_S * (AMBIENT_C + HEAT_C_PER_NM2 * tau**2 - self.temperature)
        if self._gantry is not None:
            if self.mode == Mode.RUNNING and self.time - self._running_since >= self.config.gantry_s:
                self._gantry = None   # lowered: the robot stands on its own from here
            else:
                self.data.qpos[:7], self.data.qvel[:6] = self._gantry, 0.0

    @property
    def on_gantry(self) -> bool:
        return self._gantry is not None

    def _output(self, q_target, kp, kd, tau_ff) -> None:
        # Position actuator force = kp*ctrl + bias0 - kp*q - kd*dq; bias0 carries the
        # feed-forward, so the actuator's forcerange clips PD + ff together at tau_max.
        set_pd_gains(self.model, self._aids, kp, kd)
        self.model.actuator_biasprm[self._aids, 0] = tau_ff
        self.data.ctrl[self._aids] = q_target

    def _passive(self) -> None:
        zero = np.zeros(self.spec.n_joints)
        self._output(zero, zero, self.spec.kd, zero)  # with kp = 0 the target does not matter

    # ---- outputs ----
    def state(self) -> StateMsg:
        """What the firmware measured at the start of its last PD tick, and the torque it output
        then (MuJoCo evaluates sensors before integrating, so this is one consistent snapshot),
        in the motors' frame."""
        n, sign = self.spec.n_joints, self.spec.motor_direction
        s = self.data.sensordata
        imu = s[2 * n:2 * n + 10] if self.spec.imu_body else NO_IMU
        return StateMsg(position=self.spec.motor_position(s[:n]), velocity=sign * s[n:2 * n],
                        torque=sign * self.data.actuator_force[self._aids],
                        temperature=self.temperature, quat_wxyz=imu[:4], gyro=imu[4:7], accel=imu[7:10],
                        mode=self.mode, last_command_seq=self.last_command_seq,
                        timestamp_us=round(self.time * 1e6))

    def base_state(self) -> BaseState:
        vel = np.zeros(6)
        mujoco.mj_objectVelocity(self.model, self.data, mujoco.mjtObj.mjOBJ_BODY, self._base, vel, 0)
        lin_world = vel[3:].copy()
        mujoco.mj_objectVelocity(self.model, self.data, mujoco.mjtObj.mjOBJ_BODY, self._base, vel, 1)
        return BaseState(self.data.xpos[self._base].copy(), self.data.xquat[self._base].copy(),
                         lin_world, vel[:3].copy())

    def object_pose(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The world's tracked object in the robot's base frame, (position m, quaternion w first),
        as of the last physics step's kinematics: what perception reports. None without one."""
        if self._tracked is None:
            return None
        d, b, o = self.data, self._base, self._tracked
        pos = d.xmat[b].reshape(3, 3).T @ (d.xpos[o] - d.xpos[b])
        base_inv, quat = np.empty(4), np.empty(4)
        mujoco.mju_negQuat(base_inv, d.xquat[b])
        mujoco.mju_mulQuat(quat, base_inv, d.xquat[o])
        return pos, quat

    def applied_commands(self) -> list[AppliedCommand]:
        return list(self._log)

    def save_log(self, path: str) -> None:
        """The applied-command log as .npz arrays (t, seq, q_target, kp, kd, tau_ff), written whole."""
        log = self.applied_commands()
        save_arrays(path, {"joint_names": np.array(self.spec.joint_names),
                           **{f: np.array([getattr(c, f) for c in log]) for f in AppliedCommand._fields}})


class EmulatedFirmware:
    """SimulatedFirmware on a UDP socket bound to ``bind``, sending STATE to ``peer`` (settable
    later through ``.peer``, e.g. once the other end has an ephemeral port).

    Incoming frames are read straight from the transport with a SequenceTracker (rather than a
    Link) because the firmware needs each COMMAND's seq for STATE.last_command_seq. Frames of
    another protocol version are counted (stats.bad_version) and dropped, never applied; the
    ones drained in the same poll before such a frame are lost with it.
    """

    def __init__(self, spec: RobotSpec, bind: tuple[str, int] = ("127.0.0.1", 0),
                 peer: tuple[str, int] | None = None, config: FirmwareConfig | None = None,
                 world: World | None = None):
        self.spec = spec
        self.sim = SimulatedFirmware(spec, config, world)
        config = self.sim.config
        self.transport = UdpTransport(bind, peer)
        self.address = self.transport.address
        self.stats = self.transport.stats
        self._tracker = SequenceTracker(self.stats)
        self._rx_timeout_s = config.watchdog_ms / 1000
        self._last_rx_t = 0.0
        self._tx_seq = 0
        self._state_every = max(1, round(spec.physics_hz / (config.state_hz or spec.state_hz)))
        self._max_lag_steps = max(1, round(0.05 * spec.physics_hz))
        self.lag_s = 0.0  # sim time dropped behind wall time because the machine was too slow
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def peer(self) -> tuple[str, int] | None:
        return self.transport.peer

    @peer.setter
    def peer(self, peer: tuple[str, int]) -> None:
        self.transport.peer = peer

    # ---- wire ----
    def _receive(self) -> None:
        sim = self.sim
        while True:
            try:
                frames = self.transport.poll()
                break
            except ProtocolVersionError:
                continue  # counted by the decoder; keep draining
        if frames:
            self._last_rx_t = sim.time
        elif sim.time - self._last_rx_t > self._rx_timeout_s and self._tracker.last is not None:
            self.stats.timeouts += 1
            self._tracker.reset()  # a restarted computer counts from 0 again: accept it
        for seq, msg in frames:
            if not self._tracker.accept(seq):
                continue
            if isinstance(msg, CommandMsg):
                sim.handle_command(msg, seq)
            elif isinstance(msg, ModeRequestMsg):
                sim.request_mode(msg.mode)

    def _publish(self) -> None:
        if self.transport.peer is not None:
            self.transport.send(encode(self.sim.state(), self._tx_seq))
            self._tx_seq = (self._tx_seq + 1) & SEQ_MASK

    # ---- lock-step ----
    def step_control_period(self) -> StateMsg:
        """Apply the frames that arrived, step one control period, publish (and return) one STATE."""
        if self.running:
            raise RuntimeError("the emulated firmware is running in real time; stop() it first")
        self._receive()
        for _ in range(self.spec.decimation):
            self.sim.step()
        self._publish()
        return self.sim.state()

    # ---- real time ----
    def start(self) -> None:
        if self.running:
            raise RuntimeError("the emulated firmware is already running")
        self._stop.clear()
        self._error = None
        self._thread = threading.Thread(target=self._thread_main, name="emulated_firmware", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the real-time thread; re-raises what killed it, so a dead firmware is noticed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _thread_main(self) -> None:
        try:
            self._run()
        except BaseException as e:
            self._error = e

    def _run(self) -> None:
        # Physics steps sit on an absolute wall-clock grid (t0 + k * dt) and run in whatever
        # batch catches up with it, so sim time tracks wall time. Frames are read once per batch
        # (every physics step when the machine keeps up).
        sim, dt = self.sim, self.sim.dt
        t0, k0 = time.perf_counter(), sim.steps
        while not self._stop.is_set():
            with self._lock:
                self._receive()
                due = k0 + int((time.perf_counter() - t0) / dt)
                if due - sim.steps > self._max_lag_steps:  # too slow: fall behind rather than burst
                    dropped = due - sim.steps - self._max_lag_steps
                    k0 -= dropped
                    due -= dropped
                    self.lag_s += dropped * dt
                while sim.steps < due:
                    sim.step()
                    if sim.steps % self._state_every == 0:
                        self._publish()
                next_deadline = t0 + (sim.steps - k0 + 1) * dt
            self._stop.wait(max(0.0, next_deadline - time.perf_counter()))

    # ---- ground truth and logs (safe while running) ----
    @property
    def mode(self) -> Mode:
        return self.sim.mode

    def base_state(self) -> BaseState:
        with self._lock:
            return self.sim.base_state()

    def applied_commands(self) -> list[AppliedCommand]:
        with self._lock:
            return self.sim.applied_commands()

    def object_pose(self) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            return self.sim.object_pose()

    def close(self) -> None:
        self.stop()
        self.transport.close()

    def __enter__(self) -> EmulatedFirmware:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="A simulated robot that speaks the firmware protocol over UDP.")
    p.add_argument("--robot", default="kid_biped", help="name under configs/robot/ or a YAML path")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=9000, help="UDP port to listen on (0: any free one)")
    p.add_argument("--peer", type=_address, default=("127.0.0.1", 9001),
                   help="host:port of the robot computer, where STATE frames go")
    p.add_argument("--watchdog-ms", type=float, default=FirmwareConfig.watchdog_ms)
    p.add_argument("--state-hz", type=float, default=None, help="STATE rate (default: the robot's state_hz)")
    p.add_argument("--log", default=None, help="save the applied commands to this .npz at exit")
    p.add_argument("--gantry-s", type=float, default=0.0,
                   help="hold a floating base on a gantry until this long after RUNNING (0: no gantry)")
    args = p.parse_args(argv)
    spec = load_robot(args.robot)
    config = FirmwareConfig(watchdog_ms=args.watchdog_ms, state_hz=args.state_hz, gantry_s=args.gantry_s)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmulatedFirmware(spec, (args.host, args.port), args.peer, config) as fw:
        fw.start()
        host, port = fw.address
        print(f"emulated firmware for {spec.name} listening on {host}:{port}, STATE to "
              f"{args.peer[0]}:{args.peer[1]}", flush=True)
        while not stop.wait(0.2) and fw.running:
            pass
        fw.stop()
        print(f"stopped at sim time {fw.sim.time:.2f} s, mode {fw.mode.name}, "
              f"{len(fw.applied_commands())} commands applied, {fw.lag_s:.3f} s lag, {fw.stats}", flush=True)
        if args.log:
            fw.sim.save_log(args.log)


if __name__ == "__main__":
    main()
