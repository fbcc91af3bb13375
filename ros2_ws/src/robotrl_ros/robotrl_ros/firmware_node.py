"""firmware_node: the emulated firmware (sim.emulated_firmware, the robot's MuJoCo twin behind
the firmware protocol) in real time on UDP, as a node, so a graph runs without a robot.

It speaks only the firmware protocol, exactly as a robot's motor controllers would; ROS is
used for its parameters, its lifetime and its diagnostics (mode, sim time, applied commands).
At exit it can save the log of every command it applied (log_path, .npz: t, seq, q_target,
kp, kd, tau_ff) for checking after a run. The only node that imports sim/ (and MuJoCo).

For a tabletop policy it also builds the world the policy was trained on (`world_artifact`: the
task in that artifact's manifest, its cube placed as the task draws it from `world_seed`) and
stands in for perception and the operator: the cube's pose on object_pose (PoseStamped, robot
base frame, `object_pose_hz`) and the task's target spot, if it has one, on goal (latched).
"""
from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped, PoseStamped
from std_msgs.msg import Header

from firmware_bridge import Mode
from real.artifact import ArtifactError, read_manifest
from real.robot_spec import load_robot
from robotrl_ros.common import BIND_PORT, OK, PORT, WARN, RobotNode, run, status
from robotrl_ros.messages import CONTROL_QOS, LATCHED_QOS, point_to_msg, pose_to_msg
from sim.emulated_firmware import EmulatedFirmware, FirmwareConfig
from sim.envs import task_config, task_world


class FirmwareNode(RobotNode):
    def __init__(self):
        super().__init__("firmware")
        p = self.param
        robot = p("robot", "kid_biped", "robot name under configs/robot/, or a robot YAML path", bool, "non-empty")
        bind = (p("host", "127.0.0.1", "address to listen on", bool, "non-empty"),
                p("port", 9000, "UDP port to listen on", *BIND_PORT))
        peer = (p("peer_host", "127.0.0.1", "address of the robot computer (bridge), where STATE goes", bool,
                  "non-empty"),
                p("peer_port", 9001, "UDP port of the robot computer (bridge)", *PORT))
        config = FirmwareConfig(
            watchdog_ms=p("watchdog_ms", FirmwareConfig.watchdog_ms, "RUNNING with no valid COMMAND for this "
                          "long: DAMPING", lambda v: v > 0, "> 0"),
            state_hz=p("state_hz", 0.0, "STATE rate in Hz; 0: the robot's state_hz", lambda v: v >= 0,
                       ">= 0") or None,
            gantry_s=p("gantry_s", 0.0, "hold a floating base on a gantry until this long after RUNNING is "
                       "entered (the controller's ramp time); 0: no gantry", lambda v: v >= 0, ">= 0"))
        self.log_path = p("log_path", "", "save the applied commands to this .npz at exit; empty: do not")
        diagnostics_hz = p("diagnostics_hz", 2.0, "rate of /diagnostics messages (Hz)", lambda v: v > 0, "> 0")
        world_artifact = p("world_artifact", "", "build the world of the task this artifact was trained on (a "
                           "tabletop task's cube; a walking task has none); empty: the robot alone")
        world_seed = p("world_seed", 0, "seed of the world's placement (where the cube starts)")
        object_pose_hz = p("object_pose_hz", 30.0, "rate of object_pose (the perception stand-in), Hz; 0: not "
                           "published", lambda v: v >= 0, ">= 0")
        topics = self.topic_params(["object_pose", "goal"])
        self.spec = spec = load_robot(robot)
        world = None
        if world_artifact:
            task = read_manifest(world_artifact)["task"]
            world = task_world(task_config(task["config"]), world_seed)
        self.fw = EmulatedFirmware(spec, bind, peer, config, world)
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0 / diagnostics_hz, self._publish_diagnostics)
        if world is not None and world.tracked_body is not None and object_pose_hz > 0:
            self._object_pose = self.create_publisher(PoseStamped, topics["object_pose"], CONTROL_QOS)
            self.create_timer(1.0 / object_pose_hz, self._publish_object_pose)
        if world is not None and world.goal is not None:
            goal = self.create_publisher(PointStamped, topics["goal"], LATCHED_QOS)
            goal.publish(point_to_msg(world.goal, self.get_clock().now().to_msg(), spec.base_body))
        if world is not None:
            self.get_logger().info(f"world of task '{task['name']}' (seed {world_seed}): tracking "
                                   f"'{world.tracked_body}'" + ("" if world.goal is None else f", goal {world.goal}"))
        host, port = self.fw.address
        self.get_logger().info(f"emulated firmware for '{spec.name}' listening on {host}:{port}, STATE to "
                               f"{peer[0]}:{peer[1]}, watchdog {config.watchdog_ms:.0f} ms")

    def start(self) -> None:
        self.fw.start()

    def _publish_object_pose(self) -> None:
        pos, quat = self.fw.object_pose()
        self._object_pose.publish(pose_to_msg(pos, quat, self.get_clock().now().to_msg(), self.spec.base_body))

    def _publish_diagnostics(self) -> None:
        if not self.fw.running and self.failure is None:
            self.failure = "the emulated firmware's thread stopped"
            return
        mode = self.fw.mode
        values = {"mode": mode.name, "sim_time_s": f"{self.fw.sim.time:.3f}", "lag_s": f"{self.fw.lag_s:.3f}",
                  "applied_commands": len(self.fw.applied_commands()), "rejected_commands": self.fw.sim.rejected,
                  **{f"link_{k}": v for k, v in vars(self.fw.stats).items()}}
        level = OK if mode in (Mode.IDLE, Mode.RUNNING) else WARN
        self._diagnostics.publish(DiagnosticArray(
            header=Header(stamp=self.get_clock().now().to_msg()),
            status=[status(f"{self.get_name()}: emulated firmware", level, mode.name, self.spec.name, values)]))

    def close(self) -> None:
        try:
            self.fw.close()   # re-raises what killed the firmware thread
        except Exception as e:
            self.get_logger().error(f"the emulated firmware had died: {e!r}")
        self.get_logger().info(f"stopped at sim time {self.fw.sim.time:.2f} s in mode {self.fw.mode.name}, "
                               f"{len(self.fw.applied_commands())} commands applied, "
                               f"{self.fw.sim.rejected} rejected, {self.fw.lag_s:.3f} s behind real time")
        if self.log_path:
            self.fw.sim.save_log(self.log_path)
            self.get_logger().info(f"applied-command log saved to {self.log_path}")


def main(argv: list[str] | None = None) -> int:
    return run(FirmwareNode, "firmware_node", argv, refusals=(ArtifactError,))


if __name__ == "__main__":
    raise SystemExit(main())
