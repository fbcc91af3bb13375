"""TwinHardware: the robot's MuJoCo twin as a real.hardware.HardwareInterface, in process.

It runs the very firmware behaviour the emulated firmware runs (sim.emulated_firmware.
SimulatedFirmware: modes, watchdog, PD + feed-forward at the physics rate, torque limits,
float32 values in the motors' frame as on the wire), without sockets.

Time: the caller owns it. ``step()`` advances one control period of physics and makes a new
state readable; ``read``/``write``/``request_mode`` never advance time, exactly as on the robot,
where time passes whether or not the controller writes. So a controller that stops writing is
caught by the watchdog, and a run that calls ``step()`` once per control tick is deterministic.
"""
from __future__ import annotations

import time
from typing import Callable

from firmware_bridge import Mode
from firmware_bridge.protocol import SEQ_MASK
from real.hardware import HardwareInterface, HardwareState, JointCommand, check_joint_count
from real.robot_spec import RobotSpec
from sim.emulated_firmware import FirmwareConfig, SimulatedFirmware, World


class TwinHardware(HardwareInterface):
    def __init__(self, spec: RobotSpec, config: FirmwareConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, world: World | None = None):
        """clock stamps each state (HardwareState.stamp_s); pass the sim time for stamps that
        do not depend on the machine. world: what the robot works on (SimulatedFirmware)."""
        self.spec = spec
        self.sim = SimulatedFirmware(spec, config, world)  # ground truth: .base_state(), .applied_commands()
        self._clock = clock
        self._seq = 0
        self._state = HardwareState.from_msg(self.sim.state(), clock(), spec)

    def read(self) -> HardwareState:
        return self._state

    def write(self, cmd: JointCommand) -> None:
        check_joint_count(self.spec, cmd)
        self.sim.handle_command(cmd.to_msg(self.spec), self._seq)
        self._seq = (self._seq + 1) & SEQ_MASK

    def request_mode(self, mode: int) -> None:
        self.sim.request_mode(Mode(mode))

    def step(self) -> HardwareState:
        """One control period of physics; returns the new state (also what read() returns)."""
        for _ in range(self.spec.decimation):
            self.sim.step()
        self._state = HardwareState.from_msg(self.sim.state(), self._clock(), self.spec)
        return self._state

    def close(self) -> None:
        pass  # nothing to release: the twin lives in this process
