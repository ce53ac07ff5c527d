"""Shared by the tests that compile Triton kernels for an H100 (sm_90) where no GPU is present.

The interpreter tests check what a kernel computes, but the interpreter accepts more than the
compiler does; these tests check that the compiler accepts every variant the wrappers launch. They
run in a subprocess because the kernels must be real JIT functions, which they are not once
TRITON_INTERPRET=1 is set (conftest sets it on machines without a GPU)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_in_subprocess(script: str) -> subprocess.CompletedProcess:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
