"""recorder_node through `robotrl deploy record:=…`: the sim graph's topics land in an MCAP file
(renamed from .tmp on a clean stop) that mcap_ros2 decodes, and `robotrl report` plots it."""
import json
import math
import signal
import subprocess
import sys
import time

import pytest
from geometry_msgs.msg import Twist

from robotrl.cli import main as cli_main
from robotrl.report import load
from hil_rig import FIRMWARE_WATCHDOG_MS, REPO, SPEC, TIMING, free_udp_port

SIM = REPO / "launch" / "sim.launch.yaml"
PLOTS = ("tracking.png", "torques.png", "energy.png", "timing.png", "safety.png")


def test_record_sim_graph_and_report(hil, artifact, tmp_path):
    rec, out = tmp_path / "run.mcap", tmp_path / "deploy.log"
    cmd = [sys.executable, "-m", "robotrl.cli", "deploy", str(SIM), f"artifact:={artifact}", f"record:={rec}",
           f"firmware_port:={free_udp_port()}", f"bridge_port:={free_udp_port()}", "ramp_s:=0.5",
           f"firmware_watchdog_ms:={FIRMWARE_WATCHDOG_MS}", *(f"{k}:={v}" for k, v in TIMING.items())]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        pub = hil.ros.node.create_publisher(Twist, "cmd_vel", 10)
        twist = Twist()
        twist.linear.x = 0.3
        for _ in range(3):
            pub.publish(twist)
        hil.run_robot(seconds=2.0)
        for _ in range(3):
            pub.publish(twist)
        assert (tmp_path / "run.mcap.tmp").exists() and not rec.exists(), "recording goes to .tmp until stopped"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
        print(out.read_text())
    assert code == 0
    assert "[deploy] stopped: recorder 0" in out.read_text() or "recorder 0" in out.read_text()
    assert rec.is_file() and not (tmp_path / "run.mcap.tmp").exists()

    from mcap_ros2.reader import read_ros2_messages
    counts = {}
    for m in read_ros2_messages(str(rec)):
        counts[m.channel.topic] = counts.get(m.channel.topic, 0) + 1
        assert m.ros_msg is not None
    # >= 2.5 s of running at the control rate (50 Hz); allow loss on best-effort loopback.
    for topic in ("/joint_states", "/imu", "/joint_commands"):
        assert counts.get(topic, 0) >= 0.5 * 2.5 * SPEC.control_hz, counts
    assert counts.get("/diagnostics", 0) >= 5 and counts.get("/firmware_mode", 0) >= 1, counts
    assert counts.get("/cmd_vel", 0) >= 1, counts

    report_dir = tmp_path / "report"
    assert cli_main(["report", str(rec), f"out={report_dir}"]) == 0
    for name in PLOTS:
        assert (report_dir / name).stat().st_size > 1000, name
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["complete"] is True and summary["duration_s"] > 2.0 and summary["messages"] == counts
    for key in ("mean_power_w", "energy_j", "max_abs_torque_nm", "loop_lateness_p99_us", "loop_compute_p99_us"):
        assert summary[key] is not None and math.isfinite(summary[key]), (key, summary[key])
    assert summary["max_abs_torque_nm"] > 0
    assert any(m["mode"] == "RUNNING" for m in summary["policy_modes"]) or summary["policy_modes"], summary

    # Damaged on disk: reported up to the damage, saying so; too short to hold a message: named.
    damaged = tmp_path / "damaged.mcap"
    damage_a_middle_chunk(rec, damaged)
    assert cli_main(["report", str(damaged), f"out={tmp_path / 'damaged'}"]) == 0
    partial = json.loads((tmp_path / "damaged" / "summary.json").read_text())
    assert partial["complete"] is False and partial["damage"]
    assert 0 < sum(partial["messages"].values()) < sum(counts.values())
    stub = tmp_path / "stub.mcap"
    stub.write_bytes(rec.read_bytes()[:20])
    with pytest.raises(ValueError, match="stub.mcap holds no messages that can be read"):
        load(stub)


def damage_a_middle_chunk(rec, out) -> None:
    """`rec` copied into `out` in small chunks, with bytes of its middle chunk overwritten (a disk
    error): every copy then has chunks before the damage, wherever the recording's own ended."""
    from mcap.reader import make_reader
    from mcap.writer import Writer
    with open(rec, "rb") as f, open(out, "wb") as g:
        writer, ids = Writer(g, chunk_size=4096), {}
        writer.start("ros2", "robotrl test")
        for schema, channel, message in make_reader(f).iter_messages():
            if channel.id not in ids:
                sid = writer.register_schema(schema.name, schema.encoding, schema.data)
                ids[channel.id] = writer.register_channel(channel.topic, channel.message_encoding, sid)
            writer.add_message(ids[channel.id], message.log_time, message.data, message.publish_time)
        writer.finish()
    with open(out, "rb") as f:
        chunks = sorted(make_reader(f).get_summary().chunk_indexes, key=lambda c: c.chunk_start_offset)
    assert len(chunks) >= 3, len(chunks)
    middle = chunks[len(chunks) // 2]
    data = bytearray(out.read_bytes())
    at = middle.chunk_start_offset + middle.chunk_length // 2
    data[at:at + 64] = b"\xff" * 64
    out.write_bytes(bytes(data))


def test_a_killed_recorders_file_is_read_up_to_its_last_flush(hil, tmp_path):
    """A recorder killed without its shutdown (SIGKILL: a crash, a power cut) leaves `<name>.tmp`
    without MCAP's summary; `robotrl report` still reads every chunk it flushed, and says the file
    is incomplete. A file that is not MCAP at all is refused by name."""
    rec = tmp_path / "crash.mcap"
    proc = subprocess.Popen([sys.executable, "-m", "robotrl_ros.recorder_node", "--ros-args",
                             "-p", f"path:={rec}", "-p", "flush_s:=0.2"], cwd=REPO)
    try:
        pub = hil.ros.node.create_publisher(Twist, "cmd_vel", 10)
        sent, deadline = 0, time.monotonic() + 30
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(40):   # 2 s at 20 Hz: several flushes
            twist = Twist()
            twist.linear.x = 0.01 * sent
            pub.publish(twist)
            sent += 1
            time.sleep(0.05)
        time.sleep(0.5)   # past the last flush
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    tmp = tmp_path / "crash.mcap.tmp"
    assert tmp.is_file() and not rec.exists()
    out = tmp_path / "report"
    assert cli_main(["report", str(tmp), f"out={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False
    assert summary["messages"]["/cmd_vel"] >= 0.8 * sent, (summary["messages"], sent)

    garbage = tmp_path / "garbage.mcap"
    garbage.write_bytes(bytes(range(256)) * 8)
    assert cli_main(["report", str(garbage)]) == 2
