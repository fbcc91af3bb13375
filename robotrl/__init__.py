"""robotrl: learning (algorithms, networks, runner, export, CLI) on top of sim/ and real/."""
from pathlib import Path

ARTIFACT_DIR = Path(__file__).resolve().parents[1] / "docs" / "artifacts"
# The walking policy the demo shows, the benchmarks time and the deploy tests drive: ECO
# (energy-constrained), the most frugal of the shipped walkers.
WALK_ARTIFACT = ARTIFACT_DIR / "kid_biped_walk_eco.pt"
