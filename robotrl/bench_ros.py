"""The ROS 2 part of `robotrl bench loop`: the sim-in-the-loop graph of launch/sim.launch.yaml
(emulated firmware node + bridge node + policy node, three processes on UDP/DDS loopback, in a
ROS domain of their own), started through the policy's ~/start service and timed for a while.

Figures (all times on CLOCK_MONOTONIC, which is one clock for every process of the machine):

  ros_latency_p50_us / _p99_us   sensor -> command latency through ROS 2 and the bridge, without
        the wait for the control tick: for each STATE that a command was computed from (its first
        command only), t(bridge sent that COMMAND frame) - t(bridge read the STATE frame off its
        socket) - tick_wait. It covers the bridge's decode and publish, DDS to the policy,
        the tick's observation / policy / safety / publish, DDS back, and the bridge's encode
        and send.
  tick_wait_p50_us / _p99_us     the wait for the next control tick that the above leaves out:
        t(the policy's tick read the state) - t(the policy's subscription received it). The policy
        loop is clock-driven (absolute deadlines), not state-driven, so this is uniform over about
        one period whatever the transport does.
  ros_latency_total_p99_us       the two together: STATE frame in -> COMMAND frame out.
  ros_mean_period_error, ros_lateness_p50_us, ros_lateness_p99_us, ros_overruns
        the policy node's own loop (its /diagnostics "control loop" status, read at the end of the
        window): period error and lateness percentiles over its last 10 000 ticks (the window and,
        at the low rates, the seconds before it), overruns counted during the window only.
  ros_restarts   starts that a watchdog stopped before the policy ran (reset and started again).

  ros_floor_p50_us / _p99_us   the same run's floor for those two DDS hops: a bare rclpy ping-pong
        between this process and an echo process (`python -m robotrl.bench_ros echo`), a JointState
        out and a Float64MultiArray back at the same rate, QoS and executor as the nodes, nothing
        else done; round trip. What the graph adds above it is the nodes' own work.

The policy node refuses a control rate other than the robot's (kid_biped: 50 Hz); to time its
loop at `hz` this starts it with its benchmark-only parameter bench_loop_hz (documented in
policy_node: the ticks run at that rate, the policy still assumes the robot's, so it does not
walk; the timing is what is measured). The firmware sends STATE at `hz` too. The latency figures
come from the benchmark-only trace (robotrl_ros.common.TRACE_ENV) that the bridge and the policy's
TopicHardware save at exit; without that variable the nodes record nothing.
"""
from __future__ import annotations

import io
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIM_LAUNCH = REPO / "launch" / "sim.launch.yaml"
# Watchdogs for a shared machine without real-time scheduling (as the ROS 2 tests use): a busy
# neighbour's stall must not damp the robot in the middle of the measurement.
TIMING = {"max_state_age": "0.25", "command_timeout_ms": "250.0", "firmware_watchdog_ms": "400.0"}
RAMP_S = 1.0   # the ramp to the default pose, in seconds of wall time
MAX_RESTARTS = 3   # starts stopped by a watchdog before the policy ran, reset and tried again


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, log: io.StringIO):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (value := predicate()):
            return value
        time.sleep(0.02)
    raise RuntimeError(f"bench ros: timed out after {timeout} s waiting for {what}\n{log.getvalue()[-4000:]}")


def _percentiles(x_ns: np.ndarray) -> tuple[float, float]:
    if x_ns.size == 0:
        return math.nan, math.nan
    p50, p99 = np.percentile(x_ns, [50, 99]) / 1e3
    return float(p50), float(p99)


def latency_from_traces(trace: Path, t0_ns: int, t1_ns: int) -> dict:
    """Pair the bridge's and the policy's traces (see the module docstring) for the states the
    bridge read in [t0_ns, t1_ns)."""
    states, sent, pol = (np.load(trace / f"{n}.npz") for n in ("bridge_states", "bridge_commands", "policy_commands"))
    rx = dict(zip(states["stamp_ns"].tolist(), states["rx_ns"].tolist()))
    crc, counts = np.unique(sent["crc"], return_counts=True)
    unique = set(crc[counts == 1].tolist())   # a CRC seen twice cannot name its command
    sent_at = {c: t for c, t in zip(sent["crc"].tolist(), sent["sent_ns"].tolist()) if c in unique}
    seen, total, wait = set(), [], []
    for stamp, recv, read, crc_ in zip(*(pol[k].tolist() for k in ("stamp_ns", "recv_ns", "read_ns", "crc"))):
        if stamp in seen:
            continue   # the first command computed from a state only (a late state is read twice)
        seen.add(stamp)
        if stamp in rx and crc_ in sent_at and t0_ns <= rx[stamp] < t1_ns:
            total.append(sent_at[crc_] - rx[stamp])
            wait.append(read - recv)
    total, wait = np.asarray(total, np.int64), np.asarray(wait, np.int64)
    lat = total - wait
    (l50, l99), (w50, w99), (t50, t99) = _percentiles(lat), _percentiles(wait), _percentiles(total)
    return {"ros_latency_p50_us": l50, "ros_latency_p99_us": l99, "ros_latency_max_us": float(lat.max()) / 1e3
            if lat.size else math.nan, "tick_wait_p50_us": w50, "tick_wait_p99_us": w99,
            "ros_latency_total_p50_us": t50, "ros_latency_total_p99_us": t99, "ros_latency_samples": int(lat.size),
            "ros_states_in_window": int(((states["rx_ns"] >= t0_ns) & (states["rx_ns"] < t1_ns)).sum())}


def _loopback_domain(domain_id: int | None) -> tuple[int, dict]:
    """A ROS domain of this benchmark's own (by pid unless given), discovery on loopback: the id and
    the environment for child processes (this process's participants get the discovery range too)."""
    domain = domain_id or (os.getpid() % 100 + 1)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return domain, {**os.environ, "ROS_DOMAIN_ID": str(domain), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}


def ros_loop_stats(hz: float, seconds: float, artifact, domain_id: int | None = None) -> dict:
    """Start the graph at control rate `hz`, start the policy, measure for `seconds`, stop it
    cleanly (SIGTERM, reverse order: the policy damps the robot on its way out); see the module
    docstring for what each returned figure means."""
    from real.robot_spec import load_robot
    from robotrl.deploy import Graph, load_launch
    domain, env = _loopback_domain(domain_id)
    with tempfile.TemporaryDirectory(prefix="bench_ros_") as tmp:
        trace = Path(tmp)
        env["ROBOTRL_LATENCY_TRACE"] = str(trace)
        # The ramp counts ticks of the robot's rate: scaled so that it lasts RAMP_S at `hz` (a
        # faster ramp trips the safety filter's velocity limit).
        ramp_s = RAMP_S * hz / load_robot("kid_biped").control_hz
        nodes = load_launch(SIM_LAUNCH, {"artifact": str(Path(artifact).resolve()), "ramp_s": repr(ramp_s),
                                         "firmware_port": str(_free_udp_port()),
                                         "bridge_port": str(_free_udp_port()), **TIMING})
        by_name = {n.name: n for n in nodes}
        by_name["firmware"].params.append(("state_hz", repr(float(hz))))
        by_name["policy"].params.append(("bench_loop_hz", repr(float(hz))))
        log = io.StringIO()
        graph = Graph(nodes, out=log, env=env)
        from robotrl.ros_client import RosClient
        client = RosClient(domain, "bench_ros")
        try:
            graph.start()
            def started():
                if (died := graph.exited()) is not None:
                    raise RuntimeError(f"bench ros: {died[0]} exited with code {died[1]}\n{log.getvalue()[-4000:]}")
                r = client.call("/policy/start", timeout=5.0)
                return (r is not None and r.success) or time.sleep(0.2)
            def ran_since(t: float):   # the mode the start ended in, from a status sent after it
                st = client.status.get("policy: safety", {})
                return st.get("t", 0.0) > t and st.get("mode") in ("RUNNING", "DAMPING", "ESTOP") and st["mode"]
            # A start that a watchdog stops before the policy runs (the Fast DDS publish stall,
            # docs/benchmarks.md) is reset and started again, as an operator would, and counted.
            restarts = 0
            while True:
                _wait(started, 60.0, "the policy to accept start", log)
                t_start = time.monotonic()
                if _wait(lambda t=t_start: ran_since(t), RAMP_S + 10.0, "the policy to ramp and run", log) == "RUNNING":
                    break
                if restarts == MAX_RESTARTS:
                    raise RuntimeError(f"bench ros: {restarts + 1} starts in a row stopped before the policy ran\n"
                                       f"{log.getvalue()[-4000:]}")
                restarts += 1
                client.call("/policy/reset", timeout=5.0)
            before = client.status.get("policy: control loop", {})
            t0 = time.monotonic_ns()
            time.sleep(seconds)
            t1 = time.monotonic_ns()
            _wait(lambda: client.status.get("policy: control loop", {}).get("t", 0) > t1 * 1e-9, 5.0,
                  "the policy's diagnostics", log)
            after = client.status["policy: control loop"]
            mode = client.status.get("policy: safety", {}).get("mode")
        finally:
            codes = graph.stop()
            client.close()
        if any(codes.values()):
            raise RuntimeError(f"bench ros: the graph did not stop cleanly: {codes}\n{log.getvalue()[-4000:]}")
        out = latency_from_traces(trace, t0, t1)
    out.update({"ros_mean_period_error": float(after["period_error"]),
                "ros_lateness_p50_us": float(after["lateness_p50_us"]),
                "ros_lateness_p99_us": float(after["lateness_p99_us"]),
                "ros_compute_p99_us": float(after["compute_p99_us"]),
                "ros_overruns": int(after["overruns"]) - int(before.get("overruns", 0)),
                "ros_ticks": int(after["ticks"]) - int(before.get("ticks", 0)),
                "ros_policy_mode_at_end": mode, "ros_restarts": restarts})
    return out


def _ping_node(name: str, domain: int):
    import rclpy
    from rclpy.experimental import EventsExecutor
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    node = rclpy.create_node(name, context=context)
    executor = EventsExecutor(context=context)
    executor.add_node(node)
    return context, node, executor


def echo_main(domain: int) -> None:
    """The echo side of ros_floor_stats: answers every `bench_ping` JointState with a
    Float64MultiArray on `bench_pong` carrying the ping's stamp, until killed."""
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray
    from robotrl_ros.messages import CONTROL_QOS
    context, node, executor = _ping_node("bench_echo", domain)
    pong = node.create_publisher(Float64MultiArray, "bench_pong", CONTROL_QOS)

    def on_ping(msg: JointState) -> None:
        out = Float64MultiArray()
        out.data = [msg.header.stamp.sec * 1e9 + msg.header.stamp.nanosec] + [0.0] * 39
        pong.publish(out)
    node.create_subscription(JointState, "bench_ping", on_ping, CONTROL_QOS)
    print("echo ready", flush=True)
    while context.ok():
        executor.spin_once(timeout_sec=0.1)


def ros_floor_stats(hz: float, seconds: float, domain_id: int | None = None) -> dict:
    """Round trip of a bare rclpy ping-pong at `hz` (see the module docstring): the floor of the
    graph's two DDS hops on this machine, measured in the same run."""
    import subprocess
    import sys
    import threading
    from sensor_msgs.msg import JointState
    from rclpy.executors import ExternalShutdownException
    from std_msgs.msg import Float64MultiArray
    from real.rt_loop import RateLoop
    from robotrl_ros.messages import CONTROL_QOS
    domain, env = _loopback_domain(domain_id)
    echo = subprocess.Popen([sys.executable, "-m", "robotrl.bench_ros", "echo", str(domain)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    context, node, executor = _ping_node("bench_ping", domain)
    rtt: list[int] = []
    t_window = [math.inf]

    def on_pong(msg: Float64MultiArray) -> None:
        now = time.monotonic_ns()
        sent = int(msg.data[0])
        if sent >= t_window[0]:
            rtt.append(now - sent)
    node.create_subscription(Float64MultiArray, "bench_pong", on_pong, CONTROL_QOS)
    ping_pub = node.create_publisher(JointState, "bench_ping", CONTROL_QOS)
    names = [f"joint_{i}" for i in range(10)]

    def ping() -> None:
        msg = JointState()
        t = time.monotonic_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(t, 10**9)
        msg.name = names
        msg.position = msg.velocity = msg.effort = [0.0] * 10
        ping_pub.publish(msg)

    def spin() -> None:
        try:
            while context.ok():
                executor.spin_once(timeout_sec=0.05)
        except ExternalShutdownException:
            pass
    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        if "echo ready" not in echo.stdout.readline():
            raise RuntimeError("bench ros: the echo process did not start")
        RateLoop(ping, hz).run(duration=2.0)   # DDS discovery and matching
        t_window[0] = time.monotonic_ns()
        RateLoop(ping, hz).run(duration=seconds)
        time.sleep(0.1)
    finally:
        echo.terminate()
        echo.wait(timeout=10)
        executor.shutdown()
        context.try_shutdown()
        spinner.join(2.0)
    p50, p99 = _percentiles(np.asarray(rtt, np.int64))
    return {"ros_floor_p50_us": p50, "ros_floor_p99_us": p99, "ros_floor_samples": len(rtt)}


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["echo"]:
        echo_main(int(sys.argv[2]))
