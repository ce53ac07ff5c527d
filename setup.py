"""Build script for allo's compiled extension ``allo._C`` (sources in ``csrc/``).

Metadata lives in pyproject.toml; this file only decides what to compile:

* the C++ CPU kernels, always;
* the CUDA kernels as well, when the installed torch is a CUDA build and a CUDA toolkit is found.

Environment variables:

``ALLO_BUILD_CUDA``  ``auto`` (default), ``1`` (fail unless the CUDA kernels are built; CI uses this
                     so a CUDA compile or link error fails the build) or ``0`` (C++ only).
``CUDA_HOME``        the CUDA toolkit root (the folder holding ``bin/nvcc`` and ``lib64/libcudart.so``).
``TORCH_CUDA_ARCH_LIST``  GPU architectures to compile for; without a GPU set it (e.g. ``9.0``),
                     otherwise torch compiles for every architecture it knows.

When torch cannot be imported at build time (pip's build isolation), no extension is built here and
``allo`` compiles ``csrc/`` with ninja the first time it is needed (see ``allo/ops/_extension.py``);
with ``ALLO_BUILD_CUDA=1`` the build fails instead (build with ``--no-build-isolation``).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from allo import _sources  # noqa: E402  (the extension's sources and flags, shared with the just-in-time build)

CPP_SOURCES = [f"csrc/{name}" for name in _sources.EXTENSION_CPP_SOURCES]
CUDA_SOURCES = [f"csrc/{name}" for name in _sources.EXTENSION_CUDA_SOURCES]


def _toolkit_problem(cuda_home):
    """Why ``cuda_home`` is not a usable toolkit root, or None when it is."""
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME to the toolkit root)"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return f"CUDA_HOME={cuda_home} has no bin/nvcc"
    libdirs = [os.path.join(cuda_home, d) for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]
    if not any(os.path.exists(os.path.join(d, "libcudart.so")) for d in libdirs):
        return (
            f"CUDA_HOME={cuda_home} has no libcudart.so under lib64/ (is it a wrapper script's folder? "
            "point CUDA_HOME at the real toolkit root, the folder the nvcc wrapper execs from)"
        )
    return None


def _extensions():
    # read first: without torch, ALLO_BUILD_CUDA=1 must still fail (it built nothing and succeeded)
    mode = os.environ.get("ALLO_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"allo setup: ALLO_BUILD_CUDA must be auto, 1 or 0, not {mode!r}")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if mode == "1":
            raise SystemExit(
                f"allo setup: ALLO_BUILD_CUDA=1 but torch is not importable at build time ({exc}), so no kernels "
                "can be built: install torch first and build with pip's --no-build-isolation (pip install "
                "--no-build-isolation -e .; build isolation hides the installed torch)")
        print("allo setup: torch is not importable at build time; csrc/ will be compiled on first use", file=sys.stderr)
        return [], {}

    problem = None
    if torch.version.cuda is None:
        problem = f"the installed torch {torch.__version__} is a CPU build"
    else:
        problem = _toolkit_problem(cpp_extension.CUDA_HOME)

    build_cuda = mode != "0" and problem is None
    if mode == "1" and problem is not None:
        raise SystemExit(f"allo setup: ALLO_BUILD_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    if mode == "auto" and problem is not None:
        print(f"allo setup: building the C++ CPU kernels only: {problem}", file=sys.stderr)

    cxx_flags = list(_sources.EXTENSION_CXX_FLAGS)
    if build_cuda:
        print(f"allo setup: building C++ and CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME})", file=sys.stderr)
        ext = cpp_extension.CUDAExtension(
            "allo._C",
            CPP_SOURCES + CUDA_SOURCES,
            define_macros=[(_sources.EXTENSION_CUDA_MACRO, "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": list(_sources.EXTENSION_NVCC_FLAGS)},
        )
    else:
        ext = cpp_extension.CppExtension("allo._C", CPP_SOURCES, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": _checked(cpp_extension.BuildExtension.with_options(use_ninja=True))}


def _checked(build_ext):
    """``build_ext`` that refuses an extension linking libstdc++ statically (see allo/_linkcheck.py)."""
    from allo._linkcheck import checked_build_ext

    return checked_build_ext(build_ext)


class _BuildPyWithSources(build_py):
    """Wheels carry csrc/ as allo/_csrc/: allo compiles its small C loops (csrc/cpu) on first use, and
    the extension just in time when allo._C is missing, so an installed allo needs the sources too.
    Editable installs read them from the checkout (allo/_sources.py)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "allo", "_csrc")
        for folder, _, files in os.walk("csrc"):
            for name in files:
                if name.endswith((".c", ".cpp", ".cu", ".h")):
                    dest = os.path.join(target, os.path.relpath(folder, "csrc"))
                    self.mkpath(dest)
                    self.copy_file(os.path.join(folder, name), os.path.join(dest, name))


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": _BuildPyWithSources, **cmdclass})
