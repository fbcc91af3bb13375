"""bridge_node: the motor firmware's UDP link (firmware_bridge) <-> ROS topics (messages.py).

A receive thread waits on the socket and publishes every new STATE frame at once as
joint_states + imu, stamped on arrival (firmware_mode when it changes); joint_commands and
firmware_mode_request messages are sent to the firmware from their callbacks. A joint command
of another shape or joint order, or outside the robot's limits (real.safety.CommandLimits:
targets, gains, feed-forward torque), is dropped and counted (`bad_commands`), never sent:
whatever publishes on the topic, the motors get nothing the robot's YAML does not allow.

Watchdog: when no joint command arrived from the policy for command_timeout_ms, every new
STATE is answered with a damping command (kp = 0, kd = the robot's kd) and a DAMPING mode
request, until commands come again; the policy node then finds the firmware in DAMPING and
follows it (it never switches the firmware back on by itself). The firmware's own watchdog
stays the last line when this bridge dies too.

Refuses to run (fatal log, exit 1) when the firmware speaks another protocol version or
reports another motor count than the robot's joints.
"""
from __future__ import annotations

import select
import threading
import time
import zlib

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray, Header, UInt8

from firmware_bridge import Mode
from real.hardware import FirmwareHardware, HardwareState, JointCommand
from real.robot_spec import load_robot
from real.safety import CommandLimits
from robotrl_ros.common import (BIND_PORT, ERROR, OK, PORT, REFUSALS, WARN, RobotNode, run, save_trace, status,
                                trace_dir)
from robotrl_ros.messages import CONTROL_QOS, LATCHED_QOS, command_from_msg, state_to_msgs


class BridgeNode(RobotNode):
    def __init__(self):
        super().__init__("bridge")
        p = self.param
        robot = p("robot", "kid_biped", "robot name under configs/robot/, or a robot YAML path", bool, "non-empty")
        firmware = (p("firmware_host", "127.0.0.1", "address of the firmware", bool, "non-empty"),
                    p("firmware_port", 9000, "UDP port of the firmware", *PORT))
        bind = (p("bind_host", "0.0.0.0", "local address the firmware sends STATE to", bool, "non-empty"),
                p("bind_port", 9001, "local UDP port the firmware sends STATE to", *BIND_PORT))
        link_timeout_s = p("link_timeout_s", 0.1, "no STATE for this long: the link is stale (diagnostics error)",
                           lambda v: v > 0, "> 0")
        timeout_ms = p("command_timeout_ms", 0.0, "no joint command from the policy for this long: damp the "
                       "motors. 0: three control periods of the robot", lambda v: v >= 0, ">= 0")
        diagnostics_hz = p("diagnostics_hz", 2.0, "rate of /diagnostics messages (Hz)", lambda v: v > 0, "> 0")
        topics = self.topic_params(["joint_states", "imu", "firmware_mode", "joint_commands",
                                    "firmware_mode_request"])
        self.spec = spec = load_robot(robot)
        self.limits = CommandLimits(spec)
        self.imu_frame = spec.imu_body or spec.base_body or "base_link"
        self.command_timeout_s = timeout_ms / 1e3 if timeout_ms else 3.0 / spec.control_hz
        self.hw = FirmwareHardware.udp(spec, firmware, bind, timeout_s=link_timeout_s)
        self._send_lock = threading.Lock()   # commands go out from the callback and the watchdog
        self._last_command_t = -np.inf
        self._forwarding = False             # commands are flowing (watchdog not tripped)
        self.counts = dict(states=0, commands=0, bad_commands=0, watchdog_trips=0)
        self._counts_seen, self._diag_t = dict(self.counts), time.monotonic()
        self._last_state: HardwareState | None = None
        # Benchmark only (common.TRACE_ENV): (state stamp ns, STATE read monotonic ns, published
        # monotonic ns) per state and (command data CRC, COMMAND sent monotonic ns) per command.
        self._trace = ([], []) if trace_dir() else None

        self._js_pub = self.create_publisher(JointState, topics["joint_states"], CONTROL_QOS)
        self._imu_pub = self.create_publisher(Imu, topics["imu"], CONTROL_QOS)
        self._mode_pub = self.create_publisher(UInt8, topics["firmware_mode"], LATCHED_QOS)
        self.create_subscription(Float64MultiArray, topics["joint_commands"], self._on_command, CONTROL_QOS)
        self.create_subscription(UInt8, topics["firmware_mode_request"], self._on_mode_request, CONTROL_QOS)
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0 / diagnostics_hz, self._publish_diagnostics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive_loop, name="bridge_rx", daemon=True)
        self.get_logger().info(f"bridging '{spec.name}' firmware at {firmware[0]}:{firmware[1]} (STATE to "
                               f"{bind[0]}:{self.hw.link.transport.address[1]}); command watchdog "
                               f"{self.command_timeout_s * 1e3:.0f} ms")

    def start(self) -> None:
        self._thread.start()

    # ---- receive thread ----
    def _receive_loop(self) -> None:
        fd = self.hw.link.transport.fileno()
        try:
            while not self._stop.is_set():
                select.select([fd], [], [], 0.1)   # wakes on each frame; the timeout only checks _stop
                state = self.hw.read()   # raises on another protocol version or motor count
                if state is None or state is self._last_state:
                    continue
                t_rx = time.monotonic_ns() if self._trace else 0
                if self._last_state is None or state.firmware_mode != self._last_state.firmware_mode:
                    self._mode_pub.publish(UInt8(data=state.firmware_mode))
                self._last_state = state
                self.counts["states"] += 1
                js, imu = state_to_msgs(state, self.spec.joint_names, self.get_clock().now().to_msg(),
                                        self.imu_frame, bool(self.spec.imu_body))
                self._js_pub.publish(js)
                self._imu_pub.publish(imu)
                if self._trace:
                    self._trace[0].append((js.header.stamp.sec * 10**9 + js.header.stamp.nanosec, t_rx,
                                           time.monotonic_ns()))
                self._watchdog(state)
        except REFUSALS as e:
            self.failure = f"refusing to run: {e}"
        except Exception as e:  # anything else also stops the node: a bridge must not half-work
            self.failure = f"receive thread died: {e!r}"

    def _watchdog(self, state: HardwareState) -> None:
        silent = time.monotonic() - self._last_command_t
        if silent <= self.command_timeout_s:
            return
        if self._forwarding:
            self._forwarding = False
            self.counts["watchdog_trips"] += 1
            self.get_logger().warning(f"no joint command from the policy for {silent * 1e3:.0f} ms: "
                                      "damping the motors and asking the firmware for DAMPING")
        self._damp(state)

    def _damp(self, state: HardwareState) -> None:
        n, spec = self.spec.n_joints, self.spec
        hold = np.clip(state.q, spec.q_lower, spec.q_upper)   # no effect at kp = 0, but inside the limits
        with self._send_lock:
            self.hw.request_mode(int(Mode.DAMPING))
            self.hw.write(JointCommand(hold, np.zeros(n), spec.kd, np.zeros(n)))

    # ---- executor thread ----
    def _on_command(self, msg: Float64MultiArray) -> None:
        try:
            cmd = command_from_msg(msg, self.spec.joint_names)
            outside = self.limits.violation(cmd.q_target, cmd.kp, cmd.kd, cmd.tau_ff)
            if outside:
                raise ValueError(f"outside the limits of {self.spec.name}: {outside}")
        except ValueError as e:   # dropped: to the watchdog, it is as if none had come
            self.counts["bad_commands"] += 1
            self.get_logger().error(f"dropping joint command: {e}", throttle_duration_sec=1.0)
            return
        with self._send_lock:
            self.hw.write(cmd)
        if self._trace:
            self._trace[1].append((zlib.crc32(msg.data), time.monotonic_ns()))
        self._last_command_t = time.monotonic()
        self.counts["commands"] += 1
        if not self._forwarding:
            self._forwarding = True
            self.get_logger().info("joint commands from the policy: forwarding them to the firmware")

    def _on_mode_request(self, msg: UInt8) -> None:
        try:
            mode = Mode(msg.data)
        except ValueError:
            self.get_logger().error(f"dropping mode request {msg.data}: not a firmware mode "
                                    f"({', '.join(f'{m.value}={m.name}' for m in Mode)})", throttle_duration_sec=1.0)
            return
        with self._send_lock:
            self.hw.request_mode(int(mode))

    def _publish_diagnostics(self) -> None:
        s, stats = self._last_state, self.hw.stats
        now = time.monotonic()
        rates = {f"{k}_per_s": f"{(self.counts[k] - self._counts_seen[k]) / (now - self._diag_t):.1f}"
                 for k in ("states", "commands")}
        self._counts_seen, self._diag_t = dict(self.counts), now
        if self.hw.stale:
            level, message = ERROR, "no STATE from the firmware"
        elif not self._forwarding:
            level, message = WARN, "no joint commands from the policy: motors damped"
        else:
            level, message = OK, "forwarding"
        values = {"firmware_mode": Mode(s.firmware_mode).name if s else "unknown",
                  "max_temperature_c": f"{np.max(s.temperature):.1f}" if s else "nan",
                  "last_command_seq_applied": s.last_command_seq if s else "",
                  "last_command_seq_sent": self.hw.last_sent_seq, **self.counts, **rates,
                  **{f"link_{k}": v for k, v in vars(stats).items()}}
        self._diagnostics.publish(DiagnosticArray(
            header=Header(stamp=self.get_clock().now().to_msg()),
            status=[status(f"{self.get_name()}: firmware link", level, message, self.spec.name, values)]))

    def close(self) -> None:
        """Leave the motors passive on the way out (repeated: any datagram may be lost)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)
        if self._last_state is not None and self.failure is None:
            for _ in range(3):
                self._damp(self._last_state)
                time.sleep(0.005)
        self.hw.close()
        if self._trace:
            save_trace("bridge_states", self._trace[0], ("stamp_ns", "rx_ns", "pub_ns"))
            save_trace("bridge_commands", self._trace[1], ("crc", "sent_ns"))


def main(argv: list[str] | None = None) -> int:
    return run(BridgeNode, "bridge_node", argv)


if __name__ == "__main__":
    raise SystemExit(main())
