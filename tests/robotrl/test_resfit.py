"""ResFiT end to end on arm_lift: demos on disk, BC chunk bases, the residual learner's pieces
(zero start, n-step targets, demo/online sampling, truncation vs termination), one-file export
with the chunk queue inside, and a small seeded budget where the residual beats its base."""
import json

import numpy as np
import pytest
import torch

from real.artifact import load_artifact
from robotrl.checkpoint import load_checkpoint
from robotrl.cli import main

TASK = ["task=arm_lift", "progress=false", "video=false"]
TINY_BC = ["algo=bc", "algo.hidden=[64,64]", "algo.batch=64", "algo.steps=200", "algo.eval_every=200",
           "algo.eval_episodes=2", "algo.eval_envs=2", "task.episode_s=2.0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demos_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "arm_lift.npz"
    assert main(["demos", "task=arm_lift", "n=4", "noise=0.1", "failures=1", "seed=3", f"out={out}",
                 "task.episode_s=3.0"]) == 0
    return out


@pytest.fixture(scope="module")
def bc_run(demos_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("bc") / "run"
    assert main(["train", *TASK, *TINY_BC, f"algo.demos={demos_file}", f"run_dir={d}"]) == 0
    return d


@pytest.fixture(scope="module")
def resfit_run(bc_run, tmp_path_factory):
    """A few hundred steps with short time-outs: the actor has moved, so the residual is not 0."""
    d = tmp_path_factory.mktemp("resfit") / "run"
    assert main(["train", *TASK, "algo=resfit", f"algo.base={bc_run}", "algo.env_steps=120", "algo.learning_starts=40",
                 "algo.critic_warmup=20", "algo.batch=32", "algo.utd=1", "algo.actor_hidden=[32,32]",
                 "algo.critic_hidden=[32,32]", "algo.actor_lr=3e-3", "algo.eval_every=1000", "algo.eval_episodes=2",
                 "algo.eval_envs=2", "algo.log_every=40", "task.episode_s=1.0", f"run_dir={d}"]) == 0
    return d


# ---------------------------------------------------------------- datasets
def test_demos_file_format(demos_file):
    from robotrl.datasets import load_demos
    d = load_demos(demos_file)
    h = json.loads(demos_file.with_suffix(".json").read_text())
    assert h == d.header and h["format"] == "robotrl-demos" and h["task"] == "arm_lift"
    assert h["successes"] == 4 and h["failures"] == 1 and h["expert"]["noise"] == 0.1
    assert h["robot"]["name"] == "arm7" and "torch" in h["versions"] and h["task_config"]["episode_s"] == 3.0
    assert d.success.sum() == 4 and (~d.success).sum() == 1
    ends = d.episode_ends - 1
    assert np.all(d.terminated[ends] == d.success) and np.all(d.truncated[ends] == ~d.success)
    assert np.all(d.rewards[ends] == d.success) and d.rewards.sum() == 4     # sparse: 1 on the success frame only
    assert d.obs.shape == (h["transitions"], h["observation"]["size"]) and d.actions.shape[1] == 8
    assert np.abs(d.actions).max() <= 1.0
    nxt = d.next_obs()
    np.testing.assert_array_equal(nxt[d.episode_starts[0]], d.obs[d.episode_starts[0] + 1])
    np.testing.assert_array_equal(nxt[ends], d.final_obs)


def test_demos_bad_inputs_are_named(tmp_path, capsys):
    from robotrl.datasets import DatasetError, load_demos
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable"):
        load_demos(tmp_path / "x.npz")
    with pytest.raises(DatasetError, match="not found"):
        load_demos(tmp_path / "missing.npz")
    assert main(["demos", "task=arm_lift", "n=1", "task.no_such_key=1", f"out={tmp_path}/y.npz"]) == 2
    assert "task.no_such_key" in capsys.readouterr().err


# ---------------------------------------------------------------- the residual's pieces
def _learner(**kw):
    from robotrl.algos.bc import Normalizer
    from robotrl.algos.resfit import ResFiT, ResFiTConfig, ZeroBase
    cfg = ResFiTConfig(actor_hidden=[16], critic_hidden=[16], num_q=4, **kw)
    return ResFiT(cfg, ZeroBase(Normalizer(5, 3), 3), 5, 3, seed=0)


def test_zero_initialised_residual_reproduces_the_base_exactly(bc_run):
    from robotrl.algos.resfit import ResFiT, ResFiTConfig
    from robotrl.offpolicy import load_base
    base, _, ckpt = load_base(bc_run)
    learner = ResFiT(ResFiTConfig(), base, ckpt["obs_size"], ckpt["action_size"])
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(25, 4, ckpt["obs_size"])), dtype=torch.float32)
    b1, b2 = base.with_batch(4), base.with_batch(4)
    for t in range(25):   # more than two chunks: the queue refills on the same steps in both
        _, a_base, a = learner.act(obs[t], b1, "eval")
        want = b2(obs[t])
        assert torch.equal(a_base, want) and torch.equal(a, want)
    assert learner.actor(torch.randn(7, ckpt["obs_size"]), torch.rand(7, 8)).abs().max() == 0.0


def test_nstep_targets_match_a_hand_computation():
    from robotrl.algos.resfit import NStep
    g = 0.9
    # success after 3 steps (terminated): no bootstrap
    acc = NStep(3, g, 1)
    out = []
    for t, r in enumerate([0.0, 0.0, 1.0]):
        if t:
            out += acc.ready(0, t, -t)
        acc.add(0, t, -t, 10 + t, r)
    out += acc.end(0, 99, -99, terminated=True)
    assert [o["obs"] for o in out] == [0, 1, 2]
    np.testing.assert_allclose([o["reward"] for o in out], [g * g * 1.0, g * 1.0, 1.0])
    assert [o["discount"] for o in out] == [0.0, 0.0, 0.0] and all(o["next_obs"] == 99 for o in out)
    # time-out after 4 steps with n = 2: bootstrap from the final observation
    acc = NStep(2, g, 1)
    r = [0.1, 0.2, 0.3, 0.4]
    out = []
    for t in range(4):
        if t:
            out += acc.ready(0, t, -t)
        acc.add(0, t, -t, 10 + t, r[t])
    out += acc.end(0, 4, -4, terminated=False)
    np.testing.assert_allclose([o["reward"] for o in out], [r[0] + g * r[1], r[1] + g * r[2], r[2] + g * r[3], r[3]])
    np.testing.assert_allclose([o["discount"] for o in out], [g ** 2, g ** 2, g ** 2, g])
    assert [o["next_obs"] for o in out] == [2, 3, 4, 4] and [o["next_base"] for o in out] == [-2, -3, -4, -4]
    assert [o["done"] for o in out] == [0.0] * 4


def test_td_target_is_reward_plus_discounted_min_of_two_target_heads():
    learner = _learner(target_noise=0.0, clip_q_target=False)
    for i, p in enumerate(learner.critic_target.net[-1].parameters()):   # last layer: head h outputs h + 1
        p.data.zero_()
        if i == 1:
            p.data[:, 0, 0] = torch.arange(1.0, 5.0)
    b = {"next_obs": torch.randn(6, 5), "next_base": torch.zeros(6, 3), "reward": torch.arange(6.0),
         "discount": torch.tensor([0.0, 0.9, 0.81, 0.729, 0.0, 1.0])}
    for _ in range(5):
        y = learner.td_target(b)
        q = y - b["reward"]
        assert torch.all(q[b["discount"] == 0] == 0)                                # termination: no bootstrap
        m = q[b["discount"] > 0] / b["discount"][b["discount"] > 0]                 # min of 2 random heads of 1..4
        assert torch.allclose(m, m[0].expand_as(m)) and m[0].item() in (1.0, 2.0, 3.0)


def test_batches_are_half_demos_half_online():
    from robotrl.algos.resfit import FIELDS, Replay, sample_mixed
    online, demos = Replay(100, 5, 3), Replay(100, 5, 3)
    online.add_batch({k: torch.zeros(50, *online.data[k].shape[1:]) for k in FIELDS})
    demos.add_batch({k: torch.ones(30, *demos.data[k].shape[1:]) for k in FIELDS})
    gen = torch.Generator().manual_seed(0)
    for batch in (256, 64, 7):
        b = sample_mixed(online, demos, batch, 0.5, gen)
        n_demo = int(b["is_demo"].sum())
        assert n_demo == round(batch * 0.5) and torch.all(b["reward"][b["is_demo"]] == 1)
        assert torch.all(b["reward"][~b["is_demo"]] == 0) and len(b["obs"]) == batch
    assert not sample_mixed(online, None, 64, 0.5, gen)["is_demo"].any()           # use_demos=false
    assert online.bytes_per_transition() == 4 * (5 + 3 + 3 + 1 + 5 + 3 + 1 + 1)


def test_replay_checkpoints_append_only_segments_and_restores_the_ring(tmp_path):
    """Each save writes only what was added since the last one; a ring that wrapped is restored slot
    for slot; segments with no live transition are listed no more and pruned from the folder."""
    from robotrl.algos.resfit import FIELDS, Replay

    def batch(start, n):   # transition g has reward g, so where each one lives is visible
        return {k: torch.arange(start, start + n, dtype=torch.float32).reshape(n, *([1] * (len(shape) - 1)))
                .expand(n, *shape[1:]).clone() for k, shape in ((k, rb.data[k].shape) for k in FIELDS)}

    rb = Replay(10, 4, 2)
    rb.add_batch(batch(0, 7))
    state = rb.save(tmp_path)
    assert [s[:2] for s in state["segments"]] == [[0, 7]]
    rb.add_batch(batch(7, 6))                       # 13 added: the ring wrapped, 3..12 live
    state = rb.save(tmp_path)
    assert [s[:2] for s in state["segments"]] == [[0, 7], [7, 13]]   # the first still holds 3..6
    sizes = {f.name: f.stat().st_size for f in tmp_path.glob("replay_*.pt")}
    assert len(sizes) == 2
    restored = Replay(10, 4, 2)
    restored.load(state, tmp_path)
    for k in FIELDS:
        assert torch.equal(restored.data[k], rb.data[k]), k
    assert (restored.size, restored.ptr, restored.total) == (rb.size, rb.ptr, rb.total) == (10, 3, 13)
    restored.add_batch(batch(13, 12))               # 25 added: 15..24 live, neither old segment
    state = restored.save(tmp_path)
    restored.prune(tmp_path)
    assert [s[:2] for s in state["segments"]] == [[15, 25]]           # 13, 14 were overwritten unsaved
    assert [f.name for f in tmp_path.glob("replay_*.pt")] == [state["segments"][0][2]]
    again = Replay(10, 4, 2)
    again.load(state, tmp_path)
    assert sorted(again.data["reward"].tolist()) == list(range(15, 25))
    with pytest.raises(ValueError, match="algo.buffer_size"):
        Replay(20, 4, 2).load(state, tmp_path)
    # a checkpoint from before segments (the filled part inline) resumes, and its next save keeps it all
    inline = Replay(10, 4, 2)
    inline.load({"size": rb.size, "ptr": rb.ptr, "data": {k: v.clone() for k, v in rb.data.items()}}, tmp_path)
    state = inline.save(tmp_path / "inline")
    assert [s[1] - s[0] for s in state["segments"]] == [10]
    from_inline = Replay(10, 4, 2)
    from_inline.load(state, tmp_path / "inline")
    assert all(torch.equal(from_inline.data[k], rb.data[k]) for k in FIELDS) and from_inline.ptr == rb.ptr


class _StubEnv:
    """Scripted episodes: env 0 times out after 3 steps, env 1 succeeds (terminates) at step 2."""
    num_envs = 2

    def _obs(self):   # env 0 observes +(t + 1), env 1 observes -(t + 1)
        return np.stack([np.full(5, s * (t + 1), np.float32) for s, t in zip((1, -1), self.t)])

    def reset(self, seed=None):
        self.t = np.zeros(2, dtype=int)
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        obs = self._obs()
        terminated = np.array([False, self.t[1] == 2])
        truncated = np.array([self.t[0] == 3, False])
        reward = terminated.astype(float)
        info = {"success": reward}
        if (terminated | truncated).any():
            info.update(final_obs=obs.copy(), _final_obs=terminated | truncated)
            self.t[terminated | truncated] = 0
            obs = self._obs()
        return obs, reward, terminated, truncated, info


def test_truncation_bootstraps_and_termination_does_not():
    from robotrl.algos.bc import Normalizer
    from robotrl.algos.resfit import NStep, Replay, ZeroBase
    from robotrl.offpolicy import Collector
    learner = _learner(nstep=3, gamma=0.9)
    base = ZeroBase(Normalizer(5, 3), 3)
    online = Replay(100, 5, 3)
    col = Collector(_StubEnv(), learner, base, online, NStep(3, 0.9, 2), clip=1.0)
    col.reset()
    for _ in range(3):
        col.step("explore")
    d = {k: v[:online.size] for k, v in online.data.items()}
    env0 = d["obs"][:, 0] > 0
    # env 1 succeeded at its 2nd step: both of its steps end the episode with discount 0
    np.testing.assert_allclose(d["discount"][~env0][:2], [0.0, 0.0])
    np.testing.assert_allclose(d["reward"][~env0][:2], [0.9, 1.0])
    assert torch.all(d["done"][~env0][:2] == 1)
    # env 0 timed out after 3 steps: bootstrap from the final observation (3) with γ^k
    np.testing.assert_allclose(d["discount"][env0], [0.9 ** 3, 0.9 ** 2, 0.9])
    assert torch.all(d["next_obs"][env0][:, 0] == 4) and torch.all(d["done"][env0] == 0)
    assert torch.all(d["next_obs"][~env0][:2, 0] == -3)
    assert col.successes == [1.0, 0.0]


def test_critic_heads_are_one_batched_layer_and_match_a_loop_over_heads():
    from robotrl.algos.resfit import EnsembleCritic, EnsembleLinear
    c = EnsembleCritic(5, 3, [16, 16], heads=10)
    lin = [m for m in c.net if isinstance(m, EnsembleLinear)]
    assert lin[0].weight.shape == (10, 8, 16) and lin[-1].weight.shape == (10, 16, 1)
    o, a = torch.randn(32, 5), torch.randn(32, 3)
    q = c(o, a)
    assert q.shape == (10, 32) and q.std(0).mean() > 0                       # heads differ
    torch.testing.assert_close(q, c.to_naive()(o, a), rtol=1e-5, atol=1e-5)
    heads = torch.tensor([7, 2])                                             # the REDQ target's 2 heads only
    torch.testing.assert_close(c(o, a, heads), q[heads], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- export
def _episode_through_artifact(path, run_base, actor, task_overrides, seed=0, steps=60):
    """Drive the artifact like the robot (act per observation, reset at episode start) and the
    training-time path side by side over one episode in the twin; return max |Δaction|."""
    from robotrl.offpolicy import base_act_fn
    from sim.envs import make
    art = load_artifact(path)
    env = make("arm_lift", **task_overrides)
    obs, _ = env.reset(seed=seed)
    art.reset()
    ref_base = run_base.with_batch(1)
    ref = base_act_fn(ref_base, actor, 1.0)
    worst, refills = 0.0, 0
    for t in range(steps):
        a, target = art.step(obs)             # what a control tick runs
        r = ref(torch.as_tensor(obs)[None])[0]
        refills += int(ref_base.chunks.index[0] == 1)
        worst = max(worst, float(np.abs(a - r).max()))
        obs, _, terminated, truncated, _ = env.step(a)
        np.testing.assert_allclose(target, env.task.target[0], atol=1e-5)   # command() = the twin's joint targets
        if terminated or truncated:
            break
    return worst, refills, t + 1


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_bc_export_runs_the_chunk_queue_inside_with_parity(bc_run, tmp_path, suffix):
    """As TorchScript (the queue in buffers) and as ONNX (the queue in the memory that the runtime
    feeds back): the same actions and joint targets as the training-time policy, tick by tick."""
    from robotrl.offpolicy import load_base
    out = tmp_path / f"bc{suffix}"
    assert main(["export", f"run={bc_run}", f"out={out}"]) == 0
    art = load_artifact(out)
    assert art.manifest["policy"]["family"] == "bc_chunk" and art.manifest["policy"]["chunk"] == 10
    base, _, _ = load_base(bc_run)
    worst, refills, steps = _episode_through_artifact(out, base, None, {"episode_s": 3.0})
    assert worst < 1e-5 and steps >= 30 and refills == -(-steps // 10)          # a new chunk every 10 steps


def test_onnx_chunk_artifact_runs_the_chunk_policy_only_to_refill(bc_run, tmp_path):
    """The ONNX graph's memory is the queue (zeros = empty, what reset() leaves) and the chunk
    network sits in an If branch, taken on the ticks where the queue is empty."""
    import onnx
    out = tmp_path / "bc.onnx"
    assert main(["export", f"run={bc_run}", f"out={out}"]) == 0
    art = load_artifact(out)
    layout = art.manifest["onnx"]["memory_layout"]
    assert [m["name"] for m in layout] == ["chunk_queue", "actions_left", "joint_target", "has_joint_target"]
    assert layout[0]["size"] == 10 * 8 and art.manifest["onnx"]["memory_size"] == sum(m["size"] for m in layout)
    graph = onnx.load(str(out)).graph
    branch = next(n for n in graph.node if n.op_type == "If")
    assert "Gemm" in {n.op_type for a in branch.attribute for n in a.g.node}
    assert "Gemm" not in {n.op_type for n in graph.node}   # a BC artifact's only network is the chunk policy
    obs = np.random.default_rng(0).normal(size=(12, art.manifest["observation"]["size"])).astype(np.float32)
    lefts = []
    for o in obs:
        art.step(o)
        lefts.append(int(art.memory[0, 80]))
    assert lefts == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 9, 8]   # refilled on the first and the eleventh tick
    art.reset()
    assert not art.memory.any()


def test_onnx_chunk_tick_integrates_targets_without_a_joint_target_term(bc_run, tmp_path):
    """A delta policy whose observation has no joint_target term starts from the measured joint
    position and integrates its own targets after that: the pure tick (what the ONNX graph runs)
    matches the TorchScript module tick by tick, before and after a reset."""
    from robotrl.algos.resfit import DeployPolicy, NoResidual
    from robotrl.offpolicy import load_base
    assert main(["export", f"run={bc_run}", f"out={tmp_path}/bc.pt"]) == 0
    m = load_artifact(tmp_path / "bc.pt").manifest
    terms = [{**t, "name": "target_echo"} if t["name"] == "joint_target" else t for t in m["observation"]["terms"]]
    manifest = {**m, "observation": {**m["observation"], "terms": terms}}
    base, _, _ = load_base(bc_run)
    policy = DeployPolicy(base, NoResidual(), manifest).eval()
    tick = policy.pure_tick()
    assert not policy.from_target
    scripted = torch.jit.script(DeployPolicy(base, NoResidual(), manifest).eval())
    obs = torch.as_tensor(np.random.default_rng(1).normal(size=(25, m["observation"]["size"])), dtype=torch.float32)
    memory = torch.zeros(1, sum(size for _, size in tick.memory_layout))
    with torch.no_grad():
        for i, o in enumerate(obs):
            if i == 13:
                scripted.reset()
                memory.zero_()
            a_ts, q_ts = scripted.step(o)
            a, q, memory = tick(o[None], memory)
            torch.testing.assert_close(a[0], a_ts, atol=1e-6, rtol=0)
            torch.testing.assert_close(q[0], q_ts, atol=1e-6, rtol=0)


def test_absolute_action_chunk_artifact_commands_the_twins_targets(tmp_path):
    """task.action_type=absolute: demos, BC and the artifact all speak absolute joint targets."""
    from robotrl.offpolicy import load_base
    absolute = "task.action_type=absolute"
    assert main(["demos", "task=arm_lift", "n=2", "seed=3", f"out={tmp_path}/d.npz", "task.episode_s=3.0",
                 absolute]) == 0
    assert main(["train", *TASK, *TINY_BC, f"algo.demos={tmp_path}/d.npz", f"run_dir={tmp_path}/bc", absolute]) == 0
    base, _, _ = load_base(tmp_path / "bc")
    for name in ("bc.pt", "bc.onnx"):
        assert main(["export", f"run={tmp_path}/bc", f"out={tmp_path}/{name}"]) == 0
        assert load_artifact(tmp_path / name).manifest["action"]["type"] == "joint_position"
        worst, _, steps = _episode_through_artifact(tmp_path / name, base, None,
                                                    {"episode_s": 3.0, "action_type": "absolute"})
        assert worst < 1e-5 and steps >= 30


def test_artifact_in_the_twin_reproduces_the_runs_own_evaluation(bc_run, tmp_path):
    from robotrl.checkpoint import load_checkpoint
    from robotrl.evaluate import evaluate_artifact
    assert main(["export", f"run={bc_run}", f"out={tmp_path}/bc.pt"]) == 0
    ckpt = load_checkpoint(bc_run)
    # `robotrl eval` runs a stateful (chunk-queue) artifact as the robot does: a copy per env, reset per episode
    ev = evaluate_artifact(tmp_path / "bc.pt", episodes=2, num_envs=2, seed=ckpt["config"]["seed"] + 10_000)
    assert ev["success_rate"] == ckpt["eval"]["success_rate"]
    assert ev["episode_length_mean"] == ckpt["eval"]["episode_length"]


def _reference_with_resets(base, actor, starts):
    """The training-time policy run row by row with the chunk queue reset where an episode starts:
    the reference an exported chunk artifact must match."""
    from robotrl.offpolicy import base_act_fn
    rb = base.with_batch(1)
    act = base_act_fn(rb, actor, 1.0)

    def reference(x):
        rows = []
        for i in range(len(x)):
            if starts[i]:
                rb.reset()
            rows.append(torch.as_tensor(act(x[i:i + 1]))[0])
        return torch.stack(rows)
    return reference


def test_resfit_export_is_one_artifact_base_plus_residual(resfit_run, tmp_path):
    from robotrl.algos.resfit import ResidualActor
    from robotrl.checkpoint import load_checkpoint
    from robotrl.export import ExportError, export_artifact
    from robotrl.offpolicy import build_resfit_parts, algo_config
    from sim.envs import make_task, task_config
    out = tmp_path / "resfit.pt"
    assert main(["export", f"run={resfit_run}", f"out={out}"]) == 0
    ckpt = load_checkpoint(resfit_run)
    task = make_task(task_config("arm_lift"))
    c = algo_config(ckpt["config"]["algo"])
    base = build_resfit_parts(c, task, ckpt["model"]["base"], ckpt["base_config"])
    actor = ResidualActor(task.obs_size, task.action_size, c.actor_hidden, c.action_scale, c.layer_norm)
    actor.load_state_dict(ckpt["model"]["learner"]["actor"])
    assert actor.net[-1].weight.abs().max() > 0                                 # the residual has moved off 0
    assert main(["export", f"run={resfit_run}", f"out={tmp_path}/resfit.onnx"]) == 0
    for path in (out, tmp_path / "resfit.onnx"):
        worst, _, steps = _episode_through_artifact(path, base, actor, {"episode_s": 3.0}, seed=1)
        assert worst < 1e-5 and steps >= 30
    m = load_artifact(out).manifest
    assert m["policy"]["family"] == "resfit" and m["training"]["algo"] == "resfit"
    # the parity check would catch an artifact whose queue is never reset between episodes
    starts = np.asarray(ckpt["parity_starts"])
    assert starts.sum() >= 2
    from robotrl.algos.resfit import DeployPolicy

    class NoReset(DeployPolicy):
        @torch.jit.export
        def reset(self) -> None:
            pass
    bad = NoReset(base, actor, m)
    with pytest.raises(ExportError, match="parity"):
        export_artifact(bad, {k: v for k, v in m.items() if k not in ("hashes", "versions", "format",
                                                                         "format_version", "created")},
                        tmp_path / "bad.pt", ckpt["parity_obs"], _reference_with_resets(base, actor, starts),
                        episode_starts=starts)


def test_act_transformer_chunk_policy_exports_with_parity(tmp_path):
    """The ACT-style policy (attention, learned queries) scripts and keeps parity over two
    episodes with the queue reset between them (untrained weights: the export path is what is tested)."""
    from robotrl.algos.bc import BasePolicy, BCConfig
    from robotrl.algos.resfit import DeployPolicy, ResidualActor
    from robotrl.export import export_artifact
    from robotrl.policies import artifact_manifest
    from sim.envs import make_task, task_config
    task = make_task(task_config("arm_lift"))
    cfg = BCConfig(policy="act", d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ff=64, chunk=8, execute=6)
    base = BasePolicy.build(cfg, task.obs_size, task.action_size).eval()
    actor = ResidualActor(task.obs_size, task.action_size, [16], 0.2, zero_init_last=False).eval()
    config = {"algo": {"name": "resfit"}, "seed": 0}
    manifest = artifact_manifest(task, config, "t", 0)
    obs = np.random.default_rng(0).normal(size=(23, task.obs_size)).astype(np.float32)
    starts = np.zeros(23, dtype=bool)
    starts[[0, 9]] = True
    for name in ("act.pt", "act.onnx"):   # ONNX: attention inside the If branch; execute < chunk slices the chunk
        full = export_artifact(DeployPolicy(base, actor, manifest), manifest, tmp_path / name, obs,
                               _reference_with_resets(base, actor, starts), episode_starts=starts)
        assert full["parity_max_abs_error"] < 1e-5
        art = load_artifact(tmp_path / name)
        a = art.act(obs[0])
        assert a.shape == (8,) and np.all(np.abs(a) <= 1.0)


def test_hl_gauss_critic_option_learns_a_fixed_target():
    from robotrl.algos.resfit import FIELDS, hl_gauss_target
    y = torch.tensor([0.0, 0.3, 0.77, 1.0])
    p = hl_gauss_target(y, 0.0, 1.0, 51, 0.75)
    centers = (torch.linspace(0, 1, 52)[1:] + torch.linspace(0, 1, 52)[:-1]) / 2
    assert torch.allclose(p.sum(-1), torch.ones(4)) and torch.allclose((p * centers).sum(-1)[1:3], y[1:3], atol=0.01)
    learner = _learner(critic_loss="hl_gauss", critic_lr=3e-3)
    b = {k: torch.rand(32, *((5,) if "obs" in k else (3,) if k in ("base", "action", "next_base") else ()))
         for k in FIELDS}
    b["discount"] = torch.zeros(32)                      # y = reward: a fixed regression target
    first = learner.update_critic(b)["loss/critic"]
    for _ in range(150):
        stats = learner.update_critic(b)
    assert stats["loss/critic"] < first and abs(stats["q/mean"] - b["reward"].mean().item()) < 0.05


# ---------------------------------------------------------------- the residual improves its base
class _Reach:
    """A small task with the TaskVectorEnv API (same-step autoreset, final_obs): a 2-D point,
    action = position delta (0.06 per unit), sparse reward 1 when within 0.06 of the goal
    (terminates), time-out after 30 steps (truncates). `drift` is a constant push per step the
    demonstrations never saw: the dynamics gap that makes the chunked base weak."""

    def __init__(self, num_envs, seed, drift=0.0):
        self.num_envs, self.rng, self.drift = num_envs, np.random.default_rng(seed), np.array([drift, 0.0])

    def _obs(self):
        return np.concatenate([self.p, self.g], 1).astype(np.float32)

    def _new(self, ids):
        self.p[ids], self.g[ids] = self.rng.uniform(-0.6, 0.6, (2, len(ids), 2))
        self.t[ids] = 0

    def reset(self, seed=None):
        self.p, self.g, self.t = (np.zeros((self.num_envs, 2)), np.zeros((self.num_envs, 2)),
                                  np.zeros(self.num_envs, int))
        self._new(np.arange(self.num_envs))
        return self._obs(), {}

    def step(self, action):
        self.p += 0.06 * np.clip(action, -1, 1) + self.drift
        self.t += 1
        success = np.linalg.norm(self.p - self.g, axis=1) < 0.06
        truncated = (self.t >= 30) & ~success
        obs, info, done = self._obs(), {"success": success.astype(float)}, success | truncated
        if done.any():
            info.update(final_obs=obs.copy(), _final_obs=done)
            self._new(np.flatnonzero(done))
            obs = self._obs()
        return obs, success.astype(float), success, truncated, info


def _reach_demos(n, seed):
    from robotrl.datasets import Demos
    env, eps = _Reach(1, seed), []
    obs, _ = env.reset()
    cur = {k: [] for k in ("obs", "actions", "rewards", "terminated", "truncated")}
    while len(eps) < n:   # scripted expert: proportional to the goal offset
        a = np.clip((obs[:, 2:] - obs[:, :2]) / 0.2, -1, 1).astype(np.float32)
        nxt, r, te, tr, info = env.step(a)
        for k, v in zip(cur, (obs[0], a[0], r[0], te[0], tr[0])):
            cur[k].append(v)
        if te[0] or tr[0]:
            if te[0]:
                eps.append((cur, info["final_obs"][0]))
            cur = {k: [] for k in cur}
        obs = nxt
    lengths = np.array([len(c["obs"]) for c, _ in eps])
    cat = {k: np.concatenate([np.asarray(c[k]) for c, _ in eps]) for k in eps[0][0]}
    final = np.stack([f for _, f in eps]).astype(np.float32)
    return Demos({"task": "reach"}, cat["obs"], cat["obs"], cat["actions"], cat["rewards"].astype(np.float32),
                 cat["terminated"].astype(bool), cat["truncated"].astype(bool), np.cumsum(lengths) - lengths,
                 np.cumsum(lengths), np.ones(n, bool), final, final)


@torch.no_grad()
def _reach_success(base, actor, drift, episodes=100):
    env, b, done_eps = _Reach(20, seed=123, drift=drift), base.with_batch(20), []
    obs, _ = env.reset()
    b.reset()
    while len(done_eps) < episodes:
        o = torch.as_tensor(obs)
        a = b(o)
        if actor is not None:
            a = torch.clamp(a + actor(b.norm.obs(o), a), -1.0, 1.0)
        obs, _, _, _, info = env.step(b.norm.unaction(a).numpy())
        if "_final_obs" in info:
            done_eps += info["success"][info["_final_obs"]].tolist()
            b.reset(torch.as_tensor(info["_final_obs"]))
    return float(np.mean(done_eps[:episodes]))


def test_residual_improves_a_weak_chunked_base_within_a_small_budget():
    """BC (chunk 10, open loop) on 10 clean demos, deployed where a drift the demos never saw
    makes it weak; ResFiT (sparse reward, demos in half of each batch, 10 heads, n-step 3)
    lifts success by a wide margin in 1,500 environment steps (seeded; about 15 s of CPU)."""
    from robotrl.algos.bc import BC, BCConfig
    from robotrl.algos.resfit import Replay, ResFiT, ResFiTConfig, demo_transitions
    from robotrl.offpolicy import run_resfit
    torch.manual_seed(0)
    demos = _reach_demos(10, seed=0)
    bc = BC(BCConfig(hidden=[64, 64], steps=300, batch=64, chunk=10, execute=10), demos, seed=0)
    for _ in range(300):
        bc.update()
    base = bc.base.eval()
    drift = 0.03
    assert _reach_success(base, None, 0.0) >= 0.5          # the base learned the task ...
    before = _reach_success(base, None, drift)             # ... but is weak under the drift
    cfg = ResFiTConfig(env_steps=1500, actor_hidden=[32, 32], critic_hidden=[32, 32], batch=64, utd=2,
                       learning_starts=300, critic_warmup=200, actor_lr=3e-4, critic_lr=1e-3, action_scale=0.5)
    learner = ResFiT(cfg, base, 4, 2, seed=0)
    online = Replay(2000, 4, 2)
    demo_rb = demo_transitions(demos, base, base.norm, cfg.nstep, cfg.gamma)
    col = run_resfit(_Reach(1, seed=1, drift=drift), learner, base.with_batch(1), online, demo_rb, cfg, 1.0, seed=1)
    after = _reach_success(base, learner.actor, drift)
    assert online.size > 1400 and learner.actor_updates == 1500 - 300 - 200 + 1 and len(col.successes) > 40
    assert before <= 0.25 and after >= before + 0.25, (before, after)


# ---------------------------------------------------------------- baselines in the same code
@pytest.mark.parametrize("algo, extra", [
    ("rlpd", ["algo.env_steps=60", "algo.learning_starts=30", "algo.critic_warmup=10", "algo.batch=16", "algo.utd=1",
              "algo.actor_hidden=[16]", "algo.critic_hidden=[16]", "algo.num_q=4"]),
    ("resppo", ["algo.num_envs=2", "algo.steps_per_env=16", "algo.env_steps=64", "algo.actor_hidden=[16]",
                "algo.critic_hidden=[16]"]),
    # without demos, updates from step 0 wait for the first online transition (nstep steps in)
    ("rlpd", ["algo.env_steps=60", "algo.learning_starts=0", "algo.use_demos=false", "algo.critic_warmup=10",
              "algo.batch=16", "algo.utd=1", "algo.actor_hidden=[16]", "algo.critic_hidden=[16]", "algo.num_q=4"]),
])
def test_baselines_train_and_export(algo, extra, bc_run, tmp_path):
    d = tmp_path / algo
    assert main(["train", *TASK, f"algo={algo}", f"algo.base={bc_run}", *extra, "algo.eval_every=1000",
                 "algo.eval_episodes=2", "algo.eval_envs=2", "task.episode_s=1.0", f"run_dir={d}"]) == 0
    summary = json.loads((d / "summary.json").read_text())
    assert summary["algo"] == algo and summary["env_steps"] >= 60
    assert main(["export", f"run={d}", f"out={d}/p.pt"]) == 0
    m = load_artifact(d / "p.pt").manifest
    assert m["policy"]["family"] == algo and m["training"]["algo"] == algo


def test_an_offpolicy_run_keeps_its_checkpoints_for_export(demos_file, tmp_path):
    """keep_checkpoints=true in the off-policy runner too: each evaluation's checkpoint stays as
    step_<N>.pt, and exports to <task>_<algo>_step_<N>.pt."""
    d = tmp_path / "bc"
    assert main(["train", *TASK, *TINY_BC, "algo.eval_every=100", f"algo.demos={demos_file}", f"run_dir={d}",
                 "keep_checkpoints=true"]) == 0
    kept = sorted(p.name for p in (d / "checkpoints").glob("step_*.pt"))
    assert kept == ["step_100.pt", "step_200.pt"], kept
    assert load_checkpoint(d / "checkpoints" / "step_100.pt")["grad_steps"] == 100
    assert main(["export", f"run={d / 'checkpoints' / 'step_100.pt'}"]) == 0
    assert (d / "arm_lift_bc_step_100.pt").is_file()


def test_resume_of_a_bc_run_is_refused_by_name(bc_run, capsys):
    assert main(["train", f"resume={bc_run}"]) == 2   # not handed to the PPO runner by default
    assert "resume is not supported for algo=bc" in capsys.readouterr().err


def test_resfit_resumes_with_its_learner_and_replay(resfit_run, tmp_path):
    """A stopped resfit run goes on in the folder it is in now, from its checkpoint: the learner's
    counters, optimisers and online replay continue, and the CSV holds each step once."""
    import shutil
    from robotrl.checkpoint import load_checkpoint
    from robotrl.logging import read_csv
    run = tmp_path / "moved"
    shutil.copytree(resfit_run, run)
    before = load_checkpoint(run)
    assert before["env_steps"] == 120 and before["replay"]["total"] > 0
    assert main(["train", f"resume={run}", "algo.env_steps=200"]) == 0
    after = load_checkpoint(run)
    assert after["env_steps"] == 200 and after["config"]["run_dir"] == str(run)
    learner0, learner1 = before["model"]["learner"], after["model"]["learner"]
    assert learner1["critic_updates"] == learner0["critic_updates"] + 80   # utd 1 from where it was
    assert int(next(iter(learner1["critic_opt"]["state"].values()))["step"]) == learner1["critic_updates"]
    # the replay went on: the old segment is kept as it was, one new segment holds what was added
    segments = after["replay"]["segments"]
    assert segments[0] == before["replay"]["segments"][0] and len(segments) == 2
    assert segments[1][:2] == [before["replay"]["total"], after["replay"]["total"]]
    first = torch.load(run / "checkpoints" / segments[0][2])
    assert torch.equal(first["obs"], torch.load(resfit_run / "checkpoints" / segments[0][2])["obs"])
    steps = read_csv(run / "metrics.csv")["env_steps"]
    assert steps == sorted(set(steps)) and steps[-1] == 200
    assert load_checkpoint(resfit_run)["env_steps"] == 120   # the original folder was left alone


def test_a_refused_resfit_run_leaves_no_folder(tmp_path, capsys):
    assert main(["train", "task=arm_lift", "algo=resfit", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "algo.base: give the run folder of an algo=bc run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
