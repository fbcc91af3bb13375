"""arm_place: the gymnasium contract, the expert, the sparse reward and termination, the
observation layout (target terms), config validation, and demos on disk for BC."""
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import sim.envs
from sim.envs import make, make_task, make_vec, task_config


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """sim/envs.py's TASKS is owned elsewhere; until it lists arm_place, register it here."""
    monkeypatch.setitem(sim.envs.TASKS, "arm_place", "ArmPlace")


def test_env_checker_and_layout():
    env = make("arm_place")
    check_env(env, skip_render_check=True)
    m = env.task.manifest()
    names = [t["name"] for t in m["observation"]["terms"]]
    assert names[-2:] == ["target_pos", "cube_to_target"] and m["observation"]["size"] == env.task.obs_size
    assert m["task"]["name"] == "arm_place" and "target_pos" in m["task"]["object_terms"]
    obs, _ = env.reset(seed=3)
    t = env.task
    np.testing.assert_allclose(obs[-6:-3], t.target_pos[0], atol=1e-6)                 # target on the table
    assert np.linalg.norm(t.target_pos[0, :2] - t.sim.qpos[0, t.cube_qadr:t.cube_qadr + 2]) >= t.cfg.target.min_distance
    env.close()


def test_expert_places_the_cube_and_trivial_policies_do_not():
    from sim.experts_arm_place import ArmPlaceExpert
    env = make_vec("arm_place", num_envs=8, nthread=2)
    for policy, want in (("expert", 0.9), ("zero", 0.0)):
        obs, _ = env.reset(seed=0)
        expert = ArmPlaceExpert(env.task, seed=0)
        done = np.zeros(8, dtype=bool)
        ok = np.zeros(8)
        for _ in range(env.task.episode_steps):
            a = expert() if policy == "expert" else np.zeros((8, 8))
            obs, reward, terminated, truncated, info = env.step(a)
            new = (terminated | truncated) & ~done
            ok[new] = info["success"][new]
            done |= terminated | truncated
            assert set(np.unique(reward)) <= {0.0, 1.0} and np.all(reward == info["success"])
            if done.all():
                break
        assert (ok.mean() >= want) if want else ok.sum() == 0, (policy, ok)


@pytest.mark.parametrize("overrides, key", [
    ({"target": {"x": [0.6, 0.4], "y": [-0.2, 0.2], "min_distance": 0.1}}, "task.target.x"),
    ({"place_tolerance": 0.0}, "task.place_tolerance"),
    ({"observation": {"target_speed": 1.0}}, "task.observation"),
    ({"reward": {"stacking": 1.0}}, "task.reward"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        task_config("arm_place", **overrides)


def test_dense_reward_and_demos_for_bc(tmp_path):
    env = make("arm_place", reward_mode="dense")
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(8, np.float32))
    assert 0.0 < reward < 1.0 and "reward/transport" in info
    from robotrl.datasets import load_demos, record_demos, save_demos
    demos = record_demos(task_config("arm_place"), 2, seed=1, num_envs=2)
    path = save_demos(demos, tmp_path / "place.npz")
    back = load_demos(path)
    assert back.header["task"] == "arm_place" and back.success.all() and back.obs.shape[1] == make_task(
        task_config("arm_place")).obs_size


def _with_term(term):
    obs = dict(task_config("arm_place").observation)
    return make("arm_place", observation={**obs, term: 1.0})


def test_point_cloud_observation_sees_the_cube():
    pytest.importorskip("open3d", reason="pip install open3d-cpu (Debian: libusb-1.0-0)")
    env = _with_term("point_cloud")
    obs, _ = env.reset(seed=0)
    t = env.task
    n = t.cfg.point_cloud.points
    assert obs.shape == (t.obs_size,) and t.layout.sizes[-1] == 3 * n
    pts = obs[-3 * n:].reshape(n, 3)
    pc = t.cfg.point_cloud
    assert np.all(pts[:, 2] >= pc.crop_z[0] - 1e-6) and np.all(pts[:, 0] <= pc.crop_x[1] + 1e-6)
    cube = t.sim.qpos[0, t.cube_qadr:t.cube_qadr + 3]
    near = np.linalg.norm(pts - cube, axis=1) < t.cfg.cube.size
    assert near.sum() >= 3                                           # the cube's top is in the cloud
    assert len(np.unique(np.round(pts, 4), axis=0)) > 0.3 * n         # voxel-down-sampled, not one repeated point
    env.close()


def test_image_observation_shows_cube_and_target():
    env = _with_term("camera_rgb")
    obs, _ = env.reset(seed=0)
    c = env.task.cfg.camera
    img = obs[-c.width * c.height * 3:].reshape(c.height, c.width, 3)
    assert 0.0 <= img.min() and img.max() <= 1.0
    red = (img[..., 0] > 0.6) & (img[..., 1] < 0.4)                   # the cube
    green = (img[..., 1] > 0.6) & (img[..., 0] < 0.4)                 # the target disc
    assert red.sum() >= 3 and green.sum() >= 3
    m = env.task.manifest()
    assert m["observation"]["terms"][-1] == {"name": "camera_rgb", "size": c.width * c.height * 3, "scale": 1.0}
    env.close()
