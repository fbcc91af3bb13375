"""`robotrl <command> key=value ...` — train, export, eval, demo, bench.

`train` composes configs/ with Hydra (any override works: `algo.lr=3e-4`, `task.history=3`;
`robot=NAME` is shorthand for `task.robot=NAME`). The other commands take key=value pairs.
"""
from __future__ import annotations

import math
import os
import re
import sys
import warnings
from pathlib import Path

from robotrl.files import output_place

os.environ.setdefault("MUJOCO_GL", "egl")
warnings.filterwarnings("ignore", message=".*torch.jit.*")  # TorchScript is deprecated upstream; we ship it on purpose

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USAGE = """usage: robotrl <command> [key=value ...]

commands:
  train   robot=… task=… algo=… [hydra overrides]   train a policy; writes a run folder
  export  run=<run dir> [out=<file>] [format=torchscript|onnx]
                                                     write the artifact (+ parity check); .onnx: ONNX
  eval    artifact=<file> [episodes=N] [out=<json>] [command=[vx,vy,wz]] [task.* overrides]
  compare runs=[dir,…] | train=true [methods=[…]] [budgets=[b1,…]] [steps=N] [out=<dir>] [episodes=N]
                                                     ECO vs baselines: eval table; power, multiplier, trade-off plots
  demo    [steps=N] [out=<dir>]                      train → export → eval in a fresh process
  demos   task=… n=N [noise=σ] [noise_steps=T] [failures=K] [aim=σ_m] [labels=executed|expert] [seed=S] [out=…]
                                                     record scripted-expert demos
  report  runs=<run>,<run>,… [out=<dir>]            success-vs-env-steps plot + table (bc/resfit/baselines)
  report  <recording.mcap> [out=<dir>]               plots + summary.json of a ROS 2 recording (deploy record:=)
  bench   sim|infer|loop|resfit [--json <file>]      throughput and latency figures (--help: options)
  deploy  <launch file> [name:=value ...]            run a ROS 2 launch file's node graph (--print, --show-args,
                                                     --start: call the policy's start once it is ready)
  operate start|damp|estop|reset | cmd_vel=[vx,vy,wz] | goal=[x,y,z] robot=…
                                                     operate a running graph (ROS_DOMAIN_ID as it was started)
"""


VIDEO_SUFFIXES = (".mp4", ".gif")   # what imageio writes from MuJoCo's frames


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


def number_option(opts: dict, key: str, least: float = 0, integer: bool = True) -> int | float:
    """opts[key] as a number >= least (an integer unless integer=False; 1e6 reads as 1000000), or an
    error that names the key."""
    try:
        value = math.nan if isinstance(opts[key], bool) else float(opts[key])   # true is not 1
    except (TypeError, ValueError):   # null, a list, a word
        value = math.nan
    if not least <= value < math.inf or (integer and not value.is_integer()):
        raise UsageError(f"{key} must be {'an integer' if integer else 'a number'} >= {least:g}, got '{opts[key]}'")
    return int(value) if integer else value


def numbers(opts: dict, key: str, n: int) -> list[float]:
    """opts[key], a list like [0.2,0,0], as n numbers, or an error that names the key."""
    from robotrl.compare import parse_list
    try:
        values = [float(v) for v in parse_list(opts[key])]
    except ValueError:
        values = []
    if len(values) != n or not all(map(math.isfinite, values)):
        raise UsageError(f"{key} must be {n} finite numbers like [{','.join(['0'] * n)}], got '{opts[key]}'")
    return values


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
        raise UsageError(unknown_key_message(str(e), fixed) or str(e)) from None
    OmegaConf.resolve(cfg)
    check_run_keys(cfg)
    return cfg


def unknown_key_message(error: str, overrides: list[str]) -> str | None:
    """For Hydra's "Could not override 'task.x'" (whose advice, '+task.x', the schema would refuse
    next): the key and the keys its level of the config does have."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf
    bad = re.match(r"Could not override '([\w.]+)'", error)
    if not bad:
        return None
    key = bad[1]
    parent = key.rpartition(".")[0]
    rest = [o for o in overrides if o.split("=", 1)[0] != key]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:   # another override is wrong too: Hydra's own message says which
        return None
    if not isinstance(node, DictConfig):
        return None
    return f"unknown key '{key}'; {parent or 'the run'} has: {', '.join(node.keys())}"


# The run's own keys (configs/config.yaml) and what each must be; task.* and algo.* have their schemas.
RUN_KEYS = {"seed": (int, 0), "num_envs": (int, 1), "nthread": (int, 1), "total_steps": (float, 1),
            "checkpoint_every": (int, 1), "video_seconds": (float, 0), "progress": bool, "video": bool,
            "keep_checkpoints": bool}


def check_run_keys(cfg) -> None:
    for key, rule in RUN_KEYS.items():
        if rule is not bool:
            number_option(cfg, key, least=rule[1], integer=rule[0] is int)
        elif not isinstance(cfg[key], bool):
            raise UsageError(f"{key} must be true or false, got '{cfg[key]}'")


def cmd_train(args: list[str]) -> Path:
    from robotrl.runner import train
    from real.robot_spec import available_robots
    from robotrl.offpolicy import is_offpolicy
    resumes = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if len(resumes) > 1 or resumes == [""]:
        raise UsageError(f"resume= takes one run folder or checkpoint, got {resumes}")
    resume = resumes[0] if resumes else None
    ckpt = None
    if resume:   # the run's own algo decides which runner goes on with it
        from robotrl.checkpoint import load_checkpoint
        ckpt = load_checkpoint(resume)
        saved = ckpt["config"]
        if is_offpolicy(saved["algo"]["name"]):
            from robotrl.offpolicy import resume as resume_offpolicy
            rest = [a for a in args if not a.startswith(("resume=", "algo.env_steps="))]
            if rest:
                raise UsageError(f"resume= of an off-policy run takes only algo.env_steps=N besides; got {rest}")
            given = dict(a.split("=", 1) for a in args if a.startswith("algo.env_steps="))
            env_steps = number_option(given, "algo.env_steps", 1) if given else None
            return resume_offpolicy(resume, env_steps, ckpt)
        # The run goes on with its own config: an override beside resume= would be silently lost,
        # and the run keeps its own length unless total_steps= extends it.
        rest = [a for a in args if not a.startswith(("resume=", "total_steps="))]
        if rest:
            raise UsageError(f"resume= goes on with the run's own config; it takes only total_steps=N besides "
                             f"(to extend the run); got {rest}")
        if not any(a.startswith("total_steps=") for a in args):
            args = [*args, f"total_steps={saved['total_steps']}"]
    cfg = compose_train_config(args)
    if not resume:
        if not cfg.run_dir:
            raise UsageError("run_dir= is empty: give the folder the run writes (or leave it out for runs/<name>)")
        output_place(cfg.run_dir, "run_dir", folder=True)
        if (Path(cfg.run_dir) / "checkpoints" / "last.pt").exists():   # it would be overwritten
            raise UsageError(f"run_dir={cfg.run_dir} already holds a run: continue it with resume={cfg.run_dir}, "
                             "or give another run_dir")
    if cfg.task.robot not in available_robots():
        raise UsageError(f"unknown robot '{cfg.task.robot}'; available: {', '.join(available_robots())}")
    if is_offpolicy(cfg.algo.name):  # bc, resfit and its baselines: the offline/off-policy runner
        from robotrl.offpolicy import train as train_offpolicy
        return train_offpolicy(cfg)
    return train(cfg, ckpt)


def cmd_export(args: list[str]) -> Path:
    from robotrl.policies import export_run
    opts, _ = parse_pairs(args, {"run": None, "out": None, "format": None})
    if not opts["run"]:
        raise UsageError("export needs run=<run dir or checkpoint>")
    output_place(opts["out"], "out")
    return export_run(opts["run"], opts["out"], opts["format"])


def cmd_eval(args: list[str]) -> dict:
    from robotrl.evaluate import evaluate_artifact
    opts, overrides = parse_pairs(args, {"artifact": None, "episodes": "10", "out": None, "seed": "0",
                                         "command": None, "num_envs": "10", "video": None})
    if not opts["artifact"]:
        raise UsageError("eval needs artifact=<file>")
    for key in ("out", "video"):
        output_place(opts[key], key)
    if opts["video"] and Path(opts["video"]).suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(f"video={opts['video']}: a video file ends in {' or '.join(VIDEO_SUFFIXES)}")
    return evaluate_artifact(opts["artifact"], episodes=number_option(opts, "episodes", 1), out=opts["out"],
                             seed=number_option(opts, "seed"),
                             command=numbers(opts, "command", 3) if opts["command"] else None, overrides=overrides,
                             num_envs=number_option(opts, "num_envs", 1),
                             video=opts["video"])


def cmd_compare(args: list[str]) -> Path:
    from robotrl.compare import compare, parse_list
    opts, overrides = parse_pairs(args, {"runs": None, "artifacts": None, "out": "reports/compare", "episodes": "10",
                                         "seed": "0", "eval_envs": "10", "command": None, "train": "false",
                                         "methods": None, "budgets": None, "steps": "1000000", "num_envs": None,
                                         "eval_seeds": None})
    if opts["train"] not in ("true", "false"):
        raise UsageError(f"train must be true or false, got '{opts['train']}'")
    output_place(opts["out"], "out", folder=True)
    return compare(parse_list(opts["runs"]), parse_list(opts["artifacts"]), Path(opts["out"]),
                   episodes=number_option(opts, "episodes", 1), seed=number_option(opts, "seed"),
                   eval_envs=number_option(opts, "eval_envs", 1),
                   command=numbers(opts, "command", 3) if opts["command"] else None, train=opts["train"] == "true",
                   methods=parse_list(opts["methods"]),
                   budgets=parse_list(opts["budgets"]), steps=number_option(opts, "steps", 1),
                   num_envs=number_option(opts, "num_envs", 1) if opts["num_envs"] else None, overrides=overrides,
                   eval_seeds=[number_option({"eval_seeds": v}, "eval_seeds") for v in parse_list(opts["eval_seeds"])])


def cmd_demo(args: list[str]) -> None:
    from robotrl.demo import demo
    opts, _ = parse_pairs(args, {"steps": "300000", "out": "runs/demo"})
    demo(number_option(opts, "steps", 1), output_place(opts["out"], "out", folder=True))


def cmd_demos(args: list[str]) -> Path:
    from robotrl.datasets import demos_command
    opts, overrides = parse_pairs(args, {"task": "arm_lift", "n": "50", "noise": "0.0", "failures": "0", "seed": "0",
                                         "out": None, "num_envs": "4", "aim": "0.0", "noise_steps": "0",
                                         "labels": "executed"})
    output_place(opts["out"], "out")
    return demos_command(opts["task"], n=number_option(opts, "n", 1), noise=number_option(opts, "noise", integer=False),
                         failures=number_option(opts, "failures"), seed=number_option(opts, "seed"), out=opts["out"],
                         num_envs=number_option(opts, "num_envs", 1), overrides=overrides,
                         aim=number_option(opts, "aim", integer=False),
                         noise_steps=number_option(opts, "noise_steps", integer=False), labels=opts["labels"])


def cmd_report(args: list[str]) -> dict:
    if args and "=" not in args[0]:   # robotrl report <recording.mcap> [out=<dir>]: a ROS 2 recording
        from robotrl.report import report as report_recording
        opts, _ = parse_pairs(args[1:], {"out": None})
        output_place(opts["out"], "out", folder=True)
        return report_recording(args[0], opts["out"])
    from robotrl.report_resfit import report
    opts, _ = parse_pairs(args, {"runs": None, "out": "runs/report", "title": ""})
    output_place(opts["out"], "out", folder=True)
    return report([r for r in (opts["runs"] or "").split(",") if r], opts["out"], opts["title"])


def cmd_bench(args: list[str]) -> None:
    from robotrl.bench import main as bench_main
    bench_main(args)


def cmd_operate(args: list[str]) -> None:
    from robotrl.operate import ACTIONS, call, publish
    action = args[0] if args and "=" not in args[0] else None
    opts, _ = parse_pairs(args[1:] if action else args, {"node": "policy", "wait": "10", "cmd_vel": None,
                                                         "goal": None, "robot": None})
    wait_s = number_option(opts, "wait", integer=False)
    asked = [a for a in (action, opts["cmd_vel"] and "cmd_vel=", opts["goal"] and "goal=") if a]
    if len(asked) > 1:   # one request per call: the others would be dropped without a word
        raise UsageError(f"operate does one thing per call, got {' and '.join(asked)}")
    if not re.fullmatch(r"/?[A-Za-z_][\w/]*", opts["node"]):
        raise UsageError(f"node={opts['node']}: a ROS 2 node name (letters, digits, _ and / namespaces)")
    if action:
        print(call(action, opts["node"], wait_s))
    elif opts["cmd_vel"]:
        print(publish("cmd_vel", numbers(opts, "cmd_vel", 3), node_name=opts["node"], wait_s=wait_s))
    elif opts["goal"]:
        if not opts["robot"]:
            raise UsageError("goal needs robot=<name>: the goal is in that robot's base frame")
        from real.robot_spec import load_robot
        frame = load_robot(opts["robot"]).base_body
        print(publish("goal", numbers(opts, "goal", 3), frame, opts["node"], wait_s))
    else:
        raise UsageError(f"operate needs one of {', '.join(ACTIONS)}, cmd_vel=[vx,vy,wz] or goal=[x,y,z]")


def cmd_deploy(args: list[str]) -> None:
    from robotrl.deploy import main as deploy_main
    code = deploy_main(args)
    if code:
        raise SystemExit(code)   # a node failed: the graph's exit status is the command's


COMMANDS = {"train": cmd_train, "export": cmd_export, "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench,
            "deploy": cmd_deploy, "operate": cmd_operate, "demos": cmd_demos, "compare": cmd_compare,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in ("bench", "deploy") and any(a in ("-h", "--help") for a in rest):   # those two have argparse's
        print(USAGE)
        return 0
    if cmd not in COMMANDS:
        print(f"robotrl: unknown command '{cmd}'; available: {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    from real.artifact import ArtifactError, ManifestMismatch
    from real.robot_spec import SpecError
    from robotrl.checkpoint import CheckpointError
    from robotrl.algos.ppo import NonFiniteError
    from robotrl.export import ExportError
    from omegaconf.errors import OmegaConfBaseException  # config keys and types: the message names the key
    try:
        COMMANDS[cmd](rest)
    except (UsageError, ValueError, SpecError, ArtifactError, ManifestMismatch, CheckpointError,
            NonFiniteError, ExportError, OSError, OmegaConfBaseException) as e:   # OSError: a file's trouble, named
        print(f"robotrl {cmd}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:   # argparse's (bench's options, after its message) and a deploy graph's status
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
