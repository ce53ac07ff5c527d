"""Files written atomically: a crash or an error while writing leaves the old file (or none), never
half of a new one, and no temporary file behind.

Every writer of a result that a later run reads (selections, caches, reports, metrics) goes through
:func:`atomic_path`; folders (model and checkpoint directories) are renamed into place by their
writers in :mod:`allo.train`.
"""

from __future__ import annotations

import contextlib
import os
import uuid


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary path beside ``path`` (same folder, so the same file system and an atomic
    rename) for the caller to write; renamed over ``path`` when the block ends normally, removed
    otherwise. ``suffix`` ends the temporary name, for writers that pick a format from it
    (``".png"``). The writer creates the file, so it gets the usual permissions (umask)."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f"{base}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
