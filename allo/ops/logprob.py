"""Per-token log-probabilities of labels, as a differentiable torch custom op.

The kernels (``csrc/``) are registered as ``torch.ops.allo.token_logprob_fwd`` /
``token_logprob_bwd`` / ``token_logprob_bwd_inplace``; this module adds what torch needs around
them: autograd (``torch.library.register_autograd``) and fake kernels (``register_fake``), so the op
runs under ``torch.compile`` without a graph break.

Forward keeps only the log-sum-exp of each row (plus the labels and a reference to the logits) for
backward, which recomputes softmax: grad_logits = g * (onehot(label) - softmax(logits)) for any
per-token upstream gradient g.
"""

from __future__ import annotations

import operator
import threading

import torch

from allo._backend import resolve_backend

from . import reference
from ._extension import load_extension as _load_module

_registered = False
_register_lock = threading.Lock()


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _may_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: False only when its strides prove they cannot
    (each dimension, by increasing stride, steps past everything the smaller ones reach; any stride 0
    on a dimension of size > 1, as from ``expand``, fails that). A few exotic interleaved layouts
    without overlap are reported too: ``.contiguous()`` makes them provable."""
    reach = 0  # the largest offset the dimensions seen so far reach
    for stride, size in sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_inplace_backward(logits: torch.Tensor, what: str) -> None:
    """Refuse ``inplace_backward=True`` (ValueError) where writing the logits' gradient into their own
    buffer would be silently wrong; does nothing for logits that do not require grad (the caller
    skips it under ``torch.no_grad()``).

    * leaf logits (a parameter, an input made with ``requires_grad=True``, or ``t.detach()`` /
      ``t.data``, which share ``t``'s buffer): their values are the caller's own and no autograd node
      saved them, so nothing would report that backward replaced them with their gradient;
    * views of a leaf (``leaf[:, :-1]``): the write lands in the leaf's buffer, the same problem;
    * logits whose elements may share memory (``expand``, stride 0): several gradient elements
      would be written to one place, and the gradient would be wrong.

    Views of non-leaf tensors (``model(...).logits[:, :-1]``) are accepted: they share their base's
    version counter, so autograd still raises when another node saved the base and needs it after this
    backward. Refusing, not falling back to the out-of-place kernel, keeps the memory the caller asked
    to save from silently coming back."""
    if not logits.requires_grad:
        return
    hint = "pass inplace_backward=False (the gradient then gets a buffer of its own)"
    if logits.is_leaf:
        raise ValueError(
            f"{what}: inplace_backward=True would overwrite leaf logits (a tensor created with requires_grad=True, "
            "or a .detach()ed tensor that shares another one's buffer) with their gradient, and nothing would "
            f"report it; {hint}, or use it on logits computed by the graph (the LM head's output)"
        )
    base = logits._base
    if base is not None and base.is_leaf:
        raise ValueError(
            f"{what}: inplace_backward=True on a view of a leaf tensor would overwrite the leaf's values with the "
            f"gradient, and nothing would report it; {hint}"
        )
    if _may_overlap(logits):
        raise ValueError(
            f"{what}: inplace_backward=True needs logits whose elements do not share memory, got shape "
            f"{tuple(logits.shape)} with strides {logits.stride()} (an expand()ed tensor?): the gradients of the "
            f"elements sharing a place would overwrite each other; {hint}, or pass logits.contiguous()"
        )


def check_ignore_index(ignore_index, what: str, extra: str = "") -> int:
    """``ignore_index`` as an int, or a TypeError that says what was passed (a bias, a float label)."""
    if not isinstance(ignore_index, bool):
        try:
            return operator.index(ignore_index)  # ints, numpy ints, one-element integer tensors
        except TypeError:
            pass
    got = (f"a {ignore_index.dtype} tensor of shape {tuple(ignore_index.shape)}"
           if isinstance(ignore_index, torch.Tensor) else f"{type(ignore_index).__name__} {ignore_index!r}")
    raise TypeError(f"{what}: ignore_index must be an integer label value, got {got}{extra}")


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, inplace_backward, vocab_start, vocab_size = inputs
    if vocab_start != 0 or vocab_size not in (-1, logits.shape[-1]):
        # a slice's forward gives the slice's log-sum-exp, and backward needs the whole row's
        raise RuntimeError("allo::token_logprob_fwd: autograd is defined for whole rows only; on a vocabulary "
                           "slice call the ops directly (as allo/ops/fused_linear.py does)")
    if inplace_backward and not torch.compiler.is_compiling():
        # token_logprobs checked already; this covers direct calls of the op (under torch.compile the
        # tensors here are traced stand-ins: token_logprobs' check is the one dynamo traces)
        check_inplace_backward(logits, "allo::token_logprob_fwd")
    _, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(lse)


def refuse_double_backward(what: str, *tensors: torch.Tensor) -> None:
    """The backward kernels have no derivative of their own. Under ``create_graph=True`` (a gradient
    penalty, Hessian-vector products, ``gradgradcheck``) their output would be taken as a constant and
    the second derivative silently wrong (``once_differentiable`` only raises when the graph reaches
    it, which a gradient with respect to the inputs never does): raise instead."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{what}: double backward (create_graph=True) is not supported: the backward kernels are not "
            "differentiable. Use backend='reference' (plain PyTorch) where second derivatives are needed"
        )


def _backward(ctx, grad_logp, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    refuse_double_backward("allo.ops.token_logprobs", grad_logp, logits)
    grad = grad_logp.to(lse.dtype).contiguous()
    if ctx.inplace_backward:
        # The caller promised nothing else reads these logits after backward: reuse their buffer.
        torch.ops.allo.token_logprob_bwd_inplace(grad, logits, labels, lse, ctx.ignore_index)
        # Custom ops do not bump the version counter themselves; bumping it makes autograd raise if
        # another node saved these logits and unpacks them after this backward.
        torch.autograd.graph.increment_version(logits)
        grad_logits = logits
    else:
        grad_logits = torch.ops.allo.token_logprob_bwd(grad, logits, labels, lse, ctx.ignore_index)
    return grad_logits, None, None, None, None, None


def _register():
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        _load_module()

        @torch.library.register_fake("allo::token_logprob_fwd")
        def _fwd_fake(logits, labels, ignore_index=-100, inplace_backward=False, vocab_start=0, vocab_size=-1):
            acc = _accumulate_dtype(logits.dtype)
            return logits.new_empty(labels.shape, dtype=acc), logits.new_empty(labels.shape, dtype=acc)

        @torch.library.register_fake("allo::token_logprob_bwd")
        def _bwd_fake(grad_logp, logits, labels, lse, ignore_index=-100, vocab_start=0, vocab_size=-1):
            return logits.new_empty(logits.shape)

        @torch.library.register_fake("allo::token_logprob_bwd_inplace")
        def _bwd_inplace_fake(grad_logp, logits, labels, lse, ignore_index=-100, vocab_start=0, vocab_size=-1):
            return None

        torch.library.register_autograd("allo::token_logprob_fwd", _backward, setup_context=_setup_context)
        _registered = True


def ops():
    """``torch.ops.allo`` with the kernels loaded and autograd/fake kernels registered."""
    if not _registered:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "allo's kernels are not loaded yet and cannot be loaded while torch.compile traces; call "
                "allo.ops.load_extension() once before compiling"
            )
        _register()
    return torch.ops.allo


def load_extension():
    """Load (or build) the kernels and register their autograd and fake kernels; returns the module."""
    _register()
    return _load_module()


def _prebuilt_available():
    import importlib.util

    return importlib.util.find_spec("allo._C") is not None


if _prebuilt_available():  # cheap: register now, so torch.compile never meets an unloaded op
    try:
        _register()
    except RuntimeError:
        pass  # an unloadable allo._C: the first call reports it (or builds csrc/ just in time)


def prepare_labels(logits: torch.Tensor, labels: torch.Tensor, what: str) -> torch.Tensor:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{what}: labels have shape {tuple(labels.shape)} but logits have shape {tuple(logits.shape)}; "
            "labels must be logits.shape[:-1] (one label per token)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{what}: labels must be an integer tensor, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"{what}: labels are on {labels.device} but logits on {logits.device}")
    return labels.to(torch.long).contiguous()


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   inplace_backward: bool = False, backend: str | None = None) -> torch.Tensor:
    """``log_softmax(logits, -1).gather(-1, labels)`` per token, without materialising log-softmax.

    Args:
        logits: ``[..., V]`` fp32, bf16, fp16 (or fp64). Only the last dimension must be contiguous;
            views such as ``logits[:, :-1]`` are read in place, without a copy.
        labels: integer ``logits.shape[:-1]``; tokens equal to ``ignore_index`` get log-prob 0 and
            zero gradient (their logits are not read: a NaN there does not spread).
        ignore_index, inplace_backward, backend: keyword-only.
        inplace_backward: backward writes the gradient of the logits into the logits' own buffer
            (saves one logits-sized allocation). Only when nothing else reads these logits after
            this op's backward; autograd raises if another node saved them and uses them afterwards.
            Refused (ValueError, no fallback) where that could go unnoticed or be wrong: leaf logits
            (``requires_grad=True`` tensors, ``.detach()``ed ones that share a buffer), views of a
            leaf, and logits whose elements share memory (``expand``); see
            :func:`check_inplace_backward`. Views of computed logits (``logits[:, :-1]``) are fine.
        backend: ``None``/``"auto"`` (the compiled kernels for the tensors' device; ``"cpu"`` and
            ``"triton"`` select them too, as this op has no Triton version) or ``"reference"``
            (plain PyTorch). ``ALLO_BACKEND`` applies as everywhere in allo.

    Returns:
        fp32 log-probs of shape ``labels.shape`` (fp64 for fp64 logits), 0 where ignored. Non-finite
        logits behave as in ``log_softmax(logits, -1).gather(-1, labels)``: a NaN or +inf anywhere in a
        (not ignored) row makes its log-prob and gradient NaN; a -inf logit has probability 0.
    """
    ignore_index = check_ignore_index(ignore_index, "token_logprobs")
    labels = prepare_labels(logits, labels, "token_logprobs")
    if resolve_backend(backend, logits.device, what="token_logprobs") == "reference":
        return reference.token_logprobs(logits, labels, ignore_index)
    if inplace_backward and torch.is_grad_enabled():
        check_inplace_backward(logits, "token_logprobs")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() > 9:  # the kernels index at most 8 leading dimensions
        return token_logprobs(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                              inplace_backward=inplace_backward, backend=backend).reshape(labels.shape)
    logp, _ = ops().token_logprob_fwd(logits, labels, ignore_index, inplace_backward)
    return logp
