"""Tabletop policies through the ROS 2 graph of launch/sim.launch.yaml: the emulated firmware
builds the world the artifact was trained in (its task's cube) and stands in for perception
(/object_pose) and the operator (/goal); the policy node feeds both to the controller. The test
process watches the cube on /object_pose, as a person would watch the robot."""
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from geometry_msgs.msg import PoseStamped
from rclpy.qos import HistoryPolicy, QoSProfile

from hil_rig import REPO, TIMING, free_udp_port, wait_for
from real.artifact import load_artifact
from real.robot_spec import load_robot
from robotrl.report import report
from robotrl_ros.messages import CONTROL_QOS, pose_arrays, pose_to_msg
from sim.envs import task_config

ARTIFACTS = REPO / "docs" / "artifacts"
ARM = load_robot("arm7")


class CubeWatch:
    """The cube heights on /object_pose, with their arrival times. Its queue holds a second of
    poses, so that a busy test process counts every pose the firmware sent rather than only the
    newest one when its executor gets round to it (the graph's own subscribers keep the newest)."""

    def __init__(self, node):
        self.heights: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=30, reliability=CONTROL_QOS.reliability)
        node.create_subscription(PoseStamped, "/object_pose", self._on_pose, qos)

    def _on_pose(self, msg):
        with self.lock:
            self.heights.append((time.monotonic(), float(pose_arrays(msg)[0][2])))

    def since(self, t0: float) -> np.ndarray:
        with self.lock:
            return np.array([z for t, z in self.heights if t >= t0])

    def what_happened(self, hil, t0: float, lifted: float, output) -> str:
        """For a failed lift (its first line is what CI's rerun summary keeps): how far the cube
        got, the policy's safety state and loop, then the graph's output."""
        z, status = self.since(t0), hil.ros.status
        return (f"cube: {len(z)} poses, highest {z.max() if len(z) else float('nan'):.3f} m of {lifted:.3f}; "
                f"policy: {status.get('policy: safety')}; loop: {status.get('policy: control loop')}\n" + output())


def arm_graph(hil, artifact, tmp_path, **args):
    """launch/sim.launch.yaml for arm7, started and settled: state has been flowing to the policy
    for a second (five processes starting on two cores stall each other at first)."""
    log = tmp_path / "applied.npz"
    hil.graph("sim.launch.yaml", robot="arm7", artifact=artifact, firmware_port=free_udp_port(),
              bridge_port=free_udp_port(), firmware_log=log, ramp_s=0.4, firmware_watchdog_ms=400.0,
              **{**TIMING, "max_object_age": 0.5, **args})
    wait_for(lambda: float(hil.policy("state_age_ms") or "inf") < 100.0, 40.0, "robot state at the policy",
             hil.output)
    time.sleep(1.0)
    return log


def operate(*args) -> subprocess.CompletedProcess:
    """`robotrl operate …` in a process of its own, in this test's ROS domain."""
    return subprocess.run([sys.executable, "-m", "robotrl.cli", "operate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def check_applied(log) -> None:
    """Every command the arm's firmware applied was finite and inside the joint limits."""
    applied = np.load(log)
    q = applied["q_target"]
    assert len(q) > 0 and np.isfinite(q).all()
    assert (q >= ARM.q_lower - 1e-5).all() and (q <= ARM.q_upper + 1e-5).all()


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_arm_lifts_the_cube_through_the_sim_graph(hil, tmp_path, suffix):
    """arm_lift_resfit lifts the cube by the task's lift_height and holds it, within its episode
    time, with the cube's pose travelling firmware -> /object_pose -> policy at 30 Hz."""
    artifact = ARTIFACTS / f"arm_lift_resfit{suffix}"
    cfg = task_config(load_artifact(artifact).manifest["task"]["config"])
    log = arm_graph(hil, artifact, tmp_path, world_seed=1)
    watch = CubeWatch(hil.ros.node)
    hil.start()
    hil.expect_policy("RUNNING", timeout=5.0)
    t0 = time.monotonic()
    lifted = cfg.cube.size / 2 + cfg.lift_height

    def held() -> bool:   # lifted in every pose of the last hold_s (at least two poses)
        z, n = watch.since(t0), max(2, round(cfg.hold_s * 30))
        return len(z) >= n and bool((z[-n:] >= lifted).all())
    wait_for(held, cfg.episode_s + 2.0, f"the cube to be lifted by {cfg.lift_height} m",
             lambda: watch.what_happened(hil, t0, lifted, hil.output))
    assert hil.policy() == "RUNNING"
    # 30 Hz nominal; at least 12 Hz (the policy's 0.2 s max_object_age needs 5): a loaded 2-core CI
    # machine was measured at 14-15 Hz over these ~2 s in two runs (real-time physics falls behind).
    assert len(watch.since(t0)) > 0.4 * 30 * (time.monotonic() - t0), "object_pose arrives at its rate"
    for graph, _ in hil.graphs:
        graph.stop()
    check_applied(log)


def test_operate_the_arm_from_the_command_line(hil, tmp_path):
    """Where the ros2 CLI is missing, the robotrl CLI runs the whole session: `deploy --start`
    starts the arm once perception is there, `operate` sends a command and damps, resets and
    starts it again (a refusal exits 2 saying why), and the recording's report shows the lift."""
    artifact = ARTIFACTS / "arm_lift_resfit.pt"
    cfg = task_config(load_artifact(artifact).manifest["task"]["config"])
    recording, out = tmp_path / "arm.mcap", tmp_path / "deploy.log"
    cmd = [sys.executable, "-m", "robotrl.cli", "deploy", "launch/sim.launch.yaml", "robot:=arm7",
           f"artifact:={artifact}", f"record:={recording}", f"firmware_port:={free_udp_port()}",
           f"bridge_port:={free_udp_port()}", "ramp_s:=0.4", "firmware_watchdog_ms:=400.0", "world_seed:=4",
           "max_object_age:=0.5", *(f"{k}:={v}" for k, v in {**TIMING, "max_state_age": 0.5}.items()), "--start"]
    watch = CubeWatch(hil.ros.node)
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: "[deploy] start: start: mode RAMP" in out.read_text(), 60.0, "deploy --start", out.read_text)
        t0, lifted = time.monotonic(), cfg.cube.size / 2 + cfg.lift_height
        what_happened = lambda: watch.what_happened(hil, t0, lifted, out.read_text)  # noqa: E731
        # --start starts the policy while the graph's five processes may still be loading on two
        # cores, so the wait is two episodes. CI still saw a miss at 7 s and, with this wait, one at
        # 11 s in ~25 runs: what_happened then showed the policy damped for an object pose 206 ms old
        # (the default max_object_age is 200 ms), and in the next CI twice for a state 284–289 ms old
        # (TIMING's 250 ms): this graph records every topic too, one process more on two cores. So
        # it allows 500 ms for both; the stale-state and stale-perception tests keep the faults tested.
        wait_for(lambda: (watch.since(t0) >= lifted).any(), 2 * cfg.episode_s + 3.0, "the cube to rise", what_happened)
        sent = operate("cmd_vel=[0.2,0,0]")
        assert sent.returncode == 0 and "cmd_vel [0.2, 0.0, 0.0] sent" in sent.stdout, sent
        wait_for(lambda: hil.policy("velocity_command") == "0.200, 0.000, 0.000", 5.0, "the policy to hold the "
                 "command", lambda: str(hil.ros.status.get("policy: safety")))
        assert operate("damp").stdout.strip() == "damp: mode DAMPING"
        refused = operate("start")
        assert refused.returncode == 2 and "'start' refused in DAMPING; allowed in IDLE" in refused.stderr, refused
        assert operate("reset").stdout.strip() == "reset: mode IDLE"
        assert operate("start").stdout.strip() == "start: mode RAMP"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
        print(out.read_text())
    assert code == 0 and "[deploy] stopped: recorder 0, firmware 0, bridge 0, policy 0" in out.read_text()
    summary = report(recording, tmp_path / "report")
    assert "object.png" in summary["plots"] and summary["messages"]["/object_pose"] > 30
    assert summary["object_rise_max_m"] >= cfg.lift_height and summary["object_goal_distance_m"] is None
    modes = [m["mode"] for m in summary["policy_modes"]]
    assert "DAMPING" in modes and "IDLE" in modes[modes.index("DAMPING"):], modes   # damp, then reset


def test_start_waits_for_perception_and_a_lost_camera_damps(hil, tmp_path):
    """With the world's perception off, this test is the camera: fixed above the table looking
    down, publishing in its own frame, which fixed_frames calibrates. Before its first pose, start
    is refused, saying why; while it publishes, the arm runs and sees the cube where it is in the
    base frame; when it stops, the arm damps."""
    log = arm_graph(hil, ARTIFACTS / "arm_lift_resfit.pt", tmp_path, object_pose_hz=0.0,
                    fixed_frames="camera 0.5 0 0.8 0 1 0 0")   # 0.8 m above (0.5, 0), turned over about x
    def refusal():   # once the robot state flows, what is missing is the object
        response = hil.ros.call("/policy/start", timeout=30.0)
        return "no object pose received yet" in response.message and response
    assert not wait_for(refusal, 40.0, "start to be refused for want of perception", hil.output).success
    assert hil.policy("object_pos") == "none"
    node, seeing = hil.ros.node, threading.Event()
    camera = node.create_publisher(PoseStamped, "/object_pose", CONTROL_QOS)
    seeing.set()

    def publish():   # the cube 0.775 m in front of the lens: on the table at (0.5, 0) in the base frame
        while seeing.is_set():
            camera.publish(pose_to_msg([0.0, 0.0, 0.775], [0.0, 1.0, 0.0, 0.0], node.get_clock().now().to_msg(),
                                       "camera"))
            time.sleep(1 / 30)
    threading.Thread(target=publish, daemon=True).start()
    try:
        hil.start()
        hil.expect_policy("RUNNING", timeout=5.0)
        time.sleep(0.5)
        assert hil.policy() == "RUNNING", hil.policy("fault")
        assert hil.policy("object_pos") == "0.500, 0.000, 0.025"
    finally:
        seeing.clear()
    hil.expect_policy("DAMPING", fault="object pose stale", timeout=5.0)
    for graph, _ in hil.graphs:
        graph.stop()
    check_applied(log)


def test_place_policy_gets_its_goal_and_refuses_a_pose_in_another_frame(hil, tmp_path):
    """arm_place needs the goal: the firmware's world publishes its target spot (latched), the
    policy logs it and runs; `robotrl operate goal=…` moves it. A pose in a frame other than the
    base's is dropped, named in a warning."""
    recording = tmp_path / "place.mcap"
    # Recording every topic and two `operate` processes: as in the operate test above, 500 ms of
    # state age (CI saw 253 ms against TIMING's 250 while an operate process started).
    arm_graph(hil, ARTIFACTS / "arm_place_resfit.pt", tmp_path, world_seed=2, record=recording, max_state_age=0.5)
    hil.start()
    hil.expect_policy("RUNNING", timeout=5.0)
    time.sleep(1.0)
    assert hil.policy() == "RUNNING", hil.policy("fault")
    assert "[policy] " in hil.output() and "goal: (" in hil.output()
    camera = hil.ros.node.create_publisher(PoseStamped, "/object_pose", CONTROL_QOS)
    msg = pose_to_msg([0.5, 0.0, 0.025], [1.0, 0.0, 0.0, 0.0], hil.ros.node.get_clock().now().to_msg(), "camera")
    wait_for(lambda: camera.publish(msg) or "object_pose in frame 'camera' dropped" in hil.output(), 10.0,
             "the policy to drop a pose in the camera frame", hil.output)
    assert f"needs the robot's base frame '{ARM.base_body}'" in hil.output()
    moved = operate("goal=[0.45,0.15,0]", "robot=arm7")   # the operator moves the goal
    assert moved.returncode == 0 and f"goal [0.45, 0.15, 0.0] sent in frame '{ARM.base_body}'" in moved.stdout, moved
    wait_for(lambda: "goal: (0.450, 0.150, 0.000) m" in hil.output(), 10.0, "the policy to take the new goal",
             hil.output)
    assert operate("goal=[0.9,0,0]", "robot=arm7").returncode == 0   # beyond where it learned to place
    wait_for(lambda: "goal (0.900, 0.000) is outside the area the policy was trained to place on: x [0.45, 0.55], "
             "y [0.12, 0.18] m; the goal stays [0.45, 0.15, 0.0]" in hil.output(), 10.0,
             "the policy to refuse the goal", hil.output)
    assert hil.policy() == "RUNNING", hil.policy("fault")
    for graph, _ in hil.graphs:
        graph.stop()
    summary = report(recording, tmp_path / "report")   # the three latched goals were recorded
    assert summary["messages"]["/goal"] == 3 and 0 <= summary["object_goal_distance_m"] < 1.0


def test_pose_messages_carry_ros_quaternion_order():
    """Inside robotrl a quaternion is (w, x, y, z); on the wire, geometry_msgs' (x, y, z, w)."""
    from builtin_interfaces.msg import Time
    msg = pose_to_msg([1.0, 2.0, 3.0], [0.9, 0.1, 0.2, 0.3], Time(sec=4), "base")
    o = msg.pose.orientation
    assert (o.x, o.y, o.z, o.w) == (0.1, 0.2, 0.3, 0.9) and msg.header.frame_id == "base"
    pos, quat = pose_arrays(msg)
    assert pos.tolist() == [1.0, 2.0, 3.0] and quat.tolist() == [0.9, 0.1, 0.2, 0.3]
