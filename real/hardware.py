"""The one narrow interface between the control loop and a robot's motors and IMU.

The loop only ever calls ``read`` / ``write`` / ``request_mode`` / ``close`` on a
``HardwareInterface``; what sits behind it is the real firmware over ``firmware_bridge``
(``FirmwareHardware``), the emulated firmware over the same wire (sim/emulated_firmware.py), or
an in-process MuJoCo twin (sim/twin_hardware.py).

Joint order: every per-joint array here, and every per-motor array on the wire, is in the
robot YAML's joint order (``spec.joint_names``), which is also the policy's action order. The
YAML's ``motor_id`` is the firmware's own bus address for each joint; it never reorders the
frame, so nothing above the firmware has to permute anything.

Frames: the wire carries the motors' frame, everything here the joints'. A motor mounted against
its joint (``direction: -1``) or whose encoder reads ``zero_offset`` at the joint's zero is
converted by ``HardwareState.from_msg`` and ``JointCommand.to_msg`` from the robot YAML, and
nowhere else (the firmware side: sim/emulated_firmware.py).
"""
from __future__ import annotations

import abc
import dataclasses
import select
import time
from typing import Callable

import numpy as np

from firmware_bridge import CommandMsg, Link, LinkStats, ModeRequestMsg, StateMsg, UdpTransport
from real.robot_spec import RobotSpec


class HardwareError(RuntimeError):
    """The hardware cannot be driven: no answer, or it does not match the robot spec."""


def _vec(x, n: int | None = None) -> np.ndarray:
    a = np.array(x, dtype=np.float64)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise ValueError(f"expected shape ({n if n is not None else 'n'},), got {a.shape}")
    return a


@dataclasses.dataclass(eq=False)  # arrays: compare fields with numpy
class HardwareState:
    """One measurement of the robot. Per-joint arrays are in the spec's joint order."""
    q: np.ndarray            # rad
    dq: np.ndarray           # rad/s
    tau: np.ndarray          # N*m, measured motor torque
    temperature: np.ndarray  # deg C, per motor
    quat_wxyz: np.ndarray    # IMU orientation in the world, w first
    gyro: np.ndarray         # rad/s, IMU (body) frame
    accel: np.ndarray        # m/s^2, IMU frame, proper acceleration (reads +g upward at rest)
    stamp_s: float           # local monotonic time at which it was received
    firmware_mode: int       # firmware_bridge.Mode value
    last_command_seq: int    # seq of the last COMMAND the firmware applied

    @classmethod
    def from_msg(cls, msg: StateMsg, stamp_s: float, spec: RobotSpec) -> HardwareState:
        """A STATE frame (the motors' frame) in the joints' frame."""
        sign = spec.motor_direction
        return cls(q=spec.joint_position(_vec(msg.position)), dq=sign * _vec(msg.velocity),
                   tau=sign * _vec(msg.torque), temperature=_vec(msg.temperature), quat_wxyz=_vec(msg.quat_wxyz),
                   gyro=_vec(msg.gyro), accel=_vec(msg.accel), stamp_s=stamp_s,
                   firmware_mode=int(msg.mode), last_command_seq=int(msg.last_command_seq))


@dataclasses.dataclass(eq=False)  # arrays: compare fields with numpy
class JointCommand:
    """Per-joint targets for the motors' own PD loop: tau = kp (q_target - q) - kd dq + tau_ff.
    Field order matches real.safety.Command, so ``JointCommand(*command)`` converts one."""
    q_target: np.ndarray
    kp: np.ndarray
    kd: np.ndarray
    tau_ff: np.ndarray

    def __post_init__(self):
        self.q_target = _vec(self.q_target)
        n = self.q_target.shape[0]
        self.kp, self.kd, self.tau_ff = _vec(self.kp, n), _vec(self.kd, n), _vec(self.tau_ff, n)

    def to_msg(self, spec: RobotSpec) -> CommandMsg:
        """A COMMAND frame in the motors' frame (gains are the same in both)."""
        return CommandMsg(spec.motor_position(self.q_target), self.kp, self.kd, spec.motor_direction * self.tau_ff)


def check_joint_count(spec: RobotSpec, cmd: JointCommand) -> None:
    """A command for another robot is a programming error: raise instead of sending it."""
    if cmd.q_target.shape[0] != spec.n_joints:
        raise ValueError(f"command has {cmd.q_target.shape[0]} joints, robot '{spec.name}' has {spec.n_joints}")


class HardwareInterface(abc.ABC):
    @abc.abstractmethod
    def read(self) -> HardwareState | None:
        """The newest state received so far, without blocking; None before the first one.
        The same state is returned again until a newer one arrives: judge its age by stamp_s."""

    @abc.abstractmethod
    def write(self, cmd: JointCommand) -> None:
        """Send one command; the firmware holds it until the next one (or its watchdog trips)."""

    @abc.abstractmethod
    def request_mode(self, mode: int) -> None:
        """Ask for a firmware_bridge.Mode; re-send every tick until read().firmware_mode shows it."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FirmwareHardware(HardwareInterface):
    """The robot's firmware over a firmware_bridge Link (UDP or serial).

    Call ``start()`` before driving it: it waits for the first STATE and refuses to go on when
    the firmware speaks another protocol version (firmware_bridge.ProtocolVersionError, whose
    message names both versions) or reports another motor count than the spec's joints.
    """

    def __init__(self, spec: RobotSpec, link: Link, clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self.link = link
        self._clock = clock
        self._state: HardwareState | None = None
        self.last_sent_seq: int | None = None  # compare with HardwareState.last_command_seq

    @classmethod
    def udp(cls, spec: RobotSpec, firmware: tuple[str, int], bind: tuple[str, int] = ("0.0.0.0", 0),
            timeout_s: float = 0.1) -> FirmwareHardware:
        """Talk to the firmware at ``firmware`` from the local address ``bind`` (where the
        firmware sends its STATE frames)."""
        return cls(spec, Link(UdpTransport(bind, firmware), timeout_s))

    def start(self, timeout_s: float = 1.0) -> HardwareState:
        """Wait for the first valid STATE; raise if none comes or the firmware is incompatible."""
        end = self._clock() + timeout_s
        while (state := self.read()) is None:
            remaining = end - self._clock()
            if remaining <= 0:
                raise HardwareError(f"no STATE from the firmware of '{self.spec.name}' within {timeout_s} s "
                                    "(is it running, and sending to this address?)")
            select.select([self.link.transport.fileno()], [], [], remaining)
        return state

    def read(self) -> HardwareState | None:
        # A ProtocolVersionError from poll() propagates on purpose: the robot must not run.
        states = [m for m in self.link.poll() if isinstance(m, StateMsg)]
        if states:
            msg = states[-1]
            n = msg.position.shape[0]
            if n != self.spec.n_joints:
                raise HardwareError(f"firmware reports {n} motors, robot '{self.spec.name}' has "
                                    f"{self.spec.n_joints} joints ({', '.join(self.spec.joint_names)})")
            self._state = HardwareState.from_msg(msg, self._clock(), self.spec)
        return self._state

    def write(self, cmd: JointCommand) -> None:
        check_joint_count(self.spec, cmd)
        self.last_sent_seq = self.link.send(cmd.to_msg(self.spec))

    def request_mode(self, mode: int) -> None:
        self.link.send(ModeRequestMsg(mode))

    @property
    def stats(self) -> LinkStats:
        return self.link.stats

    @property
    def stale(self) -> bool:
        """No valid frame from the firmware for the link's timeout (or none yet)."""
        return self.link.stale

    def close(self) -> None:
        self.link.close()
