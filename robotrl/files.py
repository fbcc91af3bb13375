"""Figures written whole; the atomic writer and the output-place check are real/files.py's
(re-exported here), shared with the robot side (the recorder node checks its file the same way)."""
from __future__ import annotations

from pathlib import Path

from real.files import atomic_write, output_place, save_arrays, write_text

__all__ = ["atomic_write", "write_text", "save_arrays", "output_place", "save_figure"]


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure as an image (the format by the suffix), written atomically, then closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)
