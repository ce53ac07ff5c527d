"""Streaming radix-histogram selection kernels (Triton) and the order-preserving key they share.

This module is the ``atomic`` Triton variant (``ALLO_SELECT_HISTOGRAM=atomic``): one global atomic per
element, one launch per tensor per pass. The default on GPU is the ``blocked`` variant,
:mod:`allo_kernels.radix_blocked` (block-local histograms over 5-6-bit digits, one launch per pass over
all tensors), whose docstring has what was measured on an H100. Both use the keys below.

Key: every score maps to a signed integer whose order is the scores' order, with -0.0 and +0.0 equal:

    bits = the float's bit pattern as a signed integer (int32 for float32, int16 for bf16/fp16)
    key  = 0                        if the score is +-0.0
           bits                     if bits >= 0                 (positive floats order like their bits)
           bits ^ 0x7FFF...         otherwise                    (= -magnitude - 1: negatives reversed)

16-bit scores have 16-bit keys: one histogram of 65536 bins over ``key + 32768`` finds the threshold.
float32 keys have 32 bits: a first histogram over the high half (``(key >> 16) + 32768``), then a
second one over the low half (``key & 0xFFFF``) of only the elements whose high half equals the
threshold bin. Every histogram is accumulated across all tensors (one launch per tensor, same
buffer), so no scores are ever concatenated and the extra memory is the 65536 bins.

``AbsDiff`` scores (``|a - b|`` of two weight tensors) are computed inside the kernels in float32.
The plain-PyTorch definitions (:func:`keys_torch`, :func:`value_of_key`) are the reference the
kernels are tested against.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

BINS = 65536
_SIGN_FLIP = {32: 0x7FFFFFFF, 16: 0x7FFF}


def key_bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16


def keys_torch(x: torch.Tensor, key32: bool | None = None) -> torch.Tensor:
    """Reference order-preserving keys of float scores ``x`` (int32 tensor, same shape); ``key32``
    (default: float32 scores only) upcasts 16-bit scores to compare with float32 ones."""
    if key32 or x.dtype == torch.float32:
        x = x.float()
        bits = x.view(torch.int32)
        flip = _SIGN_FLIP[32]
    else:
        bits = x.view(torch.int16).to(torch.int32)
        flip = _SIGN_FLIP[16]
    key = torch.where(bits >= 0, bits, bits ^ flip)
    return key.masked_fill_(x == 0, 0)


def value_of_key(key: int, dtype: torch.dtype) -> float:
    """The score (as a Python float, exact in ``dtype``) whose key is ``key``."""
    nbits = key_bits(dtype)
    bits = key if key >= 0 else key ^ _SIGN_FLIP[nbits]
    if nbits == 32:
        return struct.unpack("<f", struct.pack("<i", bits))[0]
    t = torch.tensor([bits], dtype=torch.int16).view(dtype)
    return float(t.item())


@triton.jit
def _f32(v, IS_BF16: tl.constexpr):
    # bf16 -> fp32 by moving the bits: exact for subnormals too (a float conversion may flush them)
    if IS_BF16:
        return (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def _bits(x_ptr, y_ptr, offs, m, IS_DIFF: tl.constexpr, KEY32: tl.constexpr, X_BF16: tl.constexpr,
          Y_BF16: tl.constexpr):
    """The scores' bits as signed integers (16-bit ones sign-extended), 0 where ``m`` is False. For
    a score > 0 this is its key already."""
    if IS_DIFF:
        a = _f32(tl.load(x_ptr + offs, mask=m, other=0), X_BF16)
        b = _f32(tl.load(y_ptr + offs, mask=m, other=0), Y_BF16)
        bits = tl.abs(a - b).to(tl.int32, bitcast=True)
    else:
        s = tl.load(x_ptr + offs, mask=m, other=0)
        if KEY32:
            # 16-bit scores mixed with wider ones compare by value: upcast exactly, then 32-bit keys
            bits = _f32(s, X_BF16).to(tl.int32, bitcast=True)
        else:
            bits = s.to(tl.int16, bitcast=True).to(tl.int32)
    return bits


@triton.jit
def _keys_of(bits, KEY32: tl.constexpr):
    """Order-preserving keys from :func:`_bits` (zero is tested on the bits, not as s == 0, which may
    flush subnormals)."""
    if KEY32:
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        zero = (bits & 0x7FFFFFFF) == 0
    else:
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFF)
        zero = (bits & 0x7FFF) == 0
    return tl.where(zero, 0, key)


@triton.jit
def _keys(x_ptr, y_ptr, offs, m, IS_DIFF: tl.constexpr, KEY32: tl.constexpr, X_BF16: tl.constexpr,
          Y_BF16: tl.constexpr):
    return _keys_of(_bits(x_ptr, y_ptr, offs, m, IS_DIFF, KEY32, X_BF16, Y_BF16), KEY32)


@triton.jit
def _radix_hist_kernel(x_ptr, y_ptr, n, hist_ptr, prefix, IS_DIFF: tl.constexpr, KEY32: tl.constexpr,
                       X_BF16: tl.constexpr, Y_BF16: tl.constexpr, LOW: tl.constexpr, REPLICAS: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = _keys(x_ptr, y_ptr, offs, m, IS_DIFF, KEY32, X_BF16, Y_BF16)
    if KEY32:
        if LOW:
            # second pass: only the candidates whose high half is the threshold bin count
            m = m & ((key >> 16) == prefix)
            b = key & 0xFFFF
        else:
            b = (key >> 16) + 32768
    else:
        b = key + 32768
    # programs spread over REPLICAS copies of the histogram: scores bunch up in few bins, and one copy
    # would serialise the atomics of every program on those few addresses
    b += (tl.program_id(0) % REPLICAS) * 65536
    tl.atomic_add(hist_ptr + b, tl.full([BLOCK], 1, tl.int64), mask=m, sem="relaxed")


@triton.jit
def _radix_write_kernel(x_ptr, y_ptr, n, out_ptr, key_hi, key_ex, HAS_HI: tl.constexpr, HI_TIES: tl.constexpr,
                        HAS_EX: tl.constexpr, EX_TIES: tl.constexpr, IS_DIFF: tl.constexpr, KEY32: tl.constexpr,
                        X_BF16: tl.constexpr, Y_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = _keys(x_ptr, y_ptr, offs, m, IS_DIFF, KEY32, X_BF16, Y_BF16)
    if HAS_HI:
        if HI_TIES:
            keep = key >= key_hi
        else:
            keep = key > key_hi
    else:
        keep = key != key
    if HAS_EX:
        if EX_TIES:
            keep = keep & (key < key_ex)
        else:
            keep = keep & (key <= key_ex)
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=m)


@triton.jit
def _radix_count_eq_kernel(x_ptr, y_ptr, n, key_eq, count_ptr, IS_DIFF: tl.constexpr, KEY32: tl.constexpr,
                           X_BF16: tl.constexpr, Y_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = _keys(x_ptr, y_ptr, offs, m, IS_DIFF, KEY32, X_BF16, Y_BF16)
    tl.atomic_add(count_ptr, tl.sum(((key == key_eq) & m).to(tl.int64), axis=0), sem="relaxed")


_BLOCK = 1024
_REPLICAS = 16


def _operands(src):
    # an AbsDiff carries .a/.b; a score tensor is read once (y_ptr unused)
    if hasattr(src, "a"):
        return src.a, src.b, True
    return src, src, False


def radix_histogram(sources, hist: torch.Tensor, *, key32: bool, low_prefix: int | None = None) -> None:
    """Add the key histogram of every source in ``sources`` into ``hist`` (int64, 65536 bins, on the
    scores' device).

    ``key32``: 32-bit keys (float32 or AbsDiff scores, or 16-bit scores mixed with other dtypes);
    otherwise 16-bit keys. ``low_prefix=None``: the 16-bit keys, or the high halves of 32-bit keys.
    ``low_prefix=H`` (32-bit keys only): the low halves of the keys whose high half is ``H``.
    """
    if low_prefix is not None and not key32:
        raise ValueError("radix_histogram: low_prefix is only meaningful for 32-bit keys")
    copies = torch.zeros(_REPLICAS, BINS, dtype=torch.int64, device=hist.device)  # 8 MB
    for src in sources:  # one launch per tensor, all into the same histogram
        x, y, is_diff = _operands(src)
        n = x.numel()
        if n == 0:
            continue
        grid = (triton.cdiv(n, _BLOCK),)
        _radix_hist_kernel[grid](x, y, n, copies, 0 if low_prefix is None else int(low_prefix), IS_DIFF=is_diff,
                                 KEY32=key32, X_BF16=x.dtype == torch.bfloat16, Y_BF16=y.dtype == torch.bfloat16,
                                 LOW=low_prefix is not None, REPLICAS=_REPLICAS, BLOCK=_BLOCK)
    hist += copies.sum(0)


def radix_write(src, out: torch.Tensor, key_hi: int | None, hi_ties: bool, key_ex: int | None, ex_ties: bool, *,
                key32: bool) -> None:
    """Write the band mask of ``src`` into ``out`` (bool, same numel).

    Kept: key > key_hi (>= when ``hi_ties``), and key < key_ex (<= when not ``ex_ties``): ``ex_ties``
    says whether the exclusion boundary's ties are all excluded. ``key_hi=None`` keeps nothing,
    ``key_ex=None`` excludes nothing. Partially taken ties are fixed by the caller.
    """
    x, y, is_diff = _operands(src)
    n = x.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, _BLOCK),)
    _radix_write_kernel[grid](x, y, n, out.view(torch.uint8), 0 if key_hi is None else int(key_hi),
                              0 if key_ex is None else int(key_ex), HAS_HI=key_hi is not None, HI_TIES=bool(hi_ties),
                              HAS_EX=key_ex is not None, EX_TIES=bool(ex_ties), IS_DIFF=is_diff, KEY32=key32,
                              X_BF16=x.dtype == torch.bfloat16, Y_BF16=y.dtype == torch.bfloat16, BLOCK=_BLOCK)


def _flat_chunks(src, chunk=1 << 22):
    n = src.numel()
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        yield start, (src.flat_chunk(start, stop) if hasattr(src, "a") else src.reshape(-1)[start:stop])


def count_equal(sources, key: int, *, key32: bool) -> list[int]:
    """Number of elements whose key is ``key``, per source (one launch per source, one sync)."""
    if not sources:
        return []
    counts = torch.zeros(len(sources), dtype=torch.int64, device=sources[0].device)
    for i, src in enumerate(sources):
        x, y, is_diff = _operands(src)
        n = x.numel()
        if n == 0:
            continue
        _radix_count_eq_kernel[(triton.cdiv(n, _BLOCK),)](x, y, n, int(key), counts[i:], IS_DIFF=is_diff, KEY32=key32,
                                                           X_BF16=x.dtype == torch.bfloat16,
                                                           Y_BF16=y.dtype == torch.bfloat16, BLOCK=_BLOCK)
    return counts.tolist()


def equal_positions(src, key: int, count: int, *, key32: bool) -> torch.Tensor:
    """Flat positions (ascending, int64) of the ``count`` elements of ``src`` whose key is ``key``."""
    pos = [start + (keys_torch(c, key32) == key).nonzero().view(-1) for start, c in _flat_chunks(src)]
    out = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64, device=src.device)
    assert out.numel() == count, (out.numel(), count)
    return out
