"""The spine end to end: train a tiny run, export it, load it where only torch and numpy exist,
evaluate it, and refuse what must be refused."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from real.artifact import ArtifactError, ManifestMismatch, check_against_robot, load_artifact, read_manifest
from real.robot_spec import CONFIG_DIR, load_robot, spec_from_dict
from robotrl.checkpoint import CheckpointError, load_checkpoint
from robotrl.cli import main

ARTIFACTS = Path(__file__).parents[2] / "docs" / "artifacts"

TINY = ["num_envs=4", "algo.steps_per_env=16", "algo.actor_hidden=[32,32]", "algo.critic_hidden=[32,32]",
        "progress=false", "checkpoint_every=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run") / "walk"
    assert main(["train", *TINY, "total_steps=192", "video_seconds=1", "keep_checkpoints=true", f"run_dir={d}"]) == 0
    return d


@pytest.fixture(scope="module")
def artifact(run):
    assert main(["export", f"run={run}", f"out={run}/policy.pt"]) == 0
    return run / "policy.pt"


def test_run_folder_has_everything(run):
    for name in ("config.yaml", "checkpoints/last.pt", "metrics.csv", "learning_curves.png", "summary.json"):
        assert (run / name).is_file(), name


def test_ppo_trains_and_exports_an_arm_policy_with_per_joint_action_scales(tmp_path, capsys):
    """The on-policy artifact maps the action to targets by a scale per joint (the arm's 0.05 rad
    joints and its gripper finger's metres), not only the walkers' one scale."""
    d = tmp_path / "arm"
    assert main(["train", "task=arm_place", "robot=arm7", "task.action_type=absolute", "num_envs=2",
                 "algo.steps_per_env=16", "algo.actor_hidden=[32]", "algo.critic_hidden=[32]", "total_steps=64",
                 "video=false", "progress=false", f"run_dir={d}"]) == 0
    assert main(["export", f"run={d}", f"out={d}/arm.pt"]) == 0   # its parity check passes
    art = load_artifact(d / "arm.pt")
    scale = np.asarray(art.manifest["action"]["scale"])
    assert scale.ndim == 1 and len(set(scale.tolist())) > 1
    lower, upper = (np.asarray(art.manifest["robot"][k]) for k in ("q_lower", "q_upper"))
    action = np.full(len(scale), 0.5, dtype=np.float32)
    expected = np.clip(np.asarray(art.manifest["action"]["offset"]) + scale * 0.5, lower, upper)
    np.testing.assert_allclose(art.command(action), expected, atol=1e-6)
    assert main(["train", "--help"]) == 0 and "usage: robotrl" in capsys.readouterr().out


def test_a_new_run_into_an_existing_runs_folder_is_refused(run, capsys):
    """It would overwrite that run's checkpoints and config and append to its metrics.csv."""
    before = (run / "checkpoints" / "last.pt").stat().st_mtime_ns, (run / "metrics.csv").read_text()
    assert main(["train", *TINY, f"run_dir={run}"]) == 2
    assert f"run_dir={run} already holds a run: continue it with resume={run}" in capsys.readouterr().err
    assert ((run / "checkpoints" / "last.pt").stat().st_mtime_ns, (run / "metrics.csv").read_text()) == before
    assert main(["report", f"runs={run}", f"out={run}/report"]) == 2   # success-rate report: tabletop runs only
    assert "is an algo=ppo run; this report compares bc, resfit" in capsys.readouterr().err
    assert any((run / "tb").iterdir())
    assert (run / "rollout.mp4").stat().st_size > 1000
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[0].startswith("env_steps")


def test_kept_checkpoints_are_each_iterations_policy_and_export(run):
    """keep_checkpoints=true keeps every checkpoint under its step count (here every iteration of 64
    steps); the newest is last.pt itself, an earlier one holds that iteration's weights and exports."""
    import torch
    kept = sorted((run / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem[5:]))
    assert [p.name for p in kept] == ["step_64.pt", "step_128.pt", "step_192.pt"]
    last, first = load_checkpoint(run), load_checkpoint(kept[0])
    assert load_checkpoint(kept[-1])["iteration"] == last["iteration"] == 3 and first["iteration"] == 1
    assert not torch.equal(first["model"]["actor.0.weight"], last["model"]["actor.0.weight"])
    assert main(["export", f"run={kept[0]}"]) == 0   # named after its checkpoint, beside the run's own artifact
    assert load_artifact(run / "humanoid_walk_ppo_step_64.pt").manifest["training"]["env_steps"] == 64


def test_export_parity_and_manifest(artifact):
    art = load_artifact(artifact)
    m = art.manifest
    assert m["action"]["joint_names"] == list(load_robot("kid_biped").joint_names)
    assert [t["name"] for t in m["observation"]["terms"]][:2] == ["gait_clock", "command"]
    assert m["observation"]["size"] == sum(t["size"] for t in m["observation"]["terms"]) * m["observation"]["history"]
    for key in ("kp", "kd", "q_lower", "q_upper", "control_hz", "physics_hz"):
        assert key in m["robot"]
    assert len(m["hashes"]["weights_sha256"]) == 64 and len(m["hashes"]["config_sha256"]) == 64
    assert "torch" in m["versions"] and "mujoco" in m["versions"]
    assert m["policy"] == {"stateful": False}   # an MLP: no reset needed between episodes
    targets = art.command(np.full(10, 100.0))
    spec = load_robot("kid_biped")
    assert np.all(targets <= spec.q_upper + 1e-6) and np.all(targets >= spec.q_lower - 1e-6)
    obs = np.random.default_rng(0).normal(size=m["observation"]["size"]).astype(np.float32) * 5
    action, q_target = art.step(obs)   # the control tick's one call = forward then command
    np.testing.assert_allclose(action, art.act(obs), atol=1e-6)
    np.testing.assert_allclose(q_target, art.command(action), atol=1e-6)


def test_artifact_loads_without_training_stack(artifact):
    code = f"""
import sys, json, numpy as np
from real.artifact import load_artifact
art = load_artifact({str(artifact)!r})
a = art.act(np.zeros(art.manifest['observation']['size'], dtype=np.float32))
heavy = [m for m in ('mujoco', 'gymnasium', 'hydra', 'omegaconf', 'robotrl', 'sim') if m in sys.modules]
print(json.dumps({{'heavy': heavy, 'n': len(a)}}))
"""
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"heavy": [], "n": 10}


def test_manifest_is_read_without_any_runtime(tmp_path):
    """read_manifest gives what load_artifact's manifest is, for either format, in a process where
    torch and onnxruntime cannot be imported (the emulated firmware needs the task, not the policy);
    a file that is not an artifact gets load_artifact's clear error."""
    files = [str(ARTIFACTS / name) for name in ("kid_biped_walk_eco.pt", "kid_biped_walk_eco.onnx")]
    code = f"""
import sys, json
sys.modules['torch'] = sys.modules['onnxruntime'] = None   # any import of them fails
from real.artifact import read_manifest
print(json.dumps([read_manifest(f) for f in {files!r}]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    manifests = json.loads(out.stdout)
    assert manifests == [json.loads(json.dumps(load_artifact(f).manifest)) for f in files]
    assert manifests[0]["task"]["name"] == "humanoid_walk"
    fake = tmp_path / "notes.pt"
    fake.write_text("not an archive")
    with pytest.raises(ArtifactError, match="not a readable TorchScript archive"):
        read_manifest(fake)


@pytest.mark.parametrize("edit, needle", [
    (lambda text: text[:len(text) // 2], "its manifest is not valid JSON"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "action"}), "has no 'action'"),
    (lambda text: json.dumps({**json.loads(text), "robot": {"name": "x"}}), "has no 'robot.joint_names'"),
    (lambda text: "[1, 2]", "its manifest is a list, not a JSON object")])
def test_a_damaged_manifest_is_named_not_a_traceback(tmp_path, edit, needle):
    """A manifest edited by hand or damaged (the archive's own checksums still pass): the file
    and what is wrong with it, before any reader meets a KeyError."""
    import zipfile
    src, dst = ARTIFACTS / "kid_biped_walk_eco.pt", tmp_path / "edited.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/extra/manifest.json"):
                data = edit(data.decode()).encode()
            zout.writestr(item, data)
    with pytest.raises(ArtifactError, match=needle) as e:
        read_manifest(dst)
    assert str(dst) in str(e.value)
    with pytest.raises(ArtifactError, match="is a folder; an artifact is one file"):
        load_artifact(tmp_path)


def _robot_variant(**changes):
    raw = yaml.safe_load((CONFIG_DIR / "robot" / "kid_biped.yaml").read_text())
    raw.update(changes)
    return spec_from_dict(raw, source="variant.yaml")


def test_manifest_mismatch_is_refused_naming_the_difference(artifact):
    m = load_artifact(artifact).manifest
    check_against_robot(m, load_robot("kid_biped"))  # the right robot passes
    raw = yaml.safe_load((CONFIG_DIR / "robot" / "kid_biped.yaml").read_text())
    swapped = dict(raw, joints=[raw["joints"][1], raw["joints"][0], *raw["joints"][2:]])
    swapped.pop("mirror")
    with pytest.raises(ManifestMismatch, match="joint 0 is 'hip_yaw_l' in the artifact but 'hip_roll_l'"):
        check_against_robot(m, spec_from_dict(swapped, "swapped.yaml"))
    with pytest.raises(ManifestMismatch, match="control_hz"):
        check_against_robot(m, _robot_variant(control_hz=100))
    with pytest.raises(ManifestMismatch, match="10 joints in the artifact, 9 on the robot"):
        fewer = dict(raw, joints=raw["joints"][:9])
        fewer.pop("mirror")
        check_against_robot(m, spec_from_dict(fewer, "fewer.yaml"))
    gains = dict(raw, joints=[dict(raw["joints"][0], kp=99.0), *raw["joints"][1:]])
    with pytest.raises(ManifestMismatch, match="kp of joint 'hip_yaw_l'"):
        check_against_robot(m, spec_from_dict(gains, "gains.yaml"))


def test_corrupt_artifact_and_checkpoint_give_clear_errors(artifact, run, tmp_path, capsys):
    data = artifact.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a robotrl artifact|corrupt"):
        load_artifact(truncated)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError):
        load_artifact(tmp_path / "flipped.pt")
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "missing.pt")
    assert main(["eval", f"artifact={truncated}"]) == 2
    err = capsys.readouterr().err
    assert "truncated.pt" in err and "Traceback" not in err
    ck = (run / "checkpoints" / "last.pt").read_bytes()
    (tmp_path / "bad.pt").write_bytes(ck[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "bad.pt")


def test_export_refuses_when_parity_fails(run, tmp_path):
    from robotrl.export import ExportError, export_artifact
    from robotrl.networks import MlpDeployPolicy
    from robotrl.policies import artifact_manifest
    from robotrl.runner import build
    from omegaconf import OmegaConf
    ckpt = load_checkpoint(run)
    env, algo = build(OmegaConf.create(ckpt["config"]), num_envs=1)
    algo.model.load_state_dict(ckpt["model"])
    manifest = artifact_manifest(env.task, ckpt["config"], "x", 0)
    out = tmp_path / "p.pt"
    with pytest.raises(ExportError, match="parity check failed"):
        export_artifact(MlpDeployPolicy(algo.model, manifest), manifest, out, ckpt["parity_obs"],
                        lambda x: algo.model.action_mean(x) + 1e-3)
    assert not out.exists()


def test_eval_writes_json(artifact, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", f"artifact={artifact}", "episodes=2", "num_envs=2", f"out={out}",
                 "task.episode_s=1.0", "command=[0.2,0,0]"]) == 0
    res = json.loads(out.read_text())
    assert res["episodes"] == 2 and 0.0 <= res["success_rate"] <= 1.0
    for key in ("return_mean", "falls", "vel_tracking_error", "mean_power_w"):
        assert np.isfinite(res[key])
    assert res["mean_power_w"] > 0
    assert list(res["joint_power_w"]) == list(load_robot("kid_biped").joint_names)   # where the power goes
    assert sum(res["joint_power_w"].values()) == pytest.approx(res["mean_power_w"], rel=1e-6)


def test_resume_after_kill(tmp_path, capsys):
    d = tmp_path / "killed"
    cmd = [sys.executable, "-m", "robotrl.cli", "train", *TINY, "total_steps=100000", "video=false", f"run_dir={d}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2])
    ckpt = d / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt.exists() and load_checkpoint(ckpt)["iteration"] >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = load_checkpoint(ckpt)["iteration"]
    assert done_before >= 2
    total = (done_before + 2) * 64
    assert main(["train", f"resume={d}", f"total_steps={total}"]) == 0
    after = load_checkpoint(ckpt)
    assert after["iteration"] == done_before + 2 and after["env_steps"] == total
    steps = [int(r.split(",")[0]) for r in (d / "metrics.csv").read_text().splitlines()[1:]]
    assert steps[-1] == total and steps == sorted(steps)
    # Resumed again without total_steps, the run keeps its own length (not the default's) ...
    assert main(["train", f"resume={d}"]) == 0
    assert load_checkpoint(ckpt)["env_steps"] == total
    # ... and an override beside resume= is refused, not silently lost.
    assert main(["train", f"resume={d}", "algo.lr=0.1"]) == 2
    assert "resume= goes on with the run's own config; it takes only total_steps=N besides" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["train", "robot=hexapod"], "unknown robot 'hexapod'; available: .*kid_biped"),
    (["train", "task=fly"], "unknown task 'fly'; available: .*humanoid_walk"),
    (["train", "algo=sac9"], "unknown algo 'sac9'; available: .*ppo"),
    (["train", "algo.lr=fast", *TINY], "algo.lr|lr"),
    (["train", "algo.gamma=2.0", *TINY], "algo.gamma"),
    (["train", "task.episode_s=-3", *TINY], "task.episode_s"),
    (["train", "task.nonsense=1"], "unknown key 'task.nonsense'; task has: .*episode_s"),   # not Hydra's '+task.x'
    (["train", "algo.lrr=1"], "unknown key 'algo.lrr'; algo has: .*, lr, "),
    (["train", "nonsense=1"], "unknown key 'nonsense'; the run has: task, algo, seed"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "task.command.vz=1"],
     "task.command.vz: no such key in task humanoid_walk command; its keys: vx, vy, yaw_rate"),
    (["train", "checkpoint_every=0"], "checkpoint_every must be an integer >= 1, got '0'"),
    (["train", "num_envs=two"], "num_envs must be an integer >= 1, got 'two'"),
    (["train", "total_steps=-5"], "total_steps must be a number >= 1"),
    (["train", "total_steps=inf"], "total_steps must be a number >= 1, got 'inf'"),
    (["train", "run_dir="], "run_dir= is empty"),
    (["train", "task.physics_hz=75", *TINY], "task.physics_hz=75 must be a whole multiple of the robot's control"),
    (["train", "task.command.vx=[0.4,0]", *TINY], r"task.command.vx must be \[low, high\] with low <= high"),
    (["train", "robot=arm7", *TINY], "task humanoid_walk needs a legged robot .*'arm7' has none"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "task.episode_s=nan"],
     "task.episode_s must be a finite number > 0, got nan"),
    (["train", "algo.lr=nan", *TINY], "algo.lr must be a finite number, got nan"),
    (["train", "algo=eco", "algo.energy_budget=inf", *TINY], "algo.energy_budget must be a finite number, got inf"),
    (["train", "task=arm_lift", "algo=resfit", "algo.actor_lr=nan"], "algo.actor_lr must be a finite number"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "task.history=3"],
     r"task.history=3: changes what the artifact was trained to see or do \(observation.history: 1 in the artifact"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "task.observation.joint_vel=0.1"],
     r"observation.terms\[3\].scale: 0.05 in the artifact, 0.1 here"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "task.action_scale=1"], "action.scale: 0.25 in the"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "task.name=arm_lift"],
     "task.name: the artifact was trained on task humanoid_walk"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "video=v.txt"], "video=v.txt: a video file ends in"),
    (["train", "task=arm_lift", "robot=arm7"], r"task arm_lift's action is a step of it \(task.action_type=delta\)"),
    (["train", "task=arm_lift", "task.action_type=absolute", "algo=eco", "algo.motion=none"],
     "algo=eco constrains the energy the task measures at the physics rate, and task arm_lift does not measure it"),
    (["train", "algo.lr=inf", *TINY], "algo.lr must be a finite number, got inf"),
    (["train", "task=arm_lift", "algo=rlpd", "task.reward_mode=dense"],
     r"algo.clip_q_target bound Q to \[algo.v_min, algo.v_max\] = \[0, 1\]"),
    (["train", "resume="], r"resume= takes one run folder or checkpoint, got \[''\]"),
    (["train", "algo.gamma=abc", *TINY], "algo.gamma: Value 'abc' of type 'str' could not be converted to Float"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "command=[nan,0,0]"], "command must be 3 finite"),
    (["eval", f"artifact={ARTIFACTS}"], "artifacts is a folder; an artifact is one file"),
    (["train", "video=maybe"], "video must be true or false, got 'maybe'"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "episodes=0"], "episodes must be an integer >= 1"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "command=[0.2,x,0]"], "command must be 3 finite"),
    (["eval", f"artifact={ARTIFACTS / 'arm_lift_resfit.pt'}", "command=[0.2,0,0]"],
     "command=: task arm_lift has no velocity command"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "num_envs=many"], "num_envs must be an integer"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", "task.physics_hz=0"], "task.physics_hz must be > 0"),
    (["compare", "runs=[runs/x]", "eval_seeds=[0,a]"], "eval_seeds must be an integer >= 0, got 'a'"),
    (["demos", "noise=x"], "noise must be a number >= 0, got 'x'"),
    (["operate", "cmd_vel=[0.2,0]"], r"cmd_vel must be 3 finite numbers like \[0,0,0\], got '\[0.2,0\]'"),
    (["bench", "infer", "--calls", "0"], "--calls must be an integer >= 100, got '0'"),
    (["bench", "sim", "--seconds", "x"], "--seconds must be a number >= 0.1, got 'x'"),
    (["bench", "loop", "--artifact", "/nonexistent.pt"], "artifact not found: /nonexistent.pt"),
    (["compare", f"artifacts=[{ARTIFACTS / 'arm_lift_resfit.pt'}]", "out=/tmp/robotrl_test_compare"],
     "arm_lift_resfit.pt is a policy for task arm_lift; compare reports power and velocity tracking"),
    (["report", "runs=,"], "report needs runs=<run dir>"),
    (["report", f"runs={Path(__file__).parents[2] / 'configs'}"], "configs is not a run folder"),
    (["report", "runs=/nonexistent"], "/nonexistent is not a run folder: it has no config.yaml or metrics.csv"),
    (["export", f"run={ARTIFACTS / 'kid_biped_walk_eco.onnx'}"], "kid_biped_walk_eco.onnx is an exported artifact"),
    (["export", f"run={ARTIFACTS / 'kid_biped_walk_eco.pt'}"], "kid_biped_walk_eco.pt is an exported artifact, not a "
     "checkpoint: give a run folder or its checkpoints/"),
    # Where results go is checked before the work that makes them.
    (["train", f"run_dir={__file__}/run"], f"run_dir={__file__}/run: {__file__} is a file, not a folder"),
    (["eval", f"artifact={ARTIFACTS / 'kid_biped_walk_eco.pt'}", f"out={__file__}/eval.json"],
     "is a file, not a folder"),
    (["export", "run=runs/x", f"out={ARTIFACTS}"], "out=.*artifacts is a folder; out names a file"),
    (["demo", f"out={__file__}"], "is a file, not a folder"),
    (["bench", "infer", "--json", f"{__file__}/b.json"], "--json=.* is a file, not a folder"),
    (["export"], "run="),
    (["eval", "artifact=/nonexistent.pt"], "artifact not found"),
    (["frobnicate"], "unknown command"),
])
def test_bad_input_is_named(args, needle, capsys, tmp_path):
    own_run_dir = args[0] == "train" and not any(a.startswith("run_dir=") for a in args)
    assert main([*args, f"run_dir={tmp_path}/x"] if own_run_dir else args) == 2
    err = capsys.readouterr().err
    import re
    assert re.search(needle, err), err
    assert "Traceback" not in err
    if own_run_dir:   # refused before anything is written
        assert not (tmp_path / "x").exists()


def test_init_from_copies_the_policy_and_keeps_new_parts_fresh(run, capsys):
    import torch
    from robotrl.runner import build, init_policy
    from robotrl.cli import compose_train_config
    cfg = compose_train_config(["algo=eco", "num_envs=2", "algo.actor_hidden=[32,32]", "algo.critic_hidden=[32,32]"])
    _, algo = build(cfg)
    init_policy(algo.model, str(run))
    theirs = load_checkpoint(run)["model"]
    for k in ("actor.0.weight", "obs_norm.mean", "log_std"):
        torch.testing.assert_close(algo.model.state_dict()[k], theirs[k])
    assert "fresh: cost_head" in capsys.readouterr().out


def test_fine_tuning_starts_at_the_source_runs_learning_rate(run, tmp_path):
    """A trained policy's action std is small, and a fresh Adam at algo.lr moves its means by many
    of those stds in the first update (a walker toppled for ~35 iterations at every fine-tuning
    stage). init_lr=source continues where the source's adaptive schedule ended."""
    import math
    import torch
    from robotrl.logging import read_csv
    trained = load_checkpoint(run)
    trained["model"]["log_std"].fill_(math.log(0.05))
    trained["algo_state"]["lr"] = 1e-5
    torch.save(trained, tmp_path / "trained.pt")
    first_kl = {}
    for init_lr in ("source", "config"):
        out = tmp_path / init_lr
        assert main(["train", *TINY, "total_steps=64", f"init_from={tmp_path / 'trained.pt'}", f"init_lr={init_lr}",
                     f"run_dir={out}"]) == 0
        first_kl[init_lr] = read_csv(out / "metrics.csv")["kl"][0]
    assert first_kl["source"] < 0.02 and first_kl["config"] > 10 * first_kl["source"], first_kl   # target 0.01


def test_every_offline_algo_setting_is_in_its_yaml():
    """Hydra refuses a key its YAML does not have, so a setting added to an algo's dataclass but not
    to configs/algo/<name>.yaml cannot be given on the command line. The exceptions are settings of a
    shared schema that the algo does not offer (RLPD has no base to bias; residual PPO's actor is
    feed-forward)."""
    import dataclasses

    import yaml

    from real.robot_spec import CONFIG_DIR
    from robotrl.offpolicy import algo_registry
    not_settable = {"rlpd": {"base_bias"}, "resppo": {"rnn", "rnn_size", "normalize_advantages"}}
    for name, schema in algo_registry().items():
        keys = set(yaml.safe_load((CONFIG_DIR / "algo" / f"{name}.yaml").read_text()))
        missing = {f.name for f in dataclasses.fields(schema)} - keys - not_settable.get(name, set())
        assert not missing, f"configs/algo/{name}.yaml lacks {sorted(missing)}"
