"""Where allo's C/C++/CUDA sources (``csrc/``) are, for the code that compiles them on first use.

From a checkout (``pip install -e .``, or running inside the clone) they are the top-level ``csrc/``.
A built wheel has no checkout beside it, so setup.py copies ``csrc/`` into the package as
``allo/_csrc/``; the checkout wins when both exist, so an edited source is what gets compiled.
"""

from __future__ import annotations

import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def csrc_dir() -> str:
    checkout = os.path.join(os.path.dirname(_PACKAGE), "csrc")
    if os.path.isdir(checkout):
        return checkout
    return os.path.join(_PACKAGE, "_csrc")
