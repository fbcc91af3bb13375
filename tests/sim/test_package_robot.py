"""A robot whose MJCF ships in an installed Python package (franka_panda: gymnasium-robotics'
Panda): the twin equals the config, its joint angles are the real arm's, it holds its pose."""
import importlib.util

import mujoco
import numpy as np
import pytest
import yaml

from real.robot_spec import load_robot, spec_from_dict
from sim.twin import build_twin, joint_indices

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("gymnasium_robotics") is None,
    reason="franka_panda's MJCF comes from gymnasium-robotics, not installed (pip install -e '.[models]')")


@pytest.fixture(scope="module")
def panda():
    r = load_robot("franka_panda")
    m = build_twin(r)
    return r, m


@needs_package
def test_twin_matches_robot_config(panda):
    r, m = panda
    qadr, dadr, aids = joint_indices(m, r)
    assert [m.actuator(i).name for i in range(m.nu)] == list(r.joint_names)  # only ours, in YAML order
    assert [m.joint(m.actuator_trnid[i, 0]).name for i in aids] == list(r.joint_names)
    jids = m.actuator_trnid[aids, 0]
    np.testing.assert_allclose(m.jnt_range[jids], np.stack([r.q_lower, r.q_upper], axis=1))
    assert m.jnt_limited[jids].all()
    np.testing.assert_allclose(m.dof_armature[dadr], r.armature)
    np.testing.assert_allclose(m.actuator_gainprm[aids, 0], r.kp)
    np.testing.assert_allclose(m.actuator_biasprm[aids, 1], -r.kp)
    np.testing.assert_allclose(m.actuator_biasprm[aids, 2], -r.kd)
    np.testing.assert_allclose(m.actuator_forcerange[aids], np.stack([-r.tau_max, r.tau_max], axis=1))
    assert m.actuator_forcelimited[aids].all()
    assert m.opt.timestep == pytest.approx(1.0 / r.physics_hz)
    assert r.decimation == 20
    # the second finger is passive and follows the first
    assert m.njnt == r.n_joints + 1 and m.neq == 1
    assert m.joint(m.eq_obj2id[0]).name == r.extra["gripper_joint"]


def _franka_dh_flange(q: np.ndarray) -> np.ndarray:
    """Franka's published kinematics (Craig's modified DH): the pose of frame 7 in the base."""
    dh = [(0, 0.333, 0), (0, 0, -np.pi / 2), (0, 0.316, np.pi / 2), (0.0825, 0, np.pi / 2),
          (-0.0825, 0.384, -np.pi / 2), (0, 0, np.pi / 2), (0.088, 0, np.pi / 2)]
    t = np.eye(4)
    for (a, d, alpha), theta in zip(dh, q):
        ca, sa, ct, st = np.cos(alpha), np.sin(alpha), np.cos(theta), np.sin(theta)
        t = t @ np.array([[ct, -st, 0, a], [st * ca, ct * ca, -sa, -sa * d], [st * sa, ct * sa, ca, ca * d],
                          [0, 0, 0, 1]])
    return t


@needs_package
def test_joint_angles_are_the_real_arms(panda):
    """The package's joint6/joint7 zeros differ from Franka's; the YAML's ref edits put them back,
    so the same angles give the same flange pose as Franka's kinematics."""
    r, m = panda
    d = mujoco.MjData(m)
    qadr, _, _ = joint_indices(m, r)
    rng = np.random.default_rng(0)
    for q in [r.q_default[:7]] + [rng.uniform(r.q_lower[:7], r.q_upper[:7]) for _ in range(5)]:
        d.qpos[qadr[:7]] = q
        mujoco.mj_kinematics(m, d)
        t = _franka_dh_flange(q)
        np.testing.assert_allclose(d.body("panda0_link7").xpos, t[:3, 3], atol=1e-3)
        np.testing.assert_allclose(d.body("panda0_link7").xmat.reshape(3, 3), t[:3, :3], atol=3e-3)
    d.qpos[qadr[:7]] = r.q_default[:7]
    mujoco.mj_kinematics(m, d)  # Franka's ready pose: the fingertips 0.307 m ahead, 0.487 m up
    np.testing.assert_allclose(d.site(r.extra["ee_site"]).xpos, [0.307, 0.0, 0.487], atol=2e-3)


def _settle(m, r, q0, target, seconds: float):
    d = mujoco.MjData(m)
    qadr, _, aids = joint_indices(m, r)
    mimic = m.joint("robot:panda0_finger_joint2").qposadr[0]
    d.qpos[qadr] = q0
    d.qpos[mimic] = q0[-1]
    d.ctrl[aids] = target
    mujoco.mj_forward(m, d)
    assert d.ncon == 0, "the arm touches itself or the floor in its start pose"
    for _ in range(int(round(seconds * r.physics_hz))):
        mujoco.mj_step(m, d)
    return d.qpos[qadr], d.qpos[mimic], d.qvel


@needs_package
def test_holds_default_pose_under_gravity(panda):
    r, m = panda
    assert np.linalg.norm(m.opt.gravity) == pytest.approx(9.81)
    q, mimic, qvel = _settle(m, r, r.q_default, r.q_default, 1.0)
    np.testing.assert_allclose(q, r.q_default, atol=1e-3)
    assert mimic == pytest.approx(r.q_default[-1], abs=1e-3)
    assert np.abs(qvel).max() < 1e-2


@needs_package
def test_pd_tracks_a_step(panda):
    r, m = panda
    target = r.q_default + np.array([0.2, 0.2, -0.2, 0.2, -0.2, 0.2, -0.2, -0.03])
    q, mimic, _ = _settle(m, r, r.q_default, target, 1.0)
    np.testing.assert_allclose(q, target, atol=1e-2)
    assert mimic == pytest.approx(target[-1], abs=2e-3)  # the second finger follows the first


def _raw():
    with open(load_robot("franka_panda").source) as f:
        return yaml.safe_load(f)


def test_missing_package_names_it_and_the_pip_command():
    raw = _raw()
    raw["mjcf_package"] = dict(raw["mjcf_package"], module="robotrl_no_such_package", pip="robotrl-no-such-package")
    with pytest.raises(ModuleNotFoundError, match=r"'robotrl_no_such_package'.*pip install 'robotrl-no-such-package'"):
        build_twin(spec_from_dict(raw))


@needs_package
@pytest.mark.parametrize("edits, message", [
    ({"joint_edits": {"robot:no_such_joint*": {"ref": 0.0}}}, "matches no joint"),
    ({"body_edits": {"panda0_*": {"gravcomp_typo": 1}}}, "no attribute 'gravcomp_typo'"),
])
def test_bad_edit_names_the_key(edits, message):
    raw = _raw()
    raw["mjcf_package"] = dict(raw["mjcf_package"], **edits)
    with pytest.raises(ValueError, match=message):
        build_twin(spec_from_dict(raw))
