"""TopicHardware: real.hardware.HardwareInterface on top of ROS topics (see messages.py).

Subscription callbacks (executor thread) only store the newest message's arrays; read() (the
control thread) combines them without blocking. Joint states are matched by joint name, so a
publisher with another joint order cannot drive the wrong joints; one that lacks a joint of the
robot is refused (logged) and the state goes stale, which the safety filter turns into damping.
"""
from __future__ import annotations

import threading
import time
import zlib

import numpy as np
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray, UInt8

from firmware_bridge import Mode
from real.hardware import HardwareInterface, HardwareState, JointCommand, check_joint_count
from real.robot_spec import RobotSpec
from robotrl_ros.common import save_trace, trace_dir
from robotrl_ros.messages import CONTROL_QOS, LATCHED_QOS, command_to_msg, imu_arrays, local_stamp


class TopicHardware(HardwareInterface):
    def __init__(self, node, spec: RobotSpec, topics: dict[str, str]):
        self.node, self.spec = node, spec
        self._lock = threading.Lock()
        self._joints = None   # (q, dq, tau, stamp_s) of the newest JointState
        self._imu = None      # (quat_wxyz, gyro, accel, stamp_s) of the newest Imu
        self._joints_src = None   # benchmark trace only: (stamp ns, receive monotonic ns) of _joints
        # No firmware_mode publisher (a driver other than bridge_node): IDLE, as a firmware boots.
        self._firmware_mode = int(Mode.IDLE)
        self._order_for: tuple[tuple[str, ...], np.ndarray | None] = ((), None)
        self._subs = [
            node.create_subscription(JointState, topics["joint_states"], self._on_joint_state, CONTROL_QOS),
            node.create_subscription(Imu, topics["imu"], self._on_imu, CONTROL_QOS),
            node.create_subscription(UInt8, topics["firmware_mode"], self._on_firmware_mode, LATCHED_QOS),
        ]
        self._command_pub = node.create_publisher(Float64MultiArray, topics["joint_commands"], CONTROL_QOS)
        self._mode_pub = node.create_publisher(UInt8, topics["firmware_mode_request"], CONTROL_QOS)
        # Benchmark only (common.TRACE_ENV): per command written, (joint_states stamp ns of the
        # state it was computed from, that message's receive / read-by-the-tick / command-published
        # monotonic ns, command data CRC).
        self._trace = [] if trace_dir() else None
        self._trace_src = None

    # ---- executor thread ----
    def _now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _order(self, names) -> np.ndarray | None:
        """Indices that put a message's joints into the spec's order (cached per name list)."""
        names = tuple(names)
        if names != self._order_for[0]:
            missing = [j for j in self.spec.joint_names if j not in names]
            if missing:
                self.node.get_logger().error(f"joint_states lacks joints {missing} of robot '{self.spec.name}'; "
                                             "ignoring it", throttle_duration_sec=1.0)
                return None
            self._order_for = (names, np.array([names.index(j) for j in self.spec.joint_names]))
        return self._order_for[1]

    def _on_joint_state(self, msg: JointState) -> None:
        order = self._order(msg.name)
        if order is None:
            return
        n = len(msg.name)
        # Missing velocity/effort become NaN: the safety filter refuses to run on them.
        q, dq, tau = (np.frombuffer(a, np.float64)[order] if len(a) == n else np.full(len(order), np.nan)
                      for a in (msg.position, msg.velocity, msg.effort))
        stamp = local_stamp(msg.header, self._now())
        src = None if self._trace is None else (msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec,
                                                time.monotonic_ns())
        with self._lock:
            self._joints = (q, dq, tau, stamp)
            self._joints_src = src

    def _on_imu(self, msg: Imu) -> None:
        quat, gyro, accel = imu_arrays(msg)
        stamp = local_stamp(msg.header, self._now())
        with self._lock:
            self._imu = (quat, gyro, accel, stamp)

    def _on_firmware_mode(self, msg: UInt8) -> None:
        self._firmware_mode = int(msg.data)

    # ---- control thread ----
    def read(self) -> HardwareState | None:
        with self._lock:
            joints, imu = self._joints, self._imu
            src = self._joints_src if self._trace is not None else None
        if joints is None or imu is None:
            return None
        if src is not None:
            self._trace_src = (*src, time.monotonic_ns())
        q, dq, tau, joint_stamp = joints
        quat, gyro, accel, imu_stamp = imu
        # The state is as old as its older half: a silent IMU makes it stale too.
        return HardwareState(q=q, dq=dq, tau=tau, temperature=np.full(len(q), np.nan), quat_wxyz=quat,
                             gyro=gyro, accel=accel, stamp_s=min(joint_stamp, imu_stamp),
                             firmware_mode=self._firmware_mode, last_command_seq=0)  # not carried on topics

    def write(self, cmd: JointCommand) -> None:
        check_joint_count(self.spec, cmd)
        msg = command_to_msg(cmd, self.spec.joint_names)
        self._command_pub.publish(msg)
        if self._trace is not None and self._trace_src is not None:
            self._trace.append((*self._trace_src, time.monotonic_ns(), zlib.crc32(msg.data)))

    def request_mode(self, mode: int) -> None:
        self._mode_pub.publish(UInt8(data=int(mode)))

    def close(self) -> None:
        for sub in self._subs:
            self.node.destroy_subscription(sub)
        self.node.destroy_publisher(self._command_pub)
        self.node.destroy_publisher(self._mode_pub)
        if self._trace is not None:
            save_trace("policy_commands", self._trace, ("stamp_ns", "recv_ns", "read_ns", "pub_ns", "crc"))
