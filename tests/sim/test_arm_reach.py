"""arm_reach and its ray-cast camera: the gymnasium contract, determinism, the image shows what the scene holds,
the instruction says which cube, the expert reaches it and trivial policies do not, the curriculum
handle, config validation."""
import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from sim.camera import RayCamera, orbit_pose
from sim.envs import make, make_vec, task_config


def test_env_checker_and_layout():
    env = make("arm_reach")
    check_env(env, skip_render_check=True)
    t = env.task
    m = t.manifest()
    names = [term["name"] for term in m["observation"]["terms"]]
    assert names[-2:] == ["camera_rgb", "instruction"] and m["observation"]["size"] == t.obs_size
    assert m["task"]["vocabulary"][0] == "<pad>" and m["task"]["instructions"] == [
        "reach the red cube", "reach the green cube", "reach the blue cube"]
    obs, _ = env.reset(seed=3)
    words = [m["task"]["vocabulary"][int(i)] for i in obs[-4:]]
    assert " ".join(words) == m["task"]["instructions"][t.goal[0]]
    image = obs[-4 - 32 * 32 * 3:-4]
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    env.close()


def test_same_seed_gives_identical_observations_and_instructions():
    def rollout(seed):
        env = make_vec("arm_reach", num_envs=4, nthread=2)
        obs, _ = env.reset(seed=seed)
        rng, out = np.random.default_rng(0), [obs]
        for _ in range(20):
            out.append(env.step(rng.uniform(-1, 1, (4, 8)).astype(np.float32))[0])
        return np.array(out), env.task.goal.copy()
    (a, goal_a), (b, goal_b), (c, _) = rollout(0), rollout(0), rollout(1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(goal_a, goal_b)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[:, 0], a[:, 1])


def test_orbit_pose_is_mujocos_free_camera():
    """The ray camera sits where MuJoCo's renderer puts the same free camera."""
    t = make("arm_reach").task
    c = t.cfg.camera
    cam = mujoco.MjvCamera()
    cam.lookat[:], cam.distance, cam.azimuth, cam.elevation = c.lookat, c.distance, c.azimuth, c.elevation
    scene, opt = mujoco.MjvScene(t.model, 100), mujoco.MjvOption()
    mujoco.mjv_updateScene(t.model, t.sim.data_of(0), opt, None, cam, mujoco.mjtCatBit.mjCAT_ALL, scene)
    pos, forward = orbit_pose(c.lookat, c.distance, c.azimuth, c.elevation)
    eyes = (np.asarray(scene.camera[0].pos) + scene.camera[1].pos) / 2    # the scene's two eyes sit ipd apart
    np.testing.assert_allclose(eyes, pos, atol=1e-5)
    np.testing.assert_allclose(scene.camera[0].forward, forward, atol=1e-5)


def test_the_image_shows_each_cube_in_its_colour_where_it_is():
    """Project each cube's centre into the image: the pixel there has the cube's colour as its
    strongest channel; moving a cube moves its colour."""
    env = make_vec("arm_reach", num_envs=1, nthread=1)
    env.reset(seed=1)
    t = env.task
    cam: RayCamera = t.camera
    d = t.sim.data_of(0)

    def pixel_of(p):
        pos, forward = orbit_pose(t.cfg.camera.lookat, t.cfg.camera.distance, t.cfg.camera.azimuth,
                                  t.cfg.camera.elevation)
        right = np.cross(forward, [0, 0, 1])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        v = p - pos
        half = np.tan(np.deg2rad(t.model.vis.global_.fovy) / 2)
        x, y = v @ right / (v @ forward), v @ up / (v @ forward)
        return int(cam.height / 2 - y / half * cam.height / 2), int(cam.width / 2 + x / half * cam.height / 2)

    image = cam.image(d)
    for k, rgb in enumerate(t.cfg.colours.values()):
        adr = t.cube_qadrs[k]
        row, col = pixel_of(d.qpos[adr:adr + 3] + [0, 0, t.cfg.cube.size / 2])
        assert np.argmax(image[row, col]) == np.argmax(rgb), (k, image[row, col])
    # move the first cube elsewhere: its old pixel shows the table, its new one the cube
    adr = t.cube_qadrs[0]
    old = pixel_of(d.qpos[adr:adr + 3] + [0, 0, t.cfg.cube.size / 2])
    others = [d.qpos[a:a + 2].copy() for a in t.cube_qadrs[1:]]
    spot = next(xy for xy in ([x, y] for x in (0.35, 0.45, 0.55) for y in (-0.15, 0.0, 0.15))
                if min(np.hypot(*(np.subtract(xy, o))) for o in others) > 0.1
                and np.hypot(*(np.subtract(xy, d.qpos[adr:adr + 2]))) > 0.1)
    d.qpos[adr:adr + 2] = spot
    mujoco.mj_forward(t.model, d)
    moved = cam.image(d)
    assert not np.array_equal(moved[old], image[old])
    new = pixel_of(d.qpos[adr:adr + 3] + [0, 0, t.cfg.cube.size / 2])
    assert np.argmax(moved[new]) == 0


def _success(env, policy, episodes_per_env=1):
    n = env.num_envs
    obs, _ = env.reset(seed=0)
    done, ok = np.zeros(n, dtype=bool), np.zeros(n)
    for _ in range(env.task.episode_steps):
        obs, reward, terminated, truncated, info = env.step(policy())
        new = (terminated | truncated) & ~done
        ok[new] = info["success"][new]
        done |= terminated | truncated
        if done.all():
            break
    return ok


def test_expert_reaches_the_named_cube_and_trivial_policies_do_not():
    from sim.experts_arm_reach import ArmReachExpert
    env = make_vec("arm_reach", num_envs=8, nthread=2)
    env.reset(seed=0)
    expert = ArmReachExpert(env.task, seed=0)
    assert _success(env, expert).mean() >= 0.9
    assert _success(env, lambda: np.zeros((8, 8))).sum() == 0
    # reaching a cube other than the named one does not count
    t = env.task
    t.set_instruction_weights([1, 0, 0])
    env.reset(seed=0)
    wrong = t.goal.copy()
    t.goal[:] = 1                          # the expert goes for the green cube ...
    expert = ArmReachExpert(t, seed=0)

    def for_green():
        t.goal[:] = 1
        t._update_target()
        a = expert()
        t.goal[:] = wrong                   # ... while the instruction says red
        t._update_target()
        return a
    assert _success(env, for_green).sum() == 0


def test_instruction_weights_draw_the_instructions():
    env = make_vec("arm_reach", num_envs=64, nthread=1)
    env.task.set_instruction_weights([0, 1, 3])
    env.reset(seed=0)
    counts = np.bincount(env.task.goal, minlength=3)
    assert counts[0] == 0 and counts[2] > counts[1] > 0
    with pytest.raises(ValueError, match="instruction weights"):
        env.task.set_instruction_weights([1, 1])


@pytest.mark.parametrize("overrides, key", [
    ({"instruction": "reach the cube"}, "task.instruction"),
    ({"colours": {"red": [1.0, 0.0]}}, "task.colours.red"),
    ({"reach_tolerance": 0.0}, "task.reach_tolerance"),
    ({"observation": {"cube_speed": 1.0}}, "task.observation"),
    ({"reward": {"lift": 1.0}}, "task.reward"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        task_config("arm_reach", **overrides)
