"""allo._atomic.atomic_path: the one way results are written (selections, caches, reports, metrics)."""

import contextlib
import os
import stat
import tempfile

import pytest

from allo._atomic import atomic_path


def _leftovers(folder):
    return [f for f in os.listdir(folder) if ".tmp" in f]


def test_replaces_on_success_with_the_usual_permissions(tmp_path):
    path = str(tmp_path / "out.json")
    with open(path, "w") as f:
        f.write("old")
    with atomic_path(path) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != path
        with open(tmp, "w") as f:
            f.write("new")
        assert open(path).read() == "old"  # not visible before the block ends
    assert open(path).read() == "new" and not _leftovers(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # (a mkstemp file would be 0600)


def test_error_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = str(tmp_path / "sel.safetensors")
    with open(path, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half of it")
            raise RuntimeError("disk full")
    assert open(path).read() == "old" and not _leftovers(tmp_path)
    # nothing written at all before the error: no new file, no temporary one
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(tmp_path / "new.png"), ".png"):
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["sel.safetensors"]


def test_suffix_ends_the_temporary_name(tmp_path):
    with atomic_path(str(tmp_path / "plot.png"), ".png") as tmp:
        assert tmp.endswith(".png")
        open(tmp, "wb").close()
    assert os.listdir(tmp_path) == ["plot.png"]


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_writer_that_sets_its_own_mode_still_gives_the_usual_permissions(tmp_path, umask):
    # safetensors writes a mkstemp file (0600) and renames it: the result must not keep that mode
    path = str(tmp_path / "sel.safetensors")
    with _umask(umask):
        with atomic_path(path) as tmp:
            fd, own = tempfile.mkstemp(dir=tmp_path)
            os.close(fd)
            os.chmod(own, 0o640)  # neither umask's default: only the fix gives the expected mode
            os.replace(own, tmp)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask and not _leftovers(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_umask_is_read_as_set(umask):
    from allo._atomic import _umask as read_umask

    with _umask(umask):
        assert read_umask() == umask
        assert read_umask() == umask  # reading did not change it


def test_a_missing_folder_is_named_before_anything_is_written(tmp_path):
    ran = []
    path = tmp_path / "no" / "such" / "sel.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"Selection\.save: cannot write {path}: its folder "
                                                rf"{path.parent} does not exist; create it first"):
        with atomic_path(str(path), what="Selection.save"):
            ran.append(1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        with atomic_path(str(tmp_path / "file" / "out.json")):
            ran.append(1)
    with pytest.raises(IsADirectoryError, match=rf"cannot write {tmp_path}: it is a folder"):
        with atomic_path(str(tmp_path)):
            ran.append(1)
    assert not ran and os.listdir(tmp_path) == ["file"]


def test_the_next_write_removes_what_a_killed_write_left(tmp_path):
    # a SIGKILL mid-write leaves <path>.<hex>.tmp (no finally runs); the next write of that path removes
    # it, and nothing else: another path's temporary file, a look-alike name, or a newer one (a writer at work)
    import time

    target = tmp_path / "masks.safetensors"
    old = time.time() - 3600
    left = [tmp_path / "masks.safetensors.0123456789ab.tmp", tmp_path / "masks.safetensors.0123456789ab.tmp.png"]
    kept = [tmp_path / "other.safetensors.0123456789ab.tmp", tmp_path / "masks.safetensors.notmine.tmp",
            tmp_path / "masks.safetensors.bak"]
    for p in left + kept:
        p.write_text("x")
        os.utime(p, (old, old))
    newer = tmp_path / "masks.safetensors.ba9876543210.tmp"
    newer.write_text("x")
    os.utime(newer, (time.time() + 60, time.time() + 60))  # changed after this write started
    with atomic_path(str(target)) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert target.read_text() == "new"
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in kept + [newer])
