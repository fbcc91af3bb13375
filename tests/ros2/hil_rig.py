"""Hardware-in-the-loop rig for the ROS 2 nodes: real node processes (started from the launch
files through robotrl.deploy), a real emulated firmware (the MuJoCo twin behind the firmware
protocol, on UDP loopback), and this test process as one more ROS participant that calls the
services, reads /diagnostics and injects faults. Every test gets its own ROS_DOMAIN_ID, and
discovery is kept on this machine."""
from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from std_srvs.srv import Trigger

from real.robot_spec import load_robot
from robotrl import ros_client
from robotrl.deploy import Graph, NodeSpec, load_launch
from sim.emulated_firmware import EmulatedFirmware, FirmwareConfig

REPO = Path(__file__).resolve().parents[2]
# Watchdog times for a shared 2-core machine without real-time scheduling, where busy
# neighbours stall a process for 100-200 ms now and then: looser than the robot defaults (state
# age 50 ms, bridge 3 control periods = 60 ms, firmware 100 ms), in the same order. The tests
# check the mechanisms; the robot's timing comes from its own real-time settings.
TIMING = {"max_state_age": 0.25, "command_timeout_ms": 250.0}
FIRMWARE_WATCHDOG_MS = 400.0
RAMP_S = 0.5
SPEC = load_robot("kid_biped")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, context=lambda: ""):
    """Poll until predicate() is truthy and return it; fail saying what was awaited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{context()}")


class RosClient(ros_client.RosClient):
    """This test's participant in the graph's domain: a service that does not answer fails the test."""

    def call(self, service: str, timeout: float = 10.0) -> Trigger.Response:
        response = super().call(service, timeout)
        assert response is not None, f"no answer from {service} within {timeout} s"
        return response


class FirmwareProbe:
    """Instruments the in-process firmware (the real one, only observed): records the measured
    joint state at the moment each command is applied (its log holds the command only), so the
    torque a command implies can be checked, and the sim time of every mode change."""

    def __init__(self, fw: EmulatedFirmware):
        self.fw, self.measured, self.base = fw, {}, {}
        self.modes = [(0.0, fw.sim.mode)]
        sim = fw.sim
        handle, step = sim.handle_command, sim.step

        def probed_handle(msg, seq):
            n = sim.spec.n_joints   # the twin's own joint sensors: joint angles, as the log holds them
            self.measured[seq] = (sim.data.sensordata[:n].copy(), sim.data.sensordata[n:2 * n].copy())
            self.base[seq] = (sim.data.qpos.copy(), sim.data.qvel.copy())   # full twin state, for scoring
            handle(msg, seq)

        def probed_step():
            step()
            if sim.mode != self.modes[-1][1]:
                self.modes.append((sim.time, sim.mode))
        sim.handle_command, sim.step = probed_handle, probed_step

    def entered(self, mode, after: float, timeout: float = 3.0) -> float:
        """Sim time at which the firmware entered `mode` after sim time `after` (waits for it)."""
        def when():
            return next((t for t, m in self.modes if m == mode and t > after), None)
        wait_for(when, timeout, f"the firmware to enter {mode.name}", lambda: f"firmware modes: {self.modes}")
        return when()

    def check_applied(self, min_count: int = 1) -> None:
        """Every command the firmware applied was finite, inside the joint range, with gains in
        [0, spec] and a PD torque within tau_max at the state measured when it was applied."""
        applied = self.fw.applied_commands()
        assert len(applied) >= min_count, f"only {len(applied)} commands reached the firmware"
        assert self.fw.sim.rejected == 0, "the firmware rejected commands (non-finite or malformed)"
        worst = 0.0
        for c in applied:
            for a in (c.q_target, c.kp, c.kd, c.tau_ff):
                assert np.isfinite(a).all()
            assert (c.q_target >= SPEC.q_lower - 1e-5).all() and (c.q_target <= SPEC.q_upper + 1e-5).all(), c
            assert (c.kp >= 0).all() and (c.kp <= SPEC.kp + 1e-4).all() and (c.kd >= 0).all(), c
            assert (c.kd <= SPEC.kd + 1e-4).all() and (c.tau_ff == 0).all(), c
            q, dq = self.measured[c.seq]
            tau = c.kp * (c.q_target - q) - c.kd * dq + c.tau_ff
            worst = max(worst, float(np.max(np.abs(tau) / SPEC.tau_max)))
        # The safety filter bounds the torque at the state the policy saw, one link hop (a few
        # ms) before the firmware applies it; 10% covers that motion at these gains.
        assert worst <= 1.10, f"a command implied {worst:.0%} of tau_max at the firmware"
        print(f"{len(applied)} commands applied, worst implied torque {worst:.0%} of tau_max")


class Hil:
    """One test's rig: ROS client, graphs and in-process firmwares; all stopped at teardown."""

    def __init__(self, domain_id: int):
        self.ros = RosClient(domain_id, "hil_test")
        self.graphs: list[tuple[Graph, io.StringIO]] = []
        self.firmwares: list[EmulatedFirmware] = []

    def firmware(self, watchdog_ms: float = FIRMWARE_WATCHDOG_MS, gantry_s: float = 0.0
                 ) -> tuple[EmulatedFirmware, FirmwareProbe, int]:
        """A real-time emulated firmware on loopback; returns it, its probe and the bridge port
        it sends STATE to."""
        bridge_port = free_udp_port()
        fw = EmulatedFirmware(SPEC, ("127.0.0.1", 0), ("127.0.0.1", bridge_port),
                              FirmwareConfig(watchdog_ms=watchdog_ms, gantry_s=gantry_s))
        probe = FirmwareProbe(fw)
        fw.start()
        self.firmwares.append(fw)
        return fw, probe, bridge_port

    def graph(self, launch: str, **args) -> Graph:
        """The nodes of launch/<launch> with these launch arguments, started."""
        return self.nodes(*load_launch(REPO / "launch" / launch, {k: str(v) for k, v in args.items()}))

    def nodes(self, *specs: NodeSpec) -> Graph:
        out = io.StringIO()
        graph = Graph(list(specs), out=out)
        self.graphs.append((graph, out))
        graph.start()
        return graph

    def real_graph(self, artifact, bridge_port: int, fw: EmulatedFirmware, **args) -> Graph:
        """launch/real.launch.yaml (bridge + policy) against an in-process firmware."""
        return self.graph("real.launch.yaml", artifact=artifact, firmware_host="127.0.0.1",
                          firmware_port=fw.address[1], bind_host="127.0.0.1", bridge_port=bridge_port,
                          ramp_s=RAMP_S, **{**TIMING, **args})

    def running_robot(self, artifact) -> tuple[EmulatedFirmware, FirmwareProbe, Graph]:
        """launch/real.launch.yaml against a fresh emulated firmware, the robot started and running."""
        fw, probe, port = self.firmware()
        graph = self.real_graph(artifact, port, fw)
        self.run_robot(fw)
        return fw, probe, graph

    def expect_policy(self, mode: str, fault: str = "", timeout: float = 3.0) -> None:
        """Wait for the policy's safety status to show `mode`, its fault naming `fault`."""
        wait_for(lambda: self.policy() == mode, timeout, f"the policy to enter {mode}", self.output)
        assert fault in (self.policy("fault") or ""), self.policy("fault")

    def output(self) -> str:
        return "".join(out.getvalue() for _, out in self.graphs)

    def policy(self, key: str = "mode"):
        return self.ros.status.get("policy: safety", {}).get(key)

    def start(self) -> None:
        """Call /policy/start until the policy has fresh state and accepts it."""
        self.ros.status.pop("policy: safety", None)   # from here on, policy() tells the new mode
        def accepted():  # a start whose answer was lost shows as RAMP/RUNNING in diagnostics
            return (self.ros.call("/policy/start", timeout=30.0).success or self.policy() in ("RAMP", "RUNNING")
                    or time.sleep(0.2))
        wait_for(accepted, 40.0, "the policy to accept start", self.output)

    def run_robot(self, fw: EmulatedFirmware | None = None, seconds: float = 1.0, attempts: int = 3) -> None:
        """Start the robot and let the policy drive it for `seconds` at the control rate: 80% of
        the ticks (the commands the in-process firmware applied, else the loop's ticks). A shared
        machine can stall a process past a watchdog before the test's own fault comes: then
        reset and start again, as an operator would."""
        def progress() -> int:
            return len(fw.applied_commands()) if fw else int(self.ros.status["policy: control loop"]["ticks"])
        for _ in range(attempts):
            self.start()
            mode = wait_for(lambda: self.policy() in ("RUNNING", "DAMPING") and self.policy(), 10.0,
                            "the policy to ramp and run", self.output)
            if mode == "RUNNING":
                n0 = progress()
                time.sleep(seconds)
                n = progress() - n0
                if self.policy() == "RUNNING" and (fw is None or fw.mode.name == "RUNNING"):
                    assert n >= 0.8 * seconds * SPEC.control_hz, f"{n} ticks in {seconds} s\n{self.output()}"
                    return
            print(f"a watchdog tripped before the test's fault ({self.policy('fault')}): reset, start again")
            self.ros.call("/policy/reset")
        pytest.fail(f"the robot did not run for {seconds} s in {attempts} attempts\n{self.output()}")

    def close(self) -> None:
        for graph, _ in self.graphs:
            graph.stop()
        for fw in self.firmwares:
            fw.close()
        self.ros.close()
