"""Host-side atomic writes: all or nothing, ordinary permissions, no temporaries left."""
import os
import stat

import pytest

from pipeline.files import atomic_path, atomic_write


def test_atomic_write_replaces_and_gets_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("intact")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "intact"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_dir_replaces_a_whole_tree_or_leaves_it(tmp_path):
    from pipeline.files import atomic_dir
    target = tmp_path / "tree"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("generator died")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["tree"]
