"""Files written atomically: a crash or an error while writing leaves the old file (or none), never
half of a new one. An error removes its temporary file at once; a kill (SIGKILL, power loss) cannot, and
the next successful write of the same path removes what such kills left (temporary files of that path
older than that write: one writer per path at a time, as allo's writers are, the main process's).

Every writer of a result that a later run reads (selections, caches, reports, metrics) goes through
:func:`atomic_path`; folders (model and checkpoint directories) are replaced and deleted by
:mod:`allo.train.folders`.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", *, what: str = "atomic_path"):
    """Yields a temporary path beside ``path`` (same folder, so the same file system and an atomic
    rename) for the caller to write; renamed over ``path`` when the block ends normally, removed
    otherwise. ``suffix`` ends the temporary name, for writers that pick a format from it
    (``".png"``). The file gets the usual permissions of a new file (``0o666`` less the umask), also
    when the writer made it with other ones (safetensors writes a ``mkstemp`` file: ``0600``).

    A folder of ``path`` that does not exist, or ``path`` being a folder, is an error (``what``, the
    caller, names it) before anything is written."""
    folder, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise NotADirectoryError(f"{what}: cannot write {path}: {folder} is a file, not a folder")
        raise FileNotFoundError(f"{what}: cannot write {path}: its folder {folder} does not exist; create it "
                                "first (os.makedirs)")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what}: cannot write {path}: it is a folder; give a file path")
    tmp = os.path.join(folder, f"{base}.{uuid.uuid4().hex[:_HEX]}.tmp{suffix}")
    started = time.time()
    try:
        yield tmp
        if os.path.isfile(tmp):
            # (a file system without Unix modes, such as some network mounts, may refuse: the mode stays)
            with contextlib.suppress(OSError):
                os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _remove_stale(folder, base, started)


_HEX = 12  # the random part of a temporary name


def _remove_stale(folder: str, base: str, before: float) -> None:
    """Temporary files of ``base`` (exactly as atomic_path names them) last changed before ``before``: a
    kill left them (a mask file's can be gigabytes). Newer ones may be another writer's, still at work."""
    pattern = re.compile(re.escape(base) + r"\.[0-9a-f]{%d}\.tmp.*\Z" % _HEX, re.S)
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < before:
                        os.unlink(entry.path)


def _umask() -> int:
    """The process's umask. Read from /proc on Linux: os.umask can only read it by setting it, and
    another thread creating a file in between would get the temporary value."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
