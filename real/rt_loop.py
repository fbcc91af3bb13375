"""Fixed-rate loop runner that measures its own timing, plus real-time OS setup.

RateLoop(wait="absolute") keeps deadlines on a fixed grid (next_deadline += period), so the
work's duration never shifts later ticks; it wakes with a hybrid wait: time.sleep until a
spin margin before the deadline (the OS wakes sleepers late by tens of microseconds), then
spins on perf_counter_ns. RateLoop(wait="naive") is the reference that most deploy scripts
ship, time.sleep(period) after the work, so every tick is late by its compute time; it shares
all the measuring code, for benchmarks.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import math
import os
import threading
import time
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

# mlockall flags as Linux defines them on x86 and ARM (a few other architectures differ).
MCL_CURRENT, MCL_FUTURE = 1, 2


@dataclasses.dataclass
class RtReport:
    """What setup_realtime achieved; None where a step was not asked for."""
    sched_fifo: bool | None = None
    memory_locked: bool | None = None
    affinity: bool | None = None
    messages: list[str] = dataclasses.field(default_factory=list)


def setup_realtime(priority: int | None = 80, cpus: Iterable[int] | None = None,
                   lock_memory: bool = True) -> RtReport:
    """Ask for SCHED_FIFO (calling thread), mlockall (whole process) and CPU pinning (calling
    thread). A refusal is normal on shared machines: it is logged and reported, never raised."""
    report = RtReport()

    def note(ok: bool, message: str) -> bool:
        report.messages.append(message)
        log.log(logging.INFO if ok else logging.WARNING, message)
        return ok

    if priority is not None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            report.sched_fifo = note(True, f"SCHED_FIFO priority {priority} set")
        except (AttributeError, OSError) as e:
            report.sched_fifo = note(False, f"SCHED_FIFO priority {priority} not allowed ({_why(e)}); "
                                            "staying on the default scheduler")
    if lock_memory:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            report.memory_locked = note(True, "mlockall(MCL_CURRENT|MCL_FUTURE) done: no page faults on memory")
        except (AttributeError, OSError) as e:
            report.memory_locked = note(False, f"mlockall not allowed ({_why(e)}); memory may be paged")
    if cpus is not None:
        cpus = sorted(set(cpus))
        try:
            os.sched_setaffinity(0, cpus)
            report.affinity = note(True, f"pinned to CPUs {cpus}")
        except (AttributeError, OSError, ValueError) as e:
            report.affinity = note(False, f"pinning to CPUs {cpus} not allowed ({_why(e)})")
    return report


def freeze_heap() -> None:
    """Call once everything long-lived is built (torch, the artifact, a ROS node: ~10^5 objects):
    moves them out of the garbage collector's reach, so that a full collection, which would stall
    every thread of the process and the control loop with it for ~0.1 s, never walks them."""
    gc.collect()
    gc.freeze()


def _why(e: BaseException) -> str:
    if isinstance(e, AttributeError):
        return "not available on this platform"
    if isinstance(e, PermissionError):
        return f"{e.strerror}: needs root, CAP_SYS_NICE / CAP_IPC_LOCK or rtprio / memlock limits"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}, errno {e.errno}"
    return str(e)


@dataclasses.dataclass(frozen=True)
class LoopStats:
    """Totals since the run started; periods and percentiles over the last `capacity` ticks."""
    ticks: int
    overruns: int             # ticks whose work ended after the next deadline
    skipped: int              # deadlines dropped after falling more than a period behind
    nominal_period_us: float
    period_mean_us: float     # wake-up to wake-up, per deadline passed (a skipped one counts): the drift
    period_error: float       # (mean period - nominal) / nominal
    lateness_p50_us: float    # wake-up time minus its deadline
    lateness_p99_us: float
    lateness_max_us: float
    compute_p50_us: float     # time spent in the tick function
    compute_p99_us: float
    compute_max_us: float

    def summary(self) -> str:
        return (f"{self.ticks} ticks, period {self.period_mean_us:.1f} us ({self.period_error:+.3%} vs "
                f"{self.nominal_period_us:.1f}), lateness p50/p99/max {self.lateness_p50_us:.0f}/"
                f"{self.lateness_p99_us:.0f}/{self.lateness_max_us:.0f} us, compute p50/p99/max "
                f"{self.compute_p50_us:.0f}/{self.compute_p99_us:.0f}/{self.compute_max_us:.0f} us, "
                f"{self.overruns} overruns, {self.skipped} skipped")


WAIT_POLICIES = ("absolute", "naive")


class RateLoop:
    def __init__(self, tick: Callable[[], None], hz: float, wait: str = "absolute", spin_us: float = 200.0,
                 capacity: int = 10_000, rt_priority: int | None = None, cpus: Iterable[int] | None = None,
                 lock_memory: bool = False, name: str = "rt_loop"):
        """tick: called once per period. rt_priority / cpus / lock_memory: setup_realtime() is run
        in the loop's own thread when any is given; its report lands in .rt_report."""
        if wait not in WAIT_POLICIES:
            raise ValueError(f"wait must be one of {WAIT_POLICIES}, got {wait!r}")
        if hz <= 0 or capacity < 2:
            raise ValueError("hz must be > 0 and capacity >= 2")
        self.tick = tick
        self.hz = float(hz)
        self.wait = wait
        self.period_ns = round(1e9 / hz)
        self.spin_ns = round(spin_us * 1e3)
        self.capacity = capacity
        self.name = name
        self._rt = (rt_priority, None if cpus is None else list(cpus), lock_memory)
        self.rt_report: RtReport | None = None
        self._wait = self._wait_hybrid if wait == "absolute" else self._wait_sleep
        self._next_deadline = self._next_absolute if wait == "absolute" else self._next_naive
        # Ring buffer, preallocated: a tick only writes integers into it.
        self._wake = np.zeros(capacity, dtype=np.int64)
        self._lateness = np.zeros(capacity, dtype=np.int64)
        self._compute = np.zeros(capacity, dtype=np.int64)
        self._slot = np.zeros(capacity, dtype=np.int64)   # deadlines since the start, skipped ones included
        self._ticks = self._overruns = self._skipped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- running ---------------------------------------------------------------------------
    def run(self, n_ticks: int | None = None, duration: float | None = None) -> LoopStats:
        """Run in the calling thread for n_ticks, for duration seconds, or until stop()."""
        self._stop.clear()
        self._loop(n_ticks, duration)
        return self.stats()

    def start(self) -> None:
        """Run in a thread of its own until stop()."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self._stop.clear()
        self._error = None
        self._thread = threading.Thread(target=self._thread_main, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> LoopStats:
        """Stop the loop (thread or run()); re-raises an exception the tick raised in the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"{self.name} did not stop within {timeout} s (tick stuck?)")
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.stats()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _thread_main(self) -> None:
        try:
            self._loop(None, None)
        except BaseException as e:  # handed to stop(): a dead control thread must not go unnoticed
            log.exception("%s: tick raised, loop stopped", self.name)
            self._error = e

    def _loop(self, n_ticks: int | None, duration: float | None) -> None:
        if self._rt != (None, None, False):
            self.rt_report = setup_realtime(*self._rt)
        self._ticks = self._overruns = self._skipped = 0
        deadline = time.perf_counter_ns()
        end = math.inf if duration is None else deadline + duration * 1e9
        limit = math.inf if n_ticks is None else n_ticks
        while self._ticks < limit and deadline < end and not self._stop.is_set():
            self._wait(deadline)
            wake = time.perf_counter_ns()
            self.tick()
            done = time.perf_counter_ns()
            i = self._ticks % self.capacity
            self._wake[i] = wake
            self._lateness[i] = wake - deadline
            self._compute[i] = done - wake
            self._slot[i] = self._ticks + self._skipped
            self._ticks += 1
            deadline = self._next_deadline(deadline, done)

    # -- wait policies ---------------------------------------------------------------------
    def _next_absolute(self, deadline: int, done: int) -> int:
        nxt = deadline + self.period_ns
        if done > nxt:
            self._overruns += 1
            behind = done - nxt
            if behind > self.period_ns:
                # Running the missed ticks back to back would burst commands at the robot:
                # drop them and go on at the next deadline still ahead, on the same grid.
                missed = behind // self.period_ns + 1
                self._skipped += missed
                nxt += missed * self.period_ns
        return nxt

    def _next_naive(self, deadline: int, done: int) -> int:
        return done + self.period_ns   # the sleep starts after the work

    def _wait_hybrid(self, deadline: int) -> None:
        remaining = deadline - time.perf_counter_ns()
        if remaining > self.spin_ns:
            time.sleep((remaining - self.spin_ns) * 1e-9)
        while time.perf_counter_ns() < deadline:
            pass

    def _wait_sleep(self, deadline: int) -> None:
        # The naive deadline is end of work + period, so this is sleep(dt) after the work.
        time.sleep(max(0, deadline - time.perf_counter_ns()) * 1e-9)

    # -- statistics ------------------------------------------------------------------------
    def stats(self) -> LoopStats:
        ticks, n = self._ticks, min(self._ticks, self.capacity)
        nominal = self.period_ns / 1e3
        period = math.nan
        if n > 1:   # the window's first and last wake-ups, and the deadlines between them
            new, old = (ticks - 1) % self.capacity, (ticks - n) % self.capacity
            period = float(self._wake[new] - self._wake[old]) / float(self._slot[new] - self._slot[old]) / 1e3
        late, compute = _percentiles(self._lateness[:n]), _percentiles(self._compute[:n])
        return LoopStats(ticks, self._overruns, self._skipped, nominal, period, (period - nominal) / nominal,
                         *late, *compute)


def _percentiles(x_ns: np.ndarray) -> tuple[float, float, float]:
    """p50, p99, max in microseconds."""
    if x_ns.size == 0:
        return math.nan, math.nan, math.nan
    p50, p99 = np.percentile(x_ns, [50, 99]) / 1e3
    return float(p50), float(p99), float(x_ns.max()) / 1e3
