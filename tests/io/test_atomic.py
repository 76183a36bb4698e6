import pytest

from locore_plugin.io import atomic
from locore_plugin.io.atomic import atomic_write


def test_writes_text_and_bytes_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, "first")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    atomic_write(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_set_aside_keeps_the_entry_and_tolerates_a_rank_that_was_first(tmp_path, capsys):
    from locore_plugin.io.atomic import set_aside

    entry = tmp_path / "cache.json"
    entry.write_text("{trunc")
    assert set_aside(entry, ValueError("bad")) == tmp_path / "cache.json.corrupt"
    assert not entry.exists() and (tmp_path / "cache.json.corrupt").read_text() == "{trunc"
    assert "cache.json is unreadable (ValueError: bad)" in capsys.readouterr().err
    set_aside(entry, ValueError("bad"))  # already moved by another process: no error
