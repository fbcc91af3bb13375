"""arm_place: pick the cube up and put it down on a target spot on the table (arm7 + gripper).

The harder sibling of arm_lift (sim/tasks/arm_lift.py), built on it: the same twin, cube, action
(joint-target deltas), sensors and randomisation; new here are the target (sampled per episode,
away from the cube), its observation terms, the success test (cube resting within
`place_tolerance` of the target, released by the fingers, for `hold_s`) and the dense terms.
Sparse 0/1 success reward by default; success terminates, the time limit truncates.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from real.observations import TERMS as ROBOT_TERMS
from real.observations import ObsLayout
from sim.emulated_firmware import World
from sim.tasks import arm_lift

# the terms of this task beyond arm_lift's: name -> meaning. target_pos and cube_to_target are
# tabletop terms of real/observations.py; the camera terms exist only here, and their sizes
# depend on the config (ArmPlace._term_size).
PLACE_TERMS = {
    "target_pos": "target spot on the table (z = table), base frame, m",
    "cube_to_target": "target_pos - cube_pos, m",
    "camera_rgb": "RGB image of task.camera, height x width x 3 row-major, in [0, 1] (target drawn as a green disc)",
    "point_cloud": ("task.point_cloud.points points (x, y, z; base frame, m) from task.camera's depth image: cropped "
                    "to the workspace box above the table, open3d voxel down-sampled, resampled to a fixed count"),
}
OBJECT_TERMS = {**arm_lift.OBJECT_TERMS, **PLACE_TERMS}


def transport(s):
    return s["grasped"] * (1.0 - np.tanh(10.0 * np.linalg.norm(s["cube_pos"][:, :2] - s["target_pos"][:, :2], axis=1)))


def placed(s):
    return s["placed"].astype(np.float64)


REWARDS = {**arm_lift.REWARDS, "transport": transport, "placed": placed}


@dataclasses.dataclass
class TargetConfig:
    x: list[float]          # target range in the robot base frame, m
    y: list[float]
    min_distance: float     # from the cube's start, m


@dataclasses.dataclass
class CameraConfig:
    """A free camera (no MJCF camera needed): MuJoCo's mjvCamera orbit parameters."""
    lookat: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.0, 0.05])
    distance: float = 1.0
    azimuth: float = 180.0     # deg; 180 looks along +x, from in front of the robot
    elevation: float = -45.0   # deg
    width: int = 64
    height: int = 64


@dataclasses.dataclass
class PointCloudConfig:
    points: int = 256                  # fixed count after down-sampling (random subset, or repeats when short)
    width: int = 128                   # depth image size (task.camera's pose)
    height: int = 128
    voxel: float = 0.01                # open3d voxel size, m
    crop_x: list[float] = dataclasses.field(default_factory=lambda: [0.2, 0.9])
    crop_y: list[float] = dataclasses.field(default_factory=lambda: [-0.4, 0.4])
    crop_z: list[float] = dataclasses.field(default_factory=lambda: [0.004, 0.5])   # above the table plane


@dataclasses.dataclass(kw_only=True)
class ArmPlaceConfig(arm_lift.ArmLiftConfig):
    """arm_lift's config (lift_height is the dense 'lift' term only here; hold_s: placed, resting
    and released for this long) plus the target and the perception options."""
    target: TargetConfig
    place_tolerance: float  # |cube - target| in the table plane, m
    camera: CameraConfig = dataclasses.field(default_factory=CameraConfig)
    point_cloud: PointCloudConfig = dataclasses.field(default_factory=PointCloudConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.place_tolerance <= 0:
            raise ValueError(f"task.place_tolerance must be > 0, got {self.place_tolerance}")
        for key in ("x", "y"):
            lo_hi = getattr(self.target, key)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ValueError(f"task.target.{key} must be [low, high] with low <= high, got {list(lo_hi)}")
        if self.target.min_distance < 0:
            raise ValueError(f"task.target.min_distance must be >= 0, got {self.target.min_distance}")

    def known_terms(self) -> tuple[dict, dict]:
        return REWARDS, OBJECT_TERMS


def target_spot(t: TargetConfig, cube_xy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A target spot on the table as the task draws it: at least min_distance from the cube's start
    (rejection sampling; the last draw after 100 tries)."""
    for _ in range(100):
        xy = np.array([rng.uniform(*t.x), rng.uniform(*t.y)])
        if np.hypot(*(xy - cube_xy)) >= t.min_distance:
            break
    return np.array([xy[0], xy[1], 0.0])


def world(cfg: ArmPlaceConfig, rng: np.random.Generator) -> World:
    """arm_lift's cube, and the target spot as the goal an operator gives."""
    pose = arm_lift.cube_pose(cfg.cube, rng)
    return arm_lift.cube_world(cfg.cube, pose, goal=target_spot(cfg.target, pose[:2], rng))


class ArmPlace(arm_lift.ArmLift):
    def __init__(self, cfg: ArmPlaceConfig, num_envs: int = 1, nthread: int = 1):
        # arm_lift builds the twin, the cube and the sensors from the terms it knows; the layout
        # is rebuilt below with this task's terms.
        lift_terms = {k: v for k, v in cfg.observation.items() if k not in PLACE_TERMS}
        lift_cfg = arm_lift.ArmLiftConfig(
            name=cfg.name, robot=cfg.robot, episode_s=cfg.episode_s, action_scale=cfg.action_scale,
            gripper_scale=cfg.gripper_scale, action_clip=cfg.action_clip, history=cfg.history,
            reward_mode=cfg.reward_mode, observation=lift_terms or {"joint_pos": 1.0},
            reward={k: v for k, v in cfg.reward.items() if k in arm_lift.REWARDS}, cube=cfg.cube,
            lift_height=cfg.lift_height, hold_s=cfg.hold_s, randomization=cfg.randomization,
            action_type=cfg.action_type)
        super().__init__(lift_cfg, num_envs=num_envs, nthread=nthread)
        self.cfg = cfg
        self._renderer = None
        terms = tuple(cfg.observation)
        sizes = tuple(self._term_size(t) for t in terms)
        self.layout = ObsLayout(terms, tuple(float(v) for v in cfg.observation.values()), sizes, cfg.history)
        self.obs_size = self.layout.size
        self.critic_obs_size = self.layout.frame_size + 6 + len(self.sensor_pads) + 3
        self.target_pos = np.zeros((num_envs, 3))
        self.history = np.zeros((num_envs, cfg.history, self.layout.frame_size), dtype=np.float32)

    def _term_size(self, term: str) -> int:
        c, n = self.cfg, self.robot.n_joints
        if term == "camera_rgb":
            return c.camera.width * c.camera.height * 3
        if term == "point_cloud":
            return c.point_cloud.points * 3
        return ROBOT_TERMS[term].size(n)

    def reset(self, ids: np.ndarray) -> None:
        t = self.cfg.target
        super().reset(ids)          # robot, cube, randomisation (and a provisional history)
        for i in ids:
            self.target_pos[i] = target_spot(t, self.sim.qpos[i, self.cube_qadr:self.cube_qadr + 2], self.rng)
        self.history[ids] = self._frame()[ids][:, None, :]

    def _quantities(self, noisy: bool) -> dict:
        s = super()._quantities(noisy)
        s["target_pos"] = self.target_pos
        if hasattr(self, "layout"):
            if "camera_rgb" in self.layout.terms:
                s["camera_rgb"] = np.stack([self._render(i, depth=False).reshape(-1) / 255.0
                                            for i in range(self.num_envs)])
            if "point_cloud" in self.layout.terms:
                s["point_cloud"] = np.stack([self._point_cloud(i).reshape(-1) for i in range(self.num_envs)])
        return s

    # ---- camera observations (optional terms; MuJoCo's offscreen renderer, EGL or OSMesa) ----
    def _render(self, i: int, depth: bool) -> np.ndarray:
        import mujoco
        c = self.cfg.camera
        size = (self.cfg.point_cloud.height, self.cfg.point_cloud.width) if depth else (c.height, c.width)
        if self._renderer is None:
            self._renderer = {}
            self._cam = mujoco.MjvCamera()
            self._cam.lookat[:], self._cam.distance = c.lookat, c.distance
            self._cam.azimuth, self._cam.elevation = c.azimuth, c.elevation
        if size not in self._renderer:
            self._renderer[size] = mujoco.Renderer(self.model, *size)
        r = self._renderer[size]
        (r.enable_depth_rendering if depth else r.disable_depth_rendering)()
        r.update_scene(self.sim.data_of(i), camera=self._cam)
        scn = r.scene
        if not depth and scn.ngeom < scn.maxgeom:   # the target spot, drawn (it is not a body of the model)
            mujoco.mjv_initGeom(scn.geoms[scn.ngeom], mujoco.mjtGeom.mjGEOM_CYLINDER,
                                np.array([self.cfg.place_tolerance, 0.001, 0.0]), self.target_pos[i] + [0, 0, 0.001],
                                np.eye(3).reshape(-1), np.array([0.2, 0.8, 0.3, 1.0], np.float32))
            scn.ngeom += 1
        return r.render()

    def _point_cloud(self, i: int) -> np.ndarray:
        """Depth image -> points in the base frame -> crop -> voxel down-sample -> fixed count."""
        import open3d as o3d
        pc = self.cfg.point_cloud
        depth = self._render(i, depth=True)
        cam = self._renderer[(pc.height, pc.width)].scene.camera[0]
        fwd, up = np.asarray(cam.forward, float), np.asarray(cam.up, float)
        right = np.cross(fwd, up)
        f = 0.5 * pc.height / np.tan(np.deg2rad(self.model.vis.global_.fovy) / 2)
        v, u = np.mgrid[0:pc.height, 0:pc.width]
        x = (u + 0.5 - pc.width / 2) / f
        y = -(v + 0.5 - pc.height / 2) / f                 # image rows go down
        rays = x[..., None] * right + y[..., None] * up + fwd
        pts = (np.asarray(cam.pos, float) + depth[..., None] * rays).reshape(-1, 3)
        lo = np.array([pc.crop_x[0], pc.crop_y[0], pc.crop_z[0]])
        hi = np.array([pc.crop_x[1], pc.crop_y[1], pc.crop_z[1]])
        pts = pts[np.all((pts >= lo) & (pts <= hi), axis=1)]
        if len(pts):
            cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
            pts = np.asarray(cloud.voxel_down_sample(pc.voxel).points)
        out = np.zeros((pc.points, 3))
        if len(pts):
            idx = (self.rng.choice(len(pts), pc.points, replace=False) if len(pts) >= pc.points
                   else np.resize(np.arange(len(pts)), pc.points))
            out[:] = pts[idx]
        return out

    def _goal_held(self, s) -> np.ndarray:
        c, sim = self.cfg, self.sim
        on_target = np.linalg.norm(s["cube_pos"][:, :2] - s["target_pos"][:, :2], axis=1) <= c.place_tolerance
        resting = ((s["cube_height"] < 0.005)
                   & (np.linalg.norm(sim.qvel[:, self.cube_dadr:self.cube_dadr + 3], axis=1) < 0.05))
        released = ~self.pad_contact.any(axis=1)
        s["placed"] = on_target & resting & released
        return s["placed"]

    def _step_info(self, s) -> dict:
        return {"placed": s["placed"].astype(np.float64),
                "cube_to_target": np.linalg.norm(s["cube_pos"][:, :2] - s["target_pos"][:, :2], axis=1)}

    def manifest(self) -> dict:
        m = super().manifest()
        c = self.cfg
        m["task"].update({"name": c.name, "place_tolerance": c.place_tolerance, "hold_s": c.hold_s,
                          "object_terms": {t: OBJECT_TERMS[t] for t in self.layout.terms if t in OBJECT_TERMS}})
        m["task"].pop("lift_height", None)
        return m
