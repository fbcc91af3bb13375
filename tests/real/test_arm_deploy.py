"""Tabletop policies through the robot-side stack: the Controller builds what the simulator
observed — joint targets, gripper width, the tool centre point by forward kinematics from the
manifest, the cube's pose as perception reports it — and drives the arm's twin (its emulated
firmware, with the task's cube added to the scene) through the safety filter."""
import dataclasses
from pathlib import Path

import mujoco
import numpy as np
import pytest
import yaml

from real.artifact import load_artifact
from real.controller import Controller, InputError
from real.kinematics import FixedFrames, KinematicChain
from real.robot_spec import SpecError, load_robot, spec_from_dict
from real.safety import SafetyFilter
from real.state_machine import Mode, TransitionError
from sim.envs import make_task, task_config, task_world
from sim.twin import build_twin, joint_indices, kinematic_chain
from sim.twin_hardware import TwinHardware

ARTIFACTS = Path(__file__).resolve().parents[2] / "docs" / "artifacts"
ARM = load_robot("arm7")


@pytest.mark.parametrize("robot", ["arm7", "franka_panda"])
def test_kinematic_chain_replays_mujoco(robot):
    spec = load_robot(robot)
    model = build_twin(spec, floor=False)
    data = mujoco.MjData(model)
    site = spec.extra["ee_site"]
    chain = KinematicChain(kinematic_chain(model, spec.base_body, site), spec.joint_names)
    qadr, _, _ = joint_indices(model, spec)
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.uniform(spec.q_lower, spec.q_upper)
        data.qpos[qadr] = q
        mujoco.mj_kinematics(model, data)
        assert np.allclose(chain.site_position(q), data.site(site).xpos, atol=1e-9)


def test_fixed_frames_bring_a_camera_pose_into_the_base_frame():
    """A pose seen by a camera fixed to the base (its extrinsic calibration given as fixed_frames)
    is R p + t in the base frame, orientation composed, as MuJoCo's own rotation computes it."""
    frames = FixedFrames.parse("link0", "camera 0.5 0 0.8 0 1 0 0; wrist_cam 0.1 -0.2 0.3 0.9 0.1 -0.3 0.3")
    pos, quat = frames.to_base("camera", [0.0, 0.0, 0.775], [1.0, 0.0, 0.0, 0.0])   # looking down at the cube
    np.testing.assert_allclose(pos, [0.5, 0.0, 0.025], atol=1e-12)
    np.testing.assert_allclose(quat, [0.0, 1.0, 0.0, 0.0])
    origin, turn = frames.poses["wrist_cam"]
    rotation = np.zeros(9)
    mujoco.mju_quat2Mat(rotation, turn)
    p, q = np.array([0.3, -0.1, 0.7]), np.array([0.5, 0.5, -0.5, 0.5])
    pos, quat = frames.to_base("wrist_cam", p, q)
    np.testing.assert_allclose(pos, rotation.reshape(3, 3) @ p + origin, atol=1e-12)
    composed = np.zeros(4)
    mujoco.mju_mulQuat(composed, turn, q)
    np.testing.assert_allclose(quat, composed, atol=1e-12)
    assert frames.to_base("link0", p)[0].tolist() == p.tolist()   # the base frame: unchanged
    for text, what in (("camera 0.5 0 0.8", "7 numbers after the name"), ("camera 0 0 0 1 1 0 0", "not of unit length"),
                       ("camera 0 0 0 1 0 0 0; camera 1 0 0 1 0 0 0", "given twice"),
                       ("link0 0 0 0 1 0 0 0", "given twice"), ("camera a b c 1 0 0 0", "7 numbers")):
        with pytest.raises(ValueError, match=what):
            FixedFrames.parse("link0", text)


def test_robot_side_terms_equal_the_tasks_on_its_rollout():
    """The manifest's kinematics and gripper map rebuild the task's observation from what a robot
    measures (the tool point within the one physics step by which the task's sensor lags)."""
    art = load_artifact(ARTIFACTS / "arm_lift_resfit.pt")
    m = art.manifest
    task = make_task(task_config(m["task"]["config"]))
    task.seed(3)
    task.reset(np.arange(1))
    chain = KinematicChain(m["kinematics"], task.robot.joint_names)
    grip = m["task"]["gripper_width"]
    g = task.robot.joint_names.index(grip["joint"])
    for _ in range(30):
        s = task._quantities(noisy=False)
        q = s["q"][0]
        assert np.allclose(chain.site_position(q), s["tcp"][0], atol=2e-3)
        assert abs(grip["offset"] + grip["per_position"] * q[g] - s["width"][0]) < 5e-4
        action, _ = art.step(task.observe()[0][0])
        task.step(action[None])
    assert grip["per_position"] == 2.0 and grip["offset"] == 0.0   # arm7: the second finger mirrors the first


def lifted(cfg, twin, pos) -> bool:
    """arm_lift's success: the cube lifted by lift_height."""
    return pos[2] - cfg.cube.size / 2 >= cfg.lift_height


def placed(cfg, twin, pos) -> bool:
    """arm_place's success: the cube resting within place_tolerance of the goal, out of the fingers."""
    m, d = twin.sim.model, twin.sim.data
    pads, cube = {m.geom(g).id for g in ARM.extra["finger_pads"]}, m.geom("cube").id
    held = any(cube in pair and pair & pads for pair in ({c.geom1, c.geom2} for c in d.contact[:d.ncon]))
    speed = np.linalg.norm(d.qvel[m.joint("cube").dofadr[0]:][:3])
    return (np.linalg.norm(pos[:2] - twin.sim.world.goal[:2]) <= cfg.place_tolerance
            and pos[2] - cfg.cube.size / 2 < 0.005 and speed < 0.05 and not held)


def run_episode(artifact, seed: int, ramp_s: float = 0.4, perceive=lambda t: True, controller_kw=None):
    """One episode from the world the artifact's task draws for `seed` (perception reading the
    twin's cube, the goal given at start); True when the task's success held for its hold_s.
    Returns (success, controller, twin)."""
    cfg = task_config(artifact.manifest["task"]["config"])
    success = placed if cfg.name == "arm_place" else lifted
    clock = {"t": 0.0}
    world = task_world(cfg, seed)
    twin = TwinHardware(ARM, clock=lambda: clock["t"], world=world)
    ctl = Controller(artifact, ARM, twin, clock=lambda: clock["t"], ramp_s=ramp_s, **(controller_kw or {}))
    ctl.set_object_pose(*twin.sim.object_pose())   # perception is up before the operator starts
    if world.goal is not None:
        ctl.set_goal_position(world.goal)
    ctl.start()
    held, hold = 0, round(cfg.hold_s * ARM.control_hz)
    for _ in range(int((ramp_s + cfg.episode_s) * ARM.control_hz)):
        pos, quat = twin.sim.object_pose()
        if perceive(clock["t"]):
            ctl.set_object_pose(pos, quat)
        ctl.tick()
        twin.step()
        clock["t"] += 1.0 / ARM.control_hz
        held = held + 1 if success(cfg, twin, pos) else 0
        if held >= hold:
            return True, ctl, twin
    return False, ctl, twin


def successes(artifact, seeds=range(12)) -> int:
    """In how many of these episodes the task succeeded; each ran without a fault and with every
    applied target inside the joint limits."""
    count = 0
    for seed in seeds:
        ok, ctl, twin = run_episode(artifact, seed)
        assert ctl.mode is Mode.RUNNING, [e for _, e in ctl.events if e.kind == "fault"]
        for c in twin.sim.applied_commands():
            assert np.all(c.q_target >= ARM.q_lower - 1e-6) and np.all(c.q_target <= ARM.q_upper + 1e-6)
        count += ok
    return count


@pytest.mark.parametrize("name, at_least", [("arm_lift_resfit.pt", 9), ("arm_lift_resfit.onnx", 9),
                                            ("arm_place_resfit.pt", 3)])
def test_shipped_resfit_policies_succeed_through_the_controller(name, at_least):
    """Of these 12 episodes, arm_lift_resfit lifted the cube in all 12, in both formats (its frozen
    BC base: 5). arm_place_resfit, the goal given by the operator, placed and released it on the
    target spot in 4 (its simulator evaluation: 0.36; its BC base: 1; an arm that holds still: 0)."""
    assert successes(load_artifact(ARTIFACTS / name)) >= at_least


def test_stale_perception_damps_the_arm():
    artifact = load_artifact(ARTIFACTS / "arm_lift_resfit.pt")
    # perception stops 1 s in (0.4 s of ramp, then 0.6 s of the policy)
    ok, ctl, _ = run_episode(artifact, 0, perceive=lambda t: t < 1.0)
    assert ctl.mode is Mode.DAMPING
    faults = [e.reason for _, e in ctl.events if e.kind in ("fault", "mode")]
    assert any("object pose stale" in r for r in faults), faults


def test_start_waits_for_perception_and_the_goal():
    """arm_place observes the cube and the target spot: start is refused, saying what is missing,
    until perception has reported a fresh pose and the operator has given the goal."""
    artifact = load_artifact(ARTIFACTS / "arm_place_resfit.pt")
    spec = load_robot("arm7")
    clock = {"t": 0.0}
    ctl = Controller(artifact, spec, TwinHardware(spec), clock=lambda: clock["t"], ramp_s=0.04)
    for says, then in (("no object pose received yet", lambda: ctl.set_object_pose([0.5, 0, 0.025], [1, 0, 0, 0])),
                       ("no goal position given yet", lambda: clock.update(t=1.0)),
                       ("object pose is 1000 ms old", lambda: ctl.set_goal_position([0.5, 0.15, 0.0]))):
        with pytest.raises(TransitionError, match=says):
            ctl.start()
        then()
    ctl.set_object_pose([0.5, 0, 0.025], [1, 0, 0, 0])
    ctl.start()
    assert ctl.mode is Mode.RAMP


def test_a_goal_outside_the_trained_area_is_refused_and_the_last_one_stays():
    """The shipped arm_place learned to place on x [0.45, 0.55] m, y [0.12, 0.18] m of the table:
    a goal beyond that is refused by name (moving it would put the object where nobody asked), as
    is a NaN."""
    artifact = load_artifact(ARTIFACTS / "arm_place_resfit.pt")
    area = artifact.manifest["task"]["config"]["target"]
    ctl = Controller(artifact, ARM, TwinHardware(ARM))
    assert ctl.set_goal_position([0.5, 0.15, 0.0]) is None
    assert ctl.set_goal_position([0.9, 0.0, 0.0]) == (
        f"goal (0.900, 0.000) is outside the area the policy was trained to place on: "
        f"x [{area['x'][0]:g}, {area['x'][1]:g}], y [{area['y'][0]:g}, {area['y'][1]:g}] m")
    assert ctl.set_goal_position([0.5, float("nan"), 0.0]) == "goal [0.5, nan, 0.0] is not finite"
    assert ctl.goal_position.tolist() == [0.5, 0.15, 0.0]
    lift = Controller(load_artifact(ARTIFACTS / "arm_lift_resfit.pt"), ARM, TwinHardware(ARM))
    assert lift.goal_area is None and lift.set_goal_position([0.9, 0.0, 0.0]) is None   # it has no goal to learn


def test_what_the_robot_cannot_observe_is_refused_at_construction():
    art = load_artifact(ARTIFACTS / "arm_lift_resfit.pt")
    spec = load_robot("arm7")
    twin = TwinHardware(spec)
    manifest = art.manifest
    for change, words in ((lambda m: m.pop("kinematics"), "no 'kinematics'"),
                          (lambda m: m["task"].pop("gripper_width"), "task.gripper_width"),
                          (lambda m: m["observation"]["terms"].append({"name": "camera_rgb", "size": 12, "scale": 1.0}),
                           "'camera_rgb' cannot be built")):
        m = {**manifest, "task": dict(manifest["task"]),
             "observation": {**manifest["observation"], "terms": list(manifest["observation"]["terms"])}}
        change(m)
        art.manifest = m
        with pytest.raises(InputError, match=words):
            Controller(art, spec, twin)


def test_gripper_may_close_against_its_stops():
    """arm7's gripper has soft_margin 0 (its limits are finger stops): fully open and fully
    closed targets pass; the arm joints keep the default 0.02 rad margin."""
    spec = load_robot("arm7")
    f = SafetyFilter(spec)
    q = spec.q_default.copy()
    for width in (0.0, 0.04):
        want = q.copy()
        want[-1] = width
        f.reset()
        cmd, _ = f.filter(want, np.r_[q[:-1], width], np.zeros(spec.n_joints), 0.0)
        assert cmd.q_target[-1] == width
    want = spec.q_upper.copy()
    f.reset()
    cmd, _ = f.filter(want, spec.q_upper, np.zeros(spec.n_joints), 0.0)
    assert np.allclose(cmd.q_target[:-1], spec.q_upper[:-1] - 0.02)
    bad = dataclasses.replace(spec, soft_margin=np.r_[spec.soft_margin[:-1], 0.03])
    with pytest.raises(ValueError, match="joint 'gripper'"):
        SafetyFilter(bad)
    raw = yaml.safe_load(Path(spec.source).read_text())
    raw["joints"][-1]["soft_margin"] = 0.03
    with pytest.raises(SpecError, match=r"joints\[7\] \(gripper\): 'soft_margin' 0.03"):
        spec_from_dict(raw, "arm7.yaml")


@pytest.mark.parametrize("robot", ["arm7", "franka_panda"])
def test_gripper_commands_move_the_fingers_within_their_rated_speed(robot):
    """A policy opens and closes its gripper in one action; the filter's per-tick change limit
    (velocity / control_hz) turns that into a ramp the finger follows below its rated speed, as a
    real hand's firmware does. (With a flat 0.2 per tick, franka's 0.2 m/s finger reached 0.7 m/s
    on the twin and the filter faulted on its velocity limit.)"""
    from firmware_bridge import Mode as FirmwareMode
    from real.hardware import JointCommand
    spec = load_robot(robot)
    twin, f = TwinHardware(spec), SafetyFilter(spec)
    twin.request_mode(FirmwareMode.RUNNING)
    g, want, speeds, ends = spec.n_joints - 1, spec.q_default.copy(), [], []
    for tick in range(60):
        want[g] = spec.q_lower[g] if (tick // 15) % 2 == 0 else spec.q_upper[g]   # close, open, close, open
        state = twin.read()
        cmd, _ = f.filter(want, state.q, state.dq, 0.0)
        twin.write(JointCommand(*cmd))
        speeds.append(abs(twin.step().dq[g]))
        if tick % 15 == 14:
            ends.append(twin.read().q[g])
    assert not f.faulted, f.fault_reason
    assert max(speeds) <= spec.dq_max[g]
    np.testing.assert_allclose(ends, [spec.q_lower[g], spec.q_upper[g]] * 2, atol=0.002)   # closed and opened
