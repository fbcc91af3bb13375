"""ONNX artifacts beside TorchScript: the same tick (action and joint targets), the same manifest,
a memory carried by the runtime, loadable on a robot computer without torch, and refusals that
name what is wrong."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch

from real.artifact import ArtifactError, OnnxArtifact, load_artifact
from robotrl.cli import main
from robotrl.export import ExportError, export_artifact
from robotrl.networks import DeployModule

TINY = ["num_envs=4", "algo.steps_per_env=16", "algo.actor_hidden=[32,32]", "algo.critic_hidden=[32,32]",
        "progress=false", "checkpoint_every=1", "video=false", "total_steps=128"]
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module", params=["none", "gru", "lstm"])
def pair(request, tmp_path_factory):
    """One tiny run per memory kind, exported twice: (TorchScript file, ONNX file)."""
    rnn = request.param
    run = tmp_path_factory.mktemp(f"onnx_{rnn}") / "walk"
    assert main(["train", *TINY, f"algo.rnn={rnn}", "algo.rnn_size=16", f"run_dir={run}"]) == 0
    assert main(["export", f"run={run}", f"out={run}/policy.pt"]) == 0
    assert main(["export", f"run={run}", "format=onnx"]) == 0   # default name: <task>_<algo>.onnx
    return run / "policy.pt", run / "humanoid_walk_ppo.onnx"


def test_exporting_again_gives_the_same_artifact(pair, tmp_path):
    """The same run exports to the same ONNX bytes and the same TorchScript manifest and weights (a
    TorchScript file itself differs: torch writes a random serialization id into each one)."""
    ts, ox = pair
    run = ts.parent
    assert main(["export", f"run={run}", f"out={tmp_path}/again.onnx"]) == 0
    assert (tmp_path / "again.onnx").read_bytes() == ox.read_bytes()
    assert main(["export", f"run={run}", f"out={tmp_path}/again.pt"]) == 0
    assert load_artifact(tmp_path / "again.pt").manifest == load_artifact(ts).manifest


def _observations(art, n=40, seed=0):
    rng = np.random.default_rng(seed)   # wide enough to hit the observation and action clips
    return rng.normal(size=(n, art.manifest["observation"]["size"])).astype(np.float32) * 5


def test_onnx_artifact_is_the_torchscript_one(pair):
    ts, ox = (load_artifact(p) for p in pair)
    assert isinstance(ox, OnnxArtifact)
    assert ox.manifest["hashes"]["weights_sha256"] == ts.manifest["hashes"]["weights_sha256"]
    assert ox.manifest["policy"] == ts.manifest["policy"] and ox.manifest["robot"] == ts.manifest["robot"]
    io = ox.manifest["onnx"]
    assert io["inputs"] == ["obs", "memory"][:1 + bool(io["memory_size"])]
    policy = ts.manifest["policy"]
    assert io["memory_size"] == {"gru": 1, "lstm": 2}.get(policy.get("rnn"), 0) * policy.get("rnn_size", 0)
    obs = _observations(ts)
    for i, o in enumerate(obs):
        if i == 20:   # a new episode halfway: both forget their memory
            ts.reset()
            ox.reset()
        (a_ts, q_ts), (a_ox, q_ox) = ts.step(o), ox.step(o)
        np.testing.assert_allclose(a_ox, a_ts, atol=1e-5)
        np.testing.assert_allclose(q_ox, q_ts, atol=1e-5)
        assert q_ox.dtype == np.float64 and a_ox.shape == a_ts.shape
    if not io["memory_size"]:   # a stateless policy takes a batch in one call (robotrl eval does)
        np.testing.assert_allclose(ox.act(obs), ts.act(obs), atol=1e-5)


def test_onnx_memory_is_reset_by_the_controller(pair, drive_controller):
    """Two identical robots driven in turn by ONE loaded ONNX artifact act identically: the second
    controller's start zeroes the memory the first one left behind (where there is one, it matters)."""
    art = load_artifact(pair[1])
    first, second = drive_controller(art, 40), drive_controller(art, 40)
    assert len(first) > 20 and np.abs(first).max() > 0
    np.testing.assert_array_equal(first, second)
    o = _observations(art, 1)[0]
    art.reset()
    fresh = art.act(o)
    if art.memory_size:
        assert not np.allclose(art.act(o), fresh, atol=1e-6)   # the same frame, another memory
    else:
        np.testing.assert_array_equal(art.act(o), fresh)


def test_onnx_artifact_runs_where_torch_is_not_installed(pair):
    ts = load_artifact(pair[0])
    obs = _observations(ts, 10)
    want = np.array([ts.step(o)[1] for o in obs])
    code = f"""
import sys, json, numpy as np
sys.modules['torch'] = None   # as on a robot computer without torch: any import of it fails
from real.artifact import load_artifact
art = load_artifact({str(pair[1])!r})
obs = np.array({obs.tolist()!r}, dtype=np.float32)
q = [art.step(o)[1].tolist() for o in obs]
heavy = [m for m in ('mujoco', 'gymnasium', 'hydra', 'omegaconf', 'robotrl', 'sim') if m in sys.modules]
print(json.dumps({{'heavy': heavy, 'q': q}}))
"""
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["heavy"] == []
    np.testing.assert_allclose(res["q"], want, atol=1e-5)


def test_bad_onnx_artifacts_are_refused_by_name(pair, tmp_path, capsys):
    import onnx
    src = pair[1]
    data = src.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        load_artifact(truncated)
    model = onnx.load(str(src))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(weight.raw_data)
    raw[0] ^= 0xFF
    weight.raw_data = bytes(raw)
    onnx.save(model, str(tmp_path / "altered.onnx"))
    with pytest.raises(ArtifactError, match="onnx_initializers_sha256"):
        load_artifact(tmp_path / "altered.onnx")
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(ArtifactError, match="not written by `robotrl export`"):
        load_artifact(tmp_path / "bare.onnx")
    assert main(["eval", f"artifact={truncated}"]) == 2
    err = capsys.readouterr().err
    assert "truncated.onnx" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (["format=tflite"], "unknown export format 'tflite'; available: torchscript, onnx"),
    (["format=onnx", "out=x.pt"], "out=x.pt is a torchscript file name but format=onnx"),
])
def test_bad_export_format_is_named(pair, args, needle, capsys):
    assert main(["export", f"run={pair[0].parent}", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


class _Tick(torch.nn.Module):
    memory_layout = []

    def forward(self, obs):
        if bool(obs.sum() > 0):   # Python control flow on data: no graph can hold it
            return obs, obs
        return -obs, obs


class _Deploy(DeployModule):
    def forward(self, obs):
        return obs

    @torch.jit.export
    def command(self, action):
        return action

    @torch.jit.export
    def reset(self) -> None:
        pass


class _DeployWithUnexportableTick(_Deploy):
    def pure_tick(self):
        return _Tick()


@pytest.mark.parametrize("module, needle", [(_Deploy(), "_Deploy has no ONNX form (pure_tick)"),
                                            (_DeployWithUnexportableTick(), "could not be exported as ONNX")])
def test_deploy_module_without_an_onnx_form_is_refused_naming_torchscript(module, needle, tmp_path, capfd):
    """One line that says why and what to do instead; torch.export's pages of report stay out of sight."""
    obs = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ExportError, match="export it with format=torchscript") as e:
        export_artifact(module, {}, tmp_path / "x.onnx", obs, lambda x: x)
    assert needle in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300
    assert capfd.readouterr() == ("", "")
    assert not list(tmp_path.iterdir())   # nothing written, no temporary file left


def test_onnx_artifact_evaluates_and_benches_beside_torchscript(pair, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", f"artifact={pair[1]}", "episodes=2", "num_envs=2", f"out={out}", "task.episode_s=1.0"]) == 0
    assert json.loads(out.read_text())["episodes"] == 2
    bench = tmp_path / "infer.json"
    sibling = pair[0].with_name("humanoid_walk_ppo.pt")   # bench infer finds the .pt beside the .onnx
    sibling.write_bytes(pair[0].read_bytes())
    assert main(["bench", "infer", "--artifact", str(pair[1]), "--calls", "200", "--json", str(bench)]) == 0
    res = json.loads(bench.read_text())
    assert res["format"] == "onnx" and res["latency_median_us"] == res["onnx_latency_median_us"]
    assert 0 < res["torchscript_latency_median_us"] and 0 < res["bare_network_median_us"]
    assert res["onnx_over_torchscript_median"] == res["onnx_latency_median_us"] / res["torchscript_latency_median_us"]


SHIPPED_ONNX = sorted((ROOT / "docs" / "artifacts").glob("*.onnx"))


@pytest.mark.parametrize("path", SHIPPED_ONNX, ids=[p.stem for p in SHIPPED_ONNX])
def test_shipped_onnx_artifact_is_its_torchscript_sibling(path):
    """Each shipped .onnx file carries its .pt sibling's weights and answers the same ticks, across
    a reset (walkers: stateless and GRU; ResFiT: the chunk queue in the memory)."""
    ts, ox = load_artifact(path.with_suffix(".pt")), load_artifact(path)
    assert ox.manifest["hashes"]["weights_sha256"] == ts.manifest["hashes"]["weights_sha256"]
    for i, o in enumerate(_observations(ts, n=30, seed=1) / 5):
        if i == 17:
            ts.reset()
            ox.reset()
        (a_ts, q_ts), (a_ox, q_ox) = ts.step(o), ox.step(o)
        np.testing.assert_allclose(a_ox, a_ts, atol=1e-5)
        np.testing.assert_allclose(q_ox, q_ts, atol=1e-5)
