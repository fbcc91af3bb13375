"""Safety filter: the last thing between a policy and the motors.

Every tick it turns desired joint position targets into the command actually sent, a
`Command(q_target, kp, kd, tau_ff)` of per-joint arrays for the motor's own PD loop
(tau = kp * (q_target - q) + kd * (0 - dq) + tau_ff). Whatever the input, the command keeps:

- q_target inside the joint limits (a soft margin inside [q_lower, q_upper]);
- q_target within max_delta of the previous tick's target (by default each joint's rated velocity
  times the control period, the rule of ros2_control's joint limiters: a target that runs ahead of
  what the joint can follow only winds up the PD torque);
- the PD torque it implies at the measured state within +-tau_max;
- finite gains, zero feed-forward torque.

Non-finite values, stale state, an over-speed joint or an explicit trip (e-stop) latch a fault:
from then on only the damping command goes out (kp = 0, kd = damping gain) until reset().

`CommandLimits` is the gate for commands that need not have come through a filter: the bridge
and the (emulated) firmware drop and count any command outside the robot's limits.
"""
from __future__ import annotations

import math
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


class CommandLimits:
    """The robot's limits as a gate for commands that need not have come through a SafetyFilter:
    the bridge checks what arrives on its joint-command topic against it, and the (emulated)
    firmware what arrives on the wire. A command passes if every value is finite, targets lie in
    [lower, upper], gains between 0 and the robot config's kp and kd (the most a SafetyFilter
    sends) and |tau_ff| <= torque; with a relative slack of 1e-6 for the wire's float32."""

    FIELDS = ("q_target", "kp", "kd", "tau_ff")

    def __init__(self, spec: RobotSpec):
        self.spec = spec
        zero = np.zeros(spec.n_joints)
        self.lower = np.concatenate([spec.q_lower, zero, zero, -spec.tau_max])   # the four fields, end to end
        self.upper = np.concatenate([spec.q_upper, spec.kp, spec.kd, spec.tau_max])
        slack = 1e-6 * np.maximum(1.0, np.maximum(np.abs(self.lower), np.abs(self.upper)))
        self._lo, self._hi = self.lower - slack, self.upper + slack

    def violation(self, q_target, kp, kd, tau_ff) -> str | None:
        """None for a command inside the limits, else what is wrong with it, naming the first joint."""
        n = self.spec.n_joints
        try:
            v = np.concatenate([np.asarray(x, dtype=np.float64).reshape(n) for x in (q_target, kp, kd, tau_ff)])
        except ValueError:
            return f"a command needs {n} values of each of {', '.join(self.FIELDS)}"
        ok = (v >= self._lo) & (v <= self._hi)   # False for NaN
        if ok.all():
            return None
        i = int(np.flatnonzero(~ok)[0])
        return (f"{self.FIELDS[i // n]} of {self.spec.joint_names[i % n]} = {v[i]:.6g} is outside "
                f"[{self.lower[i]:g}, {self.upper[i]:g}]")


class SafetyFilter:
    def __init__(self, spec: RobotSpec, max_delta: float | np.ndarray | None = None, max_state_age: float = 0.05,
                 soft_margin: float | np.ndarray | None = None, velocity_margin: float = 0.1,
                 damping_kd: float | np.ndarray | None = None):
        """max_delta: largest change of a position target per tick, in the joint's units (rad, m),
            one value or one per joint; default: each joint's velocity limit / control_hz.
        max_state_age: older robot state is a fault (s).
        soft_margin: targets stay this far inside the joint limits (rad); default: the robot
            config's per-joint `soft_margin` (0.02 rad unless the YAML says otherwise).
        velocity_margin: fault when |dq| > dq_max * (1 + velocity_margin).
        damping_kd: damping gain per joint in the fault state; defaults to the spec's kd."""
        self.spec = spec
        self.max_delta = (spec.dq_max / spec.control_hz if max_delta is None
                          else np.broadcast_to(np.asarray(max_delta, dtype=np.float64), spec.q_default.shape).copy())
        self.max_state_age = float(max_state_age)
        margin = spec.soft_margin if soft_margin is None else np.broadcast_to(soft_margin, spec.q_lower.shape)
        self.lower = spec.q_lower + margin
        self.upper = spec.q_upper - margin
        if np.any(self.lower >= self.upper):
            j = int(np.flatnonzero(self.lower >= self.upper)[0])
            raise ValueError(f"soft_margin {margin[j]} leaves no range for joint '{spec.joint_names[j]}' of "
                             f"'{spec.name}' ([{spec.q_lower[j]}, {spec.q_upper[j]}])")
        # Written so that NaN fails each check (a NaN state age would never be stale).
        if not (np.all(self.max_delta > 0) and np.all(np.isfinite(self.max_delta)) and 0 < max_state_age < math.inf
                and 0 <= velocity_margin < math.inf):
            raise ValueError(f"max_delta (got {self.max_delta.tolist()}) and max_state_age (got {max_state_age}) "
                             f"must be finite and > 0, velocity_margin (got {velocity_margin}) finite and >= 0")
        self.dq_limit = spec.dq_max * (1.0 + velocity_margin)
        kd = spec.kd if damping_kd is None else damping_kd
        self.damping_kd = np.broadcast_to(np.asarray(kd, dtype=np.float64), spec.q_default.shape).copy()
        if not np.all((self.damping_kd >= 0) & (self.damping_kd <= spec.kd)):   # CommandLimits would refuse more
            raise ValueError(f"damping_kd (got {self.damping_kd.tolist()}) must lie in [0, the robot config's kd "
                             f"{spec.kd.tolist()}]")
        self._names = spec.joint_names
        # The filter's per-joint constants as Python floats (its per-tick loop reads them).
        self._per_joint = tuple(np.broadcast_to(np.asarray(x, dtype=np.float64), spec.q_default.shape).tolist()
                                for x in (self.lower, self.upper, self.max_delta, spec.kp, spec.kd, spec.tau_max))
        self._dq_limit = self.dq_limit.tolist()
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

        if self._prev is None:
            self._prev = np.clip(q, self.lower, self.upper)
        # Per joint in plain Python floats: for a robot's 10-30 joints this is several times faster
        # than ~40 numpy calls of a few µs each, and it reads like the firmware's own loop.
        position, rate, torque, gains = [], [], [], []
        final, kp_out, kd_out = [], [], []
        for i, (want, qi, dqi, prev, lower, upper, step, kp, kd, tau_max) in enumerate(zip(
                q_des.tolist(), q.tolist(), dq.tolist(), self._prev.tolist(), *self._per_joint)):
            # Position limits and the per-tick change together: both intervals contain the previous
            # target, so their intersection [lo, hi] is never empty.
            lo, hi = max(lower, prev - step), min(upper, prev + step)
            target = min(max(want, lower), upper)
            if target != want:
                position.append((i, want, target))
            limited = min(max(target, lo), hi)
            if limited != target:
                rate.append((i, target, limited))
            # Torque: the target window where |kp (t - q) - kd dq| <= tau_max, moved towards only as
            # far as the limits above allow (clip into the window, then back into [lo, hi]).
            t = limited
            if kp > 0:
                t = min(max(t, qi + (kd * dqi - tau_max) / kp), qi + (kd * dqi + tau_max) / kp)
            t = min(max(t, lo), hi)
            if t != limited:
                torque.append((i, limited, t))
            # Where even that is not enough (joint far outside its range, or moving fast), scale both
            # gains down so the implied torque sits exactly at the limit, as the motor would saturate.
            tau = abs(kp * (t - qi) - kd * dqi)
            scale = tau_max / tau if tau > tau_max else 1.0
            if scale < 1.0:
                gains.append((i, scale))
            final.append(t)
            kp_out.append(kp * scale)
            kd_out.append(kd * scale)
        names = self._names
        events = [SafetyEvent("clamp", f"{what}: {names[i]} {a:.3f} -> {b:.3f}")
                  for what, changes in (("position limit", position), ("rate limit", rate),
                                        ("torque limit", torque)) for i, a, b in changes]
        events += [SafetyEvent("clamp", f"torque limit: {names[i]} gains scaled x{g:.3g}") for i, g in gains]
        self._prev = np.array(final)
        return Command(self._prev.copy(), np.array(kp_out), np.array(kd_out), np.zeros(len(final))), events

    def _check(self, q_des, q, dq, state_age) -> str | None:
        """The reason for a fault this tick, or None."""
        for label, x in (("state q", q), ("state dq", dq), ("desired target", q_des)):
            if x.shape != self.lower.shape:
                return f"{label} has shape {x.shape}, expected {self.lower.shape}"
            values = x.tolist()
            for i, v in enumerate(values):
                if not math.isfinite(v):
                    return f"non-finite {label}: {self._names[i]}={v}"
        if not np.isfinite(state_age) or state_age > self.max_state_age:
            return f"stale state: age {state_age * 1e3:.1f} ms > {self.max_state_age * 1e3:.1f} ms"
        worst, over = None, 1.0
        for i, (v, limit) in enumerate(zip(dq.tolist(), self._dq_limit)):
            if abs(v) > limit and abs(v) / limit > over:
                worst, over = i, abs(v) / limit
        if worst is not None:
            return f"velocity limit: {self._names[worst]} |dq|={abs(dq[worst]):.1f} > {self._dq_limit[worst]:.1f}"
        return None

    def _gain_scale(self, tau: np.ndarray) -> np.ndarray:
        """Per-joint factor <= 1 that brings |tau| down to tau_max; 1 where tau is NaN (unknown dq)."""
        mag = np.abs(tau)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(mag > self.spec.tau_max, self.spec.tau_max / mag, 1.0)
