"""arm_lift: the gymnasium contract, determinism, the twin against the robot YAML, the expert,
the sparse reward and config validation."""
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from real.robot_spec import load_robot
from sim.envs import make, make_task, make_vec, task_config
from sim.experts import ArmLiftExpert


def test_env_checker():
    env = make("arm_lift")
    check_env(env, skip_render_check=True)
    env.close()


def _rollout(env, n_steps: int = 50) -> np.ndarray:
    obs, _ = env.reset(seed=7)
    rng = np.random.default_rng(0)
    out = [obs]
    for _ in range(n_steps):
        out.append(env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))[0])
    env.close()
    return np.array(out)


def test_same_seed_gives_identical_observations():
    np.testing.assert_array_equal(_rollout(make("arm_lift")), _rollout(make("arm_lift")))
    vec = [_rollout(make_vec("arm_lift", num_envs=4, nthread=2)) for _ in range(2)]
    np.testing.assert_array_equal(vec[0], vec[1])
    assert not np.array_equal(vec[0][:, 0], vec[0][:, 1])  # envs differ from each other


def test_twin_matches_robot_config():
    r = load_robot("arm7")
    task = make_task(task_config("arm_lift"))
    m = task.model
    assert [m.actuator(i).name for i in task.act_ids] == list(r.joint_names)
    assert [m.joint(m.actuator_trnid[i, 0]).name for i in task.act_ids] == list(r.joint_names)
    jids = m.actuator_trnid[task.act_ids, 0]
    np.testing.assert_allclose(m.jnt_range[jids], np.stack([r.q_lower, r.q_upper], axis=1))
    np.testing.assert_allclose(m.dof_armature[task.dadr], r.armature)
    np.testing.assert_allclose(m.actuator_gainprm[task.act_ids, 0], r.kp)
    np.testing.assert_allclose(m.actuator_biasprm[task.act_ids, 1], -r.kp)
    np.testing.assert_allclose(m.actuator_biasprm[task.act_ids, 2], -r.kd)
    np.testing.assert_allclose(m.actuator_forcerange[task.act_ids], np.stack([-r.tau_max, r.tau_max], axis=1))
    assert m.nu == r.n_joints  # one actuator per YAML joint; the mimic finger is passive
    assert m.opt.timestep == pytest.approx(1.0 / r.physics_hz)
    assert task.substeps * m.opt.timestep == pytest.approx(task.dt) and task.dt == pytest.approx(1.0 / r.control_hz)
    manifest = task.manifest()
    assert manifest["observation"]["size"] == task.obs_size
    assert manifest["action"]["type"] == "joint_position_delta"
    assert manifest["action"]["joint_names"] == list(r.joint_names)


def _success_rate(task, policy) -> float:
    task.seed(0)
    task.reset(np.arange(task.num_envs))
    solved = np.zeros(task.num_envs, dtype=bool)
    for _ in range(task.episode_steps):
        _, terminated, info = task.step(policy())
        solved |= terminated & (info["success"] == 1.0)
        if solved.all():
            break
    return solved.mean()


@pytest.mark.parametrize("action_type", ["delta", "absolute"])
def test_expert_lifts_the_cube_and_trivial_policies_do_not(action_type):
    task = make_task(task_config("arm_lift", action_type=action_type), num_envs=10, nthread=2)
    assert _success_rate(task, ArmLiftExpert(task)) >= 0.9
    assert _success_rate(task, lambda: np.zeros((10, task.action_size))) == 0.0
    rng = np.random.default_rng(0)
    assert _success_rate(task, lambda: rng.uniform(-1, 1, (10, task.action_size))) == 0.0


def test_absolute_action_sets_the_target_the_manifest_describes():
    task = make_task(task_config("arm_lift", action_type="absolute"), num_envs=2)
    task.seed(0)
    task.reset(np.arange(2))
    r, act = task.robot, task.manifest()["action"]
    assert act["type"] == "joint_position"
    a = np.array([[1.0] * r.n_joints, [-0.5] * r.n_joints])
    task.step(a)
    want = np.clip(np.asarray(act["offset"]) + np.asarray(act["scale"]) * a, r.q_lower, r.q_upper)
    np.testing.assert_allclose(task.target, want)
    np.testing.assert_allclose(task.target[0], r.q_upper)          # +1 is the top of every joint's range
    np.testing.assert_allclose(task.action_for(1, task.target[1]), a[1])   # what an expert uses to act


def test_sparse_reward_is_0_1_and_success_terminates():
    env = make("arm_lift")
    env.reset(seed=1)
    expert = ArmLiftExpert(env.task)
    rewards = []
    for _ in range(env.task.episode_steps):
        _, reward, terminated, truncated, info = env.step(expert()[0])
        rewards.append(reward)
        if terminated or truncated:
            break
    assert terminated and not truncated and info["success"] == 1.0
    assert rewards[-1] == 1.0 and set(rewards[:-1]) == {0.0}


def test_dense_reward_shapes():
    env = make("arm_lift", reward_mode="dense")
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
    assert 0.0 < reward < 1.0 and info["reward/reach"] > 0.0


@pytest.mark.parametrize("overrides, key", [
    ({"reward_mode": "shaped"}, "task.reward_mode"),
    ({"action_type": "velocity"}, "task.action_type"),
    ({"reward": {"lift_speed": 1.0}}, "task.reward"),
    ({"observation": {"gait_clock": 1.0}}, "task.observation"),
    ({"cube": {"size": -0.05}}, "task.cube.size"),
    ({"cube": {"x": [0.6, 0.4]}}, "task.cube.x"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        task_config("arm_lift", **overrides)
