import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from real.robot_spec import load_robot
from sim.envs import make, make_vec, task_config
from sim.twin import build_twin, joint_indices

NO_DR = {"randomization": {"push_interval_s": 0.0, "obs_noise": 0.0, "action_delay_steps": [0, 0]}}


def test_env_checker_passes():
    env = make("humanoid_walk")
    check_env(env, skip_render_check=True)


def test_same_seed_same_trajectory_single_and_vector():
    def run(seed):
        env = make("humanoid_walk")
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(3)
        out = [obs]
        for _ in range(40):
            obs, *_ = env.step(rng.uniform(-1, 1, 10))
            out.append(obs)
        return np.array(out)
    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)

    def run_vec(seed):
        env = make_vec("humanoid_walk", num_envs=4, nthread=2)
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(3)
        out = [obs]
        for _ in range(40):
            obs, *_ = env.step(rng.uniform(-1, 1, (4, 10)))
            out.append(obs)
        return np.array(out)
    np.testing.assert_array_equal(run_vec(5), run_vec(5))


def test_twin_equals_robot_config():
    spec = load_robot("kid_biped")
    m = build_twin(spec)
    qadr, dadr, act = joint_indices(m, spec)
    names = [mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_ACTUATOR, i) for i in range(m.nu)]
    assert names == list(spec.joint_names)
    jids = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, n) for n in spec.joint_names]
    np.testing.assert_allclose(m.jnt_range[jids], np.stack([spec.q_lower, spec.q_upper], 1))
    np.testing.assert_allclose(m.actuator_gainprm[act, 0], spec.kp)
    np.testing.assert_allclose(-m.actuator_biasprm[act, 1], spec.kp)
    np.testing.assert_allclose(-m.actuator_biasprm[act, 2], spec.kd)
    np.testing.assert_allclose(m.actuator_forcerange[act], np.stack([-spec.tau_max, spec.tau_max], 1))
    np.testing.assert_allclose(m.dof_armature[dadr], spec.armature)
    assert m.opt.timestep == pytest.approx(1.0 / spec.physics_hz)


def test_energy_equals_direct_sum_of_torque_times_velocity():
    """Mechanical power is integrated at the physics rate: compare against stepping the same
    model one physics step at a time and summing |tau * dq| from MjData directly."""
    env = make("humanoid_walk", **NO_DR)
    env.reset(seed=0)
    task = env.task
    d = mujoco.MjData(task.model)
    mujoco.mj_setState(task.model, d, task.sim.state[0], mujoco.mjtState.mjSTATE_FULLPHYSICS)
    m = task.sim.models[0]
    action = np.full(10, 0.8)
    _, _, _, _, info = env.step(action)
    target = task.robot.q_default + task.cfg.action_scale * action
    d.ctrl[task.act_ids] = target
    joint_energy = np.zeros(10)
    for _ in range(task.substeps):  # power at each physics step's state, then integrate
        mujoco.mj_forward(m, d)
        joint_energy += np.abs(d.actuator_force[task.act_ids] * d.qvel[task.dadr]) / task.robot.physics_hz
        mujoco.mj_step(m, d)
    energy = joint_energy.sum()
    assert energy > 0.01 and (joint_energy > 0).sum() >= 5
    assert info["energy_j"] == pytest.approx(energy, rel=1e-6)
    assert info["power_w"] == pytest.approx(energy * task.robot.control_hz, rel=1e-6)
    # per joint, in the robot config's order
    np.testing.assert_allclose(info["joint_power_w"], joint_energy * task.robot.control_hz, rtol=1e-6, atol=1e-9)


def test_action_delay_holds_previous_target():
    env = make("humanoid_walk", randomization={"action_delay_steps": [3, 3], "push_interval_s": 0.0})
    env.reset(seed=0)
    env.step(np.zeros(10))
    ctrl = env.task._ctrl
    env.step(np.ones(10))
    assert np.allclose(ctrl[0, :3], env.task.robot.q_default)
    assert np.allclose(ctrl[0, 3:], env.task.robot.q_default + env.task.cfg.action_scale)


def test_observation_delay_shows_the_state_some_physics_steps_before_the_tick():
    """randomization.obs_delay_steps: the policy's newest frame is built from the state `lag`
    physics steps before the end of the control step (the sensors' latency); the critic's stays
    current. [0, 0] observes the current state."""
    def newest_joint_pos(lag):
        env = make("humanoid_walk", randomization={**NO_DR["randomization"], "obs_delay_steps": [lag, lag]})
        env.reset(seed=0)
        obs, _, _, _, info = env.step(np.full(10, 0.5))   # a large step: the joints move within it
        task = env.unwrapped.task
        frame = task.layout.frame_size
        start = sum(task.layout.sizes[:task.layout.terms.index("joint_pos")])
        k = task.layout.scales[task.layout.terms.index("joint_pos")]
        seen = obs[-frame:][start:start + 10] / k
        sub = task.sim.substep_states[0, :, 1:1 + task.model.nq][:, task.qadr] - task.robot.q_default
        return seen, sub
    seen, sub = newest_joint_pos(0)
    np.testing.assert_allclose(seen, sub[-1], atol=1e-5)
    seen, sub = newest_joint_pos(4)
    np.testing.assert_allclose(seen, sub[-1 - 4], atol=1e-5)
    assert np.abs(sub[-1] - sub[-1 - 4]).max() > 1e-3   # the delay is visible
    with pytest.raises(ValueError, match=r"obs_delay_steps \[0, 10\]: at most 9"):
        make("humanoid_walk", randomization={"obs_delay_steps": [0, 10]})
    with pytest.raises(ValueError, match="obs_delay_steps is not modelled by arm_lift"):
        make("arm_lift", randomization={"obs_delay_steps": [0, 2]})


def test_falls_terminate_and_episodes_truncate():
    env = make("humanoid_walk", episode_s=0.5, **NO_DR)
    env.reset(seed=0)
    for t in range(25):
        _, _, terminated, truncated, _ = env.step(np.zeros(10))
        if terminated or truncated:
            break
    assert truncated and t == 24
    env = make("humanoid_walk", **NO_DR)
    env.reset(seed=0)
    for _ in range(400):  # a hard, constant lean makes it fall
        _, _, terminated, _, _ = env.step(np.array([0, 0.0, 3, -3, 0, 0, 0, 3, -3, 0]))
        if terminated:
            break
    assert terminated


def test_vector_env_autoresets_and_reports_final_obs():
    env = make_vec("humanoid_walk", num_envs=3, nthread=2, episode_s=0.2, **NO_DR)
    env.reset(seed=0)
    for _ in range(10):
        obs, r, term, trunc, info = env.step(np.zeros((3, 10)))
    assert trunc.all() and info["_final_obs"].all()
    assert np.isfinite(info["episode_return"]).all()
    assert (env.task.steps == 0).all()


@pytest.mark.parametrize("override, key", [
    ({"episode_s": -1.0}, "episode_s"),
    ({"history": 0}, "history"),
    ({"reward": {"not_a_term": 1.0}}, "not_a_term"),
    ({"randomization": {"friction": [1.2, 0.5]}}, "friction"),
    ({"observation": {"bogus": 1.0}}, "bogus"),
])
def test_bad_task_values_name_the_key(override, key):
    with pytest.raises(Exception, match=key):
        make("humanoid_walk", **override)


def test_wrong_type_names_the_key():
    with pytest.raises(Exception, match="gait_period_s"):
        task_config("humanoid_walk", gait_period_s="fast")


def test_unknown_task_lists_available():
    with pytest.raises(ValueError, match="available: .*humanoid_walk"):
        task_config("flying")


def test_score_of_a_recorded_trajectory_matches_the_env_reward():
    """`score` re-evaluates the reward of a run recorded outside the env (the HIL rig uses it): on
    the env's own trajectory it must give the env's rewards (contacts are read one physics step
    later than in step, hence the small per-step tolerance)."""
    env = make("humanoid_walk", randomization={"obs_noise": 0.0, "push_velocity": 0.0},
               command={"vx": [0.3, 0.3], "vy": [0, 0], "yaw_rate": [0, 0], "resample_s": 20.0})
    env.reset(seed=3)
    t, rng = env.task, np.random.default_rng(0)
    rec = {k: [] for k in ("qpos", "qvel", "action", "phase", "reward")}
    for _ in range(40):
        _, r, terminated, _, _ = env.step(rng.uniform(-0.3, 0.3, t.action_size))
        assert not terminated
        for k, v in (("qpos", t.sim.qpos[0]), ("qvel", t.sim.qvel[0]), ("action", t.action[0]),
                     ("phase", t.phase[0]), ("reward", r)):
            rec[k].append(np.copy(v))
    got = t.score(*(np.array(rec[k]) for k in ("qpos", "qvel", "action", "phase")), t.command[0].copy())
    want = np.array(rec["reward"])
    np.testing.assert_allclose(got, want, atol=0.01)
    assert abs(got.sum() - want.sum()) < 0.01 * abs(want.sum())
    # and it is not blind to the trajectory: another command scores lower tracking reward
    worse = t.score(*(np.array(rec[k]) for k in ("qpos", "qvel", "action", "phase")), np.array([-0.5, 0.0, 0.0]))
    assert worse.sum() < want.sum() - 0.02
