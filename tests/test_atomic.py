"""allo._atomic.atomic_path: the one way results are written (selections, caches, reports, metrics)."""

import os
import stat

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
