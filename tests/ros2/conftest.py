"""Fixtures of the hardware-in-the-loop tests (the rig itself is in hil_rig.py). The whole
folder is skipped, saying why, where the ROS 2 Python packages cannot be imported."""
import itertools
import os
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="ROS 2 Jazzy wheels not importable: pip install -e '.[ros2]'")

from hil_rig import Hil  # noqa: E402

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"   # DDS discovery stays on loopback
# A domain per test (1..100 keep DDS ports valid), offset by pid so parallel runs don't meet.
_domains = itertools.count(os.getpid() % 50)


@pytest.fixture
def hil(monkeypatch):
    domain = next(_domains) % 100 + 1
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))   # inherited by the node processes
    rig = Hil(domain)
    yield rig
    rig.close()
    print(rig.output())   # shown by pytest when the test failed


@pytest.fixture(scope="session")
def artifact(tmp_path_factory) -> Path:
    """A freshly trained and exported kid_biped artifact (tiny: it need not walk, only run)."""
    from robotrl.cli import main
    run = tmp_path_factory.mktemp("ros2_run") / "walk"
    assert main(["train", "num_envs=4", "algo.steps_per_env=16", "total_steps=192", "video=false",
                 "progress=false", f"run_dir={run}"]) == 0
    assert main(["export", f"run={run}", f"out={run}/policy.pt"]) == 0
    return run / "policy.pt"


def pytest_collection_modifyitems(items):
    """Graphs of real processes talking real DDS on a shared, preemptible host: a stall of a few
    hundred ms can trip a watchdog or lose a first service reply. Re-run such a test once or twice
    (pytest-rerunfailures) rather than hide the stall behind ever-looser timeouts; the failure
    output of every attempt is still shown."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.flaky(reruns=2, reruns_delay=1))


def pytest_terminal_summary(terminalreporter):
    """Why each re-run test failed the first time (pytest-rerunfailures names it only): the cause
    of a flake is what a fix needs, and CI keeps nothing else."""
    for report in terminalreporter.stats.get("rerun", []):
        crash = getattr(report.longrepr, "reprcrash", None)
        lines = (crash.message if crash is not None else str(report.longrepr)).splitlines()
        # wait_for's context comes after the first line; a test's own summary there (not a node's
        # "[name] …" output) is kept: e.g. how high the cube got
        message = " | ".join(lines[:2] if len(lines) > 1 and not lines[1].lstrip().startswith("[") else lines[:1])
        text = report.longreprtext + "\n" + report.capstdout   # the graph's output is in the message
        faults = [line for line in text.splitlines()   # lines of the nodes, "[policy] …"
                  if line.lstrip().startswith("[") and ("fault" in line or "watchdog" in line)]
        terminalreporter.write_line(f"RERUN CAUSE {report.nodeid}: {message[:600]}")
        for line in faults[-6:]:
            terminalreporter.write_line(f"    {line[:300]}")
