"""ECO and its baselines: the multipliers, the mirror maps, the energy cost, every method through
the real runner, clear errors, and the comparison report."""
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from real.observations import ObsLayout, RobotState
from real.robot_spec import CONFIG_DIR, load_robot, spec_from_dict
from robotrl.algos.constrained import PIDMultipliers
from robotrl.algos.eco import LagrangeMultipliers, ReferenceGait
from robotrl.cli import compose_train_config, main
from robotrl.logging import read_csv
from robotrl.mirror import action_mirror, obs_mirror
from robotrl.runner import algo_config

TINY = ["num_envs=4", "algo.steps_per_env=16", "algo.actor_hidden=[32,32]", "algo.critic_hidden=[32,32]",
        "progress=false", "video=false", "total_steps=128"]
# name -> overrides: every method, both C2 forms, both energy units, and energy alone
VARIANTS = {
    "eco": ["algo=eco"],
    "eco_reference_gait": ["algo=eco", "algo.motion=reference_gait", "algo.motion_budget=0.02", "algo.energy_unit=J",
                           "algo.energy_budget=20"],
    "ppo_shaping": ["algo=ppo_shaping"],
    "ipo": ["algo=ipo", "algo.motion=reference_gait"],
    "p3o": ["algo=p3o"],
    "crpo": ["algo=crpo"],
    "pid_lagrangian": ["algo=pid_lagrangian", "algo.motion=none", "algo.energy_budget=15"],
}
WALK_OBS = yaml.safe_load((CONFIG_DIR / "task" / "humanoid_walk.yaml").read_text())["observation"]


# ---- the multipliers, on min (x − 3)² s.t. x ≤ b ----
@pytest.mark.parametrize("make", [lambda: LagrangeMultipliers(1, lr=0.05), lambda: PIDMultipliers(1, 0.1, 0.05, 0.01)],
                         ids=["adam_lagrangian", "pid"])
def test_multiplier_rises_when_violated_and_decays_to_zero_when_slack(make):
    mult, x = make(), torch.tensor([5.0])

    def solve(budget, iters=600):
        nonlocal x
        lams = []
        for _ in range(iters):
            lam = mult.update(x.clone(), torch.tensor([budget]))
            x = x - 0.05 * (2 * (x - 3) + lam)   # primal descent on the Lagrangian (x − 3)² + λ·x
            lams.append(float(lam))
        return lams

    lams = solve(1.0)   # violated: the unconstrained optimum 3 is above the budget 1
    assert lams[0] > 0 and lams[30] > lams[5] > lams[0]
    assert abs(float(x) - 1.0) < 0.02 and abs(lams[-1] - 4.0) < 0.1   # KKT: λ* = 2·(3 − 1)
    lams = solve(5.0)   # slack: the optimum 3 is inside the budget
    assert lams[-1] == 0.0 and min(lams) >= 0.0 and abs(float(x) - 3.0) < 0.02


# ---- the mirror maps ----
def _mirror_setup(history=2):
    spec = load_robot("kid_biped")
    layout = ObsLayout.make(WALK_OBS, spec.n_joints, history)
    return spec, layout, obs_mirror(spec, layout), action_mirror(spec)


def test_mirror_maps_are_involutions():
    spec, layout, m_obs, m_act = _mirror_setup()
    obs, act = torch.randn(7, layout.size), torch.randn(7, spec.n_joints)
    torch.testing.assert_close(m_obs(m_obs(obs)), obs)
    torch.testing.assert_close(m_act(m_act(act)), act)
    assert not torch.allclose(m_obs(obs), obs)


def test_mirror_maps_follow_the_robot_config():
    spec, layout, m_obs, m_act = _mirror_setup()
    names = list(spec.joint_names)
    a = np.zeros(spec.n_joints)
    a[names.index("hip_yaw_l")], a[names.index("hip_roll_l")], a[names.index("hip_pitch_l")] = 0.3, 0.2, -0.5
    b = m_act(a)
    assert b[names.index("hip_yaw_r")] == -0.3 and b[names.index("hip_roll_r")] == -0.2   # lateral axes flip
    assert b[names.index("hip_pitch_r")] == -0.5 and b[names.index("hip_pitch_l")] == 0.0
    lateral = np.array([("yaw" in n or "roll" in n) for n in names])
    assert np.all(m_act.sign[lateral] == -1) and np.all(m_act.sign[~lateral] == 1)

    # The observation of the physically mirrored state, half a gait period later, is M_s(observation).
    rng = np.random.default_rng(0)
    n, frames, mirrored = spec.n_joints, [], []
    for phase in (0.1, 0.12):
        q, dq, act = spec.q_default + rng.normal(0, 0.2, n), rng.normal(0, 2, n), rng.normal(0, 1, n)
        quat = rng.normal(size=4)
        quat /= np.linalg.norm(quat)
        gyro, cmd = rng.normal(size=3), rng.normal(size=3)
        frames.append(layout.frame(RobotState(q, dq, quat, gyro, cmd, np.float64(phase), act, spec.q_default)))
        reflect = np.array([1.0, -1.0, 1.0, -1.0])   # orientation reflected through the x-z plane: (w, −x, y, −z)
        mirrored.append(layout.frame(RobotState(m_act(q), m_act(dq), quat * reflect, gyro * [-1, 1, -1],
                                                cmd * [1, -1, -1], np.float64(phase + 0.5), m_act(act),
                                                spec.q_default)))
    obs, expected = np.concatenate(frames), np.concatenate(mirrored)
    np.testing.assert_allclose(m_obs(obs), expected, atol=1e-5)
    clock = slice(0, 2)
    np.testing.assert_allclose(m_obs(obs)[clock], [-np.sin(2 * np.pi * 0.1), -np.cos(2 * np.pi * 0.1)], atol=1e-6)


def test_one_folded_actor_pass_minimises_the_full_mirror_loss():
    """The minibatch and its mirrored rows go through the actor in one pass: the same means as two
    passes, and steps on a quarter of each batch (mirror_fraction) drive down the loss on all states."""
    from robotrl.runner import build
    torch.manual_seed(0)
    _, algo = build(compose_train_config(["algo=eco", *TINY]))
    obs = torch.randn(512, algo.buffer.obs.shape[-1])
    with torch.no_grad():
        algo.model.actor[-1].weight *= 100   # a policy far from symmetric (its init is near 0)
    mu, m_obs = algo.model.action_mean, algo.mirror_obs

    def full_loss():
        with torch.no_grad():
            return float(algo.mirror_loss(mu(obs), mu(m_obs(obs))))
    dist, mirrored = algo.minibatch_distribution(obs[:64], torch.arange(64))
    torch.testing.assert_close(dist.mean, mu(obs[:64]))
    torch.testing.assert_close(mirrored, mu(m_obs(obs[:algo.mirror_rows(64)])))
    before = full_loss()
    opt = torch.optim.Adam(algo.model.actor.parameters(), lr=1e-3)
    for _ in range(200):
        idx = torch.randperm(512)[:64]
        dist, mirrored = algo.minibatch_distribution(obs[idx], idx)
        loss = algo.mirror_loss(dist.mean, mirrored)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert algo.mirror_rows(64) == 16 and before > 0.1 and full_loss() < 0.1 * before


def test_mirror_needs_the_robot_mirror_section():
    raw = yaml.safe_load((CONFIG_DIR / "robot" / "kid_biped.yaml").read_text())
    del raw["mirror"]
    with pytest.raises(ValueError, match="mirror"):
        action_mirror(spec_from_dict(raw))


def test_reference_gait_lifts_the_right_leg_in_the_first_half():
    spec = load_robot("kid_biped")
    layout = ObsLayout.make(WALK_OBS, spec.n_joints)
    cfg = algo_config({"name": "eco", "robot": "kid_biped", "observation": WALK_OBS, "motion": "reference_gait"})
    ref = ReferenceGait(spec, layout, cfg)
    names = list(spec.joint_names)
    z = np.zeros(spec.n_joints)

    def obs(phase, q):
        return torch.as_tensor(layout.frame(RobotState(q, z, np.array([1.0, 0, 0, 0]), z[:3], z[:3],
                                                       np.float64(phase), z, spec.q_default)))[None]
    assert ref.first[names.index("knee_r")] == pytest.approx(0.4) and ref.first[names.index("knee_l")] == 0
    on_reference = spec.q_default + ref.first.numpy()   # phase ¼: sin = 1, the right leg at full lift
    assert ref.cost(obs(0.25, on_reference)).item() < 1e-10
    assert ref.cost(obs(0.25, spec.q_default)).item() == pytest.approx(float((ref.first ** 2).mean()), rel=1e-5)
    assert ref.cost(obs(0.75, spec.q_default)).item() == pytest.approx(float((ref.second ** 2).mean()), rel=1e-5)


# ---- the energy cost is the task's ----
def _rollout(*overrides):
    """A tiny constrained run's first 12-step rollout: (env, algo, last critic obs, each step's info)."""
    from robotrl.runner import build
    cfg = compose_train_config([*overrides, "num_envs=3", "task.episode_s=0.1", "algo.steps_per_env=12",
                                "algo.actor_hidden=[16]", "algo.critic_hidden=[16]"])
    env, algo = build(cfg)
    obs, info = env.reset(seed=0)
    critic, infos = info["critic_obs"], []
    for _ in range(12):
        obs, reward, terminated, truncated, info = algo.env_step(env, obs, critic)
        critic = info["critic_obs"]
        infos.append(info)
    return env, algo, torch.as_tensor(critic), infos


def test_energy_cost_is_the_task_info_energy():
    env, algo, critic, infos = _rollout("algo=eco")
    finished = []
    for t, info in enumerate(infos):
        np.testing.assert_allclose(algo.costs[t, :, 0].numpy(), info["energy_j"], rtol=1e-6)
        if "_final_obs" in info:
            done = info["_final_obs"]
            finished += (info["episode_energy_j"][done] / (info["episode_length"][done] * env.task.dt)).tolist()
    assert finished and infos[-1]["energy_j"].min() > 0
    # J_C1: mean over finished episodes of episode energy / duration, in W, from the task's own numbers
    assert algo.episodes.estimate()[0].item() == pytest.approx(np.mean(finished), rel=1e-5)
    stats = algo.update(critic, progress=0.0, step=36)
    assert stats["constraint/J1_energy_W"] == pytest.approx(np.mean(finished), rel=1e-5)


def test_rollout_estimate_is_the_rollouts_own_power():
    """algo.cost_estimate=rollout: J_C1 is this rollout's energy over its duration (W), not the
    finished episodes' (which trail the policy)."""
    env, algo, critic, infos = _rollout("algo=crpo", "algo.cost_estimate=rollout")
    algo.episodes.finished.extend([torch.tensor([1e3])] * 5)   # stale episodes at 1 kW: the estimate must not see them
    stats = algo.update(critic, progress=0.0, step=36)
    power = np.mean([info["energy_j"] for info in infos]) / env.task.dt
    assert stats["constraint/J1_energy_W"] == pytest.approx(power, rel=1e-5)
    assert stats["constraint/J1_energy_W"] < 200


@pytest.mark.parametrize("unit", ["W", "J"])
def test_a_fall_does_not_make_a_rate_constraint_cheaper(unit):
    """Every step costs the same; env 1 falls after step 5. Measured as a rate (W), its cost-to-go at
    the fall continues at J_C per step, so every step's cost return equals the steady env's. Measured
    per episode (J), the fall ends the energy, and the return drops to that last step's share."""
    from robotrl.runner import build
    _, algo = build(compose_train_config(["algo=eco", f"algo.energy_unit={unit}", "algo.energy_budget=5", *TINY]))
    T, N, _ = algo.costs.shape
    step_energy = 0.1                                    # J per control step: 0.1 / dt watts
    algo.costs.fill_(step_energy)
    algo.cost_rollout_values.fill_(step_energy)          # the steady value of that cost, in the critic's units
    algo.buffer.dones.zero_()
    algo.falls.zero_()
    algo.buffer.dones[5, 1] = algo.falls[5, 1] = 1.0
    algo.J = torch.tensor([step_energy / algo.dt if unit == "W" else step_energy * T, 0.0])
    _, returns = algo.cost_gae(torch.full((N, 1), step_energy))
    steady, fallen = returns[:, 0, 0], returns[:, 1, 0]
    torch.testing.assert_close(steady, torch.full((T,), step_energy))
    if unit == "W":
        torch.testing.assert_close(fallen, steady)
    else:
        assert fallen[5].item() == pytest.approx((1 - algo.cfg.gamma) * step_energy, rel=1e-5)
        assert (fallen[:6] < steady[:6]).all() and torch.allclose(fallen[6:], steady[6:])


# ---- every method through the real runner ----
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eco_runs")
    out = {}
    for name, overrides in VARIANTS.items():
        assert main(["train", *TINY, *overrides, f"run_dir={root / name}"]) == 0, name
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_method_trains_and_logs_its_multipliers(runs, name):
    cols = read_csv(runs[name] / "metrics.csv")
    assert len(cols["env_steps"]) == 2
    cfg = yaml.safe_load((runs[name] / "config.yaml").read_text())["algo"]
    unit, motion = cfg["energy_unit"], cfg["motion"]
    keys = ["constraint/lambda1_energy", f"constraint/J1_energy_{unit}", f"constraint/b1_energy_{unit}"]
    if motion != "none":
        keys += [f"constraint/lambda2_{motion}", f"constraint/J2_{motion}", f"constraint/b2_{motion}"]
    else:
        assert not any(k.startswith("constraint/lambda2") for k in cols)
    for k in keys:
        assert k in cols and all(math.isfinite(v) and v >= 0 for v in cols[k]), k
    assert cols[f"constraint/b1_energy_{unit}"][-1] == cfg["energy_budget"]
    if name == "eco":   # energy over budget from the start (random actions use ~80 W): λ1 rises, λ2 (slack) stays 0
        assert cols["constraint/J1_energy_W"][-1] > cfg["energy_budget"]
        assert 0 < cols["constraint/lambda1_energy"][0] < cols["constraint/lambda1_energy"][1]
        assert cols["constraint/lambda2_symmetry"][-1] == 0.0


# ---- configs and errors ----
def test_every_constrained_method_runs_the_shared_keys():
    """ECO and its baselines extend configs/algo/shared/constrained.yaml; none may set a shared key
    differently, or the methods would not compare fairly."""
    shared = yaml.safe_load((CONFIG_DIR / "algo" / "shared" / "constrained.yaml").read_text())
    for name in ("eco", "ppo_shaping", "ipo", "p3o", "crpo", "pid_lagrangian"):
        cfg = OmegaConf.to_container(compose_train_config([f"algo={name}"]))
        algo, task = cfg["algo"], cfg["task"]
        expected = {**shared, **{k: task[k] for k in ("robot", "observation", "history")}}   # interpolated
        assert {k: algo[k] for k in expected} == expected, name
        assert algo["name"] == name


@pytest.mark.parametrize("override, key", [("algo.energy_budget=-5", "algo.energy_budget"),
                                           ("algo.motion_budget=0", "algo.motion_budget"),
                                           ("algo.motion=gait_style", "algo.motion"),
                                           ("algo.energy_unit=kWh", "algo.energy_unit"),
                                           ("algo.cost_estimate=window", "algo.cost_estimate"),
                                           ("algo.cost_estimate=rollout algo.energy_unit=J", "algo.cost_estimate")])
@pytest.mark.parametrize("algo", ["eco", "p3o"])
def test_bad_budget_or_constraint_name_is_named(algo, override, key, capsys, tmp_path):
    cfg = compose_train_config([f"algo={algo}", *override.split()])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        algo_config(OmegaConf.to_container(cfg.algo))
    assert main(["train", f"algo={algo}", *override.split(), f"run_dir={tmp_path}/r", *TINY]) == 2
    assert key in capsys.readouterr().err


# ---- the comparison report ----
def test_compare_writes_table_and_plots(runs, tmp_path, monkeypatch):
    import robotrl.runner
    trained = []

    def fake_train(cfg):   # the train=true path, without training: reuse a tiny run's folder
        trained.append((cfg.algo.name, cfg.algo.get("energy_budget"), cfg.seed))
        shutil.copytree(runs[cfg.algo.name], cfg.run_dir)
        return Path(cfg.run_dir)
    monkeypatch.setattr(robotrl.runner, "train", fake_train)
    out = tmp_path / "report"
    assert main(["compare", f"runs=[{runs['pid_lagrangian']}]", "train=true", "methods=[eco,ppo_shaping]",
                 "budgets=[20,40]", "steps=128", "episodes=2", "eval_envs=2", f"out={out}"]) == 0
    assert trained == [("eco", 20.0, 0), ("eco", 40.0, 0), ("ppo_shaping", 30.0, 0)]   # shaping ignores budgets
    table = (out / "report.md").read_text()
    for label in ("pid_lagrangian", "eco_b20", "eco_b40", "ppo_shaping"):
        assert f"| {label} |" in table
    for plot in ("power_over_training.png", "multipliers_over_training.png", "tradeoff.png"):
        assert (out / plot).stat().st_size > 1000
    rows = {r["label"]: r for r in yaml.safe_load((out / "report.json").read_text())}
    assert rows["pid_lagrangian"]["c1_ok"] == (rows["pid_lagrangian"]["power_w"] <= 15)
    # the shaping baseline has an energy weight, not a budget: no b1, no C1 verdict
    assert rows["ppo_shaping"]["b1"] is None and "c1_ok" not in rows["ppo_shaping"]
    assert f"| reward −{rows['ppo_shaping']['energy_weight']:.3g}/J |" in table
    assert 0.0 <= rows["eco_b20"]["success_rate"] <= 1.0 and rows["eco_b20"]["power_w"] > 0
    # where the power goes: one figure per leg joint, in the robot's order, summing to the row's power
    joints = rows["eco_b20"]["joint_power_w"]
    assert list(joints) == list(load_robot("kid_biped").joint_names)
    assert sum(joints.values()) == pytest.approx(rows["eco_b20"]["power_w"], rel=1e-6)
    assert f"| eco_b20 | {joints['hip_yaw_l']:.2f} | {joints['hip_roll_l']:.2f} |" in table


def test_compare_over_several_evaluation_seeds(runs, tmp_path):
    """eval_seeds=[0,1]: one eval JSON per seed; the row's figures are their means, with their ranges."""
    out = tmp_path / "seeds"
    assert main(["compare", f"runs=[{runs['eco']}]", "eval_seeds=[0,1]", "episodes=2", "eval_envs=2",
                 f"out={out}"]) == 0
    row = yaml.safe_load((out / "report.json").read_text())[0]
    per_seed = [yaml.safe_load((out / "eval" / f"eco.seed{k}.json").read_text()) for k in (0, 1)]
    powers = [e["mean_power_w"] for e in per_seed]
    assert powers[0] != powers[1]   # the seeds drew different episodes
    assert row["power_w"] == pytest.approx(np.mean(powers)) and row["power_w_range"] == [min(powers), max(powers)]
    errors = [e["vel_tracking_error"] for e in per_seed]
    assert row["vel_error_range"] == [min(errors), max(errors)] and row["eval_seeds"] == [0, 1]
    table = (out / "report.md").read_text()
    assert "mean over evaluation seeds 0, 1" in table
    assert f"| {row['power_w']:.2f} ({min(powers):.2f}–{max(powers):.2f}) |" in table


def test_report_labels_tell_runs_of_the_same_name_apart():
    """Two chains have stages of the same name: each row, artifact and eval file gets the shortest
    trailing path that is its own, not a position number."""
    from robotrl.compare import unique_labels
    paths = [Path("runs/chain2/eco_b75"), Path("runs/chain_sym/eco_b75"), Path("runs/chain2/eco_b11"),
             Path("docs/artifacts/kid_biped_walk_eco")]
    assert unique_labels(paths) == ["chain2/eco_b75", "chain_sym/eco_b75", "eco_b11", "kid_biped_walk_eco"]
    assert unique_labels([Path("/r/a/x"), Path("/r/b/a/x")]) == ["r/a/x", "b/a/x"]   # one path ends the other
    assert unique_labels([Path("a/x"), Path("a/x")]) == ["x", "x_1"]   # one run given twice


def test_resume_restores_the_multipliers_optimiser_and_cost_window(runs, tmp_path):
    """A resumed ECO run goes on with λ's Adam moments, the optimiser's and the window of finished
    episodes' costs that J is estimated from, not fresh ones."""
    from robotrl.checkpoint import load_checkpoint
    run = tmp_path / "eco"
    shutil.copytree(runs["eco"], run)
    before = load_checkpoint(run)
    state = before["algo_state"]
    assert state["lambda_opt"]["state"] and state["opt"]["state"]   # Adam moments exist
    assert main(["train", f"resume={run}", "total_steps=192"]) == 0
    after = load_checkpoint(run)
    assert after["iteration"] == before["iteration"] + 1
    # Adam's step count went on from where it was: the optimiser state was loaded, not re-created
    step = lambda s: int(next(iter(s["state"].values()))["step"])  # noqa: E731
    assert step(after["algo_state"]["lambda_opt"]) == step(state["lambda_opt"]) + 1
    assert step(after["algo_state"]["opt"]) > step(state["opt"])
    assert len(after["algo_state"]["episodes"]["finished"]) >= len(state["episodes"]["finished"])
