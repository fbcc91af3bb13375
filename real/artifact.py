"""Loading a policy artifact on the robot computer, and checking it against the robot.

An artifact is one file: the policy's tick and its manifest (how to build the observation, what
the action means, and which robot, rates and gains it was trained for). Two formats carry it:
- TorchScript (any suffix but .onnx; every policy exports to it): the module maps the observation
  to the policy action (`forward`), the action to joint targets (`command`), does both in one call
  (`step`, what a control tick runs) and clears any internal state (`reset`); the manifest is
  manifest.json inside the archive.
- ONNX (`.onnx`): the tick as a pure function run by onnxruntime, obs [batch, n] -> action,
  q_target (+ memory in, memory_out: a recurrent state or a chunk queue, zeros after a reset); the
  manifest is the model's metadata entry `robotrl_manifest`. This runtime keeps the memory between calls.
Both load into an `Artifact` with the same `step`, `act` and `reset`, so the control loop does
not know which it runs. An ONNX artifact needs numpy, onnx and onnxruntime only, no torch; torch
is imported when a TorchScript artifact is loaded, so `read_manifest` (what an artifact is, without
running it) costs no runtime at all.
"""
from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np

from real.robot_spec import RobotSpec

FORMAT = "robotrl-artifact"
FORMAT_VERSION = 2   # v2: the module has `step` (one call per control tick)
METHODS = ("forward", "command", "step", "reset")
ONNX_MANIFEST_KEY = "robotrl_manifest"
# An export's default file suffix per format; a file with any suffix but .onnx is read as TorchScript.
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx"}


class ArtifactError(RuntimeError):
    """The file is missing, corrupt, not an artifact, or its contents fail their own hashes."""


class ManifestMismatch(RuntimeError):
    """The artifact was trained for a robot that differs from the one it is asked to drive."""


def artifact_format(path: str | Path) -> str:
    return "onnx" if Path(path).suffix.lower() == SUFFIXES["onnx"] else "torchscript"


def weights_sha256(module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def onnx_initializers_sha256(model) -> str:
    """The ONNX graph's constants (weights, folded normaliser, limits), by name."""
    from onnx import numpy_helper
    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(init.name.encode())
        h.update(np.ascontiguousarray(numpy_helper.to_array(init)).tobytes())
    return h.hexdigest()


class Artifact:
    """A loaded policy: `step(obs)` -> (action, joint targets) once per control tick, `act(obs)`
    -> action, `reset()` at every start (clears a memory or a chunk queue)."""

    def __init__(self, manifest: dict, path: Path):
        self.manifest, self.path = manifest, path

    @property
    def joint_names(self) -> list[str]:
        return self.manifest["action"]["joint_names"]

    def warm_up(self, calls: int = 5) -> None:
        """The runtimes optimise a graph on its first calls (TorchScript ~0.1 s): make them before
        a control loop starts, not in its first tick, where the stall would trip the watchdogs."""
        obs = np.zeros(self.manifest["observation"]["size"], dtype=np.float32)
        for _ in range(calls):
            self.step(obs)
        self.reset()


class TorchScriptArtifact(Artifact):
    def __init__(self, module, manifest: dict, path: Path):
        import torch
        super().__init__(manifest, path)
        self.module = module
        self._from_numpy = torch.from_numpy

    def _tensor(self, x):
        """The array as a float32 tensor sharing its memory where it can. `torch.as_tensor(x,
        dtype=float32)` gives the same tensor but makes the scripted call after it ~10 µs slower, a
        seventh of the walker's tick (docs/benchmarks.md, "the TorchScript wrapper")."""
        return self._from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.module(self._tensor(obs)).numpy()

    def command(self, action: np.ndarray) -> np.ndarray:
        return self.module.command(self._tensor(action)).numpy().astype(np.float64)

    def step(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One control tick: (policy action, joint position targets), in one scripted call."""
        action, q_target = self.module.step(self._tensor(obs))
        return action.numpy(), q_target.numpy().astype(np.float64)

    def reset(self) -> None:
        self.module.reset()


class OnnxArtifact(Artifact):
    """One robot's policy in onnxruntime; its memory (a recurrent state, a chunk queue) lives here between ticks."""

    def __init__(self, session, manifest: dict, path: Path):
        super().__init__(manifest, path)
        self.session = session
        self.memory_size = int(manifest["onnx"]["memory_size"])
        self.memory = np.zeros((1, self.memory_size), dtype=np.float32)

    def _run(self, obs: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(obs, dtype=np.float32)
        feed = {"obs": x.reshape(1, -1) if x.ndim == 1 else x}
        if not self.memory_size:
            return self.session.run(None, feed)
        if len(feed["obs"]) != 1:
            raise ValueError(f"{self.path}: a policy with memory runs one robot; obs of shape {x.shape} given")
        feed["memory"] = self.memory
        action, q_target, self.memory = self.session.run(None, feed)
        return [action, q_target]

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = self._run(obs)[0]
        return action[0] if np.ndim(obs) == 1 else action

    def step(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        action, q_target = self._run(obs)
        return action[0], q_target[0].astype(np.float64)

    def reset(self) -> None:
        self.memory = np.zeros_like(self.memory)


def load_artifact(path: str | Path) -> Artifact:
    path = _existing(path)
    return _load_onnx(path) if artifact_format(path) == "onnx" else _load_torchscript(path)


def read_manifest(path: str | Path) -> dict:
    """An artifact's manifest without loading its policy (no torch, no onnxruntime): for what only
    needs to know what an artifact is (the emulated firmware's world, a report). The weights are
    not checked against their hash here; load_artifact does that."""
    path = _existing(path)
    if artifact_format(path) == "onnx":
        return _onnx_manifest(_read_onnx(path), path)
    with _archive(path) as z:
        return _torchscript_manifest(z, path)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder; an artifact is one file (robotrl export writes it)")
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    return path


# What every manifest holds, by section: the controller, the observation builder and the robot
# check read these (what is missing is named here rather than as a KeyError inside one of them).
REQUIRED = {"observation": ("size", "terms", "history"), "action": ("joint_names", "scale", "offset", "clip", "type"),
            "robot": ("name", "joint_names", "control_hz", "physics_hz", "kp", "kd", "q_lower", "q_upper",
                      "q_default", "tau_max"),
            "task": ("name",), "hashes": ()}


def _readable(text: str | bytes, path: Path) -> dict:
    """The manifest, parsed and checked for the format and the sections every reader relies on."""
    try:
        manifest = json.loads(text)
    except ValueError as e:   # JSONDecodeError, UnicodeDecodeError
        raise ArtifactError(f"{path}: its manifest is not valid JSON ({e}); re-export it") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: its manifest is a {type(manifest).__name__}, not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: manifest format {manifest.get('format')} v{manifest.get('format_version')}, "
                            f"this runtime reads {FORMAT} v{FORMAT_VERSION}; re-export it with `robotrl export`")
    for section, keys in REQUIRED.items():
        part = manifest.get(section)
        missing = [k for k in keys if k not in part] if isinstance(part, dict) else None
        if missing is None or missing:
            what = f"'{section}'" if missing is None else f"'{section}.{missing[0]}'"
            raise ArtifactError(f"{path}: its manifest has no {what}; re-export it with `robotrl export`")
    return manifest


def _archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"{path} is not a robotrl artifact: not a readable TorchScript archive ({e}); "
                            "was it truncated or overwritten?") from None


def _torchscript_manifest(archive: zipfile.ZipFile, path: Path) -> dict:
    # torch.jit.save puts _extra_files under <archive name>/extra/
    names = [n for n in archive.namelist() if n.endswith("/extra/manifest.json")]
    if not names:
        raise ArtifactError(f"{path} has no manifest.json inside: it was not written by `robotrl export`")
    return _readable(archive.read(names[0]), path)


def _load_torchscript(path: Path) -> TorchScriptArtifact:
    try:
        import torch
    except ImportError:   # a robot computer that runs ONNX artifacts only
        raise ArtifactError(f"{path} is a TorchScript artifact and torch is not installed here; install torch "
                            "or export the policy as ONNX (`robotrl export … format=onnx`)") from None
    with _archive(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise ArtifactError(f"{path} is corrupt: entry '{bad}' fails its checksum")
        manifest = _torchscript_manifest(z, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError with a C++ backtrace; keep only the gist
        raise ArtifactError(f"{path} could not be loaded as TorchScript: {str(e).splitlines()[0]}") from None
    expected = manifest.get("hashes", {}).get("weights_sha256")
    if expected != weights_sha256(module):
        raise ArtifactError(f"{path}: weights do not match the manifest's weights_sha256 (file altered or corrupt)")
    missing = [m for m in METHODS if not hasattr(module, m)]
    if missing:
        raise ArtifactError(f"{path}: the module lacks {missing}; an artifact module has {list(METHODS)}")
    # A deployed policy is never trained. With no parameter requiring grad a call records no
    # autograd state (median 94 -> 72 µs for the walker's tick, interleaved in one process), and a
    # per-call no_grad/inference_mode context then buys nothing measurable: the methods use none.
    module.eval()
    for p in module.parameters():   # ScriptModule has no requires_grad_()
        p.requires_grad_(False)
    return TorchScriptArtifact(module, manifest, path)


def _needs_onnx(path: Path) -> ArtifactError:
    return ArtifactError(f"{path} is an ONNX artifact: it needs onnx and onnxruntime (pip install 'robotrl[onnx]')")


def _read_onnx(path: Path):
    try:
        import onnx
    except ImportError:
        raise _needs_onnx(path) from None
    try:
        return onnx.load(str(path))
    except Exception as e:   # protobuf's DecodeError on a truncated file, OSError, …
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); "
                            "was it truncated or overwritten?") from None


def _onnx_manifest(model, path: Path) -> dict:
    meta = {p.key: p.value for p in model.metadata_props}
    if ONNX_MANIFEST_KEY not in meta:
        raise ArtifactError(f"{path} has no '{ONNX_MANIFEST_KEY}' metadata: it was not written by `robotrl export`")
    return _readable(meta[ONNX_MANIFEST_KEY], path)


def _load_onnx(path: Path) -> OnnxArtifact:
    model = _read_onnx(path)
    try:
        import onnxruntime
    except ImportError:
        raise _needs_onnx(path) from None
    manifest = _onnx_manifest(model, path)
    if manifest.get("hashes", {}).get("onnx_initializers_sha256") != onnx_initializers_sha256(model):
        raise ArtifactError(f"{path}: the graph's constants do not match the manifest's onnx_initializers_sha256 "
                            "(file altered or corrupt)")
    options = onnxruntime.SessionOptions()
    # One robot, one small network: threads add jitter, not speed, and steal the control loop's cores.
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ArtifactError(f"{path}: onnxruntime cannot run it: {str(e).splitlines()[0]}") from None
    return OnnxArtifact(session, manifest, path)


def check_against_robot(manifest: dict, spec: RobotSpec, rtol: float = 1e-6) -> None:
    """Refuse (raise ManifestMismatch naming the first difference) unless the artifact's robot
    facts match the robot it is about to drive."""
    trained = manifest["robot"]
    names, want = list(trained["joint_names"]), list(spec.joint_names)
    where = f"artifact trained for '{trained['name']}', robot config '{spec.name}' ({spec.source})"
    if len(names) != len(want):
        raise ManifestMismatch(f"{where}: {len(names)} joints in the artifact, {len(want)} on the robot")
    for i, (a, b) in enumerate(zip(names, want)):
        if a != b:
            hint = f" ('{a}' is joint {want.index(a)} on the robot)" if a in want else ""
            raise ManifestMismatch(f"{where}: joint {i} is '{a}' in the artifact but '{b}' on the robot{hint}")
    for key in ("control_hz", "physics_hz"):
        if abs(float(trained[key]) - float(getattr(spec, key))) > 1e-9:
            raise ManifestMismatch(f"{where}: {key} is {trained[key]} in the artifact but "
                                   f"{getattr(spec, key)} on the robot")
    for key, attr in (("kp", "kp"), ("kd", "kd"), ("q_lower", "q_lower"), ("q_upper", "q_upper"),
                      ("q_default", "q_default"), ("tau_max", "tau_max")):
        a, b = np.asarray(trained[key]), getattr(spec, attr)
        diff = np.flatnonzero(~np.isclose(a, b, rtol=rtol, atol=1e-9))
        if diff.size:
            j = diff[0]
            raise ManifestMismatch(f"{where}: {key} of joint '{want[j]}' is {a[j]} in the artifact but "
                                   f"{b[j]} on the robot")
