"""Where robotrl writes: output places checked before the work, figures written whole. The atomic
writer itself is `real.files.atomic_write` (re-exported here), shared with the robot side."""
from __future__ import annotations

import os
from pathlib import Path

from real.files import atomic_write, write_text

__all__ = ["atomic_write", "write_text", "output_place", "save_figure"]


def output_place(path: str | Path | None, key: str, folder: bool = False) -> Path | None:
    """`key=path`, a file (or a folder) a command will write, checked before the command's work
    starts, so that an hour of training or evaluation does not end in an error about where its
    results go. Nothing is created here; an option not given (None, "") passes as None."""
    if not path:
        return None
    path = Path(path)
    where = path if folder else path.parent
    existing = next(p for p in (where, *where.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{key}={path}: {existing} is a file, not a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{key}={path} is a folder; {key} names a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={path}: {existing} is not writable")
    return path


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure as an image (the format by the suffix), written atomically, then closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)
