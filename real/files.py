"""Writing files so that nothing is lost: every file the stack writes whole (checkpoints, artifacts,
reports, the firmware's applied-command log, latency traces) goes through `atomic_write`, and
where a command or node will write is checked before its work (`output_place`). It lives here,
at the bottom of the stack above the wire, so that `real/`, `sim/`, the ROS 2 nodes and
`robotrl/` all use the one writer."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; when the block ends without an error it is synced
    and renamed onto `path`, so a reader (or a crash) sees the old file or the new one, never half
    of one. On an error nothing is written and no temporary file is left. The temporary name ends
    in the target's suffix, for writers that pick a format by it (imageio, numpy's savez)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp" + path.suffix)
    except OSError as e:   # say which file could not be written, not the temporary's random name
        raise OSError(e.errno, f"cannot write {path} ({e.strerror})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; what is written here is meant to be copied and read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_arrays(path: str | Path, arrays: dict, compressed: bool = False) -> Path:
    """Named arrays as one .npz file (zip-compressed if `compressed`), written atomically. Written
    through an open file, so numpy does not append `.npz` to a name that lacks it: the file is
    exactly `path`."""
    import numpy as np
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return Path(path)


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
