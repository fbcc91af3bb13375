"""The code passes ruff with the project's rules (pyproject.toml [tool.ruff]): pyflakes (unused
imports and names, undefined names), pycodestyle with 120-character lines, bugbear (a closure
that captures a loop variable, mutable defaults, …)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
