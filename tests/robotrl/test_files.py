"""Output places are checked before any work, and nothing is created by the check."""
import pytest

from robotrl.files import output_place


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
