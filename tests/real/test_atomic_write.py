"""Nothing is lost: a write that fails leaves the old file and no temporary beside it; the
firmware's applied-command log and the latency traces are written the same way."""
import numpy as np
import pytest

from real.files import atomic_write, save_arrays, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "eval.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("the writer died")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
    write_text(target, "new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1
    assert target.stat().st_mode & 0o777 == 0o644   # readable by others, like any output


def test_the_temporary_keeps_the_suffix_writers_choose_a_format_by(tmp_path):
    target = tmp_path / "sub" / "demos.npz"   # numpy's savez appends .npz to a name without it
    with atomic_write(target) as tmp:
        np.savez(tmp, x=np.arange(3))
    assert list(target.parent.iterdir()) == [target]
    np.testing.assert_array_equal(np.load(target)["x"], np.arange(3))


def test_arrays_are_saved_under_exactly_the_name_given(tmp_path):
    """np.savez appends .npz to a name without it; a log named `applied.log` must be that file."""
    for name in ("applied.npz", "applied.log"):
        save_arrays(tmp_path / name, t=np.arange(4.0), names=np.array(["a", "b"]))
        with np.load(tmp_path / name) as f:
            np.testing.assert_array_equal(f["t"], np.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["applied.log", "applied.npz"]
