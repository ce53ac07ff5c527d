"""allo.ops.fused_linear_token_logprobs against the float64 reference (hidden @ W.T, log_softmax)."""

import pytest
import torch

from allo.ops import fused_linear_token_logprobs
from allo.ops.fused_linear import default_chunk_size

from conftest import requires_cuda


def _reference(hidden, weight, labels, upstream, ignore_index=-100):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    keep = labels != ignore_index
    logp = torch.log_softmax(h @ w.t(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    grad_h, grad_w = torch.autograd.grad(logp, (h, w), upstream.double())
    return logp.detach(), grad_h, grad_w


def _run(shape, hidden_size, vocab, dtype, device, chunk_size):
    hidden = torch.randn(*shape, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < 0.3] = -100
    upstream = torch.randn(shape, device=device) * torch.rand(shape, device=device) * 2
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = fused_linear_token_logprobs(h, w, labels, chunk_size=chunk_size)
    logp.backward(upstream)
    expected = _reference(hidden, weight, labels, upstream)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert logp.shape == labels.shape and logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), expected[0], **tol)
    assert torch.all(logp[labels == -100] == 0)
    torch.testing.assert_close(h.grad.double(), expected[1], **tol)
    torch.testing.assert_close(w.grad.double(), expected[2], **tol)


@pytest.mark.parametrize("chunk_size", [1, 5, None, 1000])
def test_fused_linear_matches_reference_fp32(chunk_size):
    _run((3, 7), 24, 517, torch.float32, "cpu", chunk_size)


def test_fused_linear_bf16():
    _run((2, 9), 32, 301, torch.bfloat16, "cpu", 4)


def test_only_needed_gradients_are_computed():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen LM head
    fused_linear_token_logprobs(hidden, weight, torch.randint(0, 11, (6,)), chunk_size=4).sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_default_chunk_is_bounded_and_tensor_core_friendly():
    assert default_chunk_size(8192, 128256, torch.bfloat16) % 64 == 0
    assert default_chunk_size(8192, 128256, torch.bfloat16) * 128256 * 2 <= 64 * 2**20
    # GPUs: chunks long enough that the weight-gradient addmm is not bound by re-reading [V, H]
    assert default_chunk_size(8192, 128256, torch.bfloat16, "cuda") == 1024
    assert default_chunk_size(8192, 128256, torch.bfloat16, "cuda") * 128256 * 2 <= 256 * 2**20
    assert default_chunk_size(10, 50, torch.float32) == 10
    assert default_chunk_size(10, 10**9, torch.float32) == 1


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"lm_head_weight must be \[V, H\]"):
        fused_linear_token_logprobs(torch.randn(3, 8), torch.randn(8, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_token_logprobs(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long), chunk_size=0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cuda(dtype):
    _run((4, 33), 64, 5003, dtype, "cuda", 48)


@pytest.mark.parametrize("backward_in_autocast", [True, False])
def test_fused_linear_under_bf16_autocast_with_fp32_weights(backward_in_autocast):
    # fp32 master weights with bf16 autocast: the op runs in bf16, as nn.Linear would, and its
    # backward works whether or not autocast is still on when backward runs.
    hidden = torch.randn(3, 37, 24, requires_grad=True)
    weight = (torch.randn(101, 24) / 24**0.5).requires_grad_(True)
    labels = torch.randint(0, 101, (3, 37))
    labels[0, :5] = -100
    upstream = torch.rand(3, 37) * 2 - 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = fused_linear_token_logprobs(hidden, weight, labels, chunk_size=16)
        if backward_in_autocast:
            logp.backward(upstream)
    if not backward_in_autocast:
        logp.backward(upstream)
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    expected = _reference(hidden.to(torch.bfloat16), weight.to(torch.bfloat16), labels, upstream)
    tol = dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(logp.double(), expected[0], **tol)
    torch.testing.assert_close(hidden.grad.double(), expected[1], **tol)
    torch.testing.assert_close(weight.grad.double(), expected[2], **tol)
