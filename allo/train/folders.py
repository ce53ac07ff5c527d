"""Folders replaced and deleted so that a kill at any moment leaves a folder whole or absent, never half
of one (files are written atomically by :func:`allo._atomic.atomic_path`; this is its counterpart for
the folders allo-train writes: models, checkpoints, stage folders).

Why: ``shutil.rmtree`` deletes file by file. Killed part-way, it leaves a folder that still looks like
what it was (a half-deleted ``checkpoint-N`` still holds its ``trainer_state.json``, a stage folder its
``model/``), which a later run would resume from or reuse. So a folder being deleted is first renamed to
a trash name (a rename is atomic) that nothing else ever matches, then deleted; whatever a kill left
under a trash name is removed by the next writer of that folder (:func:`remove_leftovers`).
"""

from __future__ import annotations

import os
import shutil
import uuid

# the prefix of every name a folder gets while it is deleted (hidden, and matched by no glob of allo-train's)
TRASH_PREFIX = ".allo_removing-"


def move_aside(path: str) -> str:
    """Rename ``path`` (a folder, file or link) to a trash name beside it; returns the new path."""
    parent, name = os.path.split(os.path.normpath(path))
    trash = os.path.join(parent, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    return trash


def delete(path: str) -> None:
    """Delete what ``path`` names: a link itself (never what it points to: a stage linked from
    ``--reuse_from`` is another run's), a file, or a folder with everything in it."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove(path: str) -> None:
    """Delete ``path`` so that a kill part-way leaves it whole or under a trash name."""
    delete(move_aside(path))


def replace(new: str, path: str) -> None:
    """Put the finished folder ``new`` at ``path``: the old one (if any) is moved aside first and deleted
    only once ``new`` is in, so a kill leaves the old folder whole or the new one (``path`` is absent only
    between the two renames). ``os.replace`` alone cannot replace a folder that has files."""
    old = move_aside(path) if os.path.lexists(path) else None
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:  # (an error, not a kill: the old folder goes back)
            os.rename(old, path)
        raise
    if old is not None:
        delete(old)


def remove_leftovers(folder: str) -> None:
    """Delete what kills left under trash names directly in ``folder``."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TRASH_PREFIX):
                delete(os.path.join(folder, name))
