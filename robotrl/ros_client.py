"""This process as one more participant of a deploy graph's ROS domain: it calls the nodes'
Trigger services and keeps the newest /diagnostics status of each name. Used by
`robotrl bench loop` and the hardware-in-the-loop tests; rclpy is imported here only."""
from __future__ import annotations

import threading
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions
from std_srvs.srv import Trigger


class RosClient:
    """Spun in a thread of its own, in a context of its own (so several can live in one process)."""

    def __init__(self, domain_id: int, name: str = "robotrl_client"):
        self.context = rclpy.Context()
        # No arguments (not this process's argv: `robotrl deploy`'s name:=value would read as remaps)
        # and no signal handlers: Ctrl-C stays the host program's KeyboardInterrupt.
        rclpy.init(args=[], context=self.context, domain_id=domain_id,
                   signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.status: dict[str, dict] = {}   # name -> message, "t" (monotonic s received) and the values
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:   # shutting down
                return

    def _on_diagnostics(self, msg):
        for s in msg.status:
            self.status[s.name] = {"message": s.message, "t": time.monotonic(), **{kv.key: kv.value for kv in s.values}}

    def call(self, service: str, timeout: float = 10.0) -> Trigger.Response | None:
        """Call a Trigger service; None if it is not there or did not answer within `timeout`. A
        reply can be lost while DDS is still matching the reply path (a known ROS 2 first-call race
        on a loaded host): the request is repeated within the timeout rather than given up."""
        client = self.node.create_client(Trigger, service)
        try:
            end = time.monotonic() + timeout
            if not client.wait_for_service(timeout_sec=timeout):
                return None
            # One event for all the requests sent, and a late reply to an earlier one answers the
            # call too (with an event per request, that reply woke the newest request's wait before
            # its own reply had come, and the call returned None: "no answer").
            answered = threading.Event()
            futures = []
            while time.monotonic() < end:
                futures.append(client.call_async(Trigger.Request()))
                futures[-1].add_done_callback(lambda _: answered.set())
                if answered.wait(min(3.0, max(0.1, end - time.monotonic()))):
                    return next(f.result() for f in futures if f.done())
            return None
        finally:
            self.node.destroy_client(client)

    def close(self):
        self.executor.shutdown()   # ends _spin
        self._thread.join(2.0)
        self.node.destroy_node()
        self.context.try_shutdown()
