"""The control tick of DESIGN.md, and the loop that runs it.

Every tick: read the newest robot state without blocking → check its age → build the
observation from the artifact's layout → run the policy → safety filter / state machine →
send the command. Other threads (ROS callbacks, a UI) only call `set_velocity_command`,
`set_object_pose`, `set_goal_position`, `start`, `damp`, `estop`, `reset`: they never run inside
the tick.

A tabletop policy (arm_lift, arm_place) also observes its joint targets, the gripper's width,
the tool centre point and an object: the controller keeps the targets, reads the width off the
gripper joint and computes the tool point from the kinematic chain in the manifest; the object's
pose comes from perception (`set_object_pose`; older than `max_object_age` while running: damping)
and the goal from the operator (`set_goal_position`); `start` is refused until both are there.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

from firmware_bridge import Mode as FirmwareMode
from real.artifact import Artifact, check_against_robot
from real.hardware import HardwareInterface, JointCommand
from real.kinematics import KinematicChain
from real.observations import TERMS, ObservationBuilder, ObsLayout, RobotState
from real.robot_spec import RobotSpec
from real.rt_loop import RateLoop
from real.safety import SafetyEvent, SafetyFilter
from real.state_machine import ControlStateMachine, Mode, TransitionError


# The firmware mode each controller mode asks for (requested every tick until the state shows it).
FIRMWARE_MODE = {Mode.IDLE: FirmwareMode.IDLE, Mode.RAMP: FirmwareMode.RUNNING, Mode.RUNNING: FirmwareMode.RUNNING,
                 Mode.DAMPING: FirmwareMode.DAMPING, Mode.ESTOP: FirmwareMode.ESTOP}

class InputError(ValueError):
    """The artifact observes something this robot side cannot provide."""


class Controller:
    def __init__(self, artifact: Artifact, spec: RobotSpec, hardware: HardwareInterface, *,
                 max_state_age: float = 0.05, max_delta: float | np.ndarray | None = None, ramp_s: float = 1.0,
                 max_object_age: float = 0.2, clock=time.monotonic):
        check_against_robot(artifact.manifest, spec)   # refuses, naming the first difference
        self.artifact, self.spec, self.hw, self.clock = artifact, spec, hardware, clock
        m = artifact.manifest
        self.layout = ObsLayout.from_manifest(m["observation"])
        self.inputs = self._inputs_of(m, artifact.path)
        self.kinematics = KinematicChain(m["kinematics"], spec.joint_names) if "kinematics" in self.inputs else None
        gripper = m["task"].get("gripper_width") if "gripper" in self.inputs else None
        self._gripper = None if gripper is None else (spec.joint_names.index(gripper["joint"]),
                                                      float(gripper["offset"]), float(gripper["per_position"]))
        self.max_object_age = float(max_object_age)
        self._object: tuple[np.ndarray, np.ndarray, float] | None = None   # pos, quat (w first), stamp
        self._goal: np.ndarray | None = None
        self._joint_target = spec.q_default.copy()
        self.builder = ObservationBuilder(self.layout)
        self.gait_period = float(m["task"].get("gait_period_s", 0.0))
        self.machine = ControlStateMachine(SafetyFilter(spec, max_delta=max_delta, max_state_age=max_state_age),
                                           ramp_duration=ramp_s)
        n = spec.n_joints
        # The velocity commands the policy was trained on, [low, high] per vx, vy, yaw rate: outside
        # them what it does is unknown (a teleop's 1 m/s to a walker trained up to 0.4 m/s).
        task = m["task"].get("config", {})   # the training config of the task, as the manifest carries it
        trained = task.get("command")
        self.command_range = None if trained is None else np.array(
            [trained["vx"], trained["vy"], trained["yaw_rate"]], dtype=np.float64).T   # rows: low, high
        self._command = np.zeros(3)   # until the first command: standing is what "no command" means
        # The table area the policy was trained to place on (arm_place's target x, y): a goal
        # outside it is refused rather than moved, since the object would end up elsewhere.
        area = task.get("target")
        self.goal_area = None if area is None else np.array([area["x"], area["y"]], dtype=np.float64).T
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
    def set_velocity_command(self, vx: float, vy: float, yaw_rate: float) -> np.ndarray | None:
        """The command in force from now on, clamped into the range the policy was trained on; None
        (and the previous command stays) if a value is not finite: a NaN here would reach the
        observation, and the safety filter would damp the robot for an operator's typo."""
        command = np.array([vx, vy, yaw_rate], dtype=np.float64)
        if not np.isfinite(command).all():
            return None
        if self.command_range is not None:
            command = np.clip(command, *self.command_range)
        with self._command_lock:
            self._command = command
        return command.copy()

    @property
    def velocity_command(self) -> np.ndarray:
        with self._command_lock:
            return self._command.copy()

    def set_object_pose(self, pos, quat_wxyz, stamp_s: float | None = None) -> str | None:
        """The manipulated object's pose in the robot base frame (perception); stamp_s on this
        controller's clock, default now. Returns None when it is taken, or why not (a value that
        is not finite: one bad detection must not reach the policy), and the previous pose stays,
        growing old: perception that sends nothing usable for max_object_age damps the arm."""
        pose = (np.asarray(pos, dtype=np.float64).reshape(3), np.asarray(quat_wxyz, dtype=np.float64).reshape(4),
                self.clock() if stamp_s is None else float(stamp_s))
        if not (np.isfinite(pose[0]).all() and np.isfinite(pose[1]).all() and np.isfinite(pose[2])):
            return f"object pose {pose[0].tolist()} {pose[1].tolist()} at {pose[2]} is not finite"
        with self._command_lock:
            self._object = pose
        return None

    def set_goal_position(self, pos) -> str | None:
        """Where the object should go, robot base frame (arm_place's target spot). Returns None
        when it is taken, or why it was refused (not finite, or outside the table area the policy
        was trained to place on), in which case the previous goal stays."""
        goal = np.asarray(pos, dtype=np.float64).reshape(3)
        if not np.isfinite(goal).all():
            return f"goal {goal.tolist()} is not finite"
        area = self.goal_area
        if area is not None and not ((area[0] <= goal[:2]) & (goal[:2] <= area[1])).all():
            (x0, y0), (x1, y1) = area
            return (f"goal ({goal[0]:.3f}, {goal[1]:.3f}) is outside the area the policy was trained to place on: "
                    f"x [{x0:g}, {x1:g}], y [{y0:g}, {y1:g}] m")
        with self._command_lock:
            self._goal = goal
        return None

    @property
    def object_position(self) -> np.ndarray | None:
        """The newest perceived object position (base frame), None before the first."""
        with self._command_lock:
            return None if self._object is None else self._object[0].copy()

    @property
    def goal_position(self) -> np.ndarray | None:
        with self._command_lock:
            return None if self._goal is None else self._goal.copy()

    def missing_input(self) -> str | None:
        """Why the policy could not run now for want of perception or a goal; None if it could."""
        with self._command_lock:
            obj, goal = self._object, self._goal
        if "object" in self.inputs:
            if obj is None:
                return "no object pose received yet (is perception publishing?)"
            age = self.clock() - obj[2]
            if age > self.max_object_age:
                return f"object pose is {age * 1e3:.0f} ms old (> {self.max_object_age * 1e3:.0f} ms)"
        if "goal" in self.inputs and goal is None:
            return "no goal position given yet"
        return None

    def start(self) -> None:
        """IDLE -> RAMP. Refused (TransitionError saying why) when the firmware's last state says
        it is in ESTOP (latched on the motor side: the ramp would drive a passive robot), and for a
        tabletop policy without a fresh object pose or its goal, rather than ramped into damping."""
        if self.machine.mode is Mode.IDLE:
            s = self.last_state
            if s is not None and s.firmware_mode == FirmwareMode.ESTOP:
                raise TransitionError("the firmware is in ESTOP (latched until the firmware restarts)")
            if missing := self.missing_input():
                raise TransitionError(missing)
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
                self._joint_target = np.array(q, dtype=np.float64)
            with self._command_lock:
                command, obj, goal = self._command, self._object, self._goal
            tabletop = self._tabletop(q, obj, goal) if self.inputs else {}
            if tabletop is not None:
                obs = self.builder(RobotState(q=q, dq=dq, quat=s.quat_wxyz, gyro=s.gyro, command=command,
                                              phase=np.asarray(self.phase), last_action=self.last_action,
                                              q_default=self.spec.q_default, **tabletop))
                action, q_des = self.artifact.step(obs)     # NaN here is caught by the safety filter
                self.last_action = action.astype(np.float64)
                self._joint_target = q_des
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

    @staticmethod
    def _inputs_of(m: dict, path) -> set[str]:
        """What the artifact's observation needs beyond the joint state; refuses what cannot be built."""
        needs: set[str] = set()
        for name in (t["name"] for t in m["observation"]["terms"]):
            if name not in TERMS:
                raise InputError(f"{path}: observation term '{name}' cannot be built on the robot side "
                                 f"(it builds: {', '.join(TERMS)})")
            needs |= TERMS[name].needs
        if "kinematics" in needs and "kinematics" not in m:
            raise InputError(f"{path}: observes the tool centre point but its manifest has no 'kinematics' (exported "
                             "before the robot side computed it); re-export it with `robotrl export`")
        if "gripper" in needs and "gripper_width" not in m["task"]:
            raise InputError(f"{path}: observes gripper_width but its manifest has no 'task.gripper_width'; "
                             "re-export it with `robotrl export`")
        return needs

    def _tabletop(self, q: np.ndarray, obj, goal) -> dict | None:
        """This tick's tabletop quantities, or None after damping when perception went stale."""
        out = {"joint_target": self._joint_target}
        if self.kinematics is not None:
            out["tcp"] = self.kinematics.site_position(q)
        if self._gripper is not None:
            index, offset, per_position = self._gripper
            out["gripper_width"] = np.asarray(offset + per_position * q[index])
        if "object" in self.inputs:
            age = self.clock() - obj[2]   # start() required a pose, and it is never unset
            if not age <= self.max_object_age:   # (a NaN stamp too)
                self.machine.stop_if_active(f"object pose stale: age {age * 1e3:.0f} ms > "
                                            f"{self.max_object_age * 1e3:.0f} ms (set_object_pose)")
                return None
            out["object_pos"], out["object_quat"] = obj[0], obj[1]
        if "goal" in self.inputs:
            out["goal_pos"] = goal   # start() required it, and it is never unset
        return out

    def _follow_firmware(self, s) -> None:
        """The firmware is the last authority: if it dropped out of RUNNING on its own (its
        watchdog, a local e-stop, a restart into IDLE), the controller stops too instead of
        pushing it back into RUNNING without a ramp."""
        active = self.machine.mode in (Mode.RAMP, Mode.RUNNING)
        fw = None if s is None else FirmwareMode(s.firmware_mode)
        if active and self._firmware_was_running and fw is not FirmwareMode.RUNNING:
            self.machine.stop_if_active(f"firmware reports {fw.name}")
            active = False
        if not active:
            self._firmware_was_running = False
        elif fw is FirmwareMode.RUNNING:
            self._firmware_was_running = True

    def loop(self, **kwargs) -> RateLoop:
        """A fixed-rate loop (absolute deadlines) running this controller's tick."""
        return RateLoop(lambda: self.tick(), self.spec.control_hz, name=f"{self.spec.name}_control", **kwargs)
