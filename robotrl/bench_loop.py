"""`robotrl bench loop`: the control loop's timing at 100 and 500 Hz, against two references
measured in the same run — an idle loop (this machine's own floor) and the naive
`sleep(dt)`-after-work loop that peers ship — without and with ROS 2 in the path; with ROS, also
the floor of the graph's two DDS hops (a bare rclpy ping-pong, robotrl.bench_ros)."""
from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from pathlib import Path

from real.rt_loop import RateLoop

from robotrl import WALK_ARTIFACT as DEFAULT_ARTIFACT


@contextlib.contextmanager
def emulated_firmware(robot: str, state_hz: float, peer: tuple[str, int]):
    """The emulated firmware in its own process (its physics must not share our GIL)."""
    proc = subprocess.Popen([sys.executable, "-m", "sim.emulated_firmware", "--robot", robot, "--port", "0",
                             "--state-hz", str(state_hz), "--peer", f"{peer[0]}:{peer[1]}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not m:
            raise RuntimeError(f"emulated firmware did not start: {line}{proc.stdout.read()}")
        yield m.group(1), int(m.group(2))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _stats(loop: RateLoop, seconds: float) -> dict:
    s = loop.run(duration=seconds)
    return {"mean_period_error": s.period_error, "lateness_p50_us": s.lateness_p50_us,
            "lateness_p99_us": s.lateness_p99_us, "lateness_max_us": s.lateness_max_us,
            "compute_p50_us": s.compute_p50_us, "compute_p99_us": s.compute_p99_us, "overruns": s.overruns,
            "ticks": s.ticks}


def controller_loop_stats(hz: float, seconds: float, artifact: Path, wait: str) -> dict:
    """The real tick (newest state → observation → policy → safety → command) over UDP to the
    emulated firmware in another process, driven by RateLoop with the given wait policy."""
    from real.artifact import load_artifact
    from real.controller import Controller
    from real.hardware import FirmwareHardware
    from real.robot_spec import load_robot
    spec = load_robot("kid_biped")
    hw = FirmwareHardware.udp(spec, firmware=("127.0.0.1", 9), bind=("127.0.0.1", 0))
    with emulated_firmware(spec.name, hz, hw.link.transport.address) as addr:
        hw.link.transport.peer = addr
        try:
            hw.start(timeout_s=5.0)
            ctl = Controller(load_artifact(artifact), spec, hw, max_state_age=0.1, ramp_s=0.2)
            ctl.start()
            return _stats(RateLoop(ctl.tick, hz, wait=wait), seconds)
        finally:
            hw.close()


def bench_loop(seconds: float = 5.0, rates=(100, 500), artifact: Path | None = None, ros: bool = True) -> dict:
    artifact = Path(artifact or DEFAULT_ARTIFACT)
    out: dict = {}
    for hz in rates:
        floor = _stats(RateLoop(lambda: None, hz), seconds)
        ours = controller_loop_stats(hz, seconds, artifact, "absolute")
        naive = controller_loop_stats(hz, seconds, artifact, "naive")
        r = {**ours, "floor_p99_us": floor["lateness_p99_us"], "floor_p50_us": floor["lateness_p50_us"],
             "p99_over_floor": ours["lateness_p99_us"] / max(floor["lateness_p99_us"], 1e-9),
             "naive_mean_period_error": naive["mean_period_error"], "naive_lateness_p99_us": naive["lateness_p99_us"]}
        if ros:
            from robotrl.bench_ros import ros_floor_stats, ros_loop_stats
            r.update(ros_loop_stats(hz, seconds, artifact))
            r.update(ros_floor_stats(hz, seconds))
        out[str(hz)] = r
    _print(out)
    return out


def _print(out: dict) -> None:
    cols = [("mean_period_error", "period err", "{:+.4%}"), ("naive_mean_period_error", "naive err", "{:+.2%}"),
            ("lateness_p50_us", "late p50 µs", "{:.0f}"), ("lateness_p99_us", "late p99 µs", "{:.0f}"),
            ("floor_p99_us", "floor p99 µs", "{:.0f}"), ("compute_p99_us", "compute p99 µs", "{:.0f}"),
            ("overruns", "overruns", "{}"), ("ros_latency_p99_us", "ROS s→c p99 µs", "{:.0f}"),
            ("ros_floor_p99_us", "ROS floor p99 µs", "{:.0f}")]
    print("\nbench loop (controller tick over UDP to the emulated firmware)")
    print("rate  " + "".join(f"{c[1]:>17}" for c in cols))
    for hz, r in out.items():
        print(f"{hz:>4}  " + "".join(f"{(c[2].format(r[c[0]]) if c[0] in r else '-'):>17}" for c in cols))
    for hz, r in out.items():
        if r.get("ros_restarts"):
            print(f"{hz} Hz: the ROS graph was restarted {r['ros_restarts']} time(s): a watchdog stopped a start "
                  "before the policy ran (the Fast DDS publish stall, docs/benchmarks.md)")
