"""Benchmarks are commands, not timed tests: check they run and write the promised keys."""
import json

from robotrl.cli import main


def test_bench_sim_writes_json(tmp_path):
    out = tmp_path / "sim.json"
    assert main(["bench", "sim", "--seconds", "0.2", "--num-envs", "8", "--ppo-steps", "2048",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("env_steps_per_s", "raw_mj_steps_per_s", "env_over_raw", "vec_env_steps_per_s", "ppo_over_sb3"):
        assert res[key] > 0, key


def test_bench_infer_writes_json(tmp_path, tiny_artifact):
    out = tmp_path / "infer.json"
    assert main(["bench", "infer", "--artifact", str(tiny_artifact), "--calls", "200", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert 0 < res["latency_median_us"] <= res["latency_p99_us"] <= res["latency_max_us"]
