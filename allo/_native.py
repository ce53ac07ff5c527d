"""Builds and loads allo's small C kernels (``csrc/cpu/*.c``) through ctypes.

Two CPU hot loops are plain C rather than part of the torch extension ``allo._C``: the fused
MaskedAdamW step (``csrc/cpu/masked_adamw.c``) and the radix-select histogram and write passes
(``csrc/cpu/radix_select.c``). They use no torch headers, so they compile in about a second with the
system C compiler, and they are compiled on the machine that runs them (``-march=native``), which a
prebuilt extension cannot be. They are called on tensors' data pointers; ctypes releases the GIL.

Each library is compiled on first use into ``$ALLO_CACHE_DIR`` (default ``~/.cache/allo``), keyed by a
hash of its source, the flags, the compiler and the CPU, written atomically so concurrent first uses
never load half a file, and reused by later processes. A missing compiler or a failed compile is an
error that says what to do (install gcc, set ``CC``, or choose ``backend="reference"``), never a
silent switch to another implementation.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

from ._sources import csrc_dir


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def cache_dir() -> str:
    return os.environ.get("ALLO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "allo")


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        return platform.processor()


def _compiler(what: str) -> str:
    if os.environ.get("CC"):
        if shutil.which(os.environ["CC"]) is None:
            raise RuntimeError(f"{what}: the C compiler named by CC={os.environ['CC']!r} is not an executable; "
                               "fix or unset CC, or pass backend='reference'")
        return os.environ["CC"]
    cc = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError(f"{what} compiles csrc/cpu C code on first use and found no C compiler: install gcc "
                           "(>= 12) or set CC, or pass backend='reference' (plain PyTorch: slower, more memory)")
    return cc


def _compile(source_path: str, flags: list[str], cc: str, out: str) -> subprocess.CompletedProcess:
    return subprocess.run([cc, *flags, "-shared", "-fPIC", source_path, "-o", out, "-lm"], capture_output=True,
                          text=True)


def load_c_library(name: str, *, flags: list[str], optional_flags: list[str] = (), what: str,
                   signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL:
    """Compile (once, cached) and load ``csrc/cpu/<name>.c``; declare ``signatures``
    (function name -> (argtypes, restype)). ``optional_flags`` (e.g. ``-fopenmp``) are tried first and
    dropped, with a warning, when the compiler rejects them. ``what`` names the caller in errors."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        source_path = os.path.join(csrc_dir(), "cpu", name + ".c")
        if not os.path.exists(source_path):
            raise RuntimeError(f"{what}: its C source {source_path} is missing: the installation is incomplete; "
                               "reinstall allo (`pip install --no-build-isolation -e .` from a checkout)")
        with open(source_path) as f:
            source = f.read()
        cc = _compiler(what)
        key = hashlib.sha256("\0".join([source, *flags, *optional_flags, cc, _cpu_id()]).encode()).hexdigest()[:16]
        lib_path = os.path.join(cache_dir(), f"{name}_{key}.so")
        if not os.path.exists(lib_path):
            os.makedirs(cache_dir(), exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
                out = os.path.join(tmp, name + ".so")
                proc = _compile(source_path, [*flags, *optional_flags], cc, out)
                if proc.returncode != 0 and optional_flags:
                    first_error = proc.stderr
                    proc = _compile(source_path, list(flags), cc, out)
                    if proc.returncode == 0:
                        warnings.warn(f"{what}: {cc} rejected {' '.join(optional_flags)}; built without them "
                                      f"(for example one thread instead of several):\n{first_error[-500:]}",
                                      RuntimeWarning, stacklevel=3)
                if proc.returncode != 0:
                    raise RuntimeError(f"{what}: compiling {source_path} with {cc} failed:\n{proc.stderr[-2000:]}\n"
                                       "set CC to a C compiler with _Float16 support (gcc >= 12, clang >= 15), or "
                                       "pass backend='reference'")
                os.replace(out, lib_path)  # atomic, same file system
        lib = ctypes.CDLL(lib_path)
        for fn, (argtypes, restype) in signatures.items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = restype
        _loaded[name] = lib
        return lib
