"""`robotrl deploy <launch file> [name:=value ...]`: run a ROS 2 YAML launch file's node graph
where the `ros2` CLI and launch_ros are not installed (the PyPI ROS 2 wheels have neither).

The launch file stays the one source of truth: `ros2 launch` reads the same file on a robot
with full ROS 2. Supported subset: `arg` (name, default, description) and `node` (pkg, exec,
name, namespace, param name/value, remap from/to, args, output, if, unless) entries, with
`$(var NAME)` substitutions (a condition is `$(var NAME)`, true/false/1/0, or the emptiness test
`$(eval "'$(var NAME)' != ''")` / `== ''`); anything else is refused by name rather than silently skipped.

Each node runs as a subprocess of the Python console_script its package declares for `exec`
(`python -m robotrl_ros.policy_node --ros-args -r __node:=policy -p robot:=kid_biped ...`); its
output is streamed with a `[name]` prefix. Unlike `ros2 launch`, the graph is stopped as soon
as any node exits (a half graph is not a robot one can run); on Ctrl-C / SIGTERM, or then,
nodes get SIGTERM in reverse start order (the policy first, so its last damping command still
reaches the firmware through the bridge), escalated to SIGKILL if they hang. ROS 2 nodes stop on
SIGTERM as on SIGINT (rclpy and rclcpp handle both); SIGTERM also ends quietly a node that is
still importing when another one fails, where SIGINT printed a KeyboardInterrupt traceback.
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO_LAUNCH_DIR = Path(__file__).resolve().parents[1] / "launch"
USAGE = """usage: robotrl deploy <launch file> [name:=value ...] [--start] [--print] [--show-args]

  --start       call the policy node's start service once it accepts it (robot state, and for a
                tabletop policy perception and the goal, have arrived); else: robotrl operate start
  --print       print each node's command line and exit
  --show-args   list the launch file's arguments and exit"""
START_TIMEOUT_S = 120.0   # --start: node start-up (torch, MuJoCo) and DDS discovery on a slow machine
NODE_KEYS = {"pkg", "exec", "name", "namespace", "param", "remap", "args", "output", "if", "unless"}
SUBSTITUTION = re.compile(r"\$\(\s*([\w-]+)\s*([^)]*)\)")


class LaunchFileError(ValueError):
    """The launch file or its arguments cannot be run; the message says where and why."""


@dataclasses.dataclass
class Arg:
    name: str
    default: str | None
    description: str = ""


@dataclasses.dataclass
class NodeSpec:
    pkg: str
    exec: str
    name: str
    namespace: str = ""
    params: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # name, YAML text
    remaps: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    args: list[str] = dataclasses.field(default_factory=list)

    def command(self) -> list[str]:
        """The console_script's module run by this Python, with the ROS arguments a launch_ros
        Node would pass."""
        try:
            dist = importlib.metadata.distribution(self.pkg)
        except importlib.metadata.PackageNotFoundError:
            raise LaunchFileError(f"node '{self.name}': package '{self.pkg}' is not installed in this Python "
                                  f"({sys.executable}); deploy runs Python (ament_python) nodes: "
                                  f"pip install -e ros2_ws/src/{self.pkg}") from None
        scripts = {e.name: e for e in dist.entry_points if e.group == "console_scripts"}
        if self.exec not in scripts:
            raise LaunchFileError(f"node '{self.name}': package '{self.pkg}' has no executable '{self.exec}'; "
                                  f"it has: {', '.join(sorted(scripts))}")
        ros = ["-r", f"__node:={self.name}"]
        if self.namespace:
            ros += ["-r", f"__ns:={self.namespace}"]
        for k, v in self.params:
            ros += ["-p", f"{k}:={v}"]
        for a, b in self.remaps:
            ros += ["-r", f"{a}:={b}"]
        return [sys.executable, "-m", scripts[self.exec].module, *self.args, "--ros-args", *ros]


# ------------------------------------------------------------------------------- parsing

def _substitute(text: str, values: dict[str, str], where: str) -> str:
    def one(m: re.Match) -> str:
        kind, rest = m.group(1), m.group(2).strip()
        if kind != "var":
            raise LaunchFileError(f"{where}: unsupported substitution '{m.group(0)}'; deploy supports $(var NAME)")
        if rest not in values:
            raise LaunchFileError(f"{where}: $(var {rest}) names no argument declared before it; "
                                  f"declared: {', '.join(values) or 'none'}")
        return values[rest]
    return SUBSTITUTION.sub(one, text)


VAR = re.compile(r"\$\(\s*var\s+([\w-]+)\s*\)")
EMPTINESS = re.compile(r"""^\$\(\s*eval\s+"\s*'(.*)'\s*(==|!=)\s*''\s*"\s*\)$""", re.S)


def _condition(text, values: dict[str, str], where: str) -> bool:
    """The truth of an `if:` / `unless:` value as ros2 launch would evaluate it (for the forms
    deploy supports: true/false/1/0 after $(var) substitution, and the emptiness $(eval) test)."""
    def var(m: re.Match) -> str:
        if m.group(1) not in values:
            raise LaunchFileError(f"{where}: $(var {m.group(1)}) names no argument declared before it")
        return values[m.group(1)]
    text = VAR.sub(var, str(text).strip()) if not isinstance(text, bool) else str(text).lower()
    if m := EMPTINESS.match(text):
        return (m.group(1) == "") == (m.group(2) == "==")
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise LaunchFileError(f"{where}: condition '{text}' is not true/false/1/0 (deploy evaluates $(var NAME) and "
                          f"$(eval \"'$(var NAME)' != ''\") conditions)")


def _param_text(value, values: dict[str, str], where: str) -> str:
    """A parameter value as the YAML text of a `-p name:=value` override. Strings are substituted
    and passed on for ROS to type (as launch_ros does: "9000" is an integer, "true" a bool)."""
    if isinstance(value, str):
        text = _substitute(value, values, where)
        if not text.strip():   # ros2 launch refuses it too (it parses to no value at all)
            raise LaunchFileError(f"{where}: the value is empty; quote it to pass an empty string: "
                                  f"\"'{value}'\"")
        return text
    return json.dumps(value)   # numbers, booleans, lists: JSON is YAML flow syntax


def _entries(doc, path: Path) -> list[tuple[str, dict]]:
    if not isinstance(doc, dict) or not isinstance(doc.get("launch"), list):
        raise LaunchFileError(f"{path}: a YAML launch file has a top-level 'launch:' list")
    out = []
    for i, entry in enumerate(doc["launch"]):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise LaunchFileError(f"{path}: launch[{i}] must be one 'arg:' or 'node:' mapping")
        (kind, body), = entry.items()
        if kind not in ("arg", "node"):
            raise LaunchFileError(f"{path}: launch[{i}] is '{kind}'; deploy supports 'arg' and 'node' entries")
        if not isinstance(body, dict):
            raise LaunchFileError(f"{path}: launch[{i}] '{kind}' must be a mapping")
        out.append((kind, body))
    return out


def declared_args(path: Path) -> list[Arg]:
    return [Arg(str(b["name"]), None if b.get("default") is None else str(b["default"]), str(b.get("description", "")))
            for kind, b in _entries(_read(path), path) if kind == "arg"]


def _read(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise LaunchFileError(f"cannot read launch file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LaunchFileError(f"{path} is not a launch file: it is not text (a YAML launch file is)") from None
    except yaml.YAMLError as e:
        raise LaunchFileError(f"{path} is not valid YAML: {e}") from None


def load_launch(path: str | Path, overrides: dict[str, str] | None = None) -> list[NodeSpec]:
    """The nodes of a YAML launch file with its args resolved from `overrides` and defaults."""
    path = Path(path)
    overrides = dict(overrides or {})
    entries = _entries(_read(path), path)
    names = [str(b.get("name")) for kind, b in entries if kind == "arg"]
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise LaunchFileError(f"{path}: unknown argument(s) {', '.join(unknown)}; it declares: {', '.join(names)}")
    values: dict[str, str] = {}
    nodes: list[NodeSpec] = []
    for kind, body in entries:
        if kind == "arg":
            name = body.get("name")
            if not name:
                raise LaunchFileError(f"{path}: an 'arg' has no name")
            if name in overrides:
                values[name] = overrides[name]
            elif body.get("default") is not None:
                values[name] = _substitute(str(body["default"]), values, f"{path}: arg '{name}'")
            else:
                raise LaunchFileError(f"{path}: argument '{name}' is required ({body.get('description', '')}); "
                                      f"pass {name}:=<value>")
            continue
        where = f"{path}: node '{body.get('name', body.get('exec'))}'"
        if "if" in body and not _condition(body["if"], values, f"{where} 'if'"):
            continue
        if "unless" in body and _condition(body["unless"], values, f"{where} 'unless'"):
            continue
        nodes.append(_node(body, values, path))
    seen = [n.name for n in nodes]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise LaunchFileError(f"{path}: node names must be unique (they prefix the logs), repeated: {dupes}")
    return nodes


def _node(body: dict, values: dict[str, str], path: Path) -> NodeSpec:
    extra = set(body) - NODE_KEYS
    where = f"{path}: node '{body.get('name', body.get('exec'))}'"
    if extra:
        raise LaunchFileError(f"{where}: unsupported key(s) {sorted(extra)}; deploy supports {sorted(NODE_KEYS)}")
    for key in ("pkg", "exec"):
        if not body.get(key):
            raise LaunchFileError(f"{where}: '{key}' is required")
    sub = lambda v: _substitute(str(v), values, where)  # noqa: E731
    params = []
    body = {k: v for k, v in body.items() if k not in ("if", "unless")}   # evaluated by load_launch
    for p in body.get("param") or []:
        if not isinstance(p, dict) or "name" not in p or "value" not in p:
            raise LaunchFileError(f"{where}: each param needs 'name' and 'value' (param files via 'from' are "
                                  f"not supported), got {p!r}")
        params.append((sub(p["name"]), _param_text(p["value"], values, f"{where} param '{p['name']}'")))
    remaps = []
    for r in body.get("remap") or []:
        if not isinstance(r, dict) or set(r) != {"from", "to"}:
            raise LaunchFileError(f"{where}: each remap needs 'from' and 'to', got {r!r}")
        remaps.append((sub(r["from"]), sub(r["to"])))
    return NodeSpec(pkg=sub(body["pkg"]), exec=sub(body["exec"]), name=sub(body.get("name") or body["exec"]),
                    namespace=sub(body.get("namespace", "")), params=params, remaps=remaps,
                    args=shlex.split(sub(body.get("args", ""))))


# ------------------------------------------------------------------------------- running

try:   # looked up here, not in the child: a forked child that dlopen()s can wait forever for the
    # loader's lock if another thread of this process held it at the fork
    _PRCTL = ctypes.CDLL(None).prctl   # Linux
except (AttributeError, OSError, TypeError):
    _PRCTL = None


def _child_setup() -> None:
    """In each node process, between fork and exec (plain system calls only): its own process
    group, so a terminal's Ctrl-C reaches deploy only (which stops the nodes in order); and SIGTERM
    when deploy dies, so no node outlives it."""
    os.setpgid(0, 0)
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


class Graph:
    """The node processes of one launch, started in file order, stopped in reverse order."""

    def __init__(self, nodes: list[NodeSpec], out=None, env: dict[str, str] | None = None):
        self.nodes = nodes
        self.out = out or sys.stdout
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def say(self, name: str, line: str) -> None:
        with self._lock:
            self.out.write(f"[{name}] {line}\n")
            self.out.flush()

    def _pump(self, name: str, stream) -> None:
        for line in stream:
            self.say(name, line.rstrip("\n"))

    def start(self) -> None:
        commands = [(n.name, n.command()) for n in self.nodes]   # resolve all before starting any
        for name, cmd in commands:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    env=self.env, preexec_fn=_child_setup)
            self.procs[name] = proc
            t = threading.Thread(target=self._pump, args=(name, proc.stdout), daemon=True)
            t.start()
            self._threads.append(t)
            self.say("deploy", f"started {name} (pid {proc.pid}): {shlex.join(cmd)}")

    def exited(self) -> tuple[str, int] | None:
        """The first node found to have exited, with its exit code."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return name, proc.returncode
        return None

    def stop(self, timeout_s: float = 5.0) -> dict[str, int]:
        """Stop every node, one at a time in reverse start order; returns their exit codes."""
        for name, proc in reversed(self.procs.items()):
            for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 2.0)):
                if proc.poll() is not None:
                    break
                if sig != signal.SIGTERM:
                    self.say("deploy", f"{name} did not stop: sending {sig.name}")
                proc.send_signal(sig)
                try:
                    proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    pass
        for t in self._threads:
            t.join(1.0)
        return {name: proc.returncode for name, proc in self.procs.items()}

    def run(self, after_start=None) -> int:
        """Start (then run `after_start` in a thread of its own), supervise until Ctrl-C / SIGTERM
        or until a node exits; stop all. Exit code: 0 after a clean stop, else the first failing
        node's code (1 if it was 0)."""
        previous = signal.signal(signal.SIGTERM, _interrupt)
        died = None
        try:
            self.start()
            if after_start is not None:
                threading.Thread(target=after_start, daemon=True).start()
            while (died := self.exited()) is None:
                time.sleep(0.1)
            self.say("deploy", f"{died[0]} exited with code {died[1]}: stopping the graph")
        except KeyboardInterrupt:
            self.say("deploy", "interrupted: stopping the graph")
        finally:
            codes = self.stop()
            signal.signal(signal.SIGTERM, previous)
        self.say("deploy", "stopped: " + ", ".join(f"{n} {c}" for n, c in codes.items()))
        if died is not None:
            return died[1] or 1
        return next((c for c in codes.values() if c), 0)


def _interrupt(*_):
    raise KeyboardInterrupt


# ------------------------------------------------------------------------------- CLI

def resolve_path(text: str) -> Path:
    path = Path(text)
    if path.exists():
        return path
    known = sorted(p.name for p in REPO_LAUNCH_DIR.glob("*.launch.yaml"))
    raise LaunchFileError(f"launch file not found: {text}" + (f"; the repository's launch/ has: {', '.join(known)}"
                                                               if known else ""))


def main(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("--")}
    rest = [a for a in argv if not a.startswith("--")]
    if "--help" in flags or not rest:
        print(USAGE)
        return 0 if "--help" in flags else 2
    unknown_flags = flags - {"--print", "--show-args", "--help", "--start"}
    if unknown_flags:
        raise LaunchFileError(f"unknown option(s) {sorted(unknown_flags)}\n{USAGE}")
    path = resolve_path(rest[0])
    overrides = {}
    for a in rest[1:]:
        if ":=" not in a:
            raise LaunchFileError(f"expected name:=value, got '{a}'")
        k, v = a.split(":=", 1)
        overrides[k] = v
    if "--show-args" in flags:
        for a in declared_args(path):
            default = "(required)" if a.default is None else f"default: '{a.default}'"
            print(f"  {a.name}  {default}\n      {a.description}")
        return 0
    nodes = load_launch(path, overrides)
    if "--print" in flags:
        for n in nodes:
            print(f"[{n.name}] {shlex.join(n.command())}")
        return 0
    graph = Graph(nodes)
    if "--start" not in flags:
        return graph.run()
    policy = next((n for n in nodes if n.exec == "policy_node"), None)
    if policy is None:
        raise LaunchFileError(f"--start: {path} starts no policy_node")
    name = "/".join(part for part in (policy.namespace.strip("/"), policy.name) if part)

    def start():
        from robotrl.operate import start_when_ready
        if not start_when_ready(name, START_TIMEOUT_S, lambda line: graph.say("deploy", f"start: {line}")):
            graph.say("deploy", f"start: not accepted within {START_TIMEOUT_S:.0f} s")
    return graph.run(after_start=start)
