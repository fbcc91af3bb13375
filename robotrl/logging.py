"""What a person sees of a run: TensorBoard scalars, a CSV of the same numbers, and PNG plots."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from robotrl.files import atomic_write, save_figure


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_at: int | None = None):
        """resume_at: the env step of the checkpoint a run resumes from; the CSV keeps its rows up
        to there (the ones logged after it, before the run stopped, are logged again)."""
        from torch.utils.tensorboard import SummaryWriter
        self.csv_path = run_dir / "metrics.csv"
        self.tb = SummaryWriter(str(run_dir / "tb"))
        self.columns: list[str] | None = None
        if resume_at is not None and self.csv_path.exists():
            with open(self.csv_path) as f:
                rows = list(csv.reader(f))
            if rows:
                self.columns = rows[0]
                kept = [r for r in rows[1:] if r and float(r[0]) <= resume_at]
                with atomic_write(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
                    csv.writer(f).writerows([self.columns, *kept])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if v is not None and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        row = {"env_steps": step, **metrics}
        new = self.columns is None
        if new:
            self.columns = list(row)
        with open(self.csv_path, "w" if new else "a", newline="") as f:   # a new run starts a new file
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def close(self) -> None:
        self.tb.close()


def read_csv(path: Path) -> dict[str, list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            try:
                cols.setdefault(k, []).append(float(v) if v not in ("", None) else math.nan)
            except ValueError:
                cols.setdefault(k, []).append(math.nan)
    return cols


def plot_curves(csv_path: Path, out_dir: Path, keys: list[str]) -> list[Path]:
    """One PNG per group of curves, against environment steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = read_csv(csv_path)
    x = cols.get("env_steps", [])
    written = []
    present = [k for k in keys if k in cols]
    if not present or not x:
        return written
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.2 * len(present)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], present):
        ax.plot(x, cols[k], lw=1.2)
        ax.set_ylabel(k.replace("/", "\n"), fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("environment steps")
    written.append(save_figure(fig, out_dir / "learning_curves.png"))
    return written
