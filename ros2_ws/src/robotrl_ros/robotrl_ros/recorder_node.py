"""recorder_node: records the graph's topics (messages.TOPICS and /diagnostics) to one MCAP file
with the ROS 2 profile: CDR messages exactly as they travelled (raw, as rosbag2 stores them) and
each type's message definition (concatenated with its dependencies, the ROS 2 format), so that
`ros2 bag info`, Foxglove and `robotrl report` read it.

The file is written to `<path>.tmp` and renamed to `<path>` on a clean shutdown: a recording
under its final name is always complete. Chunks are flushed to disk every `flush_s` seconds.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped, PoseStamped, Twist
from mcap.writer import CompressionType
from mcap_ros2.writer import Writer
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray, UInt8

from real.files import output_place
from robotrl_ros.common import ConfigError, RobotNode, run
from robotrl_ros.messages import CONTROL_QOS, LATCHED_QOS, TOPICS

# key -> (type, QoS the recorder subscribes with: best effort matches any publisher)
RECORDED = {
    "joint_states": (JointState, CONTROL_QOS),
    "imu": (Imu, CONTROL_QOS),
    "firmware_mode": (UInt8, LATCHED_QOS),
    "joint_commands": (Float64MultiArray, CONTROL_QOS),
    "firmware_mode_request": (UInt8, CONTROL_QOS),
    "cmd_vel": (Twist, CONTROL_QOS),
    "object_pose": (PoseStamped, CONTROL_QOS),
    "goal": (PointStamped, LATCHED_QOS),
}
assert RECORDED.keys() == TOPICS.keys(), "the recorder records every topic of messages.TOPICS"
# Many messages may queue between spins at 50 Hz x several topics: keep them all.
RECORD_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)
PRIMITIVES = {"bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
              "uint32", "int64", "uint64", "string", "wstring"}


def type_name(msg_type) -> str:
    """sensor_msgs.msg.JointState -> 'sensor_msgs/msg/JointState'."""
    module = msg_type.__module__.split(".")
    return f"{module[0]}/msg/{msg_type.__name__}"


def _msg_file(full: str) -> Path:
    """The installed .msg file: under an AMENT_PREFIX_PATH prefix (a ROS install), else this
    Python's prefix (the PyPI wheels install share/<pkg>/msg/ there)."""
    pkg, _, name = full.split("/")
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p] + [sys.prefix]
    for prefix in prefixes:
        path = Path(prefix) / "share" / pkg / "msg" / f"{name}.msg"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no message definition for {full} under {prefixes}")


def _dependencies(text: str, pkg: str) -> list[str]:
    deps = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        field_type = re.split(r"[\[<]", line.split()[0], maxsplit=1)[0]
        if field_type in PRIMITIVES or "=" in line.split()[1 if len(line.split()) > 1 else 0]:
            continue
        if "/" in field_type:
            p, n = field_type.split("/")[0], field_type.split("/")[-1]
        else:
            p, n = pkg, field_type
        deps.append(f"{p}/msg/{n}")
    return deps


def message_definition(full: str) -> str:
    """The ROS 2 concatenated message definition of a type ('pkg/msg/Name'), from the .msg files
    installed in the packages' share/ folders: its text, then each dependency (depth first, once)
    after a line of '=' and 'MSG: pkg/Name'."""
    main = _msg_file(full).read_text()
    parts, seen, todo = [main.rstrip("\n")], {full}, _dependencies(main, full.split("/")[0])
    while todo:
        dep = todo.pop(0)
        if dep in seen:
            continue
        seen.add(dep)
        text = _msg_file(dep).read_text()
        pkg, _, name = dep.split("/")
        parts.append("=" * 80 + f"\nMSG: {pkg}/{name}\n" + text.rstrip("\n"))
        todo.extend(_dependencies(text, pkg))
    return "\n".join(parts) + "\n"


class RecorderNode(RobotNode):
    def __init__(self):
        super().__init__("recorder")
        self.path = Path(self.param("path", "", "write the recording to this .mcap file", bool, "a file path"))
        try:   # refused now, not when the graph stops and the recording would be lost
            output_place(self.path, "path")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.flush_s = self.param("flush_s", 1.0, "write buffered messages to disk at least this often (s)",
                                  lambda v: v > 0, "> 0")
        topics = self.topic_params(RECORDED)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")
        # Small chunks: a flush writes whole chunks, so what was flushed survives a crash.
        self.writer = Writer(self._file, chunk_size=256 * 1024, compression=CompressionType.ZSTD)
        self._mcap = self.writer._writer   # raw CDR goes straight in (no decode / re-encode)
        self._schemas: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        specs = [(topics[k], t, qos if qos is LATCHED_QOS else RECORD_QOS) for k, (t, qos) in RECORDED.items()]
        specs.append(("/diagnostics", DiagnosticArray, QoSProfile(depth=100)))
        for topic, msg_type, qos in specs:
            full = type_name(msg_type)
            if full not in self._schemas:
                self._schemas[full] = self.writer.register_msgdef(full, message_definition(full)).id
            resolved = self.resolve_topic_name(topic)
            channel = self._mcap.register_channel(topic=resolved, message_encoding="cdr",
                                                  schema_id=self._schemas[full])
            self.counts[resolved] = 0
            self.create_subscription(msg_type, topic, self._writer_for(resolved, channel), qos, raw=True)
        self._last_flush = time.monotonic()
        self.create_timer(self.flush_s, self._flush)
        self.get_logger().info(f"recording {', '.join(self.counts)} to {self.path}")

    def _writer_for(self, topic: str, channel: int):
        def write(data: bytes) -> None:
            now = time.time_ns()
            self._mcap.add_message(channel_id=channel, log_time=now, publish_time=now,
                                   sequence=self.counts[topic], data=data)
            self.counts[topic] += 1
        return write

    def _flush(self) -> None:
        self._mcap.flush()   # ends the open chunk and writes it out (readable after a crash, by recovery)

    def close(self) -> None:
        if self._file.closed:
            return
        self.writer.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        total = sum(self.counts.values())
        self.get_logger().info(f"recording saved to {self.path}: {total} messages (" +
                               ", ".join(f"{t} {n}" for t, n in self.counts.items()) + ")")


def main(argv: list[str] | None = None) -> int:
    return run(RecorderNode, "recorder_node", argv)


if __name__ == "__main__":
    raise SystemExit(main())
