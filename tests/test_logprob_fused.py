"""allo.ops.fused_linear_token_logprobs against the float64 reference (hidden @ W.T, log_softmax)."""

import pytest
import torch

from allo.ops import fused_linear_token_logprobs
from allo.ops.fused_linear import default_chunk_size

from _allocations import Allocations
from conftest import requires_cuda


def _reference(hidden, weight, labels, upstream, ignore_index=-100):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    keep = labels != ignore_index
    logp = torch.log_softmax(h @ w.t(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    grad_h, grad_w = torch.autograd.grad(logp, (h, w), upstream.double())
    return logp.detach(), grad_h, grad_w


def _run(shape, hidden_size, vocab, dtype, device, chunk_size, vocab_chunk_size=None):
    hidden = torch.randn(*shape, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < 0.3] = -100
    labels.view(-1)[:2] = torch.tensor([0, vocab - 1])  # the first and the last block's edge columns
    upstream = torch.randn(shape, device=device) * torch.rand(shape, device=device) * 2
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = fused_linear_token_logprobs(h, w, labels, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size, vocab_chunk_size", [(5, 1), (4, 64), (None, 100), (1000, 516)])
def test_backward_in_vocabulary_blocks(dtype, chunk_size, vocab_chunk_size):
    # backward goes through the weight's rows in blocks (one row, uneven last block, ...) and the
    # tokens in blocks of chunk_size * V / rows
    _run((3, 7), 24, 517, dtype, "cpu", chunk_size, vocab_chunk_size)


def _sink_run(hidden, weight, labels, upstream, vocab_chunk_size, **kw):
    blocks = []
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = fused_linear_token_logprobs(h, w, labels, vocab_chunk_size=vocab_chunk_size,
                                       weight_grad_sink=lambda first, rows: blocks.append((first, rows.clone())), **kw)
    logp.backward(upstream)
    return logp, h, w, blocks


def test_weight_grad_sink_gets_each_row_block_once_and_no_weight_grad():
    hidden = torch.randn(4, 9, 24)
    weight = torch.randn(301, 24) / 24**0.5
    labels = torch.randint(0, 301, (4, 9))
    labels[1, 2:6] = -100
    upstream = torch.randn(4, 9) * torch.rand(4, 9)
    logp, h, w, blocks = _sink_run(hidden, weight, labels, upstream, 64, chunk_size=7)
    expected = _reference(hidden, weight, labels, upstream)
    assert w.grad is None
    assert [first for first, _ in blocks] == list(range(0, 301, 64))
    assert all(rows.dtype == torch.float32 and rows.shape == (min(64, 301 - first), 24) for first, rows in blocks)
    torch.testing.assert_close(torch.cat([rows for _, rows in blocks]).double(), expected[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), expected[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logp.double(), expected[0], rtol=1e-4, atol=1e-4)


def test_weight_grad_sink_with_fp32_master_weight_under_bf16_autocast():
    hidden = torch.randn(2, 11, 32)
    weight = torch.randn(203, 32) / 32**0.5  # the fp32 master; the op computes in bf16
    labels = torch.randint(0, 203, (2, 11))
    upstream = torch.rand(2, 11) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, h, w, blocks = _sink_run(hidden, weight, labels, upstream, 100)
    expected = _reference(hidden.to(torch.bfloat16), weight.to(torch.bfloat16), labels, upstream)
    assert w.grad is None and h.grad.dtype == torch.float32 and [f for f, _ in blocks] == [0, 100, 200]
    torch.testing.assert_close(torch.cat([rows for _, rows in blocks]).double(), expected[2], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("with_sink", [False, True])
def test_no_low_precision_or_sunk_vocab_sized_tensors(with_sink):
    # what the memory savings rest on: under bf16 autocast an fp32 weight is cast a block of rows at a
    # time and gets its fp32 gradient straight from the blocks (no bf16 [V, H] copy or gradient); with
    # a sink, no [V, H] tensor at all
    vocab, size = 257, 16
    hidden = torch.randn(3, 5, size, requires_grad=True)
    weight = (torch.randn(vocab, size) / 4).requires_grad_(True)
    labels = torch.randint(0, vocab, (3, 5))
    kw = dict(weight_grad_sink=lambda first, rows: None) if with_sink else {}
    with Allocations() as forward:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = fused_linear_token_logprobs(hidden, weight, labels, vocab_chunk_size=64, **kw)
    with Allocations() as backward:
        logp.sum().backward()
    assert forward.shaped((vocab, size)) == []
    assert backward.shaped((vocab, size)) == ([] if with_sink else [("empty_like.default", torch.float32)])
    assert forward.shaped((64, size)) == [("copy_.default", torch.bfloat16)] * 4  # the blocks, cast into a buffer
    assert (weight.grad is None) == with_sink


def test_only_needed_gradients_are_computed():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen LM head
    fused_linear_token_logprobs(hidden, weight, torch.randint(0, 11, (6,)), chunk_size=4).sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_double_backward_raises():
    hidden = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    logp = fused_linear_token_logprobs(hidden, weight, torch.tensor([1, -100, 8]), vocab_chunk_size=4)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(logp.sum(), (hidden, weight), create_graph=True)


def test_default_chunk_is_bounded_and_tensor_core_friendly():
    assert default_chunk_size(8192, 128256, torch.bfloat16) % 64 == 0
    assert default_chunk_size(8192, 128256, torch.bfloat16) * 128256 * 2 <= 64 * 2**20
    assert default_chunk_size(8192, 128256, torch.bfloat16, "cuda") == 1024
    assert default_chunk_size(8192, 128256, torch.bfloat16, "cuda") * 128256 * 2 <= 256 * 2**20
    assert default_chunk_size(10, 50, torch.float32) == 10
    assert default_chunk_size(10, 10**9, torch.float32) == 1
    # the GPU step's shape (8 x 511 tokens, Llama-3.2-1B): one token chunk per row block, so each block's
    # rows of the weight are read once per pass
    from allo.ops.fused_linear import default_vocab_chunk_size

    rows = default_vocab_chunk_size(128256, 2048, "cuda")
    assert default_chunk_size(4088, rows, torch.bfloat16, "cuda") == 4088


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"lm_head_weight must be \[V, H\]"):
        fused_linear_token_logprobs(torch.randn(3, 8), torch.randn(8, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_token_logprobs(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="vocab_chunk_size must be >= 1"):
        fused_linear_token_logprobs(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long),
                                    vocab_chunk_size=0)
    with pytest.raises(ValueError, match="must share dtype outside autocast"):
        fused_linear_token_logprobs(torch.randn(3, 8), torch.randn(5, 8, dtype=torch.float64),
                                    torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="weight_grad_sink must be callable"):
        fused_linear_token_logprobs(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long),
                                    weight_grad_sink=[])
    with pytest.raises(ValueError, match="weight_grad_sink needs the kernels"):
        fused_linear_token_logprobs(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long),
                                    backend="reference", weight_grad_sink=lambda first, rows: None)


def test_default_vocab_chunk_is_even_and_bounded():
    from allo.ops.fused_linear import default_vocab_chunk_size

    gpu = default_vocab_chunk_size(128256, 2048, "cuda")
    assert gpu % 64 == 0 and gpu * 2048 * 4 <= 256 * 2**20 and -(-128256 // gpu) == 4
    assert 128256 - 3 * gpu > 0.9 * gpu  # equal blocks, not full ones and a sliver
    cpu = default_vocab_chunk_size(128256, 2048)
    assert cpu % 64 == 0 and cpu * 2048 * 4 <= 16 * 2**20
    assert default_vocab_chunk_size(50, 8) == 50


def test_weight_grad_sink_is_not_called_for_a_frozen_lm_head():
    # a sink stands for the weight's gradient: with the LM head frozen there is none to hand on, and
    # the sink must not be called (with None, or with rows). kills: the sink used whatever the weight needs
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(70, 8)  # frozen
    labels = torch.randint(0, 70, (5,))
    calls = []
    logp = fused_linear_token_logprobs(hidden, weight, labels, vocab_chunk_size=32,
                                       weight_grad_sink=lambda first, rows: calls.append(first))
    upstream = torch.randn(5)
    logp.backward(upstream)
    assert calls == [] and weight.grad is None
    torch.testing.assert_close(hidden.grad.double(), _reference(hidden, weight, labels, upstream)[1],
                               rtol=1e-4, atol=1e-4)


def test_bf16_weight_gradient_accumulates_token_chunks_in_fp32():
    # a bf16 LM head's gradient rows are summed over the token chunks in fp32 and rounded once at the end
    # (the module's docstring): summed in bf16 chunk after chunk, 256 one-token chunks drift ~3% off the
    # float64 gradient against ~0.4%. kills: accumulating straight into the bf16 gradient
    gen = torch.Generator().manual_seed(3)
    n, size, vocab = 256, 16, 40
    hidden = torch.randn(n, size, generator=gen).bfloat16()
    weight = (torch.randn(vocab, size, generator=gen) / 4).bfloat16()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.rand(n, generator=gen) + 0.5
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused_linear_token_logprobs(h, w, labels, chunk_size=1).backward(upstream)
    expected = _reference(hidden, weight, labels, upstream)[2]
    assert w.grad.dtype == torch.bfloat16
    err = ((w.grad.double() - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-2, err


def test_labels_of_any_integer_dtype_and_layout_are_taken_and_others_refused():
    # int32 labels (and labels that are a view, as a causal shift makes them) give the int64 result;
    # bool and float labels are refused by name. kills: the labels passed to the kernels unconverted
    gen = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(3, 5, 12, generator=gen), torch.randn(50, 12, generator=gen) / 4
    ids = torch.randint(0, 50, (3, 6), generator=gen)
    ids[1, 2] = -100
    want = fused_linear_token_logprobs(hidden, weight, ids[:, 1:].contiguous())
    for labels in (ids[:, 1:], ids[:, 1:].int()):
        torch.testing.assert_close(fused_linear_token_logprobs(hidden, weight, labels, chunk_size=4), want)
    for bad in (ids[:, 1:].bool(), ids[:, 1:].float()):
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            fused_linear_token_logprobs(hidden, weight, bad)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cuda(dtype):
    _run((4, 33), 64, 5003, dtype, "cuda", 48)
    _run((4, 33), 64, 5003, dtype, "cuda", 48, 1024)  # row blocks: the fp32-output matmuls of cuBLAS


@requires_cuda
def test_weight_grad_sink_cuda_bf16_autocast():
    hidden = torch.randn(3, 40, 64, device="cuda")
    weight = torch.randn(1000, 64, device="cuda") / 8
    labels = torch.randint(0, 1000, (3, 40), device="cuda")
    upstream = torch.rand(3, 40, device="cuda") + 0.5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp, h, w, blocks = _sink_run(hidden, weight, labels, upstream, 256)
    expected = _reference(hidden.to(torch.bfloat16), weight.to(torch.bfloat16), labels, upstream)
    assert w.grad is None and [f for f, _ in blocks] == [0, 256, 512, 768]
    torch.testing.assert_close(torch.cat([rows for _, rows in blocks]).double(), expected[2], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(h.grad.double(), expected[1], rtol=3e-2, atol=3e-2)


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
