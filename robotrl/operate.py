"""`robotrl operate …`: the operator's side of a running deploy graph where the `ros2` CLI is not
installed (the PyPI ROS 2 wheels have none). It joins the graph's ROS domain (ROS_DOMAIN_ID, as
the graph was started with) and:

    robotrl operate start                  # ros2 service call /policy/start std_srvs/srv/Trigger
    robotrl operate damp | estop | reset
    robotrl operate cmd_vel=[0.25,0,0]     # ros2 topic pub cmd_vel geometry_msgs/msg/Twist …
    robotrl operate goal=[0.45,0.15,0] robot=arm7   # the tabletop goal, latched, in the robot's base frame

Options: node=policy (the policy node's name, with a namespace if it has one), wait=<s> (how long
to wait for the service or for the policy to subscribe). A refused call says why and exits 2.
`robotrl deploy … --start` calls start by itself once the policy accepts it.
"""
from __future__ import annotations

import os
import time

ACTIONS = ("start", "damp", "estop", "reset")


class OperateError(ValueError):
    """What was asked cannot be done; the message says why."""


def _domain() -> int:
    text = os.environ.get("ROS_DOMAIN_ID", "0") or "0"
    if not text.isdigit() or not 0 <= int(text) <= 232:
        raise OperateError(f"ROS_DOMAIN_ID must be an integer in 0..232, got '{text}'")
    return int(text)


def service_name(node: str, action: str) -> str:
    return "/" + "/".join(part for part in (*node.strip("/").split("/"), action) if part)


def call(action: str, node: str = "policy", wait_s: float = 10.0, client=None) -> str:
    """Call the policy node's Trigger service; returns its answer, raises OperateError if refused
    or unanswered."""
    from robotrl.ros_client import RosClient
    if action not in ACTIONS:
        raise OperateError(f"unknown action '{action}'; the policy node offers: {', '.join(ACTIONS)}")
    own = client is None
    client = client or RosClient(_domain(), "robotrl_operate")
    try:
        name = service_name(node, action)
        response = client.call(name, timeout=wait_s)
    finally:
        if own:
            client.close()
    if response is None:
        raise OperateError(f"no answer from {name} within {wait_s:g} s (is the graph running, in ROS_DOMAIN_ID "
                           f"{_domain()}?)")
    if not response.success:
        raise OperateError(response.message)
    return response.message


def start_when_ready(node: str, timeout_s: float, say) -> bool:
    """Call start until the policy accepts it (it refuses until robot state, and for a tabletop
    policy perception and the goal, have arrived), saying each new reason; False on timeout."""
    from robotrl.ros_client import RosClient
    client = RosClient(_domain(), "robotrl_deploy_start")
    end, last = time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < end:
            try:
                say(call("start", node, wait_s=max(1.0, end - time.monotonic()), client=client))
                return True
            except OperateError as e:
                if str(e) != last:
                    say(f"waiting: {e}")
                    last = str(e)
            time.sleep(0.5)
        return False
    finally:
        client.close()


def publish(kind: str, values: list[float], frame: str = "", node_name: str = "policy", wait_s: float = 10.0) -> str:
    """cmd_vel (vx, vy, yaw rate) at 10 Hz for a second once the policy node subscribes (it keeps
    the newest); goal (x, y, z) once, latched, held a moment for the reliable delivery."""
    from geometry_msgs.msg import PointStamped, Twist
    from robotrl.ros_client import RosClient
    from robotrl_ros.messages import CONTROL_QOS, LATCHED_QOS, point_to_msg
    if len(values) != 3:
        raise OperateError(f"{kind} takes 3 numbers, got {values}")
    client = RosClient(_domain(), "robotrl_operate")
    try:
        node = client.node
        if kind == "cmd_vel":
            pub = node.create_publisher(Twist, "cmd_vel", CONTROL_QOS)
            msg = Twist()
            msg.linear.x, msg.linear.y, msg.angular.z = values
        else:
            pub = node.create_publisher(PointStamped, "goal", LATCHED_QOS)
            msg = point_to_msg(values, node.get_clock().now().to_msg(), frame)
        end, name = time.monotonic() + wait_s, node_name.strip("/").split("/")[-1]
        while not (pub.get_subscription_count() and any(
                info.node_name == name for info in node.get_subscriptions_info_by_topic(pub.topic_name))):
            if time.monotonic() > end:
                raise OperateError(f"node '{node_name}' did not subscribe to {kind} within {wait_s:g} s (is the "
                                   f"graph running, in ROS_DOMAIN_ID {_domain()}? does its policy take {kind}?)")
            time.sleep(0.05)
        # The other subscribers the graph knows of (a recorder) get a moment to match too: this
        # process lives a second, and a latched message dies with it (CI's recording missed a goal).
        others_by = time.monotonic() + 2.0
        while (pub.get_subscription_count() < len(node.get_subscriptions_info_by_topic(pub.topic_name))
               and time.monotonic() < others_by):
            time.sleep(0.05)
        # cmd_vel: best effort, so ten times over a second; goal: reliable and latched, delivered
        # once matched, so once, then held a moment for the delivery.
        repeats, hold_s = (10, 0.1) if kind == "cmd_vel" else (1, 0.5)
        for _ in range(repeats):
            pub.publish(msg)
            time.sleep(hold_s)
        return f"{kind} {values} sent" + (f" in frame '{frame}'" if frame else "")
    finally:
        client.close()
