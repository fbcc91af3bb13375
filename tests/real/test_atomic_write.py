"""Nothing is lost: a write that fails leaves the old file and no temporary beside it; the
firmware's applied-command log and the latency traces are written the same way; where a command
will write is checked before its work."""
import numpy as np
import pytest

from real.files import atomic_write, output_place, save_arrays, write_text


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
    for name, compressed in (("applied.npz", False), ("applied.log", True)):
        save_arrays(tmp_path / name, {"t": np.arange(4.0), "names": np.array(["a", "b"])}, compressed)
        with np.load(tmp_path / name) as f:
            np.testing.assert_array_equal(f["t"], np.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["applied.log", "applied.npz"]


def test_an_output_place_that_cannot_be_written_is_named_before_any_work(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=f"out={a_file}/run: {a_file} is a file, not a folder"):
        output_place(a_file / "run", "out", folder=True)
    with pytest.raises(ValueError, match=f"out={a_file}/a/b.json: {a_file} is a file, not a folder"):
        output_place(a_file / "a" / "b.json", "out")
    with pytest.raises(ValueError, match=f"out={tmp_path} is a folder; out names a file"):
        output_place(tmp_path, "out")
    assert output_place(tmp_path / "new" / "deep" / "x.json", "out") == tmp_path / "new" / "deep" / "x.json"
    assert not (tmp_path / "new").exists()   # checked, not created
    assert output_place(None, "out") is None and output_place("", "out", folder=True) is None   # not given
