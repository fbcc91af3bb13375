"""`robotrl compare`: ECO against its baselines in one report folder.

Each run is exported to an artifact and evaluated with `robotrl eval`'s function (the artifact, not
the checkpoint, is what is judged). The folder gets report.md (a table of average power,
velocity-tracking error, no-fall rate and constraint satisfaction per run, and one of where each
run's power goes, joint by joint), report.json, the artifacts, and three plots: power over training,
the multipliers over training (from each run's metrics.csv), and the energy–tracking trade-off
across budgets (eval power against tracking error).

    robotrl compare runs=[runs/a,runs/b] [artifacts=[x.pt]] [out=reports/compare] [episodes=10]
                    [eval_seeds=[0,1,2]: each figure is the mean over these evaluation seeds, with its range]
    robotrl compare train=true [methods=[eco,ppo_shaping,...]] [budgets=[20,30,40]] [steps=1000000]
                    [num_envs=32] [seed=0] [algo.*=… task.*=… training overrides]
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from robotrl.files import save_figure, write_text

METHODS = ["eco", "ppo_shaping", "ipo", "p3o", "crpo", "pid_lagrangian"]
BUDGET_FREE = {"ppo", "ppo_shaping"}   # their training ignores the budget: trained once, not per budget


def parse_list(text: str | None) -> list[str]:
    if not text:
        return []
    return [v.strip() for v in str(text).strip("[]() ").split(",") if v.strip()]


def train_runs(out: Path, methods: list[str], budgets: list[str], steps: int, seed: int, num_envs: int | None,
               overrides: list[str]) -> list[Path]:
    """One run per method and budget, same seed and task; budget-free methods once."""
    from robotrl.cli import compose_train_config
    from robotrl.runner import train
    runs = []
    for method in methods:
        for budget in ([None] if method in BUDGET_FREE or not budgets else budgets):
            name = method if budget is None else f"{method}_b{budget}"
            args = [f"algo={method}", f"total_steps={steps}", f"seed={seed}", f"run_dir={out / 'runs' / name}",
                    "video=false", *overrides]
            if budget is not None:
                args.append(f"algo.energy_budget={budget}")
            if num_envs:
                args.append(f"num_envs={num_envs}")
            runs.append(train(compose_train_config(args)))
    return runs


def unique_labels(paths: list[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell it from the others: eco_b75 while it is the
    only one, chain2/eco_b75 beside chain_sym/eco_b75. Labels name the report's rows and its artifact
    and eval files (out/artifacts/chain2/eco_b75.pt), so a path given twice gets its position too."""
    parts = [Path(p).resolve().parts for p in paths]
    labels = []
    for i, own in enumerate(parts):
        n = 1
        while n < len(own) and any(o[-n:] == own[-n:] for j, o in enumerate(parts) if j != i and o != own):
            n += 1
        label = "/".join(own[-n:])
        labels.append(label if parts.index(own) == i else f"{label}_{i}")
    return labels


def describe_run(run: Path) -> dict:
    """What the report needs from a run folder: its method, budgets and last logged constraint values."""
    from robotrl.logging import read_csv
    algo = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))["algo"]
    # A budget-free method's energy_budget is a default it never trained against: no b1 for it.
    constrained = algo["name"] not in BUDGET_FREE
    row = {"run": str(run), "method": algo["name"], "motion": algo.get("motion"),
           "energy_unit": algo.get("energy_unit"), "b1": algo.get("energy_budget") if constrained else None,
           "energy_weight": algo.get("energy_weight"),
           "b2": algo.get("motion_budget") if algo.get("motion") != "none" else None}
    cols = read_csv(run / "metrics.csv")
    for key, values in cols.items():
        for i in ("1", "2"):
            if key.startswith(f"constraint/J{i}_") and values:
                row[f"train_J{i}"] = values[-1]
    return row


def evaluate_rows(rows: list[dict], out: Path, episodes: int, seeds: list[int], num_envs: int,
                  command: list[float] | None) -> None:
    """Export each run and evaluate its artifact once per evaluation seed (eval/<label>.json, or
    eval/<label>.seed<k>.json for several); a row's figures are the means over the seeds, and with
    several seeds <figure>_range holds their [min, max]."""
    import numpy as np
    from robotrl.evaluate import evaluate_artifact
    from robotrl.policies import export_run
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    for row in rows:
        if "artifact" not in row:
            row["artifact"] = str(export_run(row["run"], out / "artifacts" / f"{row['label']}.pt"))
        results = [evaluate_artifact(row["artifact"], episodes=episodes, seed=seed, num_envs=num_envs, command=command,
                                     out=out / "eval" / (f"{row['label']}.json" if len(seeds) == 1
                                                         else f"{row['label']}.seed{seed}.json"))
                   for seed in seeds]
        figures = {"power_w": [r["mean_power_w"] for r in results],
                   "episode_energy_j": [r["episode_energy_j_mean"] for r in results],
                   "vel_error": [r.get("vel_tracking_error", math.nan) for r in results],
                   "success_rate": [r["success_rate"] for r in results]}
        for key, values in figures.items():
            row[key] = float(np.mean(values))
            if len(seeds) > 1:
                row[f"{key}_range"] = [float(min(values)), float(max(values))]
        joints = [r["joint_power_w"] for r in results if r.get("joint_power_w")]
        row["joint_power_w"] = {j: float(np.mean([jp[j] for jp in joints])) for j in joints[0]} if joints else None
        row["eval_seeds"] = list(seeds)
        # C1 on the evaluation, in the budget's own unit; C2 on the last training iteration (the
        # mirror loss and the reference deviation are training-side quantities).
        if row.get("b1") is not None:
            measured = row["power_w"] if row["energy_unit"] == "W" else row["episode_energy_j"]
            row["c1_ok"] = bool(measured <= row["b1"])
        if row.get("b2") is not None and "train_J2" in row:
            row["c2_ok"] = bool(row["train_J2"] <= row["b2"])


def _fmt(v, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _energy_term(row: dict) -> str:
    if row.get("b1") is not None:
        return f"b1 = {_fmt(row['b1'])} {row['energy_unit']}"
    if row.get("energy_weight") is not None:   # only ppo_shaping's config has one
        return f"reward −{_fmt(row['energy_weight'])}/J"
    return "—"


def _figure(row: dict, key: str, spec: str) -> str:
    """A figure, and with several evaluation seeds its range: 6.61 (6.61–6.87)."""
    text = _fmt(row.get(key), spec)
    if row.get(f"{key}_range"):
        lo, hi = row[f"{key}_range"]
        text += f" ({_fmt(lo, spec)}–{_fmt(hi, spec)})"
    return text


def write_markdown(rows: list[dict], plots: list[Path], path: Path) -> None:
    seeds = rows[0].get("eval_seeds", [0]) if rows else [0]
    over = (f"the mean over evaluation seeds {', '.join(map(str, seeds))} (in brackets: lowest–highest)"
            if len(seeds) > 1 else f"evaluation seed {seeds[0]}")
    lines = ["# ECO comparison", "",
             "Average power, tracking error and no-fall rate come from `robotrl eval` on each exported artifact, "
             f"{over}. C1 compares the evaluated power (W, or episode energy for J budgets) with b1; C2 compares "
             "the last training J_C2 with b2.", "",
             "| run | method | C2 form | energy: budget b1 or reward weight | power (W) | vel. error (m/s) "
             "| no-fall rate | C1 ok | J_C2 (train) | b2 | C2 ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['method']} | {_fmt(r.get('motion'))} | {_energy_term(r)} "
                     f"| {_figure(r, 'power_w', '.2f')} | {_figure(r, 'vel_error', '.3f')} "
                     f"| {r['success_rate']:.0%} | {_fmt(r.get('c1_ok'))} "
                     f"| {_fmt(r.get('train_J2'))} | {_fmt(r.get('b2'))} | {_fmt(r.get('c2_ok'))} |")
    joints = next((list(r["joint_power_w"]) for r in rows if r.get("joint_power_w")), [])
    if joints:   # where each walker spends its power
        lines += ["", "Where the power goes: mean |τ·q̇| per joint in the same evaluation (W; the row sums to the "
                  "power above).", "", f"| run | {' | '.join(joints)} |", "|---|" + "---|" * len(joints)]
        lines += [f"| {r['label']} | " + " | ".join(_fmt(r["joint_power_w"].get(j), ".2f") for j in joints) + " |"
                  for r in rows if r.get("joint_power_w")]
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    write_text(path, "\n".join(lines))


def plot_report(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from robotrl.logging import read_csv
    written = []
    curves = {r["label"]: read_csv(Path(r["run"]) / "metrics.csv") for r in rows if "run" in r}

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, cols in curves.items():
        ax.plot(cols["env_steps"], cols["train/power_w"], lw=1.2, label=label)
    for b1 in sorted({r["b1"] for r in rows if r.get("b1") is not None and r["energy_unit"] == "W"}):
        ax.axhline(b1, ls="--", lw=0.8, color="gray")
    ax.set(xlabel="environment steps", ylabel="average power (W)", title="power over training (dashed: budgets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out / "power_over_training.png"))

    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for i, ax in zip(("1", "2"), axes):
        for label, cols in curves.items():
            for key in (k for k in cols if k.startswith(f"constraint/lambda{i}_")):
                ax.plot(cols["env_steps"], cols[key], lw=1.2, label=f"{label} ({key.split('_', 1)[1]})")
        ax.set_ylabel(f"λ{i} ({'energy' if i == '1' else 'motion'})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("environment steps")
    axes[0].set_title("multipliers (effective constraint weights) over training")
    written.append(save_figure(fig, out / "multipliers_over_training.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    def series(r: dict) -> str:   # chain2/eco_b75 and chain_sym/eco_b75: two chains of one method
        return r["method"] + (f" · {r['label'].rsplit('/', 1)[0]}" if "/" in r["label"] else "")
    for name in dict.fromkeys(series(r) for r in rows):   # each point named by its run and budget
        pts = [r for r in rows if series(r) == name]
        # points, not a line: runs of one method may differ in more than the budget (length, start)
        # with several evaluation seeds, bars from the lowest to the highest seed's figure
        ax.errorbar([r["power_w"] for r in pts], [r["vel_error"] for r in pts], fmt="o", label=name, capsize=2,
                    elinewidth=0.8, xerr=_spread(pts, "power_w"), yerr=_spread(pts, "vel_error"))
        for r in pts:
            label = r["label"].rsplit("/", 1)[-1] + (f" (b1={_fmt(r['b1'])})" if r.get("b1") is not None else "")
            ax.annotate(label, (r["power_w"], r["vel_error"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="average power in evaluation (W)", ylabel="velocity-tracking error (m/s)",
           title="energy–tracking trade-off across budgets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out / "tradeoff.png"))
    return written


def _spread(rows: list[dict], key: str) -> list[list[float]] | None:
    """errorbar's [below, above] of each row's figure, from its range over evaluation seeds."""
    if not all(r.get(f"{key}_range") for r in rows):
        return None
    return [[r[key] - r[f"{key}_range"][0] for r in rows], [r[f"{key}_range"][1] - r[key] for r in rows]]


def compare(runs: list[str], artifacts: list[str], out: Path, episodes: int = 10, seed: int = 0, eval_envs: int = 10,
            command: list[float] | None = None, train: bool = False, methods: list[str] | None = None,
            budgets: list[str] | None = None, steps: int = 1_000_000, num_envs: int | None = None,
            overrides: list[str] | None = None, eval_seeds: list[int] | None = None) -> Path:
    """seed: the training seed (train=true) and, unless eval_seeds are given, the one evaluation seed."""
    run_dirs = [Path(r) for r in runs]
    if train:
        out.mkdir(parents=True, exist_ok=True)
        run_dirs += train_runs(out, methods or METHODS, budgets or [], steps, seed, num_envs, overrides or [])
    if not run_dirs and not artifacts:
        raise ValueError("compare needs runs=[…], artifacts=[…] or train=true")
    for r in run_dirs:
        if not (r / "config.yaml").is_file() or not (r / "metrics.csv").is_file():
            raise FileNotFoundError(f"{r} is not a run folder (no config.yaml / metrics.csv)")
    from real.artifact import read_manifest
    manifests = {a: read_manifest(a) for a in artifacts}
    tasks = [(r, OmegaConf.load(r / "config.yaml").task) for r in run_dirs]
    tasks += [(a, m["task"].get("config", {})) for a, m in manifests.items()]
    for where, task in tasks:   # the report is power against velocity tracking
        if "command" not in task:
            raise ValueError(f"{where} is a policy for task {task.get('name')}; compare reports power and velocity "
                             "tracking of walking policies (`robotrl report runs=…` compares tabletop runs)")
    out.mkdir(parents=True, exist_ok=True)
    rows = [describe_run(r) for r in run_dirs]
    rows += [{"artifact": a, "method": m["training"]["algo"]} for a, m in manifests.items()]
    for row, label in zip(rows, unique_labels([*run_dirs, *(Path(a).with_suffix("") for a in artifacts)])):
        row["label"] = label
    evaluate_rows(rows, out, episodes, eval_seeds or [seed], eval_envs, command)
    plots = plot_report(rows, out)
    write_markdown(rows, plots, out / "report.md")
    write_text(out / "report.json", json.dumps(rows, indent=1))
    print(f"report: {out / 'report.md'}\n  plots: {', '.join(str(p) for p in plots)}")
    return out
