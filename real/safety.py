"""Safety filter: the last thing between a policy and the motors.

Every tick it turns desired joint position targets into the command actually sent, a
`Command(q_target, kp, kd, tau_ff)` of per-joint arrays for the motor's own PD loop
(tau = kp * (q_target - q) + kd * (0 - dq) + tau_ff). Whatever the input, the command keeps:

- q_target inside the joint limits (a soft margin inside [q_lower, q_upper]);
- q_target within max_delta of the previous tick's target;
- the PD torque it implies at the measured state within +-tau_max;
- finite gains, zero feed-forward torque.

Non-finite values, stale state, an over-speed joint or an explicit trip (e-stop) latch a fault:
from then on only the damping command goes out (kp = 0, kd = damping gain) until reset().
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from real.robot_spec import RobotSpec


class Command(NamedTuple):
    """What goes to the motors, one entry per joint in the spec's joint order."""
    q_target: np.ndarray   # rad
    kp: np.ndarray         # Nm/rad
    kd: np.ndarray         # Nm s/rad
    tau_ff: np.ndarray     # Nm


class SafetyEvent(NamedTuple):
    kind: str     # "fault": latched damping; "clamp": the command was altered; "mode": state change
    reason: str   # human-readable, names the joint and the value


class SafetyFilter:
    def __init__(self, spec: RobotSpec, max_delta: float = 0.1, max_state_age: float = 0.05,
                 soft_margin: float = 0.02, velocity_margin: float = 0.1,
                 damping_kd: float | np.ndarray | None = None):
        """max_delta: largest change of a position target per tick (rad).
        max_state_age: older robot state is a fault (s).
        soft_margin: targets stay this far inside the joint limits (rad).
        velocity_margin: fault when |dq| > dq_max * (1 + velocity_margin).
        damping_kd: damping gain per joint in the fault state; defaults to the spec's kd."""
        self.spec = spec
        self.max_delta = float(max_delta)
        self.max_state_age = float(max_state_age)
        self.lower = spec.q_lower + soft_margin
        self.upper = spec.q_upper - soft_margin
        if np.any(self.lower >= self.upper):
            raise ValueError(f"soft_margin {soft_margin} leaves no range for some joint of '{spec.name}'")
        if max_delta <= 0 or max_state_age <= 0 or velocity_margin < 0:
            raise ValueError("max_delta and max_state_age must be > 0, velocity_margin >= 0")
        self.dq_limit = spec.dq_max * (1.0 + velocity_margin)
        kd = spec.kd if damping_kd is None else damping_kd
        self.damping_kd = np.broadcast_to(np.asarray(kd, dtype=np.float64), spec.q_default.shape).copy()
        self._names = spec.joint_names
        self._prev: np.ndarray | None = None   # last sent target; seeded from the measured pose
        self.fault_reason: str | None = None

    @property
    def faulted(self) -> bool:
        return self.fault_reason is not None

    def reset(self) -> None:
        """Clear a latched fault; the next target is rate-limited from the measured pose again."""
        self.fault_reason = None
        self._prev = None

    def trip(self, reason: str) -> SafetyEvent:
        """Latch a fault from outside (e-stop, operator damp). The first reason is kept."""
        if self.fault_reason is None:
            self.fault_reason = reason
        return SafetyEvent("fault", reason)

    def damping_command(self, dq: np.ndarray) -> Command:
        """Passive command: no stiffness, only damping, target held where it was (no effect at kp=0)."""
        target = self._prev if self._prev is not None else np.clip(self.spec.q_default, self.lower, self.upper)
        dq = np.asarray(dq, dtype=np.float64)
        if dq.shape != target.shape:   # unusable speed: plain damping gain
            dq = np.full(target.shape, np.nan)
        kd = self.damping_kd * self._gain_scale(-self.damping_kd * dq)
        zeros = np.zeros_like(target)
        return Command(target.copy(), zeros, kd, zeros.copy())

    def filter(self, q_des, q, dq, state_age: float) -> tuple[Command, list[SafetyEvent]]:
        """One tick: desired targets and the measured state in, safe command and events out."""
        q_des, q, dq = (np.asarray(x, dtype=np.float64) for x in (q_des, q, dq))
        if self.faulted:
            return self.damping_command(dq), []
        fault = self._check(q_des, q, dq, state_age)
        if fault is not None:
            return self.damping_command(dq), [self.trip(fault)]

        events: list[SafetyEvent] = []
        if self._prev is None:
            self._prev = np.clip(q, self.lower, self.upper)
        # Position limits and the per-tick change together: both intervals contain the previous
        # target, so their intersection is never empty.
        lo = np.maximum(self.lower, self._prev - self.max_delta)
        hi = np.minimum(self.upper, self._prev + self.max_delta)
        target = np.clip(q_des, self.lower, self.upper)
        self._clamp_events(events, "position limit", q_des, target)
        limited = np.clip(target, lo, hi)
        self._clamp_events(events, f"rate limit ({self.max_delta} rad/tick)", target, limited)

        # Torque: the target window where |kp (t - q) - kd dq| <= tau_max, moved towards only as
        # far as the limits above allow (clip into the window, then back into [lo, hi]).
        kp, kd, tau_max = self.spec.kp, self.spec.kd, self.spec.tau_max
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            t_lo = np.where(kp > 0, q + (kd * dq - tau_max) / kp, -np.inf)
            t_hi = np.where(kp > 0, q + (kd * dq + tau_max) / kp, np.inf)
        final = np.clip(np.clip(limited, t_lo, t_hi), lo, hi)
        self._clamp_events(events, "torque limit", limited, final)
        # Where even that is not enough (joint far outside its range, or moving fast), scale both
        # gains down so the implied torque sits exactly at the limit, as the motor would saturate.
        with np.errstate(over="ignore", invalid="ignore"):
            scale = self._gain_scale(kp * (final - q) - kd * dq)
        for i in np.flatnonzero(scale < 1.0):
            events.append(SafetyEvent("clamp", f"torque limit: {self._names[i]} gains scaled x{scale[i]:.3g}"))
        self._prev = final
        return Command(final.copy(), kp * scale, kd * scale, np.zeros_like(final)), events

    def _check(self, q_des, q, dq, state_age) -> str | None:
        """The reason for a fault this tick, or None."""
        for label, x in (("state q", q), ("state dq", dq), ("desired target", q_des)):
            if x.shape != self.lower.shape:
                return f"{label} has shape {x.shape}, expected {self.lower.shape}"
            bad = np.flatnonzero(~np.isfinite(x))
            if bad.size:
                return f"non-finite {label}: {self._names[bad[0]]}={x[bad[0]]}"
        if not np.isfinite(state_age) or state_age > self.max_state_age:
            return f"stale state: age {state_age * 1e3:.1f} ms > {self.max_state_age * 1e3:.1f} ms"
        over = np.flatnonzero(np.abs(dq) > self.dq_limit)
        if over.size:
            i = over[np.argmax(np.abs(dq[over]) / self.dq_limit[over])]
            return f"velocity limit: {self._names[i]} |dq|={abs(dq[i]):.1f} > {self.dq_limit[i]:.1f}"
        return None

    def _gain_scale(self, tau: np.ndarray) -> np.ndarray:
        """Per-joint factor <= 1 that brings |tau| down to tau_max; 1 where tau is NaN (unknown dq)."""
        mag = np.abs(tau)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(mag > self.spec.tau_max, self.spec.tau_max / mag, 1.0)

    def _clamp_events(self, events: list, what: str, before: np.ndarray, after: np.ndarray) -> None:
        for i in np.flatnonzero(before != after):
            events.append(SafetyEvent("clamp", f"{what}: {self._names[i]} {before[i]:.3f} -> {after[i]:.3f}"))
