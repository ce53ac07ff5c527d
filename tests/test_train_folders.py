"""allo.train.folders: folders replaced and deleted so that a kill leaves them whole or under a trash
name (which the next writer removes), and links deleted, never followed."""

import os

import pytest

from allo.train import folders


def _tree(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f)).read()
            for d, _, files in os.walk(root) for f in files}


def _make(path, files):
    os.makedirs(path)
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)


def test_replace_puts_the_new_folder_in_and_deletes_the_old(tmp_path):
    _make(tmp_path / "model", {"a": "old", "b": "old"})
    _make(tmp_path / "model.tmp", {"a": "new"})
    folders.replace(str(tmp_path / "model.tmp"), str(tmp_path / "model"))
    assert _tree(tmp_path) == {"model/a": "new"}
    _make(tmp_path / "fresh.tmp", {"c": "x"})  # nothing there before
    folders.replace(str(tmp_path / "fresh.tmp"), str(tmp_path / "fresh"))
    assert _tree(tmp_path / "fresh") == {"c": "x"}


def test_replace_that_fails_puts_the_old_folder_back(tmp_path, monkeypatch):
    _make(tmp_path / "model", {"a": "old"})
    _make(tmp_path / "model.tmp", {"a": "new"})

    def refuse(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(folders.os, "replace", refuse)
    with pytest.raises(OSError, match="disk gone"):
        folders.replace(str(tmp_path / "model.tmp"), str(tmp_path / "model"))
    assert _tree(tmp_path) == {"model/a": "old", "model.tmp/a": "new"}


def test_a_kill_mid_delete_leaves_a_trash_name_that_the_next_writer_removes(tmp_path, monkeypatch):
    _make(tmp_path / "checkpoint-2", {"trainer_state.json": "{}", "model.safetensors": "w"})
    monkeypatch.setattr(folders, "delete", lambda path: None)  # killed right after the rename
    folders.remove(str(tmp_path / "checkpoint-2"))
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(folders.TRASH_PREFIX + "checkpoint-2-"), left
    monkeypatch.undo()
    (tmp_path / "other").write_text("kept")
    folders.remove_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["other"]


def test_a_link_is_deleted_not_what_it_points_to(tmp_path):
    _make(tmp_path / "other_run" / "select", {"DONE": "", "masks": "m"})
    os.makedirs(tmp_path / "run")
    os.symlink(tmp_path / "other_run" / "select", tmp_path / "run" / "select")
    folders.remove(str(tmp_path / "run" / "select"))
    assert os.listdir(tmp_path / "run") == []
    assert _tree(tmp_path / "other_run") == {"select/DONE": "", "select/masks": "m"}
