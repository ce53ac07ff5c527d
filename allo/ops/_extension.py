"""Loads allo's compiled kernels (``csrc/``): the prebuilt ``allo._C``, else a just-in-time build.

``pip install --no-build-isolation -e .`` compiles ``allo._C`` (see setup.py). When it is missing
(for example after an install with build isolation, which cannot see torch), the sources in
``csrc/`` are compiled with ninja on first use through ``torch.utils.cpp_extension.load`` and cached
in torch's extension folder (``TORCH_EXTENSIONS_DIR``). Importing the extension registers the ops
``torch.ops.allo.*`` with their CPU (and, when built with CUDA, CUDA) kernels.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings

import torch

from .. import _sources
from .._linkcheck import static_libstdcxx_problem
from .._sources import csrc_dir

_lock = threading.Lock()
_module = None
_how = None  # "prebuilt" or "jit"


def _jit_build():
    from torch.utils import cpp_extension

    csrc = csrc_dir()
    cpp = [os.path.join(csrc, name) for name in _sources.EXTENSION_CPP_SOURCES]
    cu = [os.path.join(csrc, name) for name in _sources.EXTENSION_CUDA_SOURCES]
    missing = [path for path in cpp if not os.path.exists(path)]
    if missing:
        raise RuntimeError(
            f"allo's compiled extension allo._C is not installed and its sources are not at {csrc} to build it "
            f"just in time (missing: {', '.join(os.path.basename(p) for p in missing)}); reinstall from a "
            "checkout with `pip install --no-build-isolation -e .`"
        )
    with_cuda = bool(torch.cuda.is_available() and torch.version.cuda and cpp_extension.CUDA_HOME
                     and all(os.path.exists(path) for path in cu))
    cflags = list(_sources.EXTENSION_CXX_FLAGS) + ([f"-D{_sources.EXTENSION_CUDA_MACRO}=1"] if with_cuda else [])
    module = cpp_extension.load(
        name="allo_C_jit" + ("_cuda" if with_cuda else ""),
        sources=cpp + (cu if with_cuda else []),
        extra_cflags=cflags,
        extra_cuda_cflags=list(_sources.EXTENSION_NVCC_FLAGS),
        with_cuda=with_cuda,
        verbose=os.environ.get("ALLO_VERBOSE_BUILD", "0") == "1",
    )
    problem = static_libstdcxx_problem(module.__file__)
    if problem:
        raise RuntimeError(problem)
    return module


def load_extension():
    """Import (or build) the extension once; return the module. Raises RuntimeError saying why not."""
    global _module, _how
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        try:
            # import_module, not `from allo import _C`: only it tells "not built" (ModuleNotFoundError
            # naming allo._C) apart from "built but unloadable" (any other ImportError)
            module, how = importlib.import_module("allo._C"), "prebuilt"
        except ModuleNotFoundError as exc:
            if exc.name != "allo._C":
                raise
            module, how = None, None
        except ImportError as exc:  # present but unloadable: built against another torch, most often
            warnings.warn(
                f"allo._C exists but cannot be loaded ({exc}); building csrc/ just in time instead. "
                "Rebuild it with `pip install --no-build-isolation -e .` to avoid this.",
                RuntimeWarning,
                stacklevel=2,
            )
            module, how = None, None
        if module is None:
            try:
                module, how = _jit_build(), "jit"
            except Exception as exc:
                raise RuntimeError(
                    "allo's kernels are unavailable: allo._C is not built and compiling csrc/ just in time failed "
                    f"({type(exc).__name__}: {exc}). Install a C++ compiler and ninja, then run "
                    "`pip install --no-build-isolation -e .` in the allo checkout (set ALLO_VERBOSE_BUILD=1 to see "
                    "the compiler output)."
                ) from exc
        _module, _how = module, how
        return module


_prebuilt = None  # whether allo._C is importable (looked up once)


def extension_if_ready():
    """The extension when it is loaded already or prebuilt (importing it), else None; never a just-in-time
    build. For host-side helpers whose plain-Python version gives the same result, only slower
    (:func:`allo.select.topk._new_masks`): selecting on a machine without a built extension must not
    start a compile."""
    global _prebuilt
    if _module is not None:
        return _module
    if _prebuilt is None:
        try:
            importlib.import_module("allo._C")
            _prebuilt = True
        except ImportError:  # not built, or built against another torch: load_extension would compile
            _prebuilt = False
    return load_extension() if _prebuilt else None


def extension_info() -> str:
    """One line saying how the kernels were obtained and which devices they cover."""
    module = load_extension()
    kernels = "CPU + CUDA kernels" if getattr(module, "with_cuda", False) else "CPU kernels only"
    return f"{_how} ({module.__name__}: {kernels})"
