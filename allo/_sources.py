"""Where allo's C/C++/CUDA sources (``csrc/``) are, for the code that compiles them on first use.

From a checkout (``pip install -e .``, or running inside the clone) they are the top-level ``csrc/``.
A built wheel has no checkout beside it, so setup.py copies ``csrc/`` into the package as
``allo/_csrc/``; the checkout wins when both exist, so an edited source is what gets compiled.
"""

from __future__ import annotations

import os

# The extension allo._C: its sources (relative to csrc/) and compiler flags, one list for both builds
# (setup.py's, and allo.ops._extension's just-in-time one when allo._C is missing)
EXTENSION_CPP_SOURCES = ("logprob.cpp", "masks.cpp", "step_plan.cpp")
EXTENSION_CUDA_SOURCES = ("logprob_cuda.cu",)
EXTENSION_CXX_FLAGS = ("-O3", "-std=c++20")  # torch >= 2.10 headers need C++20
EXTENSION_NVCC_FLAGS = ("-O3", "-std=c++20", "--use_fast_math", "-lineinfo")
EXTENSION_CUDA_MACRO = "ALLO_WITH_CUDA"  # defined (1) when the CUDA kernels are compiled in

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def csrc_dir() -> str:
    checkout = os.path.join(os.path.dirname(_PACKAGE), "csrc")
    if os.path.isdir(checkout):
        return checkout
    return os.path.join(_PACKAGE, "_csrc")
