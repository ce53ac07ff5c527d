"""Per-token log-probs straight from hidden states and the LM-head weight, without [tokens, V] logits.

Both passes go through the vocabulary in blocks of the weight's rows (outermost) and the tokens in
chunks: a block's logits ``[tokens, rows]`` are made with one matmul and live only while the kernels
read them. Forward keeps the log-sum-exp of each block's columns (``allo::token_logprob_fwd`` on a
vocabulary slice) and merges them into each token's log-sum-exp, which is all it saves for backward;
the label's logit comes from the block that holds it. The upstream gradient is only known in backward
(DPO-style losses weight each token), which is why the gradients are not precomputed in forward as
in Liger-Kernel's fused linear cross entropy; the price is one extra matmul. Backward recomputes a
block's logits, turns them into their gradient in place from the saved log-sum-exp
(``allo::token_logprob_bwd_inplace`` on the slice) and multiplies that into the hidden states' gradient
(accumulated across blocks in fp32) and into the gradient of the block's rows, which is then finished.
Because the weight is only ever used a block of rows at a time,

* an fp32 master weight under bf16 autocast is cast one block at a time (no bf16 ``[V, H]`` copy)
  and gets its fp32 gradient directly (no bf16 ``[V, H]`` gradient for autograd to cast);
* with ``weight_grad_sink`` there is no ``[V, H]`` gradient at all: each block goes to the sink
  (MaskedAdamW keeps only the selected elements: ``allo.optim.compact_row_grads``). At Llama-3.2-1B
  shape (128256 x 2048) with fp32 master weights that is 1.05 GB of fp32 gradient, plus a bf16
  gradient and a bf16 copy of 0.53 GB each, that the improve step no longer holds.
"""

from __future__ import annotations

from typing import Callable

import torch

from allo._backend import resolve_backend

from . import reference
from .logprob import _accumulate_dtype, check_ignore_index, ops, prepare_labels, refuse_double_backward

# Logits bytes per block. A block's matmul streams its rows of the weight once per token chunk, so a
# chunk of c tokens does about 2c flops per weight element moved: on an H100 (~800 TFLOP/s bf16,
# ~3 TB/s) that is compute-bound only from c ~ 550 tokens. GPUs get 256 MiB (4160 bf16 tokens for a
# 32064-row block), CPUs 64 MiB (compute-bound at any c that fits a cache sensibly; measured well
# there). A prediction for the GPU, to be checked by bench_logprob.py.
_CHUNK_BYTES = {"cuda": 256 * 2**20}
_CHUNK_BYTES_DEFAULT = 64 * 2**20
# fp32 gradient bytes per row block. Smaller blocks hold less, but every block adds one fp32
# [tokens, H] product into the hidden states' gradient (~16 * tokens * H bytes of traffic: at
# Llama-3.2-1B shape, 8 x 512 tokens, 134 MB a block; at 8192 tokens x H = 4096, 537 MB) and recasts
# its rows of an fp32 weight. On a GPU 256 MiB gives 4 blocks at the 1B shape (0.26 GB of gradient
# rows, ~0.5 GB of accumulation traffic); the CPU's small token counts make its blocks cheap, and
# its memory is what CPU users watch. (Going through tokens instead, the [V, H] gradient itself was
# read and written once per token chunk: ~1 GB a chunk at the 1B shape in bf16.)
_ROW_BLOCK_BYTES = {"cuda": 256 * 2**20}
_ROW_BLOCK_BYTES_DEFAULT = 16 * 2**20

WeightGradSink = Callable[[int, torch.Tensor], None]


def default_chunk_size(num_tokens: int, columns: int, dtype: torch.dtype, device_type: str = "cpu") -> int:
    """Tokens per chunk: as many as keep a ``[tokens, columns]`` logits block within the budget
    (``columns``: the weight rows of a block), a multiple of 64 when that is at least 64."""
    budget = _CHUNK_BYTES.get(device_type, _CHUNK_BYTES_DEFAULT)
    rows = budget // max(1, columns * torch.empty((), dtype=dtype).element_size())
    if rows >= 64:
        rows -= rows % 64  # tensor-core friendly
    return int(max(1, min(num_tokens, rows)))


def default_vocab_chunk_size(vocab_size: int, hidden_size: int, device_type: str = "cpu") -> int:
    """Weight rows per block: the block's fp32 gradient ``[rows, H]`` within ``_ROW_BLOCK_BYTES``,
    the vocabulary cut into blocks of equal size (a multiple of 64) rather than full blocks and a
    small remainder."""
    most = max(64, _ROW_BLOCK_BYTES.get(device_type, _ROW_BLOCK_BYTES_DEFAULT) // (4 * max(1, hidden_size)))
    blocks = -(-vocab_size // most)
    rows = -(-vocab_size // blocks)
    rows += -rows % 64
    return int(max(1, min(vocab_size, rows)))


def _autocast_off(fn):
    def wrapper(ctx, *args):
        with torch.autocast(args[0].device.type, enabled=False):  # args[0]: hidden, or grad in backward
            return fn(ctx, *args)

    return wrapper


def _block(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``[rows, cols]`` view at the start of ``buf``'s storage."""
    return buf.view(-1)[:rows * cols].view(rows, cols)


class _Scratch:
    """Buffers that every block reuses, allocated at the first block's size. With fresh tensors a
    block's logits were still referenced while the next ones were allocated (two blocks alive at the
    peak), and on the CPU each fresh multi-MB tensor pays its page faults again (measured here: 8
    fp32->bf16 casts of [16064, 256] blocks took 21 ms into fresh tensors, 5 ms into one buffer)."""

    def __init__(self, device: torch.device):
        self.device, self.buffers = device, {}

    def view(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < rows * cols:  # the first block is the largest; "product" serves two shapes
            buf = self.buffers[name] = torch.empty(rows * cols, dtype=dtype, device=self.device)
        return _block(buf, rows, cols)

    def rows_of(self, weight: torch.Tensor, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """``weight[r0:r1]`` in ``dtype``: a view when it already is (a bf16 model), else cast into a buffer
        (an fp32 master weight: one block's low-precision copy at a time, never a [V, H] one)."""
        if weight.dtype == dtype:
            return weight[r0:r1]
        return self.view("weight", r1 - r0, weight.shape[1], dtype).copy_(weight[r0:r1])

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, accumulate: bool = False,
           name: str = "") -> torch.Tensor:
        """``a @ b`` in the accumulation dtype (fp32 for bf16/fp16 inputs), written to ``out`` (added to
        it when ``accumulate``) or, with ``out`` None, to the buffer ``name``; returns the tensor that
        holds it. cuBLAS writes fp32 from bf16 inputs directly (into a fresh tensor where ``out`` is
        None: the caching allocator makes that free, and no copy follows); the CPU has no such matmul,
        so its product is rounded once to the inputs' dtype, then widened. One addmm when the dtypes
        agree, so the sink and autograd routes round alike."""
        acc = _accumulate_dtype(a.dtype)
        if out is None:
            if a.is_cuda and a.dtype != acc:
                return torch.mm(a, b, out_dtype=acc)
            out = self.view(name, a.shape[0], b.shape[1], acc)
        if a.dtype == out.dtype:
            return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
        if a.is_cuda:
            product = torch.mm(a, b, out_dtype=out.dtype)
        else:
            product = torch.mm(a, b, out=self.view("product", a.shape[0], b.shape[1], a.dtype))
        return out.add_(product) if accumulate else out.copy_(product)


def _block_sizes(tokens: int, vocab: int, hidden_size: int, dtype: torch.dtype, device_type: str,
                 chunk_size: int | None, vocab_chunk_size: int | None) -> tuple[int, int]:
    """(weight rows, tokens) per block: the sizes asked for, else the defaults; at least 1 each, so
    empty inputs loop zero times."""
    if vocab_chunk_size is None:
        vocab_chunk_size = default_vocab_chunk_size(vocab, hidden_size, device_type)
    rows = max(1, min(vocab, int(vocab_chunk_size)))
    if chunk_size is None:
        chunk_size = default_chunk_size(tokens, rows, dtype, device_type)
    return rows, max(1, min(tokens, int(chunk_size)))


class FusedLinearTokenLogprobs(torch.autograd.Function):
    # Autocast is handled in the wrapper (hidden cast to the autocast dtype, as nn.Linear's input
    # would be); inside, it is off in forward and backward alike, so autocast never re-casts the chunk
    # matmuls and their buffers keep the compute dtype whatever context backward runs in.
    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, labels, ignore_index, rows, tokens, sink):
        (n, vocab), acc = (hidden.shape[0], weight.shape[0]), _accumulate_dtype(hidden.dtype)
        lse = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
        label_logit = torch.zeros(n, dtype=acc, device=hidden.device)
        op, scratch = ops(), _Scratch(hidden.device)
        for r0 in range(0, vocab, rows):
            r1 = min(vocab, r0 + rows)
            w = scratch.rows_of(weight, r0, r1, hidden.dtype)
            for t0 in range(0, n, tokens):
                t1 = min(n, t0 + tokens)
                y = labels[t0:t1]
                logits = torch.mm(hidden[t0:t1], w.t(), out=scratch.view("logits", t1 - t0, r1 - r0, hidden.dtype))
                logp_block, lse_block = op.token_logprob_fwd(logits, y, ignore_index, False, r0, vocab)
                # the label's logit comes from the block that holds it (logp_block is 0 elsewhere)
                label_logit[t0:t1] += torch.where((y >= r0) & (y < r1), logp_block + lse_block, 0.0)
                torch.logaddexp(lse[t0:t1], lse_block, out=lse[t0:t1])
        keep = labels != ignore_index
        lse = torch.where(keep, lse, 0.0)
        logp = torch.where(keep, label_logit - lse, 0.0)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.rows, ctx.tokens, ctx.sink = ignore_index, rows, tokens, sink
        return logp

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_logp):
        hidden, weight, labels, lse = ctx.saved_tensors
        refuse_double_backward("allo.ops.fused_linear_token_logprobs", grad_logp, hidden, weight)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        sink = ctx.sink if need_weight else None
        grad = grad_logp.to(lse.dtype).contiguous()
        op = ops()
        (n, size), vocab = hidden.shape, weight.shape[0]
        rows, tokens = ctx.rows, ctx.tokens
        acc = _accumulate_dtype(hidden.dtype)
        grad_hidden = torch.empty(n, size, dtype=acc, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight and sink is None else None
        # the block's weight gradient accumulates in the weight's gradient itself when that has the
        # accumulation dtype (an fp32 model), else in fp32 rows handed on when finished
        direct = grad_weight is not None and grad_weight.dtype == acc
        scratch = _Scratch(hidden.device)
        for r0 in range(0, vocab, rows):
            r1 = min(vocab, r0 + rows)
            w = scratch.rows_of(weight, r0, r1, hidden.dtype)
            grad_rows = grad_weight[r0:r1] if direct else None
            for t0 in range(0, n, tokens):
                t1 = min(n, t0 + tokens)
                logits = torch.mm(hidden[t0:t1], w.t(), out=scratch.view("logits", t1 - t0, r1 - r0, hidden.dtype))
                op.token_logprob_bwd_inplace(grad[t0:t1], logits, labels[t0:t1], lse[t0:t1], ctx.ignore_index,
                                             r0, vocab)
                if need_hidden:
                    scratch.mm(logits, w, grad_hidden[t0:t1], accumulate=r0 > 0)
                if need_weight:
                    grad_rows = scratch.mm(logits.t(), hidden[t0:t1], grad_rows, accumulate=t0 > 0, name="grad_rows")
            if need_weight and n == 0:  # no tokens: the token loop never wrote this block
                grad_rows = grad_rows.zero_() if direct else torch.zeros(r1 - r0, size, dtype=acc,
                                                                        device=hidden.device)
            if sink is not None:
                sink(r0, grad_rows)
            elif need_weight and not direct:
                grad_weight[r0:r1] = grad_rows
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_linear_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                                ignore_index: int = -100, chunk_size: int | None = None,
                                backend: str | None = None, vocab_chunk_size: int | None = None,
                                weight_grad_sink: WeightGradSink | None = None) -> torch.Tensor:
    """``token_logprobs(hidden @ lm_head_weight.T, labels)`` without the full ``[tokens, V]`` logits.

    Args:
        hidden: ``[..., H]`` hidden states (fp32/bf16/fp16), the LM head's input.
        lm_head_weight: ``[V, H]`` (``model.lm_head.weight``), same dtype and device as ``hidden``
            (under autocast it may be a higher-precision master weight: see below).
        labels: integer ``hidden.shape[:-1]``; ``ignore_index`` tokens get 0 and no gradient.
        Every argument after ``labels`` is keyword-only. There is no bias: the LM head must have none
            (unlike Liger-Kernel's ``(hidden, weight, labels, bias)`` order, a fourth positional
            argument is refused rather than taken for ``ignore_index``).
        chunk_size: tokens per chunk; default: as many as keep a ``[tokens, vocab_chunk_size]`` logits
            block within 256 MiB on a GPU, 64 MiB on a CPU (a multiple of 64; see ``_CHUNK_BYTES``).
        backend: ``"reference"`` for the plain-PyTorch version; anything else runs the kernels.
        vocab_chunk_size: weight rows per block; default: the vocabulary in equal blocks whose fp32
            gradient fits ``_ROW_BLOCK_BYTES`` (``default_vocab_chunk_size``).
        weight_grad_sink: ``sink(first_row, grad_rows)``, called in backward once per row block, in
            order, covering every row once: ``grad_rows`` is the finished gradient of rows
            ``[first_row, first_row + len(grad_rows))``, ``[rows, H]`` in fp32 (fp64 for fp64
            inputs), valid during the call only (its buffer serves the next block: copy what you keep). The weight then gets no gradient from this op (its
            ``.grad`` is not touched), so no ``[V, H]`` gradient is ever made. For
            :class:`allo.optim.MaskedAdamW` in compact-grad mode, ``allo.optim.compact_row_grads``
            makes one that keeps only the selected elements.

    Returns:
        fp32 log-probs of shape ``labels.shape``. Gradients flow to ``hidden`` and (without a sink)
        to ``lm_head_weight``, in their own dtypes. A NaN (or +inf) logit makes its token's log-prob
        and gradients NaN, as with :func:`token_logprobs` on the full logits.

    Under autocast, ``hidden`` is cast to the autocast dtype, as ``nn.Linear``'s input would be, and
    the weight is used in that dtype, cast a block of rows at a time, so an fp32 master weight gets
    its fp32 gradient without a low-precision ``[V, H]`` copy of it or of its gradient.
    """
    ignore_index = check_ignore_index(ignore_index, "fused_linear_token_logprobs",
                                      " (there is no bias argument: the LM head must have no bias)")
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        if not lm_head_weight.dtype.is_floating_point:
            raise ValueError(f"fused_linear_token_logprobs: lm_head_weight must be floating point, got "
                             f"{lm_head_weight.dtype}")
    elif hidden.dtype != lm_head_weight.dtype:
        raise ValueError(
            f"fused_linear_token_logprobs: hidden ({hidden.dtype}) and lm_head_weight ({lm_head_weight.dtype}) "
            "must share dtype outside autocast; cast one of them, or run under torch.autocast"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"fused_linear_token_logprobs: lm_head_weight must be [V, H] with H = hidden.shape[-1] = "
            f"{hidden.shape[-1]}, got {tuple(lm_head_weight.shape)}"
        )
    if lm_head_weight.shape[0] < 1:
        raise ValueError("fused_linear_token_logprobs: lm_head_weight has no rows (the vocabulary is empty)")
    if hidden.device != lm_head_weight.device:
        raise ValueError(
            f"fused_linear_token_logprobs: hidden is on {hidden.device} but lm_head_weight on "
            f"{lm_head_weight.device}; they must share a device"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"fused_linear_token_logprobs: labels have shape {tuple(labels.shape)}, expected hidden.shape[:-1] = "
            f"{tuple(hidden.shape[:-1])}"
        )
    if weight_grad_sink is not None and not callable(weight_grad_sink):
        raise TypeError(f"fused_linear_token_logprobs: weight_grad_sink must be callable as sink(first_row, "
                        f"grad_rows), got {type(weight_grad_sink).__name__}")
    if resolve_backend(backend, hidden.device, what="fused_linear_token_logprobs") == "reference":
        if weight_grad_sink is not None:
            raise ValueError("fused_linear_token_logprobs: weight_grad_sink needs the kernels; the reference "
                             "backend makes the whole [V, H] gradient (leave the sink out, or the backend)")
        return reference.fused_linear_token_logprobs(hidden, lm_head_weight.to(hidden.dtype), labels, ignore_index)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = prepare_labels(flat_hidden[:, :1], labels.reshape(-1, 1)[:, 0], "fused_linear_token_logprobs")
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and int(value) < 1:
            raise ValueError(f"fused_linear_token_logprobs: {name} must be >= 1, got {value}")
    rows, tokens = _block_sizes(flat_hidden.shape[0], lm_head_weight.shape[0], hidden.shape[-1], hidden.dtype,
                                hidden.device.type, chunk_size, vocab_chunk_size)
    logp = FusedLinearTokenLogprobs.apply(flat_hidden, lm_head_weight, flat_labels, ignore_index, rows, tokens,
                                          weight_grad_sink)
    return logp.reshape(labels.shape)
