"""Edge cases of allo.ops and allo.losses.token_weights: non-finite logits, refused in-place backward,
argument mistakes, and top_fraction_mask's ranking of -inf and near-equal scores."""

import numpy as np
import pytest
import torch

from allo.losses import improve_loss, top_fraction_mask
from allo.ops import fused_linear_token_logprobs, token_logprobs
from allo.ops.logprob import _may_overlap, ops
from conftest import requires_cuda

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]  # the CUDA kernels on a GPU machine
# 16 floats a vector, 2048 a block in the CPU kernel: first/last lane, vector and block edges, tail
POSITIONS = [0, 1, 15, 16, 17, 98, 99, 2046, 2047, 2048, 2049, 4095, 4999]


def _tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=5e-5), torch.bfloat16: dict(rtol=2e-2, atol=1e-4),
            torch.float16: dict(rtol=3e-3, atol=1e-5)}[dtype]


def _reference(logits, labels, upstream, ignore_index=-100):
    """float64 log_softmax + gather and its gradient, from the (already rounded) logits."""
    x = logits.detach().double().requires_grad_(True)
    keep = labels != ignore_index
    logp = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, 0.0)
    (grad,) = torch.autograd.grad(logp, x, upstream.double())
    return logp.detach(), grad


def _special_rows(vocab, value, dtype):
    """One row per position (< vocab) holding ``value``, twice: labelled there and labelled elsewhere;
    plus a clean row."""
    positions = sorted({p for p in POSITIONS if p < vocab} | {vocab - 1, vocab - 2})
    rows, labels = [], []
    for pos in positions:
        for label in (pos, (pos + 3) % vocab):
            row = torch.randn(vocab) * 3
            row[pos] = value
            rows.append(row)
            labels.append(label)
    rows.append(torch.randn(vocab) * 3)
    labels.append(vocab // 2)
    return torch.stack(rows).to(dtype), torch.tensor(labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [7, 100, 4096, 5000])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
def test_token_logprobs_non_finite_logits_match_log_softmax(dtype, vocab, value, device):
    torch.manual_seed(vocab)
    logits, labels = _special_rows(vocab, value, dtype)
    upstream = torch.rand(labels.shape) + 0.5
    expected_logp, expected_grad = _reference(logits, labels, upstream)
    x = logits.to(device, copy=True).requires_grad_(True)
    logp = token_logprobs(x, labels.to(device))
    logp.backward(upstream.to(device))
    logp = logp.cpu()
    if value != -INF:  # NaN and +inf poison their whole row, as in log_softmax
        assert torch.isnan(logp[:-1]).all() and torch.isfinite(logp[-1])
    torch.testing.assert_close(logp.double(), expected_logp, equal_nan=True, **_tol(dtype))
    torch.testing.assert_close(x.grad.cpu().double(), expected_grad, equal_nan=True, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_all_minus_inf_row_is_nan_like_log_softmax(dtype):
    logits = torch.full((2, 37), -INF).to(dtype)
    logits[1] = torch.randn(37).to(dtype)
    labels = torch.tensor([3, 5])
    upstream = torch.ones(2)
    expected_logp, expected_grad = _reference(logits, labels, upstream)
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, labels)
    logp.backward(upstream)
    torch.testing.assert_close(logp.double(), expected_logp, equal_nan=True, **_tol(dtype))
    torch.testing.assert_close(x.grad.double(), expected_grad, equal_nan=True, **_tol(dtype))


def _hard_nan_rows():
    """Rows where the CPU kernel's block maximum misses the NaN: a -inf block holding a NaN before a
    finite block, and a NaN lane that replaces a larger value the lane held before."""
    rows = []
    for pos in (0, 5, 2047):
        row = torch.randn(4096)
        row[:2048] = -INF
        row[pos] = NAN
        rows.append(row)
    row = torch.full((4096,), -5.0)
    row[0], row[16], row[32] = 100.0, NAN, 1.0  # lane 0: 100, then NaN, then 1
    rows.append(row)
    row = torch.full((4096,), -INF)
    row[3] = NAN  # NaN and -inf only
    rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_token_logprobs_nan_that_block_maximum_misses(dtype, device):
    logits = _hard_nan_rows().to(dtype)
    labels = torch.tensor([3000, 3000, 3000, 40, 7])
    x = logits.to(device, copy=True).requires_grad_(True)
    logp = token_logprobs(x, labels.to(device))
    logp.sum().backward()
    expected_logp, expected_grad = _reference(logits, labels, torch.ones(5))
    assert torch.isnan(logp.cpu()).all() and torch.isnan(expected_logp).all()
    torch.testing.assert_close(x.grad.cpu().double(), expected_grad, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_nan_in_an_ignored_row_stays_out(dtype):
    # ignored rows are not read: 0 and zero gradient (log_softmax's gradient there would be NaN)
    logits = torch.randn(3, 2100).to(dtype)
    logits[1, 2047] = NAN
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, torch.tensor([4, -100, 9]))
    logp.sum().backward()
    assert logp[1] == 0 and torch.isfinite(logp).all()
    assert (x.grad[1] == 0).all() and torch.isfinite(x.grad).all()


def test_nan_in_float64_logits_and_on_vocabulary_slices():
    x = torch.randn(2, 3000, dtype=torch.float64)
    x[0, 1500] = NAN
    torch.testing.assert_close(token_logprobs(x, torch.tensor([1, 2])), _reference(x, torch.tensor([1, 2]),
                               torch.ones(2))[0], equal_nan=True)
    # a slice holding the NaN gives a NaN lse; the other slice does not see it
    _, lse = ops().token_logprob_fwd(x[:, 1000:2000].contiguous(), torch.tensor([1, 2]), -100, False, 1000, 3000)
    assert torch.isnan(lse[0]) and torch.isfinite(lse[1])
    _, lse = ops().token_logprob_fwd(x[:, :1000].contiguous(), torch.tensor([1, 2]), -100, False, 0, 3000)
    assert torch.isfinite(lse).all()


def _fused_case(vocab, hidden_size, position, value, dtype, where):
    torch.manual_seed(position + vocab)
    hidden = torch.randn(6, hidden_size)
    hidden[:, 0] = hidden[:, 0].abs() + 0.5  # so a +-inf in column 0 of a weight row gives a +-inf logit
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    if where == "weight":
        weight[position, 0] = value
    else:  # one token's hidden state
        hidden[2, 1] = value
    # no ignored token: log_softmax's gradient is NaN on ignored rows with NaN logits, the kernels' 0
    labels = torch.tensor([position, (position + 1) % vocab, position, 0, vocab - 1, vocab // 2])
    return hidden.to(dtype), weight.to(dtype), labels


def _fused_reference(hidden, weight, labels, upstream):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    keep = labels != -100
    logp = torch.log_softmax(h @ w.t(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, 0.0)
    grad_h, grad_w = torch.autograd.grad(logp, (h, w), upstream.double())
    return logp.detach(), grad_h, grad_w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab, position, vocab_chunk_size", [
    (100, 99, None), (100, 0, 10), (100, 9, 10), (4096, 2047, None), (4096, 2048, None), (5000, 2047, 1024),
    (5000, 4999, None), (5000, 16, 64),
])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_non_finite_weight_row_matches_reference(dtype, vocab, position, vocab_chunk_size, value, device):
    hidden, weight, labels = _fused_case(vocab, 16, position, value, dtype, "weight")
    upstream = torch.rand(labels.shape) + 0.5
    h, w = hidden.to(device, copy=True).requires_grad_(True), weight.to(device, copy=True).requires_grad_(True)
    logp = fused_linear_token_logprobs(h, w, labels.to(device), vocab_chunk_size=vocab_chunk_size, chunk_size=4)
    logp.backward(upstream.to(device))
    logp = logp.cpu()
    expected = _fused_reference(hidden, weight, labels, upstream)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    if value != -INF:
        assert torch.isnan(logp).all()
    torch.testing.assert_close(logp.double(), expected[0], equal_nan=True, **tol)
    torch.testing.assert_close(h.grad.cpu().double(), expected[1], equal_nan=True, **tol)
    torch.testing.assert_close(w.grad.cpu().double(), expected[2], equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_nan_hidden_state_poisons_its_token_only(dtype):
    hidden, weight, labels = _fused_case(4096, 16, 2047, NAN, dtype, "hidden")
    logp = fused_linear_token_logprobs(hidden, weight, labels)
    expected = _fused_reference(hidden, weight, labels, torch.ones(labels.shape))[0]
    assert torch.isnan(logp[2]) and torch.isfinite(logp[[0, 1, 3, 4, 5]]).all()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(logp.double(), expected, equal_nan=True, **tol)


# ---- inplace_backward refusals ------------------------------------------------------------------

def test_inplace_backward_refuses_leaf_logits_and_leaves_them_untouched():
    x = torch.randn(2, 7, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(ValueError, match="inplace_backward=True would overwrite leaf logits"):
        token_logprobs(x, torch.tensor([1, 2]), inplace_backward=True)
    assert torch.equal(x.detach(), before)


def test_inplace_backward_refuses_detached_tensor_sharing_a_buffer():
    base = torch.randn(2, 7)
    saved = base.clone()
    cut = base.detach().requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward"):
        token_logprobs(cut, torch.tensor([1, 2]), inplace_backward=True)
    assert torch.equal(base, saved)


def test_inplace_backward_refuses_view_of_a_leaf():
    x = torch.randn(2, 5, 7, requires_grad=True)
    with pytest.raises(ValueError, match="view of a leaf"):
        token_logprobs(x[:, :-1], torch.zeros(2, 4, dtype=torch.long), inplace_backward=True)


@pytest.mark.parametrize("make", [
    lambda b: (b * 1).expand(3, 7),
    lambda b: (b * 1).expand(3, 7).unsqueeze(0),
    lambda b: torch.as_strided((b * 1).repeat(3, 1).reshape(-1), (3, 7), (3, 1)),  # rows overlap
], ids=["expand", "expand-3d", "overlapping-rows"])
def test_inplace_backward_refuses_logits_with_overlapping_memory(make):
    b = torch.randn(1, 7, requires_grad=True)
    logits = make(b)
    labels = torch.ones(logits.shape[:-1], dtype=torch.long)
    with pytest.raises(ValueError, match="do not share memory"):
        token_logprobs(logits, labels, inplace_backward=True)
    # out of place the same logits give log_softmax's gradient
    token_logprobs(logits, labels).sum().backward()
    b2 = b.detach().clone().requires_grad_(True)
    expected = make(b2)
    torch.log_softmax(expected, -1).gather(-1, labels.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(b.grad, b2.grad)


def test_inplace_backward_still_works_on_views_of_computed_logits():
    x = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4))
    token_logprobs((x * 2)[:, :-1], labels, inplace_backward=True).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    token_logprobs((x2 * 2)[:, :-1], labels).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_inplace_backward_is_not_refused_without_a_backward():
    x = torch.randn(2, 7, requires_grad=True)
    with torch.no_grad():
        token_logprobs(x, torch.tensor([1, 2]), inplace_backward=True)
    token_logprobs(torch.randn(2, 7), torch.tensor([1, 2]), inplace_backward=True)  # no grad needed


def test_direct_op_call_refuses_inplace_backward_on_leaf():
    x = torch.randn(2, 7, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        ops().token_logprob_fwd(x, torch.tensor([1, 2]), -100, True)


def test_inplace_backward_refusal_under_torch_compile():
    def f(x, y):
        return token_logprobs(x, y, inplace_backward=True).sum()

    x = torch.randn(2, 7, requires_grad=True)
    with pytest.raises(Exception, match="inplace_backward"):
        torch.compile(f, backend="aot_eager")(x, torch.tensor([1, 2]))


def test_may_overlap():
    t = torch.randn(3, 5, 7)
    assert not _may_overlap(t)
    assert not _may_overlap(t[:, :-1])
    assert not _may_overlap(t.transpose(0, 1))
    assert not _may_overlap(t[:, :, ::2])
    assert not _may_overlap(torch.randn(1, 7).expand(1, 7))
    assert _may_overlap(torch.randn(1, 7).expand(2, 7))
    assert _may_overlap(torch.randn(30).as_strided((3, 7), (5, 1)))


# ---- argument mistakes ------------------------------------------------------------------------------

def test_fused_linear_bias_passed_positionally_is_refused():
    h, w, y, bias = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randint(0, 5, (2, 3)), torch.randn(5)
    with pytest.raises(TypeError, match="positional"):
        fused_linear_token_logprobs(h, w, y, bias)
    with pytest.raises(TypeError, match="no bias"):
        fused_linear_token_logprobs(h, w, y, ignore_index=bias)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        fused_linear_token_logprobs(h, w, y, ignore_index=-100.0)


def test_token_logprobs_ignore_index_is_keyword_and_integer():
    x, y = torch.randn(2, 5), torch.tensor([1, -1])
    with pytest.raises(TypeError, match="positional"):
        token_logprobs(x, y, -1)
    for bad in (1.5, torch.tensor(-1.0), torch.tensor([-1, 2]), True, "x"):
        with pytest.raises(TypeError, match="ignore_index must be an integer"):
            token_logprobs(x, y, ignore_index=bad)
    expected = token_logprobs(x, y, ignore_index=-1)
    assert expected[1] == 0
    for fine in (torch.tensor(-1), np.int64(-1)):
        torch.testing.assert_close(token_logprobs(x, y, ignore_index=fine), expected)


# ---- top_fraction_mask ------------------------------------------------------------------------------

def test_top_fraction_mask_minus_inf_scores_after_masked_out_positions():
    scores = torch.tensor([[0.0, 0.0, -INF, -INF]])
    mask = torch.tensor([[False, False, True, True]])
    assert top_fraction_mask(scores, mask, 1.0).tolist() == [[False, False, True, True]]
    assert top_fraction_mask(scores, mask, 0.5).tolist() == [[False, False, True, False]]
    assert top_fraction_mask(scores, mask, 0.01).sum() == 1


def test_improve_loss_keeps_at_least_one_key_token_with_minus_inf_scores():
    z = torch.zeros(1, 4)
    m = torch.tensor([[False, False, True, True]])
    rejected_ref = torch.tensor([[0.0, 0.0, -INF, -INF]])
    _, metrics = improve_loss(z, z, z, rejected_ref, m, m, eps=0.5)
    assert metrics["improve/key_tokens"] == 1


def test_top_fraction_mask_keeps_float64_precision():
    scores = torch.tensor([[1.0, 1.0 + 1e-9]], dtype=torch.float64)
    assert top_fraction_mask(scores, torch.ones(1, 2, dtype=torch.bool), 0.5).tolist() == [[False, True]]


def test_top_fraction_mask_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([-INF, INF, -1.0, 0.0, 0.5, 2.0])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        scores = values[torch.randint(0, len(values), (64, 11), generator=gen)].to(dtype)
        mask = torch.rand(64, 11, generator=gen) < 0.6
        for fraction in (0.01, 0.3, 0.5, 1.0):
            got = top_fraction_mask(scores, mask, fraction)
            for row in range(64):
                inside = [t for t in range(11) if mask[row, t]]
                k = max(1, int(len(inside) * fraction + 1e-9)) if inside else 0
                best = sorted(inside, key=lambda t: (-float(scores[row, t]), t))[:k]
                assert got[row].nonzero().flatten().tolist() == sorted(best), (dtype, fraction, row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("hidden_shape", [(0, 8), (3, 0, 8)])
def test_fused_linear_without_tokens_gives_a_zero_weight_gradient(dtype, hidden_shape):
    # a micro-batch whose every label was cut (or sequences of one token) has no token to score: the
    # weight gradient is zero, as the unfused computation's, not the unwritten buffer of the backward
    for _ in range(3):  # freed NaN blocks of the gradient's size, for the allocator to hand back
        torch.full((13 * 8,), NAN, dtype=dtype)
    hidden = torch.randn(*hidden_shape, dtype=dtype, requires_grad=True)
    weight = torch.randn(13, 8, dtype=dtype, requires_grad=True)
    labels = torch.zeros(hidden_shape[:-1], dtype=torch.long)
    fused_linear_token_logprobs(hidden, weight, labels, vocab_chunk_size=5).sum().backward()
    assert weight.grad.dtype == dtype and torch.equal(weight.grad, torch.zeros_like(weight))
    assert hidden.grad.shape == hidden.shape
    blocks = []
    sink = lambda r0, g: blocks.append((r0, None if g is None else g.clone()))  # noqa: E731
    weight.grad = None
    fused_linear_token_logprobs(hidden, weight, labels, vocab_chunk_size=5, weight_grad_sink=sink).sum().backward()
    assert weight.grad is None
    assert [r0 for r0, _ in blocks] == [0, 5, 10]
    for r0, g in blocks:  # every block handed on, zero, in the accumulation dtype
        assert g is not None and g.shape == (min(13, r0 + 5) - r0, 8) and not g.any()
        assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_empty_vocabulary_is_refused_by_name():
    with pytest.raises(ValueError, match="vocabulary is empty"):
        fused_linear_token_logprobs(torch.randn(2, 4), torch.randn(0, 4), torch.zeros(2, dtype=torch.long))
    for backend in (None, "reference"):
        with pytest.raises(RuntimeError, match="vocabulary"):
            token_logprobs(torch.randn(2, 0), torch.zeros(2, dtype=torch.long), backend=backend)


@pytest.mark.parametrize("label", [-1, 9, 10**6])
def test_reference_backend_refuses_labels_outside_the_vocabulary_like_the_kernels(label):
    logits, labels = torch.randn(3, 9), torch.tensor([0, label, -100])
    for backend in (None, "reference"):
        with pytest.raises(RuntimeError, match=rf"labels\[1\] = {label} is outside the vocabulary \[0, 9\) "
                                               r"and is not ignore_index \(-100\)"):
            token_logprobs(logits, labels, backend=backend)


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_reference_backend_keeps_a_non_finite_ignored_row_out_of_the_gradient(value):
    logits = torch.randn(4, 7, dtype=torch.float64)
    logits[2, 3] = value
    labels = torch.tensor([1, 6, -100, 0])
    for backend in (None, "reference"):
        x = logits.clone().requires_grad_(True)
        logp = token_logprobs(x, labels, backend=backend)
        upstream = torch.tensor([0.5, -2.0, 3.0, 1.25], dtype=torch.float64)
        logp.backward(upstream)
        assert torch.isfinite(logp).all() and logp[2] == 0
        assert torch.equal(x.grad[2], torch.zeros(7, dtype=torch.float64)), backend
        ref_logp, ref_grad = _reference(logits.masked_fill(labels.eq(-100).unsqueeze(-1), 0), labels, upstream)
        torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad[[0, 1, 3]], ref_grad[[0, 1, 3]], rtol=1e-12, atol=1e-12)
