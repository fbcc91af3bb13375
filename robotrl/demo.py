"""`robotrl demo`: the whole journey on a CPU in a few minutes — train a short run, export it,
evaluate the artifact in a fresh process, and show the shipped walking policy."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from robotrl import WALK_ARTIFACT as SHIPPED
from robotrl.files import write_text


def _eval_in_fresh_process(artifact: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "robotrl.cli", "eval", f"artifact={artifact}", f"out={out}", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def demo(steps: int, out: Path) -> None:
    from robotrl.cli import compose_train_config
    from robotrl.policies import export_run
    from robotrl.runner import train
    t0 = time.time()
    run_dir = out / "train"
    print(f"[1/4] training humanoid_walk with PPO for {steps:,} env steps → {run_dir}")
    cfg = compose_train_config([f"total_steps={steps}", f"run_dir={run_dir}", "video_seconds=6"])
    train(cfg)
    print("[2/4] exporting the TorchScript artifact (with parity check)")
    artifact = export_run(run_dir, run_dir / "policy.pt")
    print("[3/4] evaluating the artifact in a fresh process")
    short = _eval_in_fresh_process(artifact, out / "eval_short_run.json", "episodes=10", "command=[0.25,0,0]")
    report = {"short_run": short}
    if SHIPPED.exists():
        print(f"[4/4] evaluating the shipped walking policy {SHIPPED.name} and rendering it walking")
        report["shipped"] = _eval_in_fresh_process(SHIPPED, out / "eval_shipped.json", "episodes=10",
                                                   "command=[0.25,0,0]", f"video={out / 'shipped_walk.mp4'}")
    write_text(out / "report.json", json.dumps(report, indent=1))
    print(f"\ndemo finished in {time.time() - t0:.0f} s\n")
    rows = [("short run (this demo)", short)] + ([("shipped walking policy", report["shipped"])]
                                                 if "shipped" in report else [])
    print(f"{'policy':<26}{'return':>9}{'no-fall':>9}{'vel err m/s':>13}{'power W':>9}")
    for name, r in rows:
        print(f"{name:<26}{r['return_mean']:>9.2f}{r['success_rate']:>9.0%}"
              f"{r.get('vel_tracking_error', float('nan')):>13.3f}"
              f"{r['mean_power_w']:>9.1f}")
    print(f"\nreport:  {out / 'report.json'}\nplots:   {run_dir / 'learning_curves.png'}\n"
          f"videos:  {run_dir / 'rollout.mp4'}" + (f", {out / 'shipped_walk.mp4'}" if "shipped" in report else "")
          + f"\nartifact: {artifact}")
