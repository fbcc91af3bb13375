"""The control tick of DESIGN.md, and the loop that runs it.

Every tick: read the newest robot state without blocking → check its age → build the
observation from the artifact's layout → run the policy → safety filter / state machine →
send the command. Other threads (ROS callbacks, a UI) only call `set_velocity_command`,
`start`, `damp`, `estop`, `reset`: they never run inside the tick.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

from firmware_bridge import Mode as FirmwareMode
from real.artifact import Artifact, check_against_robot
from real.hardware import HardwareInterface, JointCommand
from real.observations import ObservationBuilder, ObsLayout, RobotState
from real.robot_spec import RobotSpec
from real.rt_loop import RateLoop
from real.safety import SafetyEvent, SafetyFilter
from real.state_machine import ControlStateMachine, Mode


# The firmware mode each controller mode asks for (requested every tick until the state shows it).
FIRMWARE_MODE = {Mode.IDLE: FirmwareMode.IDLE, Mode.RAMP: FirmwareMode.RUNNING, Mode.RUNNING: FirmwareMode.RUNNING,
                 Mode.DAMPING: FirmwareMode.DAMPING, Mode.ESTOP: FirmwareMode.ESTOP}


class Controller:
    def __init__(self, artifact: Artifact, spec: RobotSpec, hardware: HardwareInterface, *,
                 max_state_age: float = 0.05, max_delta: float = 0.2, ramp_s: float = 1.0,
                 clock=time.monotonic):
        check_against_robot(artifact.manifest, spec)   # refuses, naming the first difference
        self.artifact, self.spec, self.hw, self.clock = artifact, spec, hardware, clock
        m = artifact.manifest
        self.layout = ObsLayout.from_manifest(m["observation"])
        self.builder = ObservationBuilder(self.layout)
        self.gait_period = float(m["task"].get("gait_period_s", 0.0))
        self.machine = ControlStateMachine(SafetyFilter(spec, max_delta=max_delta, max_state_age=max_state_age),
                                           ramp_duration=ramp_s)
        n = spec.n_joints
        self._command = np.zeros(3)
        self._command_lock = threading.Lock()
        self.phase = 0.0
        self.last_action = np.zeros(n)
        self.last_sent: JointCommand | None = None
        self.last_state = None
        self.events: collections.deque[tuple[float, SafetyEvent]] = collections.deque(maxlen=256)
        self.ticks = 0
        self._was_running = False
        self._firmware_was_running = False

    # ---- called from other threads ----
    def set_velocity_command(self, vx: float, vy: float, yaw_rate: float) -> None:
        with self._command_lock:
            self._command = np.array([vx, vy, yaw_rate], dtype=np.float64)

    def start(self) -> None:
        self.machine.start()

    def damp(self, reason: str = "damp command") -> None:
        self.machine.damp(reason)

    def estop(self, reason: str = "e-stop") -> None:
        self.machine.estop(reason)

    def reset(self) -> None:
        self.machine.reset()

    @property
    def mode(self) -> Mode:
        return self.machine.mode

    # ---- the tick ----
    def tick(self) -> JointCommand:
        state = self.hw.read()
        if state is not None:
            self.last_state = state
        s = self.last_state
        n = self.spec.n_joints
        if s is None:
            q = dq = np.full(n, np.nan)
            age = float("inf")
        else:
            q, dq, age = s.q, s.dq, self.clock() - s.stamp_s
        self._follow_firmware(s)
        running = self.machine.mode is Mode.RUNNING
        q_des = None
        if running:
            if not self._was_running:  # a fresh episode for the policy
                self.builder.reset()
                self.artifact.reset()
                self.phase = 0.0
                self.last_action[:] = 0.0
            with self._command_lock:
                command = self._command
            obs = self.builder(RobotState(q=q, dq=dq, quat=s.quat_wxyz, gyro=s.gyro, command=command,
                                          phase=np.asarray(self.phase), last_action=self.last_action,
                                          q_default=self.spec.q_default))
            action, q_des = self.artifact.step(obs)     # NaN here is caught by the safety filter
            self.last_action = action.astype(np.float64)
            if self.gait_period > 0:
                self.phase = (self.phase + 1.0 / (self.spec.control_hz * self.gait_period)) % 1.0
        self._was_running = running
        cmd, events = self.machine.step(q, dq, age, q_des)
        now = self.clock()
        for e in events:
            self.events.append((now, e))
        out = JointCommand(q_target=cmd.q_target, kp=cmd.kp, kd=cmd.kd, tau_ff=cmd.tau_ff)
        want = FIRMWARE_MODE[self.machine.mode]
        if s is None or s.firmware_mode != int(want):  # repeat until acknowledged: frames may be lost
            self.hw.request_mode(int(want))
        self.hw.write(out)
        self.last_sent = out
        self.ticks += 1
        return out

    def _follow_firmware(self, s) -> None:
        """The firmware is the last authority: if it dropped out of RUNNING on its own (its
        watchdog, a local e-stop), the controller stops too instead of pushing it back."""
        active = self.machine.mode in (Mode.RAMP, Mode.RUNNING)
        fw = None if s is None else FirmwareMode(s.firmware_mode)
        if active and self._firmware_was_running and fw in (FirmwareMode.DAMPING, FirmwareMode.ESTOP):
            self.machine.damp(f"firmware reports {fw.name}")
            active = False
        if not active:
            self._firmware_was_running = False
        elif fw is FirmwareMode.RUNNING:
            self._firmware_was_running = True

    def loop(self, **kwargs) -> RateLoop:
        """A fixed-rate loop (absolute deadlines) running this controller's tick."""
        return RateLoop(lambda: self.tick(), self.spec.control_hz, name=f"{self.spec.name}_control", **kwargs)
