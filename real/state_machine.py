"""Operating modes of the robot: IDLE -> RAMP -> RUNNING, and DAMPING / ESTOP from anywhere.

- IDLE: passive (damping only), never stiff.
- RAMP: targets interpolate from the pose measured at the first RAMP tick to q_default over
  ramp_duration; once the (filtered) targets have arrived at q_default the mode becomes RUNNING
  by itself. Targets that have not arrived 2 s after the rate limit allows (a joint that cannot
  follow them, blocked or overloaded) are a fault: DAMPING, naming the joint.
- RUNNING: policy targets go through the safety filter.
- DAMPING: after a damp command or any safety fault; left only by reset (to IDLE).
- ESTOP: latched; only reset leaves it (to IDLE), damp is refused.

Ramp targets pass the safety filter too, so a ramp faster than its rate limit simply takes
longer to arrive: the policy never starts from a pose it was not ramped to. Commands
(start/damp/estop/reset) may come from another thread than step();
a refused one raises TransitionError instead of being ignored.
"""
from __future__ import annotations

import enum
import threading

import numpy as np

from real.safety import Command, SafetyEvent, SafetyFilter


class Mode(enum.Enum):
    IDLE = "idle"
    RAMP = "ramp"
    RUNNING = "running"
    DAMPING = "damping"
    ESTOP = "estop"


class TransitionError(RuntimeError):
    """A command that is not allowed in the current mode."""


# The modes in which each command is accepted. damp/estop repeated in their own mode are no-ops:
# pressing a stop button twice must never fail.
ALLOWED = {
    "start": {Mode.IDLE},
    "damp": {Mode.IDLE, Mode.RAMP, Mode.RUNNING, Mode.DAMPING},
    "estop": set(Mode),
    "reset": {Mode.DAMPING, Mode.ESTOP},
}


class ControlStateMachine:
    def __init__(self, safety: SafetyFilter, ramp_duration: float = 2.0):
        self.safety = safety
        self.ramp_ticks = max(1, round(ramp_duration * safety.spec.control_hz))
        self.mode = Mode.IDLE
        self._lock = threading.Lock()            # commands arrive from other threads
        self._pending: list[SafetyEvent] = []    # mode events of commands, reported by the next step
        self._ramp_from: np.ndarray | None = None
        self._ramp_tick = 0
        self._ramp_deadline = 0
        self._ramp_goal = np.clip(safety.spec.q_default, safety.lower, safety.upper)   # what the filter can reach

    def start(self) -> None:
        self._command("start", Mode.RAMP, "start")

    def damp(self, reason: str = "damp command") -> None:
        self._command("damp", Mode.DAMPING, reason)

    def estop(self, reason: str = "e-stop") -> None:
        self._command("estop", Mode.ESTOP, reason)

    def reset(self) -> None:
        self._command("reset", Mode.IDLE, "reset")

    def stop_if_active(self, reason: str) -> bool:
        """RAMP or RUNNING -> DAMPING, checked and done under the lock: for stops the control tick
        decides itself (the firmware dropped out, perception went stale), where an operator's
        e-stop from another thread may have come first (it stays). True if this call damped."""
        with self._lock:
            if self.mode not in (Mode.RAMP, Mode.RUNNING):
                return False
            self.safety.trip(reason)
            self._pending += self._set(Mode.DAMPING, reason)
            return True

    def step(self, q, dq, state_age: float, q_des=None) -> tuple[Command, list[SafetyEvent]]:
        """One control tick. q_des (the policy's targets) is used only in RUNNING."""
        with self._lock:
            events, self._pending = self._pending, []
            if self.mode is Mode.RAMP:
                q_des = self._ramp_target(q)
            if self.mode not in (Mode.RAMP, Mode.RUNNING):
                return self.safety.damping_command(dq), events
            if q_des is None:   # no policy output while running is as bad as a NaN one
                q_des = np.full(self.safety.spec.n_joints, np.nan)
            command, filter_events = self.safety.filter(q_des, q, dq, state_age)
            events += filter_events
            if self.safety.faulted:
                events += self._set(Mode.DAMPING, self.safety.fault_reason)
            elif self.mode is Mode.RAMP and self._ramp_tick >= self.ramp_ticks:
                events += self._ramp_end(command.q_target)
            return command, events

    def _ramp_end(self, target: np.ndarray) -> list[SafetyEvent]:
        """RUNNING once the targets are at the default pose; DAMPING if they are still not there
        at the ramp's deadline."""
        off = np.abs(target - self._ramp_goal)
        if off.max() <= 1e-6:
            return self._set(Mode.RUNNING, "ramp complete")
        if self._ramp_tick < self._ramp_deadline:
            return []
        j = int(np.argmax(off))
        spec = self.safety.spec
        reason = (f"ramp did not reach the default pose in {self._ramp_tick / spec.control_hz:.1f} s: "
                  f"{spec.joint_names[j]} target {target[j]:.3f}, default {self._ramp_goal[j]:.3f} "
                  "(a joint that cannot follow its target?)")
        return [self.safety.trip(reason), *self._set(Mode.DAMPING, reason)]

    def _command(self, name: str, to: Mode, reason: str) -> None:
        with self._lock:
            if self.mode not in ALLOWED[name]:
                allowed = ", ".join(m.name for m in Mode if m in ALLOWED[name])
                latched = " (ESTOP is latched: reset first)" if self.mode is Mode.ESTOP else ""
                raise TransitionError(f"'{name}' refused in {self.mode.name}; allowed in {allowed}{latched}")
            if to in (Mode.DAMPING, Mode.ESTOP):
                self.safety.trip(reason)
            elif to is Mode.IDLE:
                self.safety.reset()
            elif to is Mode.RAMP:
                self._ramp_from, self._ramp_tick = None, 0
            self._pending += self._set(to, reason)

    def _set(self, to: Mode, why: str) -> list[SafetyEvent]:
        if to is self.mode:
            return []
        event = SafetyEvent("mode", f"{self.mode.name} -> {to.name}: {why}")
        self.mode = to
        return [event]

    def _ramp_target(self, q) -> np.ndarray:
        if self._ramp_from is None:
            self._ramp_from = np.clip(np.asarray(q, dtype=np.float64), self.safety.lower, self.safety.upper)
            rate_ticks = np.max(np.abs(self._ramp_goal - self._ramp_from) / self.safety.max_delta)
            self._ramp_deadline = self.ramp_ticks + int(np.ceil(rate_ticks)) + round(2.0 * self.safety.spec.control_hz)
        self._ramp_tick += 1
        alpha = min(1.0, self._ramp_tick / self.ramp_ticks)
        return (1.0 - alpha) * self._ramp_from + alpha * self.safety.spec.q_default
