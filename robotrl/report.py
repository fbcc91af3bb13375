"""`robotrl report <recording.mcap> [out=<dir>]`: plots and a summary of a recording made by the
ROS 2 graph's recorder_node (`robotrl deploy launch/sim.launch.yaml record:=run.mcap`).

Reads the MCAP with mcap_ros2's decoder and writes into out/ (default: next to the recording,
<name>_report/): tracking.png (velocity command; joint target vs measured position for a few
joints), torques.png, energy.png (mechanical power sum_j |tau_j * dq_j| and its integral),
timing.png (the policy's control-loop diagnostics: period, lateness, compute, overruns),
safety.png (policy and firmware modes over time, with events), for a tabletop run object.png
(the object's position from /object_pose, and the goal), and summary.json.
"""
from __future__ import annotations

import json
import math
import struct
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from robotrl.files import save_figure, write_text

MODE_NAMES = None   # firmware_bridge.Mode names, looked up lazily
LOOP_KEYS = ("period_mean_us", "lateness_p99_us", "compute_p99_us", "overruns", "skipped", "ticks")


def _firmware_mode_name(value: int) -> str:
    try:
        from firmware_bridge import Mode
        return Mode(value).name
    except Exception:
        return str(value)


def _topic_key(topic: str) -> str:
    return topic.rsplit("/", 1)[-1]


def _messages(path: Path) -> tuple[Iterator, bool]:
    """The recording's ROS 2 messages, streamed in the order they were logged, and whether the file is complete.
    A recording the recorder could not close (killed, power lost: `<name>.mcap.tmp` is left) has no
    summary; it is read as a stream up to its last whole chunk (the recorder flushes every second),
    in file order, which is the order the recorder wrote the messages as they arrived."""
    from mcap.exceptions import InvalidMagic, McapError
    from mcap.reader import make_reader
    with open(path, "rb") as f:
        try:
            make_reader(f).get_summary()   # a closed recording ends with its summary and footer
        except InvalidMagic:
            raise ValueError(f"{path} is not an MCAP recording (it does not begin with MCAP's magic bytes)") from None
        except (McapError, struct.error, OSError):   # no footer, or shorter than one (a seek before the start)
            return _read(path, complete=False), False
    return _read(path, complete=True), True


def _read(path: Path, complete: bool) -> Iterator:
    """Each chunk's CRC is checked, so bytes damaged on disk stop the reading (load says where)
    rather than decode into wrong values."""
    from mcap.exceptions import EndOfFile
    from mcap.reader import NonSeekingReader, SeekingReader
    from mcap_ros2.decoder import DecoderFactory
    from mcap_ros2.reader import read_ros2_messages
    with open(path, "rb") as f:
        reader = (SeekingReader if complete else NonSeekingReader)(f, validate_crcs=True,
                                                                   decoder_factories=[DecoderFactory()])
        try:
            yield from read_ros2_messages(reader, log_time_order=complete)
        except EndOfFile:   # the cut of an unclosed recording: what came before it is whole
            return


def load(path: str | Path) -> dict:
    """The recording's messages as arrays by kind (times in seconds from the first message)."""
    messages, complete = _messages(Path(path))
    counts: Counter = Counter()
    js_t, js_q, js_dq, js_tau, joint_names = [], [], [], [], None
    cmd_t, cmd_q, cmd_names = [], [], None
    vel_t, vel = [], []
    obj_t, obj, goal = [], [], None
    loop_t, loop = [], defaultdict(list)
    modes, fw_modes, events, seen_events = [], [], [], set()
    t0, damage = None, None
    messages = iter(messages)
    while True:
        try:
            m = next(messages)
        except StopIteration:
            break
        except Exception as e:   # from the MCAP reader: bytes damaged on disk; what came before them stands
            damage = f"{type(e).__name__}: {e}"
            break
        topic = m.channel.topic
        counts[topic] += 1
        t = m.log_time_ns * 1e-9
        t0 = t if t0 is None else t0
        t -= t0
        msg, key = m.ros_msg, _topic_key(topic)
        if key == "joint_states":
            js_t.append(t)
            js_q.append(list(msg.position))
            js_dq.append(list(msg.velocity))
            js_tau.append(list(msg.effort))
            joint_names = list(msg.name)
        elif key == "joint_commands":
            data = np.asarray(msg.data, dtype=float)
            n = len(data) // 4
            if n:
                cmd_t.append(t)
                cmd_q.append(data[:n])
                labels = msg.layout.dim[1].label if len(msg.layout.dim) > 1 else ""
                cmd_names = labels.split(",") if labels else None
        elif key == "cmd_vel":
            vel_t.append(t)
            vel.append([msg.linear.x, msg.linear.y, msg.angular.z])
        elif key == "object_pose":
            obj_t.append(t)
            p = msg.pose.position
            obj.append([p.x, p.y, p.z])
        elif key == "goal":
            goal = [msg.point.x, msg.point.y, msg.point.z]
        elif key == "firmware_mode":
            fw_modes.append((t, _firmware_mode_name(msg.data)))
        elif key == "diagnostics":
            for s in msg.status:
                values = {kv.key: kv.value for kv in s.values}
                if s.name.endswith("control loop"):
                    loop_t.append(t)
                    for k in LOOP_KEYS:
                        loop[k].append(float(values.get(k, "nan")))
                elif s.name.endswith(": safety"):
                    mode = values.get("mode", s.message)
                    if not modes or modes[-1][1] != mode:
                        modes.append((t, mode))
                    for k, v in values.items():
                        if k.startswith("event_") and v not in seen_events:
                            seen_events.add(v)
                            events.append((t, v))
    if t0 is None:
        raise ValueError(f"{path} holds no messages" + (f" that can be read ({damage})" if damage else ""))
    arr = lambda x: np.asarray(x, dtype=float)  # noqa: E731
    return {"complete": complete and damage is None, "damage": damage, "counts": dict(counts), "duration_s": max(
                [0.0, *js_t[-1:], *cmd_t[-1:], *loop_t[-1:], *vel_t[-1:]]),
            "js_t": arr(js_t), "q": arr(js_q), "dq": arr(js_dq), "tau": arr(js_tau), "joint_names": joint_names or [],
            "cmd_t": arr(cmd_t), "q_target": arr(cmd_q), "cmd_names": cmd_names,
            "vel_t": arr(vel_t), "vel": arr(vel).reshape(-1, 3),
            "object_t": arr(obj_t), "object": arr(obj).reshape(-1, 3), "goal": goal,
            "loop_t": arr(loop_t), "loop": {k: arr(v) for k, v in loop.items()},
            "modes": modes, "firmware_modes": fw_modes, "events": events}


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def summarize(d: dict) -> dict:
    tau, dq, t = d["tau"], d["dq"], d["js_t"]
    has_js = tau.ndim == 2 and tau.shape[0] > 0 and tau.shape == dq.shape
    power = np.abs(tau * dq).sum(axis=1) if has_js else np.zeros(0)
    energy = float(np.trapezoid(power, t)) if len(power) > 1 else 0.0
    loop, obj = d["loop"], d["object"]
    last = {k: _finite(v[-1]) for k, v in loop.items() if len(v)}
    return {
        "complete": d["complete"],   # false: the recorder did not close it; read up to its last whole chunk
        "damage": d["damage"],       # what stopped the reading of a damaged file (None: nothing)
        "duration_s": round(d["duration_s"], 3),
        "messages": d["counts"],
        "rate_hz": {k: round(n / d["duration_s"], 2) for k, n in d["counts"].items()} if d["duration_s"] > 0 else {},
        "mean_power_w": float(power.mean()) if len(power) else 0.0,
        "energy_j": energy,
        "max_abs_torque_nm": float(np.abs(tau).max()) if has_js else 0.0,
        "loop_lateness_p99_us": last.get("lateness_p99_us"),
        "loop_compute_p99_us": last.get("compute_p99_us"),
        "loop_period_mean_us": last.get("period_mean_us"),
        "loop_overruns": last.get("overruns"),
        "policy_modes": [{"t": round(t, 3), "mode": m} for t, m in d["modes"]],
        "firmware_modes": [{"t": round(t, 3), "mode": m} for t, m in d["firmware_modes"]],
        "safety_events": [{"t": round(t, 3), "event": e} for t, e in d["events"]],
        # tabletop runs: how high the object rose above where it was first seen, how far it ended from the goal
        "object_rise_max_m": float(obj[:, 2].max() - obj[0, 2]) if len(obj) else None,
        "object_goal_distance_m": (float(np.linalg.norm(obj[-1, :2] - np.asarray(d["goal"][:2])))
                                   if len(obj) and d["goal"] is not None else None),
    }


def _plots(d: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []

    def save(fig, name):
        written.append(save_figure(fig, out / name, dpi=100))

    names = d["joint_names"]
    n_show = min(4, d["q"].shape[1] if d["q"].ndim == 2 else 0)
    fig, axes = plt.subplots(1 + max(n_show, 1), 1, figsize=(10, 2.2 * (1 + max(n_show, 1))), sharex=True)
    axes = np.atleast_1d(axes)
    if len(d["vel_t"]):
        for i, label in enumerate(("vx cmd", "vy cmd", "wz cmd")):
            axes[0].step(d["vel_t"], d["vel"][:, i], where="post", label=label)
        axes[0].legend(loc="upper right", fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no cmd_vel messages (base velocity is not on a topic)", ha="center",
                     transform=axes[0].transAxes)
    axes[0].set_ylabel("velocity command")
    cmd_index = {n: i for i, n in enumerate(d["cmd_names"] or names)}
    for j in range(n_show):
        ax = axes[1 + j]
        ax.plot(d["js_t"], d["q"][:, j], label="measured")
        k = cmd_index.get(names[j] if j < len(names) else "", j)
        if d["q_target"].ndim == 2 and len(d["q_target"]) and k < d["q_target"].shape[1]:
            ax.step(d["cmd_t"], d["q_target"][:, k], where="post", label="target", alpha=0.8)
        ax.set_ylabel(f"{names[j] if j < len(names) else j} (rad)", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("time (s)")
    save(fig, "tracking.png")

    fig, ax = plt.subplots(figsize=(10, 4))
    if d["tau"].ndim == 2 and len(d["tau"]):
        for j in range(d["tau"].shape[1]):
            ax.plot(d["js_t"], d["tau"][:, j], lw=0.8, label=names[j] if j < len(names) else str(j))
        ax.legend(fontsize=6, ncol=4)
    ax.set(xlabel="time (s)", ylabel="joint torque (Nm)", title="measured joint torques")
    save(fig, "torques.png")

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    if d["tau"].ndim == 2 and len(d["tau"]) > 1 and d["tau"].shape == d["dq"].shape:
        p = np.abs(d["tau"] * d["dq"]).sum(axis=1)
        a1.plot(d["js_t"], p)
        e = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(d["js_t"]))])
        a2.plot(d["js_t"], e)
    a1.set_ylabel("power Σ|τ·q̇| (W)")
    a2.set(xlabel="time (s)", ylabel="cumulative energy (J)")
    save(fig, "energy.png")

    fig, axes = plt.subplots(4, 1, figsize=(10, 7), sharex=True)
    lt, loop = d["loop_t"], d["loop"]
    for ax, (key, label) in zip(axes, [("period_mean_us", "mean period (us)"), ("lateness_p99_us",
                                        "lateness p99 (us)"), ("compute_p99_us", "compute p99 (us)"),
                                       ("overruns", "overruns (total)")]):
        if len(lt) and key in loop:
            ax.plot(lt, loop[key], marker=".")
        ax.set_ylabel(label, fontsize=8)
    axes[-1].set_xlabel("time (s)")
    axes[0].set_title("policy control loop (from /diagnostics)")
    save(fig, "timing.png")

    fig, ax = plt.subplots(figsize=(10, 3.5))
    for series, label in ((d["modes"], "policy"), (d["firmware_modes"], "firmware")):
        if series:
            ts = [t for t, _ in series] + [max(d["duration_s"], series[-1][0])]
            ms = [m for _, m in series]
            ax.step(ts, [f"{label}: {m}" for m in ms] + [f"{label}: {ms[-1]}"], where="post", label=label)
    for t, e in d["events"]:
        ax.axvline(t, color="r", alpha=0.3)
        ax.annotate(e[:40], (t, 0), fontsize=6, rotation=90, va="bottom")
    ax.set(xlabel="time (s)", title="modes and safety events")
    save(fig, "safety.png")

    if len(d["object_t"]):
        fig, ax = plt.subplots(figsize=(10, 3.5))
        for i, axis in enumerate("xyz"):
            line, = ax.plot(d["object_t"], d["object"][:, i], label=f"object {axis}")
            if d["goal"] is not None:
                ax.axhline(d["goal"][i], color=line.get_color(), ls="--", lw=0.8, label=f"goal {axis}")
        ax.legend(loc="upper right", fontsize=8, ncol=2)
        ax.set(xlabel="time (s)", ylabel="position in the base frame (m)", title="object (/object_pose)")
        save(fig, "object.png")
    return written


def report(recording: str | Path, out: str | Path | None = None) -> dict:
    recording = Path(recording)
    if not recording.is_file():
        raise FileNotFoundError(f"recording not found: {recording}")
    out = Path(out) if out else recording.with_name(recording.stem + "_report")
    out.mkdir(parents=True, exist_ok=True)
    d = load(recording)
    summary = summarize(d)
    summary["plots"] = [p.name for p in _plots(d, out)]
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    fmt = lambda v, unit: "n/a" if v is None else f"{v:.1f} {unit}"  # noqa: E731
    print(f"recording {recording}: {summary['duration_s']:.2f} s")
    if summary["damage"]:
        n = sum(summary["messages"].values())
        print(f"  (damaged: read up to the damage, after {n} messages: {summary['damage']})")
    elif not summary["complete"]:
        print("  (not closed by the recorder - it was killed or lost power: read up to its last whole chunk)")
    for topic, n in sorted(summary["messages"].items()):
        print(f"  {topic:28s} {n:7d} messages ({summary['rate_hz'].get(topic, 0):.1f} Hz)")
    print(f"  mean power {summary['mean_power_w']:.2f} W, energy {summary['energy_j']:.2f} J, "
          f"max |tau| {summary['max_abs_torque_nm']:.2f} Nm")
    print(f"  loop: lateness p99 {fmt(summary['loop_lateness_p99_us'], 'us')}, compute p99 "
          f"{fmt(summary['loop_compute_p99_us'], 'us')}, overruns {summary['loop_overruns']}")
    print("  policy modes: " + (" -> ".join(m["mode"] for m in summary["policy_modes"]) or "none"))
    print(f"  safety events: {len(summary['safety_events'])}" +
          "".join(f"\n    {e['t']:.2f} s  {e['event']}" for e in summary["safety_events"]))
    if summary["object_rise_max_m"] is not None:
        print(f"  object: rose up to {summary['object_rise_max_m'] * 100:.1f} cm" +
              ("" if summary["object_goal_distance_m"] is None else
               f", ended {summary['object_goal_distance_m'] * 100:.1f} cm from the goal"))
    print(f"  wrote {', '.join(summary['plots'])}, summary.json to {out}")
    return summary
