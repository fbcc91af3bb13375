"""A robot's facts, read from its one YAML file (configs/robot/<name>.yaml)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import yaml

# configs/ sits at the repository root, beside the import packages.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
JOINT_KEYS = ("name", "motor_id", "lower", "upper", "velocity", "torque", "kp", "kd", "default")


class SpecError(ValueError):
    """A robot YAML is missing a key, has a wrong type or an out-of-range value."""


@dataclasses.dataclass(frozen=True)
class RobotSpec:
    name: str
    joint_names: tuple[str, ...]
    motor_ids: np.ndarray
    q_lower: np.ndarray
    q_upper: np.ndarray
    dq_max: np.ndarray
    tau_max: np.ndarray
    kp: np.ndarray
    kd: np.ndarray
    q_default: np.ndarray
    armature: np.ndarray
    # The motors' own frame (firmware side): motor = direction·joint + zero_offset for positions,
    # direction·joint for velocities and torques (direction ±1). Wiring, not in the manifest.
    motor_direction: np.ndarray
    motor_zero_offset: np.ndarray
    # How far inside [q_lower, q_upper] the safety filter keeps targets (rad, or m for a slide
    # joint); 0 where the limit is a hard stop the joint may be driven against (a gripper).
    soft_margin: np.ndarray
    control_hz: float
    physics_hz: float
    state_hz: float   # how often the firmware reports STATE (not in the manifest: the policy never sees it)
    mjcf: str = ""
    base_body: str = ""
    imu_body: str = ""
    foot_bodies: tuple[str, ...] = ()
    quaternion_order: str = "wxyz"
    mirror_perm: np.ndarray | None = None   # index of each joint's mirror partner
    mirror_sign: np.ndarray | None = None
    source: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def n_joints(self) -> int:
        return len(self.joint_names)

    @property
    def decimation(self) -> int:
        return int(round(self.physics_hz / self.control_hz))

    def motor_position(self, q: np.ndarray) -> np.ndarray:
        """Joint angles (rad) as the motors read them."""
        return self.motor_direction * q + self.motor_zero_offset

    def joint_position(self, q_motor: np.ndarray) -> np.ndarray:
        """Motor readings (rad) as joint angles."""
        return self.motor_direction * (q_motor - self.motor_zero_offset)

    def facts(self) -> dict:
        """The robot facts that travel inside an artifact's manifest (JSON-friendly)."""
        return {
            "name": self.name,
            "joint_names": list(self.joint_names),
            "motor_ids": self.motor_ids.tolist(),
            "q_lower": self.q_lower.tolist(), "q_upper": self.q_upper.tolist(),
            "dq_max": self.dq_max.tolist(), "tau_max": self.tau_max.tolist(),
            "kp": self.kp.tolist(), "kd": self.kd.tolist(),
            "q_default": self.q_default.tolist(),
            "control_hz": self.control_hz, "physics_hz": self.physics_hz,
            "quaternion_order": self.quaternion_order,
        }


def available_robots() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "robot").glob("*.yaml"))


def load_robot(name_or_path: str | Path) -> RobotSpec:
    """Load by name (configs/robot/<name>.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "robot" / f"{name_or_path}.yaml"
        if not path.exists():
            raise SpecError(f"unknown robot '{name_or_path}'; available: {', '.join(available_robots())}")
    if not path.exists():
        raise SpecError(f"robot file not found: {path}")
    with open(path) as f:
        raw = yaml.safe_load(f)
    return spec_from_dict(raw, source=str(path))


def _num(value, key: str, where: str) -> float:
    # Finite: YAML's .nan and .inf are numbers too, and an infinite torque limit is no limit.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{where}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def spec_from_dict(raw: dict, source: str = "<dict>") -> RobotSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level")
    for key in ("name", "joints", "control_hz", "physics_hz"):
        if key not in raw:
            raise SpecError(f"{source}: missing key '{key}'")
    joints = raw["joints"]
    if not isinstance(joints, list) or not joints:
        raise SpecError(f"{source}: 'joints' must be a non-empty list")
    cols: dict[str, list] = {k: [] for k in JOINT_KEYS + ("armature", "direction", "zero_offset", "soft_margin")}
    for i, j in enumerate(joints):
        where = f"{source}: joints[{i}]"
        if not isinstance(j, dict):
            raise SpecError(f"{where}: expected a mapping")
        for key in JOINT_KEYS:
            if key not in j:
                raise SpecError(f"{where}: missing key '{key}' (a joint needs {', '.join(JOINT_KEYS)})")
        cols["name"].append(str(j["name"]))
        cols["motor_id"].append(int(j["motor_id"]))
        for key in JOINT_KEYS[2:]:
            cols[key].append(_num(j[key], key, f"{where} ({j['name']})"))
        name = j["name"]
        for key, default in (("armature", 0.0), ("direction", 1), ("zero_offset", 0.0), ("soft_margin", 0.02)):
            cols[key].append(_num(j.get(key, default), key, f"{where} ({name})"))
        if cols["direction"][-1] not in (1.0, -1.0):
            raise SpecError(f"{where} ({name}): 'direction' must be 1 or -1 (the motor turns with or against "
                            f"the joint), got {j['direction']!r}")
        if cols["lower"][-1] >= cols["upper"][-1]:
            raise SpecError(f"{where} ({name}): 'lower' {j['lower']} must be below 'upper' {j['upper']}")
        if not 0 <= 2 * cols["soft_margin"][-1] < cols["upper"][-1] - cols["lower"][-1]:
            raise SpecError(f"{where} ({name}): 'soft_margin' {cols['soft_margin'][-1]} must be >= 0 and leave a "
                            f"range inside [{j['lower']}, {j['upper']}]")
        if not cols["lower"][-1] <= cols["default"][-1] <= cols["upper"][-1]:
            raise SpecError(f"{where} ({name}): 'default' {j['default']} outside [{j['lower']}, {j['upper']}]")
        for key in ("velocity", "torque"):
            if cols[key][-1] <= 0:
                raise SpecError(f"{where} ({name}): '{key}' must be > 0, got {j[key]}")
        for key in ("kp", "kd"):
            if cols[key][-1] < 0:
                raise SpecError(f"{where} ({name}): '{key}' must be >= 0, got {j[key]}")
    names = cols["name"]
    if len(set(names)) != len(names):
        raise SpecError(f"{source}: joint names must be unique, got {names}")
    if len(set(cols["motor_id"])) != len(names):
        raise SpecError(f"{source}: motor_id values must be unique, got {cols['motor_id']}")
    control_hz = _num(raw["control_hz"], "control_hz", source)
    physics_hz = _num(raw["physics_hz"], "physics_hz", source)
    if control_hz <= 0 or physics_hz <= 0:
        raise SpecError(f"{source}: 'control_hz' and 'physics_hz' must be > 0")
    ratio = physics_hz / control_hz
    if abs(ratio - round(ratio)) > 1e-9 or ratio < 1:
        raise SpecError(f"{source}: 'physics_hz' ({physics_hz}) must be a whole multiple of "
                        f"'control_hz' ({control_hz})")
    # Motor controllers stream state at their own loop rate, not the policy's: a state stream at
    # the control rate with an unsynchronised phase makes the newest state up to a period old.
    state_hz = _num(raw.get("state_hz", physics_hz), "state_hz", source)
    if not control_hz <= state_hz <= physics_hz or abs(physics_hz / state_hz - round(physics_hz / state_hz)) > 1e-9:
        raise SpecError(f"{source}: 'state_hz' ({state_hz}) must divide 'physics_hz' ({physics_hz}) and be at least "
                        f"'control_hz' ({control_hz})")
    quat = raw.get("quaternion_order", "wxyz")
    if quat not in ("wxyz", "xyzw"):
        raise SpecError(f"{source}: 'quaternion_order' must be 'wxyz' or 'xyzw', got {quat!r}")
    perm = sign = None
    if "mirror" in raw:
        m = raw["mirror"]
        try:
            perm = np.array([names.index(n) for n in m["joints"]], dtype=np.int64)
        except (ValueError, KeyError, TypeError) as e:
            raise SpecError(f"{source}: 'mirror.joints' must list every joint name once ({e})") from None
        sign = np.asarray(m.get("signs", [1.0] * len(names)), dtype=np.float64)
        if len(perm) != len(names) or sorted(perm.tolist()) != list(range(len(names))) or sign.shape != (len(names),):
            raise SpecError(f"{source}: 'mirror' must have one entry per joint ({len(names)})")
    known = {"name", "joints", "control_hz", "physics_hz", "state_hz", "mjcf", "base_body", "imu_body",
             "foot_bodies", "quaternion_order", "mirror"}
    arr = lambda k: np.asarray(cols[k], dtype=np.float64)  # noqa: E731
    return RobotSpec(
        name=str(raw["name"]), joint_names=tuple(names), motor_ids=np.asarray(cols["motor_id"], dtype=np.int64),
        q_lower=arr("lower"), q_upper=arr("upper"), dq_max=arr("velocity"), tau_max=arr("torque"),
        kp=arr("kp"), kd=arr("kd"), q_default=arr("default"), armature=arr("armature"),
        motor_direction=arr("direction"), motor_zero_offset=arr("zero_offset"), soft_margin=arr("soft_margin"),
        control_hz=control_hz, physics_hz=physics_hz, state_hz=state_hz, mjcf=str(raw.get("mjcf", "")),
        base_body=str(raw.get("base_body", "")), imu_body=str(raw.get("imu_body", "")),
        foot_bodies=tuple(raw.get("foot_bodies", ())), quaternion_order=quat,
        mirror_perm=perm, mirror_sign=sign, source=source,
        extra={k: v for k, v in raw.items() if k not in known},
    )
