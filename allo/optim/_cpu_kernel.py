"""The fast CPU path of MaskedAdamW: one fused C loop over every selected element of many tensors.

Why C and not torch ops: on a CPU a masked step is bound by memory latency of the random accesses.
With torch ops the selected gradient elements are gathered (one pass over the gradient), the selected
weights gathered (one pass over the weight), the AdamW math run on compact buffers, and the weights
scattered back (another pass): about 38 ms for a random 10% of 50M fp32 weights on 2 cores. The fused
loop touches each gradient and weight cache line once, with no temporaries: the reads and writes that
must happen, and nothing else. Runs of selected elements that are contiguous in the weight (whole
rows) take a plain-array loop the compiler vectorises (-fno-math-errno lets it vectorise sqrtf): a
10% row mask went from 17.6 to 4.3 ms single-threaded on 50M weights. Gathering scattered elements
into a local block to vectorise their math too was tried and measured slower at 10% density.

The C source is ``csrc/cpu/masked_adamw.c``; :mod:`allo._native` compiles it on first use (cached)
and loads it with ctypes. Without a C compiler the ``cpu`` backend raises an error saying so
(``backend="reference"`` is the plain-PyTorch path).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from allo._native import load_c_library
from allo_kernels.multi_tensor import adamw_address_table

# dtype codes shared with the C source
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INDEX_CODES = {None: 0, torch.int32: 4, torch.int64: 8}

# Per-tensor tables (one row per tensor):
#   addresses (int64): param, grad, indices, exp_avg, exp_avg_sq, master, k, codes
#   codes packs param dtype | grad dtype << 4 | index code << 8 | compact-grad flag << 12
#   scalars (float32): 1 - beta1, beta2, 1 - beta2, step_size, bias_correction2_sqrt, decay, eps
#   (the one-minus values computed on the host in float64, as torch.optim.AdamW does: 1 - fp32(0.999) is
#   1.3e-5 off). The C source's N_SCAL must match.
N_ADDR = 8
N_SCAL = 7



_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-pthread", "-std=gnu11"]


def load() -> ctypes.CDLL:
    """The compiled library (built on first use); raises RuntimeError saying why it cannot be built."""
    return load_c_library("masked_adamw", flags=_FLAGS, what="MaskedAdamW's cpu backend", signatures={
        "allo_masked_adamw": ([ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], None)})


def masked_adamw_cpu(addr: torch.Tensor, scal: torch.Tensor) -> None:
    """Run the fused step over the tensors described by ``addr`` ([T, 8] int64) and ``scal``
    ([T, N_SCAL] float32), built by :func:`pack`. Caller keeps every referenced tensor alive."""
    lib = load()
    assert addr.is_contiguous() and scal.is_contiguous() and addr.shape[0] == scal.shape[0]
    # ctypes releases the GIL for the call; the loop uses as many threads as torch does.
    lib.allo_masked_adamw(addr.shape[0], addr.data_ptr(), scal.data_ptr(), torch.get_num_threads())


def addresses(rows: list[tuple]) -> np.ndarray:
    """The address table of ``rows`` (see :func:`pack`), dtype codes in its last column."""
    addr = adamw_address_table(rows)
    addr[:, 7] = [DTYPE_CODES[param.dtype] | (DTYPE_CODES[grad.dtype] << 4)
                  | (INDEX_CODES[None if indices is None else indices.dtype] << 8) | (int(compact) << 12)
                  for param, grad, indices, _, _, _, compact, _ in rows]
    return addr


def pack(rows: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the tables from rows of (param, grad, indices|None, exp_avg, exp_avg_sq, master|None,
    compact_grad: bool, (1 - beta1, beta2, 1 - beta2, step_size, bc2_sqrt, decay, eps))."""
    scal = np.array([r[7] for r in rows], dtype=np.float32).reshape(len(rows), N_SCAL)
    return torch.from_numpy(addresses(rows)), torch.from_numpy(scal)


class Launch:
    """The C step over fixed rows: the address table built once, the gradients' addresses and the
    scalars given per step (see allo_kernels.masked_adamw.Launch, the same split for Triton)."""

    def __init__(self, rows: list[tuple]):
        self.addr = addresses(rows)

    def run(self, grad_ptrs, scal) -> None:
        if grad_ptrs is not None:
            self.addr[:, 1] = grad_ptrs
        # a 1-row broadcast view of the scalar table counts as contiguous but is read-only, which
        # torch.from_numpy warns about: "W" copies it (the C loop only reads the table)
        masked_adamw_cpu(torch.from_numpy(self.addr), torch.from_numpy(np.require(scal, np.float32, ("C", "W"))))
