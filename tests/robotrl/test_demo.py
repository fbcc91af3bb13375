"""`robotrl demo`, the README's main command, end to end with a tiny training budget: it trains,
exports, evaluates the artifact in a fresh process and shows the shipped walker walking."""
import json

from robotrl.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "steps=2048", f"out={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    short, shipped = report["short_run"], report["shipped"]
    assert short["episodes"] == 10 and (tmp_path / "train" / "policy.pt").is_file()
    # the shipped walker walks: no falls, close to the commanded 0.25 m/s, far better than 2k steps of PPO
    assert shipped["success_rate"] == 1.0 and shipped["vel_tracking_error"] < 0.1
    assert shipped["return_mean"] > short["return_mean"] + 10
    assert (tmp_path / "shipped_walk.mp4").stat().st_size > 10_000
    assert "report:" in printed and "artifact:" in printed
