"""`robotrl report runs=<run>,<run>,… [out=<dir>] [title=…]`: success rate against environment
steps for a BC base, ResFiT and the baselines (rlpd, resppo) in one plot, and the final table
(markdown + JSON). Reads only the run folders (metrics.csv, config.yaml, summary.json); a BC run,
which uses no environment steps, is drawn as a horizontal line at its final evaluation."""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from robotrl.files import save_figure, write_text
from robotrl.logging import read_csv

OFFLINE = ("bc", "diwa")   # no environment steps: their x-axis is gradient steps or iterations
LABELS = {"bc": "BC base (chunked)", "diwa": "DiWA (in a world model, 0 env steps)",
          "resfit": "ResFiT (residual, off-policy)", "rlpd": "RLPD-style (no base, demos)",
          "resppo": "residual PPO"}


def _run(path: Path) -> dict:
    missing = [name for name in ("config.yaml", "metrics.csv") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a run folder: it has no {' or '.join(missing)} "
                                "(robotrl train writes both)")
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    from robotrl.offpolicy import is_offpolicy
    if not is_offpolicy(cfg["algo"]["name"]) or cfg["algo"]["name"] == "world_model":   # no success rate
        raise ValueError(f"{path} is an algo={cfg['algo']['name']} run; this report compares bc, resfit, rlpd, "
                         "resppo and diwa runs by their success rate (walking runs: robotrl compare runs=[…])")
    cols = read_csv(path / "metrics.csv")
    steps, succ = cols.get("env_steps", []), cols.get("eval/success_rate", [])
    pts = [(s, v) for s, v in zip(steps, succ) if not math.isnan(v)]
    algo = cfg["algo"]["name"]
    start = pts[0][1] if pts else math.nan
    if algo in OFFLINE:     # only the final evaluation is a point at 0 env steps
        pts = pts[-1:]
    a = cfg["algo"]
    eps = a.get("eval_episodes")
    return {"run": str(path), "algo": algo, "label": LABELS.get(algo, algo), "points": pts,
            "start": start, "final": pts[-1][1] if pts else math.nan,
            "best": max(v for _, v in pts) if pts else math.nan,
            "env_steps": pts[-1][0] if pts and algo not in OFFLINE else 0,
            "eval_episodes": eps, "task": cfg["task"]["name"]}


def report(runs: list[str], out: str | Path = "runs/report", title: str = "") -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not runs:
        raise ValueError("report needs runs=<run dir>,<run dir>,… (bc, resfit, rlpd, resppo runs)")
    rows = [_run(Path(r)) for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    xmax = max([r["env_steps"] for r in rows] + [1])
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if not r["points"]:
            continue
        if r["algo"] in OFFLINE:
            color = "grey" if r["algo"] == "bc" else "tab:purple"
            ax.axhline(r["final"], ls="--", lw=1.2, color=color, label=f"{r['label']}: {r['final']:.2f}")
        else:
            xs, ys = zip(*r["points"])
            ax.plot(xs, ys, marker="o", ms=3, lw=1.4, label=f"{r['label']}")
    ax.set_xlim(0, xmax)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success rate (deterministic eval)")
    ax.set_title(title or f"{rows[0]['task'] if rows else ''}: success vs environment steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    png = save_figure(fig, out / "success_vs_env_steps.png")
    lines = ["| method | run | env steps | success at start | final success | best | eval episodes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['label']} | {Path(r['run']).name} | {r['env_steps']:,.0f} | {r['start']:.2f} | "
                     f"{r['final']:.2f} | {r['best']:.2f} | {r['eval_episodes']} |")
    table = "\n".join(lines)
    result = {"plot": str(png), "table": table, "runs": rows}
    for name, text in (("report.md", f"# {title or 'ResFiT report'}\n\n![]({png.name})\n\n{table}\n"),
                       ("report.json", json.dumps(result, indent=1, default=str))):
        write_text(out / name, text)
    print(table + f"\n\nplot: {png}\nreport: {out / 'report.md'}")
    return result
