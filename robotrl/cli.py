"""`robotrl <command> key=value ...` — train, export, eval, demo, bench.

`train` composes configs/ with Hydra (any override works: `algo.lr=3e-4`, `task.history=3`;
`robot=NAME` is shorthand for `task.robot=NAME`). The other commands take key=value pairs.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
warnings.filterwarnings("ignore", message=".*torch.jit.*")  # TorchScript is deprecated upstream; we ship it on purpose

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USAGE = """usage: robotrl <command> [key=value ...]

commands:
  train   robot=… task=… algo=… [hydra overrides]   train a policy; writes a run folder
  export  run=<run dir> [out=<file>]                 write the TorchScript artifact (+ parity check)
  eval    artifact=<file> [episodes=N] [out=<json>] [command=[vx,vy,wz]] [task.* overrides]
  demo    [steps=N] [out=<dir>]                      train → export → eval in a fresh process
  bench   sim|infer [--json <file>]                  throughput and latency figures
"""


class UsageError(ValueError):
    pass


def parse_pairs(args: list[str], allowed: dict[str, object]) -> tuple[dict, list[str]]:
    """key=value pairs for the non-Hydra commands; keys with a dot pass through as task overrides."""
    out, passthrough = dict(allowed), []
    for a in args:
        if "=" not in a:
            raise UsageError(f"expected key=value, got '{a}'")
        k, v = a.split("=", 1)
        if "." in k:
            passthrough.append(a)
        elif k in allowed:
            out[k] = v
        else:
            raise UsageError(f"unknown option '{k}'; allowed: {', '.join(sorted(allowed))} (or task.<key>=…)")
    return out, passthrough


def compose_train_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    fixed = [("task.robot=" + o.split("=", 1)[1]) if o.startswith("robot=") else o for o in overrides]
    for o in fixed:
        for group in ("task", "algo"):
            if o.startswith(group + "="):
                name = o.split("=", 1)[1]
                options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
                if name not in options:
                    raise UsageError(f"unknown {group} '{name}'; available: {', '.join(options)}")
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=fixed)
    except HydraException as e:
        raise UsageError(str(e)) from None
    OmegaConf.resolve(cfg)
    return cfg


def cmd_train(args: list[str]) -> Path:
    from robotrl.runner import train
    from real.robot_spec import available_robots
    cfg = compose_train_config(args)
    if cfg.task.robot not in available_robots():
        raise UsageError(f"unknown robot '{cfg.task.robot}'; available: {', '.join(available_robots())}")
    return train(cfg)


def cmd_export(args: list[str]) -> Path:
    from robotrl.policies import export_run
    opts, _ = parse_pairs(args, {"run": None, "out": None})
    if not opts["run"]:
        raise UsageError("export needs run=<run dir or checkpoint>")
    return export_run(opts["run"], opts["out"])


def cmd_eval(args: list[str]) -> dict:
    from robotrl.evaluate import evaluate_artifact
    opts, overrides = parse_pairs(args, {"artifact": None, "episodes": "10", "out": None, "seed": "0",
                                         "command": None, "num_envs": "10", "video": None})
    if not opts["artifact"]:
        raise UsageError("eval needs artifact=<file>")
    return evaluate_artifact(opts["artifact"], episodes=int(opts["episodes"]), out=opts["out"], seed=int(opts["seed"]),
                             command=opts["command"], overrides=overrides, num_envs=int(opts["num_envs"]),
                             video=opts["video"])


def cmd_demo(args: list[str]) -> None:
    from robotrl.demo import demo
    opts, _ = parse_pairs(args, {"steps": "300000", "out": "runs/demo"})
    demo(int(opts["steps"]), Path(opts["out"]))


def cmd_bench(args: list[str]) -> None:
    from robotrl.bench import main as bench_main
    bench_main(args)


COMMANDS = {"train": cmd_train, "export": cmd_export, "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"robotrl: unknown command '{cmd}'; available: {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    from real.artifact import ArtifactError, ManifestMismatch
    from real.robot_spec import SpecError
    from robotrl.checkpoint import CheckpointError
    from robotrl.algos.ppo import NonFiniteError
    try:
        COMMANDS[cmd](rest)
    except (UsageError, ValueError, SpecError, ArtifactError, ManifestMismatch, CheckpointError,
            NonFiniteError, FileNotFoundError) as e:
        print(f"robotrl {cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
