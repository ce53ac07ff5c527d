"""Triton kernel for MaskedAdamW: one launch updates the selected elements of many tensors.

Layout. Every tensor keeps its own compact state (exp_avg, exp_avg_sq, optional fp32 master: one
entry per selected element) and its own index set (int32/int64 flat indices into the weight). The
launch gets a small table with one row per tensor (addresses of weight, gradient, indices, state;
number of selected elements k; per-tensor scalars), and a block table that maps each program to
(tensor, first element, first weight address if the block is one contiguous run): a tensor's k
elements are cut into blocks of BLOCK, so no block spans two tensors and no program searches; a block
inside whole selected rows skips the index reads and accesses weight and gradient coalesced. A program loads its row, turns the addresses into typed pointers,
and does the AdamW update for BLOCK selected elements in fp32:

    read  idx[j], grad[idx[j]] (or the compact grad[j]), exp_avg[j], exp_avg_sq[j],
          master[j] (bf16/fp16 weights) or weight[idx[j]]
    write exp_avg[j], exp_avg_sq[j], master[j], weight[idx[j]]

Why one launch with an address table: a Llama-1B-sized model has ~150 weight tensors; a launch per
tensor costs more than the update of a small one, and the table lets a single grid keep all SMs
busy whatever the tensor sizes (the same reason torch's fused AdamW uses multi-tensor apply).

All tensors in one launch share weight dtype, gradient kind and index dtype (they are constexpr);
the wrapper groups tensors into such buckets, usually one.

Access width. Addresses read from a table carry no alignment, so the compiler emits 4-byte accesses
unless told otherwise; a lane mask that may change at any element does the same. When every address of
a launch is 16-byte aligned (tensors of their own are) the host launches the ``ALIGNED`` variant, and
whole blocks run without a mask: the compact state, the indices and the weight and gradient of
contiguous runs (which start at multiples of RUN_ALIGN elements) then move in 16-byte accesses.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
import triton
import triton.language as tl

from .multi_tensor import adamw_address_table, tile_layout, upload, upload_table

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.int32: tl.int32, torch.int64: tl.int64}

# table columns (int64): weight, grad, indices, exp_avg, exp_avg_sq, master, k, unused
N_ADDR = 8
# scalar columns (float32): 1 - beta1, beta2, 1 - beta2, step_size (lr / bias_correction1),
# bias_correction2_sqrt, decay (1 - lr * weight_decay), eps. The one-minus values come from the host,
# computed in float64 as torch.optim.AdamW does: formed here from fp32 betas, 1 - 0.999 would carry the
# rounding of fp32(0.999) (1.3e-5 relative error in every exp_avg_sq update)
N_SCAL = 7


@triton.jit
def _update(weight, grad, exp_avg, exp_avg_sq, master, e, j, live, one_minus_beta1, beta2, one_minus_beta2,
            step_size, bc2_sqrt, decay, eps, PARAM_T: tl.constexpr, COMPACT_GRAD: tl.constexpr,
            HAS_MASTER: tl.constexpr, MASKED: tl.constexpr):
    """AdamW on BLOCK selected elements: ``j`` their positions in the compact state, ``e`` in the weight.
    ``MASKED``: the last block of a tensor, whose lanes past its count ``live`` leaves out (a lane mask
    that may change every element also keeps the compiler from vector accesses: whole blocks go without)."""
    if COMPACT_GRAD:
        g = _ld(grad + j, live, MASKED).to(tl.float32)
    else:
        g = _ld(grad + e, live, MASKED).to(tl.float32)
    m = _ld(exp_avg + j, live, MASKED)
    v = _ld(exp_avg_sq + j, live, MASKED)
    if HAS_MASTER:
        p = _ld(master + j, live, MASKED)
    else:
        p = _ld(weight + e, live, MASKED).to(tl.float32)

    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * g * g
    p = p * decay
    # IEEE-rounded sqrt and division (tl.sqrt and "/" are approximate on NVIDIA GPUs): the kernel is
    # memory-bound, so exactness is free and the CUDA, CPU and reference paths agree to the last ulp or two
    p = p - tl.div_rn(step_size * m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)

    _st(exp_avg + j, m, live, MASKED)
    _st(exp_avg_sq + j, v, live, MASKED)
    if HAS_MASTER:
        _st(master + j, p, live, MASKED)
    _st(weight + e, p.to(PARAM_T), live, MASKED)


@triton.jit
def _ld(ptrs, live, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptrs, mask=live, other=0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _st(ptrs, x, live, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=live)
    else:
        tl.store(ptrs, x)


@triton.jit
def _update_block(weight, grad, exp_avg, exp_avg_sq, master, e, indices, j, live, full, one_minus_beta1, beta2,
                  one_minus_beta2, step_size, bc2_sqrt, decay, eps, PARAM_T: tl.constexpr, COMPACT_GRAD: tl.constexpr,
                  HAS_MASTER: tl.constexpr, GATHER: tl.constexpr):
    """:func:`_update` of a whole block without a lane mask, of a tensor's last block with one.
    ``GATHER``: the weight offsets are ``indices[j]`` (loaded here, masked alike), else ``e`` (and
    ``indices`` is not read)."""
    if full:
        if GATHER:
            e = tl.load(indices + j).to(tl.int64)
        _update(weight, grad, exp_avg, exp_avg_sq, master, e, j, live, one_minus_beta1, beta2, one_minus_beta2,
                step_size, bc2_sqrt, decay, eps, PARAM_T, COMPACT_GRAD, HAS_MASTER, False)
    else:
        if GATHER:
            e = tl.load(indices + j, mask=live, other=0).to(tl.int64)
        _update(weight, grad, exp_avg, exp_avg_sq, master, e, j, live, one_minus_beta1, beta2, one_minus_beta2,
                step_size, bc2_sqrt, decay, eps, PARAM_T, COMPACT_GRAD, HAS_MASTER, True)


@triton.jit
def masked_adamw_kernel(addr_ptr, scal_ptr, block_tensor_ptr, block_start_ptr, block_element_ptr,
                        u_one_minus_beta1, u_beta2, u_one_minus_beta2, u_step_size, u_bc2_sqrt, u_decay, u_eps,
                        PARAM_T: tl.constexpr, GRAD_T: tl.constexpr, INDEX_T: tl.constexpr,
                        DENSE: tl.constexpr, COMPACT_GRAD: tl.constexpr, HAS_MASTER: tl.constexpr,
                        UNIFORM: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    t = tl.load(block_tensor_ptr + b).to(tl.int64)
    start = tl.load(block_start_ptr + b)  # int64: first selected element of this block (a multiple of BLOCK)
    row = addr_ptr + t * 8
    weight = tl.load(row + 0).to(tl.pointer_type(PARAM_T))
    grad = tl.load(row + 1).to(tl.pointer_type(GRAD_T))
    exp_avg = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    exp_avg_sq = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    master = tl.load(row + 5).to(tl.pointer_type(tl.float32))  # (0 without a master copy: not read then)
    k = tl.load(row + 6)

    if UNIFORM:
        # every tensor's scalars are the same (the usual case: equal step counts): kernel arguments, so
        # the step uploads no scalar table
        one_minus_beta1, beta2, one_minus_beta2 = u_one_minus_beta1, u_beta2, u_one_minus_beta2
        step_size, bc2_sqrt, decay, eps = u_step_size, u_bc2_sqrt, u_decay, u_eps
    else:
        srow = scal_ptr + t * 7  # N_SCAL columns
        one_minus_beta1 = tl.load(srow + 0)
        beta2 = tl.load(srow + 1)
        one_minus_beta2 = tl.load(srow + 2)
        step_size = tl.load(srow + 3)
        bc2_sqrt = tl.load(srow + 4)
        decay = tl.load(srow + 5)
        eps = tl.load(srow + 6)

    if ALIGNED:
        # addresses and offsets read from tables carry no alignment: without these hints (true when the
        # host sets ALIGNED, see Launch) every access is a 4-byte one; with them, and without a lane mask
        # (whole blocks, see _update_block), the compact state (and the indices, and the weight and the
        # gradient of contiguous runs) moves in 16-byte accesses
        weight = tl.multiple_of(weight, 16)
        grad = tl.multiple_of(grad, 16)
        exp_avg = tl.multiple_of(exp_avg, 16)
        exp_avg_sq = tl.multiple_of(exp_avg_sq, 16)
        master = tl.multiple_of(master, 16)
        start = tl.multiple_of(start, BLOCK)
    j = start + tl.arange(0, BLOCK)
    live = j < k
    full = start + BLOCK <= k
    if DENSE:
        _update_block(weight, grad, exp_avg, exp_avg_sq, master, j, grad, j, live, full, one_minus_beta1, beta2,
                      one_minus_beta2, step_size, bc2_sqrt, decay, eps, PARAM_T, COMPACT_GRAD, HAS_MASTER, False)
    else:
        # A block whose selected elements are one contiguous run (whole selected rows, say) has its
        # first element in the table (a multiple of RUN_ALIGN, see contiguous_block_starts): no index
        # reads, coalesced weight/grad accesses. The update is called in each branch, not once after
        # them on a weight offset chosen by the branch: the compiler would take that offset's alignment
        # from its least aligned source, the index loads.
        first = tl.load(block_element_ptr + b)
        if first >= 0:
            if ALIGNED:
                first = tl.multiple_of(first, RUN_ALIGN)
            run = first + tl.arange(0, BLOCK).to(tl.int64)
            _update_block(weight, grad, exp_avg, exp_avg_sq, master, run, grad, j, live, full, one_minus_beta1,
                          beta2, one_minus_beta2, step_size, bc2_sqrt, decay, eps, PARAM_T, COMPACT_GRAD, HAS_MASTER,
                          False)
        else:
            # scattered elements (4-byte gathers and scatters whatever the hints; sm_90 moves the indices
            # and the new weights through shared memory between the vector and the gather layouts)
            indices = tl.load(row + 2).to(tl.pointer_type(INDEX_T))
            if ALIGNED:
                indices = tl.multiple_of(indices, 16)
            _update_block(weight, grad, exp_avg, exp_avg_sq, master, j, indices, j, live, full, one_minus_beta1,
                          beta2, one_minus_beta2, step_size, bc2_sqrt, decay, eps, PARAM_T, COMPACT_GRAD, HAS_MASTER,
                          True)


BLOCK = 1024
NUM_WARPS = 4
# contiguous runs the kernel addresses without indices start at multiples of this many elements (16 bytes
# of the narrowest weight or gradient dtype, 2-byte ones), so that it can move them in 16-byte vectors
RUN_ALIGN_ELEMENTS = 8
RUN_ALIGN = tl.constexpr(RUN_ALIGN_ELEMENTS)
# False: never tell the kernel its addresses are aligned (4-byte accesses throughout, as before the hints;
# benchmarks/profile_gpu.py times both until a GPU run has compared them)
ALIGN_HINTS = True
_tables: dict = {}


def contiguous_block_starts(indices: torch.Tensor) -> torch.Tensor:
    """Per block of BLOCK selected elements: the flat index of its first element when the block's
    elements are one contiguous run starting at a multiple of RUN_ALIGN elements, else -1 (the block
    reads its indices). ``indices`` sorted and unique. (Runs of whole rows start at such multiples when
    the row length is one, as in every usual model; an odd-length row's runs read their indices, so
    that the kernel may take every run's start as 16-byte aligned.)"""
    k = indices.numel()
    blocks = (k + BLOCK - 1) // BLOCK
    pos = torch.arange(blocks, device=indices.device, dtype=torch.int64) * BLOCK
    last = torch.clamp(pos + BLOCK - 1, max=k - 1)
    idx = indices.long()
    first = idx[pos]
    run = (idx[last] - first == last - pos) & (first % RUN_ALIGN_ELEMENTS == 0)
    return torch.where(run, first, torch.full_like(first, -1))


def _block_table(bucket: list, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tensor id, first selected element, first weight element or -1) per program. Depends only on
    the selections, so it is cached, keyed by the index tensors (held weakly: a new selection is a
    new tensor, and a dead one never matches)."""
    key = tuple((id(r[2]), r[3].numel()) for r in bucket)
    hit = _tables.get(key)
    if hit is not None and all(ref is None or ref() is r[2] for ref, r in zip(hit[0], bucket)):
        return hit[1]
    tensor_of_block, first = tile_layout([r[3].numel() for r in bucket], BLOCK, device)
    # first selected element of each block: its rank inside its tensor, times BLOCK
    start = (torch.arange(tensor_of_block.numel(), dtype=torch.int64, device=device)
             - torch.tensor(first, dtype=torch.int64, device=device)[tensor_of_block.long()]) * BLOCK
    elements = [start[f:f + (r[3].numel() + BLOCK - 1) // BLOCK] if r[2] is None else contiguous_block_starts(r[2])
                for f, r in zip(first, bucket)]
    table = (tensor_of_block, start, torch.cat(elements) if elements else start)
    if len(_tables) > 64:  # selections change rarely; keep the cache small anyway
        _tables.clear()
    _tables[key] = ([None if r[2] is None else weakref.ref(r[2]) for r in bucket], table)
    return table


def bucket_rows(rows: list[tuple]) -> dict:
    """Positions of the rows grouped by what the kernel takes as compile-time constants (weight and
    gradient dtypes, index dtype, compact gradient, master copy) and device: one launch per group,
    usually one."""
    buckets: dict = {}
    for j, (weight, grad, indices, _, _, master, compact, _) in enumerate(rows):
        key = (weight.device, weight.dtype, grad.dtype, None if indices is None else indices.dtype,
               bool(compact), master is not None)
        buckets.setdefault(key, []).append(j)
    return buckets


class Launch:
    """One launch over a bucket of rows (see :func:`bucket_rows`), split into what depends only on the
    selection and the state (addresses of weights, indices, moments, master copies; the block table),
    built once, and what changes every step: the gradients' addresses and the scalars. MaskedAdamW
    keeps a Launch between steps (allo.optim.step_plan) so a step's host work is a few numpy
    operations instead of a pass over every tensor."""

    def __init__(self, key, bucket: list[tuple]):
        device, wdt, gdt, idt, compact, has_master = key
        self.device = device
        self.addr = adamw_address_table(bucket)
        self.blocks = _block_table(bucket, device)
        self.constexprs = dict(PARAM_T=_TL_DTYPES[wdt], GRAD_T=_TL_DTYPES[gdt if not compact else torch.float32],
                               INDEX_T=_TL_DTYPES[idt] if idt is not None else tl.int32, DENSE=idt is None,
                               COMPACT_GRAD=compact, HAS_MASTER=has_master, BLOCK=BLOCK, num_warps=NUM_WARPS)
        self._uploaded = None  # (host copy, device table, all addresses aligned) of the last upload

    def run(self, grad_ptrs, scal: np.ndarray) -> None:
        """Launch with the gradients at ``grad_ptrs`` (one per row, or None: those given at
        construction) and ``scal`` ([rows, N_SCAL] float32)."""
        if grad_ptrs is not None:
            self.addr[:, 1] = grad_ptrs
        if self._uploaded is None or not np.array_equal(self._uploaded[0], self.addr):
            # the caching allocator usually hands a step's gradients the addresses of the last step's:
            # then the table on the device is still right. Whether every address is 16-byte aligned
            # (tensors of their own are; a view into a larger buffer may not be) goes with the table: the
            # kernel may then use 16-byte accesses
            self._uploaded = (self.addr.copy(), upload_table(torch.from_numpy(self.addr.copy()), self.device),
                              not (self.addr[:, :6] % 16).any())
        scal = np.asarray(scal, dtype=np.float32)
        tensor_of_block, start, element = self.blocks
        # (a table of one row broadcast, stride 0, is uniform without a look: allo.optim.step_plan.scalar_table)
        uniform = scal.strides[0] == 0 or bool((scal == scal[:1]).all())
        if uniform:
            # the same scalars for every row (equal step counts, one group): passed as arguments (float32
            # values, exactly), so the step uploads nothing when its address table is unchanged
            args, scal_dev = [float(x) for x in scal[0]], tensor_of_block  # (any pointer: not read)
        else:
            args, scal_dev = [0.0] * N_SCAL, upload(torch.from_numpy(np.ascontiguousarray(scal)), self.device)
        aligned = ALIGN_HINTS and self._uploaded[2]
        masked_adamw_kernel[(tensor_of_block.numel(),)](self._uploaded[1], scal_dev, tensor_of_block, start, element,
                                                        *args, UNIFORM=uniform, ALIGNED=aligned, **self.constexprs)


def masked_adamw_triton(rows: list[tuple]) -> None:
    """Update many tensors, one launch per bucket of tensors that share dtypes.

    ``rows``: (weight, grad, indices|None, exp_avg, exp_avg_sq, master|None, compact_grad, scalars), with
    scalars the N_SCAL columns above: (1 - beta1, beta2, 1 - beta2, step_size, bias_correction2_sqrt, decay,
    eps). Callers keep the tensors alive until the kernels have run (the optimizer holds them).
    """
    for key, positions in bucket_rows(rows).items():
        bucket = [rows[j] for j in positions]
        Launch(key, bucket).run(None, np.array([r[7] for r in bucket], dtype=np.float32).reshape(len(bucket), N_SCAL))
