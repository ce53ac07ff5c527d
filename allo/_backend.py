"""Which implementation of a kernel runs: shared by every op that has several.

Every op in allo has up to three implementations:

* ``triton``    the Triton kernels in ``allo_kernels`` (CUDA tensors; also runs on CPU tensors under
                ``TRITON_INTERPRET=1``, which is how CI tests them);
* ``cpu``       the fast CPU path (vectorised torch ops or the C++ extension);
* ``reference`` plain PyTorch, written for clarity; tests compare the others against it.

``auto`` picks ``triton`` for CUDA tensors and ``cpu`` otherwise. A caller's explicit ``backend=``
argument wins over the ``ALLO_BACKEND`` environment variable, which wins over ``auto``.
"""

import os

BACKENDS = ("auto", "triton", "cpu", "reference")
ENV_VAR = "ALLO_BACKEND"


def resolve_backend(requested, device, *, what):
    """Return the concrete backend ("triton", "cpu" or "reference") for tensors on ``device``.

    ``requested`` is the caller's choice (None or "auto" defers to ``ALLO_BACKEND``); ``what`` names
    the caller in error messages. Asking for something impossible is an error, never a silent
    fallback.
    """
    choice = requested
    source = f"{what}(backend=...)"
    if choice is None or choice == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env != "auto":
            choice, source = env, f"the environment variable {ENV_VAR}"
        else:
            choice = "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{source} is {choice!r}; expected one of {', '.join(BACKENDS)}")
    device_type = device.type if hasattr(device, "type") else str(device)
    if choice == "auto":
        return "triton" if device_type == "cuda" else "cpu"
    if choice == "triton" and device_type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{source} asks for the triton backend on {device_type} tensors; Triton runs on CUDA tensors, "
            "or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported"
        )
    return choice


def triton_interpreting():
    """True when Triton kernels run in the interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
