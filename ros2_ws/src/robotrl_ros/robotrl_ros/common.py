"""What the three nodes share: typed, validated parameters; diagnostics; and one `main` that
refuses to start with a clear log and a non-zero exit, spins, and shuts down cleanly."""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

import rclpy
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.experimental import EventsExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from firmware_bridge import ProtocolVersionError
from real.files import save_arrays
from real.hardware import HardwareError
from real.robot_spec import SpecError
from real.rt_loop import freeze_heap
from robotrl_ros.messages import TOPICS


# Benchmark-only latency trace (robotrl.bench_ros): when this environment variable names a
# folder, bridge_node and TopicHardware keep CLOCK_MONOTONIC (system-wide, so comparable between
# processes) timestamps of each state and command in memory and save them there at exit. Unset
# (always, outside the benchmark): nothing is recorded and nothing changes.
TRACE_ENV = "ROBOTRL_LATENCY_TRACE"


def trace_dir() -> str | None:
    return os.environ.get(TRACE_ENV) or None


def save_trace(name: str, rows: list, columns: tuple[str, ...]) -> None:
    """Write the trace rows (tuples of int64) to $ROBOTRL_LATENCY_TRACE/<name>.npz, one array per column."""
    import numpy as np
    data = np.array(rows, dtype=np.int64).reshape(-1, len(columns))
    save_arrays(os.path.join(trace_dir(), f"{name}.npz"), {c: data[:, i] for i, c in enumerate(columns)})


class ConfigError(ValueError):
    """A parameter value the node cannot run with."""


# What means "do not start": said once, clearly, then exit 1. A node adds its own (the policy
# node: artifact errors) through run(refusals=...), so the bridge never imports torch.
REFUSALS = (ConfigError, SpecError, HardwareError, ProtocolVersionError)
# Parameter checks for `RobotNode.param(..., *PORT)`.
PORT = (lambda v: 0 < v < 65536, "a UDP port in 1..65535")
BIND_PORT = (lambda v: 0 <= v < 65536, "a UDP port in 0..65535 (0: any free one)")


class RobotNode(Node):
    """A node built in __init__ (refusing bad configurations there), whose threads begin in
    `start()`, with a `failure` (set from any thread when it can no longer run: main then exits
    non-zero) and a `close()` that leaves the robot passive."""

    failure: str | None = None

    def start(self) -> None:
        pass

    def param(self, name: str, default, description: str, check: Callable[[object], bool] | None = None,
              must: str = ""):
        """Declare a read-only parameter (type from the default) and return its value; raises
        ConfigError naming the parameter when `check` fails (`must` says what it must be)."""
        floating = isinstance(default, float)
        # Doubles accept an integer override (`ramp_s:=1`), which rclpy would refuse as the wrong type.
        desc = ParameterDescriptor(description=description, read_only=True, dynamic_typing=floating)
        try:
            value = self.declare_parameter(name, default, desc).value
        except InvalidParameterTypeException as e:   # world_seed:=x for an integer: rclpy's traceback
            kind = {bool: "true or false", int: "an integer", str: "a string"}.get(type(default), "a list")
            raise ConfigError(f"parameter '{name}' must be {kind}: {e}") from None
        if floating:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"parameter '{name}' must be a number, got {value!r}")
            value = float(value)
        if check is not None and not check(value):
            raise ConfigError(f"parameter '{name}' = {value!r}: must be {must}")
        return value

    def topic_params(self, keys) -> dict[str, str]:
        return {k: self.param(f"topics.{k}", TOPICS[k], f"name of the {k} topic", bool, "a topic name")
                for k in keys}

    def close(self) -> None:
        pass


def status(name: str, level: int, message: str, hardware_id: str, values: dict) -> DiagnosticStatus:
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])


OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


_stop_requested = threading.Event()


def _request_stop(*_):
    # Only a flag. An exception raised from a signal handler lands wherever the main thread is,
    # which can be inside a pybind11 callback of the executor converting a message: rclpy then
    # raises "Unable to convert call argument '0' to Python object" instead, and the node died with
    # exit code 1 on a plain Ctrl-C (seen in `robotrl bench loop` at 500 Hz).
    _stop_requested.set()


def run(make_node: Callable[[], RobotNode], name: str, argv: list[str] | None = None,
        refusals: tuple[type[Exception], ...] = ()) -> int:
    """Build the node, start it, spin it until Ctrl-C / SIGTERM or its failure, close it. rclpy's own
    signal handlers are off: they would invalidate the context before close() could send the
    last (damping) messages, so SIGINT and SIGTERM set a flag that the spin loop checks every
    0.1 s (a signal during start-up takes effect once the node is built)."""
    rclpy.init(args=sys.argv if argv is None else argv, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    log = rclpy.logging.get_logger(name)
    node, code = None, 0
    try:
        node = make_node()
        freeze_heap()   # everything built so far lives as long as the node
        node.start()
        # rclpy's EventsExecutor (C++, Jazzy): sensor -> command through the graph measured at
        # p50 1.3-2.0 ms / p99 2.3-4.2 ms at 500 Hz against 2.0-2.3 / 6.1-6.7 ms with the Python
        # SingleThreadedExecutor, whose overruns it also cut from ~500 to <100 in 4 s (robotrl bench loop).
        executor = EventsExecutor()
        executor.add_node(node)
        while node.failure is None and not _stop_requested.is_set():
            executor.spin_once(timeout_sec=0.1)
    except REFUSALS + refusals as e:
        log.fatal(f"refusing to start: {e}")
        code = 1
    finally:
        if node is not None:
            if node.failure is not None:
                log.fatal(node.failure)
                code = 1
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return code
