"""Float64 ground truth for the log-prob kernel tests (shared by test_logprob*.py)."""

import torch


def reference_logprobs_and_grad(logits, labels, upstream, ignore_index=-100):
    """(logp, grad_logits) in float64 from the (already rounded) logits, by autograd on log_softmax."""
    x = logits.detach().double().requires_grad_(True)
    keep = labels != ignore_index
    safe = labels.masked_fill(~keep, 0)
    logp = torch.log_softmax(x, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep
    (grad,) = torch.autograd.grad(logp, x, upstream.double())
    return logp.detach(), grad


def tolerances(dtype):
    # Outputs are rounded to the logits' dtype: allow a few of its ulps, plus fp32 accumulation error.
    return {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
            torch.float16: dict(rtol=2e-3, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}[dtype]
