"""Per-token log-probs straight from hidden states and the LM-head weight, without [tokens, V] logits.

Forward goes through the tokens in chunks: a chunk's logits (``chunk_size x V``) live only long enough
for their log-sum-exp and the label's logit (``allo::token_logprob_fwd``); the log-sum-exp per token is
all that is kept. The upstream gradient is only known in backward (DPO-style losses weight each
token), which is why the gradients are not precomputed in forward as in Liger-Kernel's fused linear
cross entropy; the price is one extra matmul.

Backward goes through the vocabulary, outermost, in blocks of the weight's rows: for rows
``[r0, r1)`` it recomputes those columns of the logits, turns them into their gradient in place from
the saved log-sum-exp (``allo::token_logprob_bwd_inplace`` on a vocabulary slice), and multiplies that
into the hidden states' gradient (accumulated across blocks in fp32) and into the gradient of rows
``[r0, r1)``, which is then complete. The matmul work is the same as going through tokens
outermost; what changes is that the weight's gradient is produced one row block at a time, so

* an fp32 master weight under bf16 autocast gets its fp32 gradient directly: no bf16 ``[V, H]``
  copy of the weight kept for backward, no bf16 ``[V, H]`` gradient for autograd to cast (the
  weight is cast to the compute dtype for the forward, and per row block again in backward);
* with ``weight_grad_sink`` there is no ``[V, H]`` gradient at all: each block goes to the sink
  (MaskedAdamW keeps only the selected elements: ``allo.optim.compact_row_grads``). At Llama-3.2-1B
  shape (128256 x 2048) with fp32 master weights this is 1.05 GB of fp32 gradient, plus a bf16
  gradient and a bf16 copy of 0.53 GB each, that the improve step no longer holds.
"""

from __future__ import annotations

from typing import Callable

import torch

from allo._backend import resolve_backend

from . import reference
from .logprob import _accumulate_dtype, ops, prepare_labels

# Logits bytes per chunk. Each chunk's matmuls stream the whole [V, H] weight, so a chunk of c tokens
# does about 2c flops per weight element moved: on an H100 (~800 TFLOP/s bf16, ~3 TB/s) that is
# compute-bound only from c ~ 550 tokens. 64 MiB gives 256 tokens at V = 128256 in bf16, so GPUs get
# 256 MiB (1024 bf16 tokens at that vocabulary). CPUs are compute-bound at any c that fits a cache
# sensibly; 64 MiB measured well there. Backward's logits blocks are no larger than a forward chunk.
# A prediction for the GPU, to be checked by bench_logprob.py.
_CHUNK_BYTES = {"cuda": 256 * 2**20}
_CHUNK_BYTES_DEFAULT = 64 * 2**20
# fp32 gradient bytes per backward row block. Smaller blocks hold less, but every block adds one fp32
# [tokens, H] product into the hidden states' gradient (~16 * tokens * H bytes of traffic: at
# Llama-3.2-1B shape, 8 x 512 tokens, 134 MB a block; at 8192 tokens x H = 4096, 537 MB) and recasts
# its rows of an fp32 weight. On a GPU 256 MiB gives 4 blocks at the 1B shape (0.26 GB of gradient
# rows, ~0.5 GB of accumulation traffic); the CPU's small token counts make its blocks cheap, and
# its memory is what CPU users watch. (Going through tokens instead, the [V, H] gradient itself was
# read and written once per token chunk: ~1 GB a chunk at the 1B shape in bf16.)
_ROW_BLOCK_BYTES = {"cuda": 256 * 2**20}
_ROW_BLOCK_BYTES_DEFAULT = 16 * 2**20

WeightGradSink = Callable[[int, torch.Tensor], None]


def default_chunk_size(num_tokens: int, vocab_size: int, dtype: torch.dtype, device_type: str = "cpu") -> int:
    budget = _CHUNK_BYTES.get(device_type, _CHUNK_BYTES_DEFAULT)
    rows = budget // max(1, vocab_size * torch.empty((), dtype=dtype).element_size())
    if rows >= 64:
        rows -= rows % 64  # tensor-core friendly
    return int(max(1, min(num_tokens, rows)))


def default_vocab_chunk_size(vocab_size: int, hidden_size: int, device_type: str = "cpu") -> int:
    """Weight rows per backward block: the block's fp32 gradient ``[rows, H]`` within ``_ROW_BLOCK_BYTES``,
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
    """A contiguous ``[rows, cols]`` view at the start of ``buf``'s storage. One buffer serves every
    chunk: with a fresh ``hidden @ weight.t()`` per chunk the previous chunk's logits are still
    referenced while the next ones are allocated, so two chunks were alive at the peak (measured on
    the CPU: 2 x 65.7 MB in forward and in backward at V = 128256, 256-token bf16 chunks)."""
    return buf.view(-1)[:rows * cols].view(rows, cols)


def _mm_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the accumulation dtype (fp32 for bf16/fp16 inputs): cuBLAS writes fp32 directly;
    the CPU has no such matmul, so its bf16/fp16 product is rounded once, then widened."""
    acc = _accumulate_dtype(a.dtype)
    if a.dtype == acc:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a, b).to(acc)


class FusedLinearTokenLogprobs(torch.autograd.Function):
    # Autocast is handled in the wrapper (hidden cast to the autocast dtype, as nn.Linear's input
    # would be); inside, it is off in forward and backward alike, so autocast never re-casts the chunk
    # matmuls and their buffers keep the compute dtype whatever context backward runs in.
    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, vocab_chunk_size, sink):
        n = hidden.shape[0]
        acc = _accumulate_dtype(hidden.dtype)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        op = ops()
        # an fp32 master weight is cast for this forward only (backward casts a row block at a time)
        w = weight.to(hidden.dtype)
        buf = torch.empty(min(chunk_size, n) * weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            logits = torch.mm(hidden[start:end], w.t(), out=_block(buf, end - start, weight.shape[0]))
            logp[start:end], lse[start:end] = op.token_logprob_fwd(logits, labels[start:end], ignore_index, False)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_size, ctx.vocab_chunk_size, ctx.sink = ignore_index, chunk_size, vocab_chunk_size, sink
        return logp

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_logp):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        sink = ctx.sink if need_weight else None
        grad = grad_logp.to(lse.dtype).contiguous()
        op = ops()
        (n, size), vocab = hidden.shape, weight.shape[0]
        rows = max(1, min(vocab, ctx.vocab_chunk_size))
        # as many tokens per block as keep the logits block within the forward chunk's size
        tokens = max(1, min(n, max(ctx.chunk_size, ctx.chunk_size * vocab // rows)))
        acc = _accumulate_dtype(hidden.dtype)
        grad_hidden = torch.zeros(n, size, dtype=acc, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight and sink is None else None
        buf = torch.empty(tokens * rows, dtype=hidden.dtype, device=hidden.device)
        for r0 in range(0, vocab, rows):
            r1 = min(vocab, r0 + rows)
            w = weight[r0:r1].to(hidden.dtype)
            grad_rows = None
            for t0 in range(0, n, tokens):
                t1 = min(n, t0 + tokens)
                logits = torch.mm(hidden[t0:t1], w.t(), out=_block(buf, t1 - t0, r1 - r0))
                op.token_logprob_bwd_inplace(grad[t0:t1], logits, labels[t0:t1], lse[t0:t1], ctx.ignore_index,
                                             r0, vocab)
                if need_hidden:
                    if hidden.dtype == acc:
                        grad_hidden[t0:t1].addmm_(logits, w)
                    else:
                        grad_hidden[t0:t1] += _mm_wide(logits, w)
                if need_weight:
                    part = _mm_wide(logits.t(), hidden[t0:t1])
                    if grad_rows is None:
                        grad_rows = part
                    else:
                        grad_rows.add_(part)
                    del part
            if sink is not None:
                sink(r0, grad_rows)
            elif need_weight:
                grad_weight[r0:r1] = grad_rows
            del w, grad_rows  # before the next block's are made: one block's worth alive, not two
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_linear_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                                ignore_index: int = -100, chunk_size: int | None = None,
                                backend: str | None = None, *, vocab_chunk_size: int | None = None,
                                weight_grad_sink: WeightGradSink | None = None) -> torch.Tensor:
    """``token_logprobs(hidden @ lm_head_weight.T, labels)`` without the full ``[tokens, V]`` logits.

    Args:
        hidden: ``[..., H]`` hidden states (fp32/bf16/fp16), the LM head's input.
        lm_head_weight: ``[V, H]`` (``model.lm_head.weight``), same dtype and device as ``hidden``
            (under autocast it may be a higher-precision master weight: see below).
        labels: integer ``hidden.shape[:-1]``; ``ignore_index`` tokens get 0 and no gradient.
        chunk_size: tokens per forward chunk; default: as many as fit 256 MiB of logits on a GPU,
            64 MiB on a CPU (a multiple of 64; see ``_CHUNK_BYTES``). Backward's logits blocks are
            no larger than a forward chunk.
        backend: ``"reference"`` for the plain-PyTorch version; anything else runs the kernels.
        vocab_chunk_size: weight rows per backward block; default: the vocabulary in equal blocks
            whose fp32 gradient fits the same budget (``default_vocab_chunk_size``).
        weight_grad_sink: ``sink(first_row, grad_rows)``, called in backward once per row block, in
            order, covering every row once: ``grad_rows`` is the finished gradient of rows
            ``[first_row, first_row + len(grad_rows))``, ``[rows, H]`` in fp32 (fp64 for fp64
            inputs), the sink's to keep. The weight then gets no gradient from this op (its
            ``.grad`` is not touched), so no ``[V, H]`` gradient is ever made. For
            :class:`allo.optim.MaskedAdamW` in compact-grad mode, ``allo.optim.compact_row_grads``
            makes one that keeps only the selected elements.

    Returns:
        fp32 log-probs of shape ``labels.shape``. Gradients flow to ``hidden`` and (without a sink)
        to ``lm_head_weight``, in their own dtypes.

    Under autocast, ``hidden`` is cast to the autocast dtype, as ``nn.Linear``'s input would be, and
    the weight is used in that dtype: cast whole for the forward, a row block at a time in backward,
    so an fp32 master weight gets its fp32 gradient without a low-precision ``[V, H]`` copy kept
    between forward and backward.
    """
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
    vocab = lm_head_weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(flat_hidden.shape[0], vocab, hidden.dtype, hidden.device.type)
    if vocab_chunk_size is None:
        vocab_chunk_size = default_vocab_chunk_size(vocab, hidden.shape[-1], hidden.device.type)
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if int(value) < 1:
            raise ValueError(f"fused_linear_token_logprobs: {name} must be >= 1, got {value}")
    logp = FusedLinearTokenLogprobs.apply(flat_hidden, lm_head_weight, flat_labels, ignore_index, int(chunk_size),
                                          int(vocab_chunk_size), weight_grad_sink)
    return logp.reshape(labels.shape)
