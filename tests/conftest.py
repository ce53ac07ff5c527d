"""Test setup shared by every test module.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The interpreter is chosen
when a kernel is decorated, so the variable must be set before any module that defines kernels is
imported: here, before collection.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run this suite's kernels here, or None. numpy 2.4 stopped converting
    1-element arrays to Python ints, which Triton's interpreter does for a loop bound loaded from memory
    (`for off in range(0, full, BLOCK)`): with triton 3.4 and 3.6 every selection kernel then fails with
    "only 0-dimensional arrays can be converted to Python scalars" (seen 2026-11-27); triton 3.8 works."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    version = lambda v: tuple(int(x) for x in v.split("+")[0].split(".")[:2])  # noqa: E731
    if version(numpy.__version__) >= (2, 4) and version(triton.__version__) < (3, 8):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, how the Triton kernels are tested "
                f"without a GPU) cannot run under numpy {numpy.__version__}: install numpy<2.4 "
                "(pip install 'numpy<2.4') or triton>=3.8")
    return None


def pytest_configure(config):
    problem = _interpreter_problem()
    if problem:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)


# Only tests that exercise the CUDA kernels need a GPU; everything else runs on the CPU in CI.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_runtest_logreport(report):
    # ALLO_TEST_FAILURES=FILE: each failure's report appended to FILE as it happens, not in pytest's summary
    # at the end, which a run cut by a time limit never prints (benchmarks/gpu_check.sh on a 15-minute GPU
    # lease: the tracebacks of a whole test file's errors were lost that way). Under pytest-xdist only the
    # controlling process writes (it receives every worker's reports)
    path = os.environ.get("ALLO_TEST_FAILURES")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_for(backend):
    """Where a test builds the tensors it hands to ``backend``: Triton takes CUDA tensors on a GPU
    machine and CPU tensors only under the interpreter; every other backend takes CPU tensors."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def reset_accelerate_state():
    """accelerate keeps its state in process-wide singletons: a Trainer or Accelerator would see the
    previous one's (its device, its gradient accumulation)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's state reset before and after the test (see reset_accelerate_state)."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: failures can be replayed from the test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
