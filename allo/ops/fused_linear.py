"""Per-token log-probs straight from hidden states and the LM-head weight, chunked over tokens.

Only one chunk of logits (``chunk_size x V``) exists at a time, in forward and in backward: forward
keeps the log-sum-exp per token, backward recomputes each chunk's logits with one matmul, turns them
into their gradient in place (``allo::token_logprob_bwd_inplace``) and multiplies that into the
gradients of the hidden states and of the weight. The upstream gradient is only known in backward
(DPO-style losses weight each token), which is why the gradients are not precomputed in forward as
in Liger-Kernel's fused linear cross entropy; the price is one extra matmul.
"""

from __future__ import annotations

import torch

from allo._backend import resolve_backend

from . import reference
from .logprob import _accumulate_dtype, ops, prepare_labels

# Logits bytes per chunk. Each chunk's matmuls stream the whole [V, H] weight (the logits in forward,
# their recomputation and the grad_hidden product in backward read it; the grad_weight addmm reads AND
# writes its [V, H] gradient), so a chunk
# of c tokens does about 2c flops per weight element moved: on an H100 (~800 TFLOP/s bf16, ~3 TB/s)
# that is compute-bound only from c ~ 550 tokens. 64 MiB gives 256 tokens at V = 128256 in bf16 (the
# weight-gradient traffic alone would then be ~2 GB per chunk, ~20 ms over 8192 tokens), so GPUs get
# 256 MiB (1024 bf16 tokens at that vocabulary). CPUs are compute-bound at any c that fits a cache
# sensibly; 64 MiB measured well there. A prediction for the GPU, to be checked by bench_logprob.py.
_CHUNK_BYTES = {"cuda": 256 * 2**20}
_CHUNK_BYTES_DEFAULT = 64 * 2**20


def default_chunk_size(num_tokens: int, vocab_size: int, dtype: torch.dtype, device_type: str = "cpu") -> int:
    budget = _CHUNK_BYTES.get(device_type, _CHUNK_BYTES_DEFAULT)
    rows = budget // max(1, vocab_size * torch.empty((), dtype=dtype).element_size())
    if rows >= 64:
        rows -= rows % 64  # tensor-core friendly
    return int(max(1, min(num_tokens, rows)))


def _autocast_off(fn):
    def wrapper(ctx, *args):
        with torch.autocast(args[0].device.type, enabled=False):  # args[0]: hidden, or grad in backward
            return fn(ctx, *args)

    return wrapper


def _chunk_buffer(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """One chunk's logits, reused by every chunk: with a fresh ``hidden @ weight.t()`` per chunk the
    previous chunk's logits are still referenced while the next ones are allocated, so two chunks
    were alive at the peak (measured on the CPU: 2 x 65.7 MB in forward and in backward at
    V = 128256, 256-token bf16 chunks)."""
    return torch.empty(min(chunk_size, hidden.shape[0]), weight.shape[0], dtype=hidden.dtype, device=hidden.device)


class FusedLinearTokenLogprobs(torch.autograd.Function):
    # Autocast is handled once, in the wrapper (inputs cast to the autocast dtype, as nn.Linear's
    # would be); inside, it is off in forward and backward alike, so autocast never re-casts the
    # chunk matmuls and their out= buffers keep the inputs' dtype whatever context backward runs in.
    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size):
        n = hidden.shape[0]
        acc = _accumulate_dtype(hidden.dtype)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        op = ops()
        buf = _chunk_buffer(hidden, weight, chunk_size)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            logits = torch.mm(hidden[start:end], weight.t(), out=buf[:end - start])
            logp[start:end], lse[start:end] = op.token_logprob_fwd(logits, labels[start:end], ignore_index, False)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        return logp

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_logp):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad_logp.to(lse.dtype).contiguous()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated chunk by chunk in the weight's dtype (as Liger does): an fp32 copy of a bf16
        # LM head would double the memory this op exists to save.
        grad_weight = torch.zeros_like(weight) if need_weight else None
        op = ops()
        n = hidden.shape[0]
        buf = _chunk_buffer(hidden, weight, ctx.chunk_size)
        for start in range(0, n, ctx.chunk_size):
            end = min(n, start + ctx.chunk_size)
            logits = torch.mm(hidden[start:end], weight.t(), out=buf[:end - start])
            op.token_logprob_bwd_inplace(grad[start:end], logits, labels[start:end], lse[start:end], ctx.ignore_index)
            if need_hidden:
                torch.matmul(logits, weight, out=grad_hidden[start:end])
            if need_weight:
                grad_weight.addmm_(logits.t(), hidden[start:end])
        return grad_hidden, grad_weight, None, None, None


def fused_linear_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                                ignore_index: int = -100, chunk_size: int | None = None,
                                backend: str | None = None) -> torch.Tensor:
    """``token_logprobs(hidden @ lm_head_weight.T, labels)`` without the full ``[tokens, V]`` logits.

    Args:
        hidden: ``[..., H]`` hidden states (fp32/bf16/fp16), the LM head's input.
        lm_head_weight: ``[V, H]`` (``model.lm_head.weight``), same dtype and device as ``hidden``.
        labels: integer ``hidden.shape[:-1]``; ``ignore_index`` tokens get 0 and no gradient.
        chunk_size: tokens per chunk; default: as many as fit 256 MiB of logits on a GPU, 64 MiB on
            a CPU (a multiple of 64; see ``_CHUNK_BYTES``).
        backend: ``"reference"`` for the plain-PyTorch version; anything else runs the kernels.

    Returns:
        fp32 log-probs of shape ``labels.shape``. Gradients flow to ``hidden`` and ``lm_head_weight``.

    Under autocast, ``hidden`` and ``lm_head_weight`` are first cast to the autocast dtype, as
    ``nn.Linear``'s inputs would be (so fp32 master weights with bf16 autocast work).
    """
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, lm_head_weight = hidden.to(dtype), lm_head_weight.to(dtype)
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"fused_linear_token_logprobs: lm_head_weight must be [V, H] with H = hidden.shape[-1] = "
            f"{hidden.shape[-1]}, got {tuple(lm_head_weight.shape)}"
        )
    if hidden.dtype != lm_head_weight.dtype or hidden.device != lm_head_weight.device:
        raise ValueError(
            f"fused_linear_token_logprobs: hidden ({hidden.dtype}, {hidden.device}) and lm_head_weight "
            f"({lm_head_weight.dtype}, {lm_head_weight.device}) must share dtype and device"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"fused_linear_token_logprobs: labels have shape {tuple(labels.shape)}, expected hidden.shape[:-1] = "
            f"{tuple(hidden.shape[:-1])}"
        )
    if resolve_backend(backend, hidden.device, what="fused_linear_token_logprobs") == "reference":
        return reference.fused_linear_token_logprobs(hidden, lm_head_weight, labels, ignore_index)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = prepare_labels(flat_hidden[:, :1], labels.reshape(-1, 1)[:, 0], "fused_linear_token_logprobs")
    if chunk_size is None:
        chunk_size = default_chunk_size(flat_hidden.shape[0], lm_head_weight.shape[0], hidden.dtype,
                                        hidden.device.type)
    if int(chunk_size) < 1:
        raise ValueError(f"fused_linear_token_logprobs: chunk_size must be >= 1, got {chunk_size}")
    logp = FusedLinearTokenLogprobs.apply(flat_hidden, lm_head_weight, flat_labels, ignore_index, int(chunk_size))
    return logp.reshape(labels.shape)
