"""policy_node: an exported artifact driving the robot through real.controller.Controller.

The control tick runs in its own thread (real.rt_loop.RateLoop, absolute deadlines, optional
SCHED_FIFO / CPU pinning / mlockall); ROS callbacks only fill buffers (TopicHardware, the
velocity command) or call the controller's thread-safe commands. Hardware, by parameter:
  topics  TopicHardware: joint_states + imu + firmware_mode in, joint_commands +
          firmware_mode_request out; bridge_node (or another driver) on the other side.
  udp     real.hardware.FirmwareHardware: the firmware protocol straight from this process.

A tabletop policy (its observation has cube_pos, target_pos, ...) also subscribes to object_pose
(perception) and goal (the operator), each in the robot's base frame (`base_frame`) or in a frame
fixed to it whose pose `fixed_frames` gives (a mounted camera's calibration: no tf2 needed); a pose
in another frame is dropped with a warning. Start is refused until both are there; an object pose
going stale while running (older than `max_object_age`): damping. Diagnostics show both as the
policy sees them, in the base frame.

Services (std_srvs/Trigger, private: /<node>/start ...): start, damp, estop, reset; a refused
one answers success=false with the reason. Diagnostics on /diagnostics: loop timing, safety
state, recent events.

Refuses to start (fatal log, exit 1) on an unknown robot, a missing or corrupt artifact, an
artifact trained for another robot (the manifest check names the first difference) or rate, or
one that observes what the robot side cannot build (a camera image).
"""
from __future__ import annotations

import sys
import time

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped, PoseStamped, Twist
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from firmware_bridge import Mode as FirmwareMode
from real.artifact import ArtifactError, ManifestMismatch, TorchScriptArtifact, load_artifact
from real.controller import Controller, InputError
from real.kinematics import FixedFrames
from real.hardware import FirmwareHardware
from real.robot_spec import load_robot
from real.rt_loop import RateLoop
from real.state_machine import Mode, TransitionError
from robotrl_ros.common import BIND_PORT, ERROR, OK, PORT, WARN, ConfigError, RobotNode, run, status
from robotrl_ros.messages import CONTROL_QOS, LATCHED_QOS, local_stamp, pose_arrays
from robotrl_ros.topic_hardware import TopicHardware

SAFETY_LEVEL = {Mode.IDLE: OK, Mode.RAMP: OK, Mode.RUNNING: OK, Mode.DAMPING: WARN, Mode.ESTOP: ERROR}
positive = (lambda v: v > 0, "> 0")


class PolicyNode(RobotNode):
    def __init__(self):
        super().__init__("policy")
        p = self.param
        robot = p("robot", "kid_biped", "robot name under configs/robot/, or a robot YAML path", bool, "non-empty")
        artifact = p("artifact", "", "path of the exported policy artifact (robotrl export: .pt TorchScript, "
                     ".onnx ONNX); required",
                     bool, "the path of an exported artifact (robotrl export)")
        hardware = p("hardware", "topics", "'topics': state and commands over ROS topics (bridge_node); "
                     "'udp': the firmware protocol straight from this node", lambda v: v in ("topics", "udp"),
                     "'topics' or 'udp'")
        control_hz = p("control_hz", 0.0, "expected control rate in Hz; the node refuses to run an artifact "
                       "and robot at another rate. 0: the artifact's", lambda v: v >= 0, ">= 0")
        max_state_age = p("max_state_age", 0.05, "robot state older than this (s) is a fault: damping", *positive)
        max_delta = p("max_delta", 0.0, "largest change of a position target per tick, in the joints' units "
                      "(rad, m); 0: each joint's velocity limit / control_hz", lambda v: v >= 0, ">= 0")
        ramp_s = p("ramp_s", 1.0, "time to ramp from the measured pose to the default pose on start (s)", *positive)
        self.rate_tolerance = p("rate_tolerance", 0.05, "diagnostics warn when the measured mean period "
                                "differs from nominal by more than this fraction", *positive)
        diagnostics_hz = p("diagnostics_hz", 5.0, "rate of /diagnostics messages (Hz)", *positive)
        rt_priority = p("rt_priority", 0, "SCHED_FIFO priority of the control thread; 0: default scheduler",
                        lambda v: 0 <= v <= 99, "in 0..99")
        cpu = p("cpu", -1, "pin the control thread to this CPU; -1: no pinning", lambda v: v >= -1, ">= -1")
        lock_memory = p("lock_memory", False, "mlockall the process (no page faults in the loop)")
        bench_loop_hz = p("bench_loop_hz", 0.0, "BENCHMARK ONLY (robotrl bench loop), never on a robot: run "
                          "the control loop's ticks at this rate instead of the robot's, to time the loop "
                          "with ROS in the path; the policy and its gait clock still assume the robot's "
                          "rate, so it does not walk. 0: the robot's rate", lambda v: v >= 0, ">= 0")
        firmware = (p("firmware_host", "127.0.0.1", "hardware=udp: address of the firmware", bool, "non-empty"),
                    p("firmware_port", 9000, "hardware=udp: UDP port of the firmware", *PORT))
        bind = (p("bind_host", "0.0.0.0", "hardware=udp: local address the firmware sends STATE to", bool,
                  "non-empty"),
                p("bind_port", 9001, "hardware=udp: local UDP port", *BIND_PORT))
        connect_timeout_s = p("connect_timeout_s", 2.0, "hardware=udp: wait this long for the first STATE", *positive)
        topics = self.topic_params(["joint_states", "imu", "firmware_mode", "joint_commands",
                                    "firmware_mode_request", "cmd_vel", "object_pose", "goal"])
        max_object_age = p("max_object_age", 0.2, "tabletop policies: an object pose older than this (s) is a "
                           "fault: damping", *positive)
        base_frame = p("base_frame", "", "tabletop policies: the robot's base frame, which the policy observes "
                       "in; empty: the robot's base body")
        fixed_frames = p("fixed_frames", "", "tabletop policies: frames fixed to the base that object_pose and "
                         "goal may also come in, each 'name x y z qw qx qy qz' (its pose in the base frame, m and a "
                         "unit quaternion: a mounted camera's extrinsic calibration), separated by ';'")

        spec = load_robot(robot)
        try:   # a malformed calibration is refused before the artifact loads
            self.frames = FixedFrames.parse(base_frame or spec.base_body, fixed_frames)
        except ValueError as e:
            raise ConfigError(f"parameter 'fixed_frames': {e}") from None
        if control_hz and abs(control_hz - spec.control_hz) > 1e-9:
            raise ConfigError(f"control_hz is {control_hz} but robot '{spec.name}' ({spec.source}) runs at "
                              f"{spec.control_hz} Hz")
        art = load_artifact(artifact)
        if isinstance(art, TorchScriptArtifact):   # a small network: threads add jitter, not speed,
            import torch                            # and steal the cores (onnxruntime's: one, at load)
            torch.set_num_threads(1)
        # The tick gives up the GIL inside torch and rclpy; take it back from the executor thread
        # within 0.5 ms instead of Python's default 5 ms.
        sys.setswitchinterval(0.0005)
        if hardware == "topics":
            self.hw = TopicHardware(self, spec, topics)
        else:
            self.hw = FirmwareHardware.udp(spec, firmware, bind, timeout_s=max_state_age)
            self.hw.start(timeout_s=connect_timeout_s)  # refuses another protocol version or motor count
        self.spec = spec
        self.controller = Controller(art, spec, self.hw, max_state_age=max_state_age, max_delta=max_delta or None,
                                     ramp_s=ramp_s, max_object_age=max_object_age)
        # (the controller refuses an artifact trained for another robot, or one it cannot observe for)
        self.create_subscription(Twist, topics["cmd_vel"], self._on_cmd_vel, CONTROL_QOS)
        self._wrong_frames: set[str] = set()
        if "object" in self.controller.inputs:
            self.create_subscription(PoseStamped, topics["object_pose"], self._on_object_pose, CONTROL_QOS)
        if "goal" in self.controller.inputs:
            self.create_subscription(PointStamped, topics["goal"], self._on_goal, LATCHED_QOS)
        for name, action in (("start", self._start), ("damp", lambda: self.controller.damp("damp service")),
                             ("estop", lambda: self.controller.estop("estop service")),
                             ("reset", self.controller.reset)):
            self.create_service(Trigger, f"~/{name}", self._service(name, action))
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._last_event = None
        self._overruns_seen = 0
        self._rt_logged = False
        art.warm_up()
        rt = dict(rt_priority=rt_priority or None, cpus=None if cpu < 0 else [cpu], lock_memory=lock_memory)
        if bench_loop_hz:
            self.get_logger().warning(f"bench_loop_hz: the control loop runs at {bench_loop_hz} Hz, not the "
                                      f"robot's {spec.control_hz} Hz (benchmark only)")
            self.loop = RateLoop(lambda: self.controller.tick(), bench_loop_hz, name=f"{spec.name}_control", **rt)
        else:
            self.loop = self.controller.loop(**rt)
        self.create_timer(1.0 / diagnostics_hz, self._publish_diagnostics)
        self._ready = (f"running {art.path} on '{spec.name}' at {spec.control_hz} Hz over {hardware}; "
                       f"mode {self.controller.mode.name}: call ~/start to ramp and run")

    def start(self) -> None:
        self.loop.start()
        self.get_logger().info(self._ready)

    # ---- executor thread ----
    def _on_cmd_vel(self, msg: Twist) -> None:
        wanted = (msg.linear.x, msg.linear.y, msg.angular.z)
        applied = self.controller.set_velocity_command(*wanted)
        if applied is None:
            self.get_logger().warning(f"cmd_vel {list(wanted)} ignored: not finite; the command stays "
                                      f"{self.controller.velocity_command.tolist()}", throttle_duration_sec=5.0)
        elif applied.tolist() != list(wanted):
            low, high = self.controller.command_range
            self.get_logger().warning(
                f"cmd_vel {list(wanted)} clamped to {applied.tolist()}: the policy was trained on "
                + ", ".join(f"{k} [{lo:g}, {hi:g}]" for k, lo, hi in zip(("vx", "vy", "yaw_rate"), low, high)),
                throttle_duration_sec=5.0)

    def _known_frame(self, msg, topic: str) -> bool:
        frame = msg.header.frame_id
        if frame in self.frames.poses:
            return True
        if frame not in self._wrong_frames:   # once per frame name: perception may send many
            self._wrong_frames.add(frame)
            self.get_logger().warning(f"{topic} in frame '{frame}' dropped: this policy needs the robot's base "
                                      f"frame '{self.frames.base}' (parameter base_frame) or a frame of "
                                      f"fixed_frames {sorted(set(self.frames.poses) - {self.frames.base})}")
        return False

    def _on_object_pose(self, msg: PoseStamped) -> None:
        if self._known_frame(msg, "object_pose"):
            pos, quat = self.frames.to_base(msg.header.frame_id, *pose_arrays(msg))
            now = self.get_clock().now().nanoseconds * 1e-9
            refused = self.controller.set_object_pose(pos, quat, local_stamp(msg.header, now))
            if refused:
                self.get_logger().warning(f"{refused}: ignored", throttle_duration_sec=1.0)

    def _on_goal(self, msg: PointStamped) -> None:
        if self._known_frame(msg, "goal"):
            p = msg.point
            goal, _ = self.frames.to_base(msg.header.frame_id, (p.x, p.y, p.z))
            refused = self.controller.set_goal_position(goal)
            if refused:
                kept = self.controller.goal_position
                self.get_logger().warning(f"{refused}; the goal stays "
                                          + ("unset" if kept is None else str([round(v, 3) for v in kept.tolist()])))
            else:
                self.get_logger().info(f"goal: ({goal[0]:.3f}, {goal[1]:.3f}, {goal[2]:.3f}) m in '{self.frames.base}'")

    def _start(self) -> None:
        s = self.controller.last_state
        if self.controller.mode is Mode.IDLE:   # in other modes the state machine's refusal says why
            if s is None:
                raise TransitionError("no robot state received yet (is the bridge or firmware running?)")
            age = time.monotonic() - s.stamp_s
            if age > self.controller.machine.safety.max_state_age:
                raise TransitionError(f"robot state is {age * 1e3:.0f} ms old (is the bridge or firmware running?)")
        self.controller.start()   # refuses a firmware in ESTOP, or missing perception, itself

    def _service(self, name, action):
        def handle(_request, response):
            try:
                action()
                response.success, response.message = True, f"{name}: mode {self.controller.mode.name}"
                self.get_logger().info(response.message)
            except TransitionError as e:
                response.success, response.message = False, f"{name} refused: {e}"
                self.get_logger().warning(response.message)
            return response
        return handle

    def _new_events(self) -> list:
        events = list(self.controller.events)  # one C-level copy: safe against the tick's appends
        new = []
        for e in reversed(events):
            if e is self._last_event:
                break
            new.append(e)
        if events:
            self._last_event = events[-1]
        return new[::-1]

    def _publish_diagnostics(self) -> None:
        if not self.loop.running and self.failure is None:
            try:
                self.loop.stop()
                self.failure = "control loop stopped"
            except Exception as e:  # the tick raised: the node must not go on without its loop
                self.failure = f"control loop died: {e!r}"
            return
        if self.loop.rt_report is not None and not self._rt_logged:
            self._rt_logged = True
            for line in self.loop.rt_report.messages:
                self.get_logger().info(line)
        clamps = 0
        for _, event in self._new_events():
            if event.kind == "clamp":
                clamps += 1
            elif event.kind == "fault":   # (rclpy wants one severity per call site)
                self.get_logger().warning(f"fault: {event.reason}")
            else:
                self.get_logger().info(f"{event.kind}: {event.reason}")
        st = self.loop.stats()
        ok_rate = abs(st.period_error) <= self.rate_tolerance or st.ticks < 2
        new_overruns, self._overruns_seen = st.overruns - self._overruns_seen, st.overruns
        level = OK if ok_rate and not new_overruns else WARN
        mode = self.controller.mode
        fault = self.controller.machine.safety.fault_reason
        s = self.controller.last_state
        recent = list(self.controller.events)[-5:]
        name = self.get_name()
        loop_status = status(f"{name}: control loop", level, st.summary(), self.spec.name,
                             {f: getattr(st, f) for f in st.__dataclass_fields__})
        safety = status(f"{name}: safety", SAFETY_LEVEL[mode], mode.name + (f": {fault}" if fault else ""),
                        self.spec.name, {
                            "mode": mode.name, "fault": fault or "",
                            "firmware_mode": FirmwareMode(s.firmware_mode).name if s else "unknown",
                            "state_age_ms": f"{(time.monotonic() - s.stamp_s) * 1e3:.1f}" if s else "inf",
                            "clamps_since_last": clamps,
                            "velocity_command": ", ".join(f"{v:.3f}" for v in self.controller.velocity_command),
                            **self._tabletop_inputs(),
                            **{f"event_{i}": f"{e.kind}: {e.reason}" for i, (_, e) in enumerate(recent)}})
        self._diagnostics.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()),
                                                  status=[loop_status, safety]))

    def _tabletop_inputs(self) -> dict:
        """The object's position and the goal as the policy sees them (base frame), for a tabletop policy."""
        c = self.controller
        seen = {"object_pos": ("object", c.object_position), "goal": ("goal", c.goal_position)}
        return {key: "none" if v is None else ", ".join(f"{x:.3f}" for x in v)
                for key, (needed, v) in seen.items() if needed in c.inputs}

    def close(self) -> None:
        """Stop the loop and leave the robot passive rather than holding the last target until a
        watchdog trips; repeated because any single message may be lost."""
        try:
            self.loop.stop()
        except Exception as e:
            self.get_logger().error(f"control loop had died: {e!r}")
        try:
            self.controller.damp("policy node shutting down")
        except TransitionError:
            pass  # ESTOP: already passive, and latched
        try:
            for _ in range(3):
                self.controller.tick()   # sends the damping command and asks the firmware for DAMPING
                time.sleep(0.005)
        except Exception as e:
            self.get_logger().error(f"could not send the final damping command: {e!r}")
        self.hw.close()


def main(argv: list[str] | None = None) -> int:
    return run(PolicyNode, "policy_node", argv, refusals=(ArtifactError, ManifestMismatch, InputError))


if __name__ == "__main__":
    raise SystemExit(main())
