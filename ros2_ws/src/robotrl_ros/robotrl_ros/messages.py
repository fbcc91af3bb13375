"""How robot state and joint commands travel as standard ROS 2 messages (shared by the nodes).

Topics (relative names: a namespace or a remap moves them together; each node also has a
``topics.<key>`` parameter for its name):

| key                   | type                       | direction            | content                                  |
| --------------------- | -------------------------- | -------------------- | ---------------------------------------- |
| joint_states          | sensor_msgs/JointState     | bridge -> policy     | position, velocity, effort by joint name |
| imu                   | sensor_msgs/Imu            | bridge -> policy     | orientation (xyzw, ROS), gyro, accel     |
| firmware_mode         | std_msgs/UInt8             | bridge -> policy     | firmware_bridge.Mode, on each change     |
| joint_commands        | std_msgs/Float64MultiArray | policy -> bridge     | one PD command, see ``command_to_msg``   |
| firmware_mode_request | std_msgs/UInt8             | policy -> bridge     | a firmware_bridge.Mode to ask for        |
| cmd_vel               | geometry_msgs/Twist        | anyone -> policy     | linear.x, linear.y, angular.z            |
| object_pose           | geometry_msgs/PoseStamped  | perception -> policy | the manipulated object, robot base frame |
| goal                  | geometry_msgs/PointStamped | operator -> policy   | where the object should go, base frame   |

firmware_mode and goal are latched (LATCHED_QOS): a late joiner gets the last one. The policy
holds cmd_vel within the range its artifact was trained on, refuses a goal outside the table area
it was trained to place on, and ignores a non-finite value of either.

object_pose and goal matter only to tabletop policies (their observation has cube_pos, target_pos,
...); their header.frame_id must be the robot's base frame or a frame the policy node's
fixed_frames calibrates, and their stamp the measurement time.

A joint command is one Float64MultiArray, so targets and gains always arrive together (two
topics could pair a new target with old gains): 4 rows (q_target, kp, kd, tau_ff) by n joints,
row-major; dim[0].label names the rows, dim[1].label lists the joint names in order, and the
bridge refuses a command whose joint order is not its robot's.
"""
from __future__ import annotations

import array
import time

import numpy as np
from geometry_msgs.msg import PointStamped, PoseStamped
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension

from real.hardware import HardwareState, JointCommand

TOPICS = {
    "joint_states": "joint_states",
    "imu": "imu",
    "firmware_mode": "firmware_mode",
    "joint_commands": "joint_commands",
    "firmware_mode_request": "firmware_mode_request",
    "cmd_vel": "cmd_vel",
    "object_pose": "object_pose",
    "goal": "goal",
}
# High-rate control traffic: only the newest message matters and a lost one is replaced next
# tick, so no retransmission and no queue (a queue would deliver stale data late).
CONTROL_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
# The firmware's mode changes rarely: sent once per change, reliably, and latched for late joiners
# (a message per STATE frame would cost the policy's executor as much as the joint states do).
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
COMMAND_ROWS = ("q_target", "kp", "kd", "tau_ff")


def f64(x) -> array.array:
    """numpy -> the array.array('d') that rclpy stores float64[] fields as (no per-element copy)."""
    a = array.array("d")
    a.frombytes(np.ascontiguousarray(x, dtype=np.float64).tobytes())
    return a


def stamp_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def local_stamp(header, now_ros_s: float) -> float:
    """A message's measurement time on this process's monotonic clock (HardwareState.stamp_s):
    the receive time minus the transport delay told by the header stamp, never in the future."""
    return time.monotonic() - max(0.0, now_ros_s - stamp_seconds(header.stamp))


def command_to_msg(cmd: JointCommand, joint_names) -> Float64MultiArray:
    n = len(joint_names)
    msg = Float64MultiArray()
    msg.layout.dim = [MultiArrayDimension(label=",".join(COMMAND_ROWS), size=4, stride=4 * n),
                      MultiArrayDimension(label=",".join(joint_names), size=n, stride=n)]
    msg.data = f64(np.concatenate([cmd.q_target, cmd.kp, cmd.kd, cmd.tau_ff]))
    return msg


def command_from_msg(msg: Float64MultiArray, joint_names) -> JointCommand:
    """Raises ValueError, naming what is wrong, for a command of another shape or joint order."""
    n, dims = len(joint_names), msg.layout.dim
    if len(dims) != 2 or dims[0].size != 4 or dims[1].size != n or len(msg.data) != 4 * n:
        raise ValueError(f"joint command must be 4 x {n} ({', '.join(COMMAND_ROWS)} by joint), got dims "
                         f"{[(d.label, d.size) for d in dims]} with {len(msg.data)} values")
    if dims[1].label != ",".join(joint_names):
        raise ValueError(f"joint command is for joints [{dims[1].label}], this robot's order is "
                         f"[{','.join(joint_names)}]")
    return JointCommand(*np.frombuffer(msg.data, dtype=np.float64).reshape(4, n))


def state_to_msgs(state: HardwareState, joint_names, stamp, imu_frame: str,
                  has_imu: bool) -> tuple[JointState, Imu]:
    js = JointState()
    js.header.stamp = stamp
    js.name = list(joint_names)
    js.position, js.velocity, js.effort = f64(state.q), f64(state.dq), f64(state.tau)
    imu = Imu()
    imu.header.stamp = stamp
    imu.header.frame_id = imu_frame
    w, x, y, z = (float(v) for v in state.quat_wxyz)   # robotrl is wxyz inside, ROS is xyzw
    imu.orientation.x, imu.orientation.y, imu.orientation.z, imu.orientation.w = x, y, z, w
    imu.angular_velocity.x, imu.angular_velocity.y, imu.angular_velocity.z = (float(v) for v in state.gyro)
    imu.linear_acceleration.x, imu.linear_acceleration.y, imu.linear_acceleration.z = (float(v) for v in state.accel)
    if not has_imu:  # ROS convention: covariance[0] = -1 marks a field with no data
        for cov in (imu.orientation_covariance, imu.angular_velocity_covariance, imu.linear_acceleration_covariance):
            cov[0] = -1.0
    return js, imu


def pose_to_msg(pos, quat_wxyz, stamp, frame_id: str) -> PoseStamped:
    msg = PoseStamped()
    msg.header.stamp, msg.header.frame_id = stamp, frame_id
    p, o = msg.pose.position, msg.pose.orientation
    p.x, p.y, p.z = (float(v) for v in pos)
    o.w, o.x, o.y, o.z = (float(v) for v in quat_wxyz)   # robotrl is wxyz inside, ROS is xyzw
    return msg


def pose_arrays(msg: PoseStamped) -> tuple[np.ndarray, np.ndarray]:
    """(position, quat_wxyz) of a PoseStamped."""
    p, o = msg.pose.position, msg.pose.orientation
    return np.array([p.x, p.y, p.z]), np.array([o.w, o.x, o.y, o.z])


def point_to_msg(pos, stamp, frame_id: str) -> PointStamped:
    msg = PointStamped()
    msg.header.stamp, msg.header.frame_id = stamp, frame_id
    msg.point.x, msg.point.y, msg.point.z = (float(v) for v in pos)
    return msg


def imu_arrays(msg: Imu) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quat_wxyz, gyro, accel) of an Imu message."""
    o, g, a = msg.orientation, msg.angular_velocity, msg.linear_acceleration
    return np.array([o.w, o.x, o.y, o.z]), np.array([g.x, g.y, g.z]), np.array([a.x, a.y, a.z])
