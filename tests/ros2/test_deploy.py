"""`robotrl deploy`: the launch-file subset it reads, the sim-in-the-loop graph end to end
(launch/sim.launch.yaml: emulated firmware + bridge + policy processes), and the refusals."""
import re
import signal
import subprocess
import sys
import zlib

import numpy as np
import pytest
import yaml

from firmware_bridge import Mode, StateMsg, UdpTransport, encode
from real.artifact import load_artifact
from real.robot_spec import CONFIG_DIR
from robotrl.cli import main as cli_main
from robotrl.deploy import LaunchFileError, NodeSpec, load_launch
from hil_rig import FIRMWARE_WATCHDOG_MS, REPO, SPEC, TIMING, free_udp_port, wait_for

SIM = REPO / "launch" / "sim.launch.yaml"


def write_launch(tmp_path, entries) -> str:
    path = tmp_path / "t.launch.yaml"
    path.write_text(yaml.safe_dump({"launch": entries}))
    return str(path)


def test_nodes_import_no_policy_runtime_they_do_not_run():
    """torch costs ~1.3 s of CPU to import, paid by every process at once when a graph starts on a
    2-core machine: only a policy node given a TorchScript artifact imports it. The firmware node
    reads its world's task from the manifest alone, the bridge and recorder run no policy."""
    code = ("import sys, robotrl_ros.policy_node, robotrl_ros.firmware_node, robotrl_ros.bridge_node, "
            "robotrl_ros.recorder_node; print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out


def test_launch_files_resolve_to_the_packaged_nodes():
    nodes = load_launch(SIM, {"artifact": "/a/p.pt", "firmware_log": ""})
    assert [n.name for n in nodes] == ["firmware", "bridge", "policy"]
    policy = nodes[2].command()
    assert policy[1:3] == ["-m", "robotrl_ros.policy_node"]
    assert policy[policy.index("--ros-args"):][:3] == ["--ros-args", "-r", "__node:=policy"]
    assert "artifact:='/a/p.pt'" in policy and "log_path:=''" in nodes[0].command()
    real = load_launch(REPO / "launch" / "real.launch.yaml", {"artifact": "p.pt", "firmware_host": "10.0.0.2"})
    assert [n.name for n in real] == ["bridge", "policy"]
    assert ("firmware_host", "10.0.0.2") in real[0].params


@pytest.mark.parametrize("entries, args, says", [
    ([{"arg": {"name": "a"}}], {}, "argument 'a' is required"),
    ([{"arg": {"name": "a", "default": "1"}}], {"b": "2"}, "unknown argument(s) b; it declares: a"),
    ([{"include": {"file": "x"}}], {}, "'include'; deploy supports 'arg' and 'node'"),
    ([{"node": {"pkg": "robotrl_ros", "exec": "x", "respawn": True}}], {}, "unsupported key(s) ['respawn']"),
    ([{"node": {"pkg": "p", "exec": "x", "param": [{"name": "a", "value": "$(find-pkg-share p)"}]}}], {},
     "unsupported substitution '$(find-pkg-share p)'"),
    ([{"node": {"pkg": "p", "exec": "x", "param": [{"name": "a", "value": "$(var nope)"}]}}], {},
     "$(var nope) names no argument"),
    ([{"arg": {"name": "a", "default": ""}}, {"node": {"pkg": "p", "exec": "x", "param": [
        {"name": "b", "value": "$(var a)"}]}}], {}, "the value is empty; quote it"),
])
def test_launch_file_errors_name_the_problem(tmp_path, entries, args, says):
    with pytest.raises(LaunchFileError) as e:
        load_launch(write_launch(tmp_path, entries), args)
    assert says in str(e.value)


def test_unknown_executable_and_cli_errors(capsys):
    with pytest.raises(LaunchFileError, match="no executable 'nope'; it has: bridge_node, firmware_node, policy_node"):
        NodeSpec("robotrl_ros", "nope", "n").command()
    assert cli_main(["deploy", str(SIM), "robot:=kid_biped"]) == 2
    assert "argument 'artifact' is required" in capsys.readouterr().err
    assert cli_main(["deploy", str(SIM), "artifact:=x.pt", "--print"]) == 0
    assert "[policy] " in capsys.readouterr().out
    assert cli_main(["deploy", str(REPO / "docs" / "artifacts" / "kid_biped_walk_eco.pt")]) == 2   # not text
    assert "kid_biped_walk_eco.pt is not a launch file: it is not text" in capsys.readouterr().err


def test_sim_in_the_loop_through_robotrl_deploy(hil, artifact, tmp_path):
    """The whole graph from the launch file, in real time: start ramps and runs it at the rate,
    commands reach the firmware within limits, Ctrl-C leaves the robot passive and exits 0."""
    log, out = tmp_path / "applied.npz", tmp_path / "deploy.log"
    cmd = [sys.executable, "-m", "robotrl.cli", "deploy", str(SIM), f"artifact:={artifact}",
           f"firmware_port:={free_udp_port()}", f"bridge_port:={free_udp_port()}", f"firmware_log:={log}",
           "ramp_s:=0.5", f"firmware_watchdog_ms:={FIRMWARE_WATCHDOG_MS}",
           *(f"{k}:={v}" for k, v in TIMING.items())]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    text = out.read_text
    try:
        hil.run_robot(seconds=2.0)
        stats = hil.ros.status["policy: control loop"]
        assert stats["nominal_period_us"] == "20000.0" and abs(float(stats["period_error"])) < 0.2, stats
        assert int(hil.ros.status["firmware: emulated firmware"]["applied_commands"]) > 0
        assert hil.ros.status["bridge: firmware link"]["message"] == "forwarding"
        # An operator's command beyond what the walker was trained on reaches it clamped.
        vx_max = load_artifact(artifact).manifest["task"]["config"]["command"]["vx"][1]
        assert cli_main(["operate", "cmd_vel=[5,0,0]"]) == 0
        wait_for(lambda: hil.policy("velocity_command") == f"{vx_max:.3f}, 0.000, 0.000", 5.0,
                 "the policy to hold the clamped command", lambda: str(hil.ros.status.get("policy: safety")))
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
        print(text())
    assert code == 0
    assert f"cmd_vel [5.0, 0.0, 0.0] clamped to [{vx_max}, 0.0, 0.0]: the policy was trained on vx [0, {vx_max:g}]" \
        in text()
    assert "[deploy] stopped: firmware 0, bridge 0, policy 0" in text()
    assert "[policy] " in text() and "[firmware] " in text()
    assert "in mode DAMPING" in text(), "the clean shutdown must leave the firmware passive"
    applied = np.load(log)
    t, q, kp, kd, ff = (applied[k] for k in ("t", "q_target", "kp", "kd", "tau_ff"))
    assert len(t) >= 0.8 * 2.5 * SPEC.control_hz, f"{len(t)} commands applied"
    assert np.isfinite(np.stack([q, kp, kd, ff])).all()
    assert (q >= SPEC.q_lower - 1e-5).all() and (q <= SPEC.q_upper + 1e-5).all()
    assert (kp >= 0).all() and (kp <= SPEC.kp + 1e-4).all() and (kd >= 0).all() and (kd <= SPEC.kd + 1e-4).all()
    assert (ff == 0).all() and kp.max() > 0, "stiff commands (ramp and policy) reached the firmware"
    assert np.abs(q - SPEC.q_default).max(axis=1).min() < 1e-3, "the ramp ends on the default pose"


def test_no_node_outlives_a_killed_deploy(tmp_path):
    """deploy SIGKILLed (no chance to stop its graph): the kernel sends each node SIGTERM
    (PR_SET_PDEATHSIG), so no bridge is left holding the robot's port."""
    launch = write_launch(tmp_path, [{"node": {"pkg": "robotrl_ros", "exec": "bridge_node", "name": "bridge",
                                               "param": [{"name": "robot", "value": "kid_biped"},
                                                         {"name": "bind_port", "value": str(free_udp_port())},
                                                         {"name": "firmware_port", "value": str(free_udp_port())}]}}])
    out = tmp_path / "deploy.log"
    with open(out, "w") as f:
        deploy = subprocess.Popen([sys.executable, "-m", "robotrl.cli", "deploy", launch], stdout=f,
                                  stderr=subprocess.STDOUT, cwd=REPO)
    started = wait_for(lambda: re.search(r"started bridge \(pid (\d+)\)", out.read_text()), 30, "the bridge to start")
    bridge = int(started[1])
    wait_for(lambda: "[bridge] " in out.read_text().split("started bridge", 1)[1], 30, "the bridge's first line")
    deploy.kill()
    deploy.wait(10)
    wait_for(lambda: not running(bridge), 10, f"the bridge (pid {bridge}) to end with deploy")


def running(pid: int) -> bool:
    """Whether pid is still a running process (a zombie, ended but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_manifest_mismatch_refused_and_graph_stopped(hil, artifact, tmp_path):
    raw = yaml.safe_load((CONFIG_DIR / "robot" / "kid_biped.yaml").read_text())
    raw["joints"][0]["kp"] = 30.0
    variant = tmp_path / "kid_biped_stiffer.yaml"
    variant.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "robotrl.cli", "deploy", "launch/real.launch.yaml",
                           f"artifact:={artifact}", f"robot:={variant}", "firmware_host:=127.0.0.1",
                           f"firmware_port:={free_udp_port()}", "bind_host:=127.0.0.1",
                           f"bridge_port:={free_udp_port()}"],
                          cwd=REPO, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1, proc.stdout
    assert ("refusing to start: artifact trained for 'kid_biped', robot config 'kid_biped' "
            f"({variant}): kp of joint 'hip_yaw_l' is 15.0 in the artifact but 30.0 on the robot") in proc.stdout
    assert "[deploy] policy exited with code 1: stopping the graph" in proc.stdout
    assert "bridge 0" in proc.stdout


def test_policy_node_refuses_bad_configuration(hil, artifact):
    cases = {"artifact not found: /nonexistent/policy.pt": {"artifact": "/nonexistent/policy.pt"},
             "unknown robot 'nobot'; available: ": {"robot": "nobot"},
             "control_hz is 100.0 but robot 'kid_biped'": {"control_hz": "100.0"},
             "parameter 'fixed_frames': fixed frame 'camera 0 0 0.8'": {"fixed_frames": "'camera 0 0 0.8'"}}
    procs = {says: subprocess.Popen(NodeSpec("robotrl_ros", "policy_node", "policy", params=list(
        {"artifact": str(artifact), **params}.items())).command(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for says, params in cases.items()}   # all at once: torch loads slowly
    for says, proc in procs.items():
        output = proc.communicate(timeout=90)[0]
        assert proc.returncode == 1 and f"refusing to start: {says}" in output, output


def test_recorder_and_firmware_refuse_bad_parameters_by_name(hil, tmp_path):
    """A recording path that cannot be written is refused at start, not when the graph stops and
    the recording is lost; a parameter of the wrong type is named, not rclpy's traceback."""
    cases = {f"path={tmp_path} is a folder; path names a file": NodeSpec(
                 "robotrl_ros", "recorder_node", "recorder", params=[("path", f"'{tmp_path}'")]),
             "parameter 'world_seed' must be an integer": NodeSpec(
                 "robotrl_ros", "firmware_node", "firmware", params=[("world_seed", "x")])}
    procs = {says: subprocess.Popen(spec.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for says, spec in cases.items()}
    for says, proc in procs.items():
        output = proc.communicate(timeout=90)[0]
        assert proc.returncode == 1 and f"refusing to start: {says}" in output, output


def test_bridge_refuses_firmware_of_another_protocol_version(hil):
    firmware = UdpTransport(("127.0.0.1", 0))
    port = free_udp_port()
    firmware.peer = ("127.0.0.1", port)
    graph = hil.nodes(NodeSpec("robotrl_ros", "bridge_node", "bridge", params=[
        ("firmware_port", str(firmware.address[1])), ("bind_host", "127.0.0.1"), ("bind_port", str(port))]))
    n = SPEC.n_joints
    frame = bytearray(encode(StateMsg(SPEC.q_default, np.zeros(n), np.zeros(n), np.zeros(n), [1, 0, 0, 0],
                                      np.zeros(3), [0, 0, 9.81], Mode.IDLE, 0, 0), 0))
    frame[2] = 2   # the same frame as protocol v2 would send it, CRC intact
    frame[-4:] = zlib.crc32(frame[:-4]).to_bytes(4, "little")
    try:
        def exited():
            firmware.send(bytes(frame))
            return graph.exited()
        name, code = wait_for(exited, 30.0, "the bridge to refuse", hil.output)
    finally:
        firmware.close()
    assert code == 1
    assert "refusing to run: the other end speaks firmware protocol v2, this bridge speaks v1" in hil.output()


def test_operate_says_what_is_wrong(hil, capsys, monkeypatch):
    """`robotrl operate` with no graph in the domain (the hil fixture's own), or a wrong request:
    exit 2 and the reason."""
    cases = {("start", "wait=1"): "no answer from /policy/start within 1 s (is the graph running, in ROS_DOMAIN_ID",
             ("jump",): "unknown action 'jump'; the policy node offers: start, damp, estop, reset",
             ("goal=[0.4,0.1,0]",): "goal needs robot=<name>",
             ("cmd_vel=[0.2,0]",): "cmd_vel must be 3 finite numbers like [0,0,0]",
             ("cmd_vel=[0.2,0,0]", "node=walker", "wait=1"): "node 'walker' did not subscribe to cmd_vel within 1 s",
             ("start", "cmd_vel=[0.2,0,0]"): "operate does one thing per call, got start and cmd_vel=",
             ("start", "node=bad/name!"): "node=bad/name!: a ROS 2 node name",
             ("start", "wait=inf"): "wait must be a number >= 0, got 'inf'",
             (): "operate needs one of start, damp, estop, reset"}
    for args, says in cases.items():
        assert cli_main(["operate", *args]) == 2, args
        assert says in capsys.readouterr().err, (args, says)
    monkeypatch.setenv("ROS_DOMAIN_ID", "300")
    assert cli_main(["operate", "start"]) == 2
    assert "ROS_DOMAIN_ID must be an integer in 0..232, got '300'" in capsys.readouterr().err
