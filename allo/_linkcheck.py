"""Whether a compiled extension links libstdc++ dynamically, as torch's C++ libraries do.

Found on a GPU machine whose image sets ``CXX`` to a compiler wrapper that links libstdc++
statically: the extension built and ran, but the first C++ exception it threw (a label outside the
vocabulary, ``TORCH_CHECK`` in ``csrc/logprob.cpp``) crashed the process with a segmentation fault
inside ``c10::Error`` instead of raising a ``RuntimeError``: the exception object came from the
extension's private copy of libstdc++, which torch's copy cannot handle. The same sources built by
the system ``g++`` raised the error as they should. Checked after every build (setup.py and the
just-in-time build), so such a build fails at once, with the fix, rather than on a user's first bad
input.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def static_libstdcxx_problem(path: str) -> str | None:
    """Why the shared library at ``path`` is unsafe to load into torch, or None (also when this cannot
    be told: no ``readelf``, which comes with the compiler's binutils)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=False)
    if out.returncode != 0 or "(NEEDED)" not in out.stdout or "libstdc++" in out.stdout:
        return None
    return (
        f"{path} does not load libstdc++ dynamically: the C++ compiler (CXX={os.environ.get('CXX', 'c++')}) linked "
        "it in statically. A C++ exception from the extension (a bad label, say) would then crash the process "
        "instead of raising an error, because torch cannot catch exceptions of a second libstdc++. Build with a "
        "compiler that links it dynamically, e.g. `CXX=/usr/bin/g++ CC=/usr/bin/gcc`"
    )


def checked_build_ext(build_ext):
    """A subclass of the setuptools command ``build_ext`` that fails the build, saying why, when an
    extension it built links libstdc++ statically."""

    class CheckedBuildExt(build_ext):
        def build_extensions(self):
            super().build_extensions()
            for ext in self.extensions:
                problem = static_libstdcxx_problem(self.get_ext_fullpath(ext.name))
                if problem:
                    raise SystemExit(f"allo setup: {problem}")

    return CheckedBuildExt
