"""allo.ops.token_logprobs (csrc/ kernels) against a float64 reference."""

import pytest
import torch

from allo.ops import token_logprobs
from allo.ops.logprob import ops

from conftest import requires_cuda


def reference_logprobs_and_grad(logits, labels, upstream, ignore_index=-100):
    """(logp, grad_logits) in float64 from the (already rounded) logits, by autograd on log_softmax."""
    x = logits.detach().double().requires_grad_(True)
    keep = labels != ignore_index
    safe = labels.masked_fill(~keep, 0)
    logp = torch.log_softmax(x, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep
    (grad,) = torch.autograd.grad(logp, x, upstream.double())
    return logp.detach(), grad


def tolerances(dtype):
    # Gradients are rounded to the logits' dtype: allow a few of its ulps, plus fp32 accumulation error.
    return {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
            torch.float16: dict(rtol=2e-3, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}[dtype]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 1, tiny, odd, just under / over the CPU block of 2048, and not a multiple of any vector width
VOCABS = [1, 7, 2047, 2049, 5003]


def _inputs(shape, vocab, dtype, device, ignore_index=-100, ignore_fraction=0.25):
    logits = (torch.randn(*shape, vocab, device=device) * 4).to(dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_fraction] = ignore_index
    upstream = torch.randn(shape, device=device) * torch.rand(shape, device=device) * 3  # non-uniform
    return logits, labels, upstream


def _check(logits, labels, upstream, ignore_index=-100, inplace=False):
    expected_logp, expected_grad = reference_logprobs_and_grad(logits, labels, upstream, ignore_index)
    x = logits.clone().requires_grad_(True)
    work = x * 1 if inplace else x  # a non-leaf whose buffer backward may overwrite
    logp = token_logprobs(work, labels, ignore_index=ignore_index, inplace_backward=inplace)
    assert logp.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(logp.double(), expected_logp, rtol=1e-5, atol=5e-5)
    assert torch.all(logp[labels == ignore_index] == 0)
    logp.backward(upstream)
    torch.testing.assert_close(x.grad.double(), expected_grad, **tolerances(logits.dtype))
    assert torch.all(x.grad[labels == ignore_index] == 0)
    return x, work


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_forward_backward_matches_float64_reference(dtype, vocab):
    _check(*_inputs((3, 5), vocab, dtype, "cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_writes_gradient_into_logits_buffer(dtype):
    logits, labels, upstream = _inputs((4, 6), 2053, dtype, "cpu")
    x, work = _check(logits, labels, upstream, inplace=True)
    # the gradient now lives in the intermediate's buffer: every element, ignored rows included, was rewritten
    torch.testing.assert_close(work.detach(), x.grad, rtol=0, atol=0)


def test_inplace_backward_is_detected_when_logits_are_needed_again():
    x = torch.randn(4, 9, requires_grad=True)
    logits = x * 2
    labels = torch.randint(0, 9, (4,))
    squares = (logits * logits).sum()  # mul saves logits for its own backward
    loss = token_logprobs(logits, labels, inplace_backward=True).sum() + squares
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_custom_ignore_index_and_all_ignored():
    logits, labels, upstream = _inputs((2, 9), 33, torch.float32, "cpu", ignore_index=-1)
    _check(logits, labels, upstream, ignore_index=-1)
    labels[:] = -1
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, labels, ignore_index=-1)
    logp.backward(upstream)
    assert torch.all(logp == 0) and torch.all(x.grad == 0)


def test_vocab_of_one_gives_zero_logprob_and_gradient():
    logits = torch.randn(5, 1, requires_grad=True)
    logp = token_logprobs(logits, torch.zeros(5, dtype=torch.long))
    logp.backward(torch.randn(5))
    assert torch.all(logp == 0) and torch.all(logits.grad == 0)


def test_shifted_view_is_read_without_copy_and_extreme_logits():
    full = torch.randn(2, 8, 300) * 30  # large range: exercises the online max rescaling
    full[0, 1, 5] = 1e4
    full[1, 2] = -float("inf")
    full[1, 2, 7] = 0.0
    labels = torch.randint(0, 300, (2, 7))
    labels[1, 1] = 7  # row (1, 1) of the view is row (1, 2) of full: one finite logit
    upstream = torch.randn(2, 7)
    expected_logp, expected_grad = reference_logprobs_and_grad(full[:, :-1], labels, upstream, -100)
    # the view itself goes to the op (_check's clone of a view that is not dense would be contiguous)
    leaf = full.clone().requires_grad_(True)
    view = leaf[:, :-1]  # not viewable as [14, 300]
    assert not view.is_contiguous()
    logp = token_logprobs(view, labels)
    torch.testing.assert_close(logp.double(), expected_logp, rtol=1e-5, atol=5e-5)
    logp.backward(upstream)
    torch.testing.assert_close(leaf.grad[:, :-1].double(), expected_grad, **tolerances(torch.float32))
    assert torch.all(leaf.grad[:, -1] == 0)


def test_gradcheck_float64():
    logits = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 5, -100], [2, -100, 1]])
    assert torch.autograd.gradcheck(lambda t: token_logprobs(t, labels), (logits,))


def test_double_backward_raises_instead_of_a_wrong_second_derivative():
    logits = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, 2])
    upstream = torch.randn(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(token_logprobs(logits, labels), logits, upstream, create_graph=True)
    # the plain-PyTorch backend is the way to second derivatives, and agrees with the first ones
    (first,) = torch.autograd.grad(token_logprobs(logits, labels, backend="reference"), logits, upstream,
                                   create_graph=True)
    torch.testing.assert_close(first, torch.autograd.grad(token_logprobs(logits, labels), logits, upstream)[0])
    assert torch.autograd.gradgradcheck(lambda t: token_logprobs(t, labels, backend="reference"), (logits,))


def test_fp64_kernel_matches_reference_tightly():
    _check(*_inputs((3, 4), 513, torch.float64, "cpu"))


def test_reference_backend_agrees():
    logits, labels, upstream = _inputs((3, 4), 99, torch.float32, "cpu")
    torch.testing.assert_close(token_logprobs(logits, labels, backend="reference"), token_logprobs(logits, labels))


def test_bad_inputs_raise_with_names():
    logits = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 10 is outside the vocabulary"):
        token_logprobs(logits, torch.tensor([0, 10, 2]))
    with pytest.raises(ValueError, match="labels must be logits.shape"):
        token_logprobs(logits, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        token_logprobs(logits, torch.zeros(3))


def test_labels_of_the_wrong_kind_or_device_are_refused_and_strided_labels_are_read():
    # bool labels would silently become 0/1 and labels on another device would reach the kernels (or the
    # fake kernels): both are refused by name. Labels that are a view (labels[:, 1:], as a causal LM's
    # shift makes them) are used as given, not refused by the kernels' contiguity check.
    # kills: the bool and the device checks dropped, labels passed on without .contiguous()
    logits = torch.randn(2, 6, 11)
    with pytest.raises(TypeError, match="integer"):
        token_logprobs(logits[:, 0], torch.tensor([True, False]))
    with pytest.raises(ValueError, match="labels are on meta but logits on cpu"):
        token_logprobs(logits, torch.zeros(2, 6, dtype=torch.long, device="meta"))
    ids = torch.randint(0, 11, (2, 7))
    ids[0, 3] = -100
    labels = ids[:, 1:]
    assert not labels.is_contiguous()
    _check(logits, labels, torch.randn(2, 6))


def test_bf16_gradient_ties_round_to_even():
    # A row whose only finite logit is at column j (probability exactly 1) and whose label has logit -inf
    # (probability 0) has the gradient -g at j and +g at the label: with g exactly halfway between two
    # bf16 values, the rounding mode decides the result. Ties must go to even, as in torch's own
    # fp32 -> bf16 conversion (the vector loops round bf16 by hand). kills: ties rounded away from zero
    V = 2 * 2048 + 37  # columns in the vectors' bodies and in a block's tail
    ties = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8) * 2**-3, 3 * (1 + 2**-8), -(1 + 5 * 2**-8) * 4]
    cols = [(0, 5), (17, 3000), (2047, 2048), (4096 + 35, 100), (4096 + 36, 4096 + 1)]
    logits = torch.full((len(cols), V), float("-inf"))
    labels = torch.empty(len(cols), dtype=torch.long)
    for r, (j, y) in enumerate(cols):
        logits[r, j] = 3.0
        labels[r] = y
    logits = logits.bfloat16()
    upstream = torch.tensor(ties)
    for inplace in (False, True):
        x = logits.clone().requires_grad_(True)
        work = x * 1 if inplace else x
        token_logprobs(work, labels, inplace_backward=inplace).backward(upstream)
        want = reference_logprobs_and_grad(logits, labels, upstream)[1].to(torch.bfloat16)
        assert torch.equal(x.grad, want), (inplace, (x.grad != want).nonzero().tolist())


def test_logits_whose_last_dimension_is_strided_are_copied_not_refused():
    # token_logprobs takes any logits; only the kernels need the vocabulary dimension contiguous, so logits
    # with a strided last dimension (a transpose, every other column) are made contiguous first.
    # kills: that copy dropped (the kernels then refuse them)
    base = torch.randn(11, 3, 4)
    logits = base.transpose(0, 2)  # [4, 3, 11], stride 12 on the vocabulary
    assert logits.stride(-1) != 1
    labels = torch.randint(0, 11, (4, 3))
    labels[2, 1] = -100
    assert logits.clone().stride(-1) != 1  # (_check's clone keeps the strides)
    _check(logits, labels, torch.randn(4, 3))


def test_more_leading_dimensions_than_the_kernels_index():
    # the kernels index at most 8 leading dimensions: more are flattened first, with the same result and
    # the same in-place backward. kills: the flattening at another bound, inplace_backward dropped there
    shape = (2, 1, 3, 1, 2, 1, 1, 1, 2)  # 9 leading dimensions, one more than the kernels index
    logits = torch.randn(*shape, 13)
    labels = torch.randint(0, 13, shape)
    labels.view(-1)[3] = -100
    assert token_logprobs(logits, labels).shape == shape
    x, work = _check(logits, labels, torch.randn(shape), inplace=True)
    torch.testing.assert_close(work.detach(), x.grad, rtol=0, atol=0)  # written into work's own buffer


def test_reference_backend_returns_fp32_for_low_precision_logits():
    # backend="reference" keeps the documented contract: fp32 log-probs from bf16/fp16 logits, computed in
    # fp32. kills: log_softmax in the logits' own dtype (bf16 log-probs, ~1e-2 off)
    for dtype in (torch.bfloat16, torch.float16):
        logits, labels, upstream = _inputs((3, 5), 301, dtype, "cpu")
        got = token_logprobs(logits, labels, backend="reference")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), reference_logprobs_and_grad(logits, labels, upstream)[0],
                                   rtol=1e-5, atol=5e-5)


def test_autograd_refuses_a_first_slice_of_the_vocabulary():
    # a slice that starts at column 0 but is not the whole row (vocab_size > V): its lse is the slice's,
    # and a gradient from it would be silently wrong. kills: only vocab_start checked
    logits = torch.randn(3, 10, requires_grad=True)
    with pytest.raises(RuntimeError, match="whole rows only"):
        ops().token_logprob_fwd(logits[:, :7], torch.tensor([2, 3, 4]), -100, False, 0, 10)
    ops().token_logprob_fwd(logits, torch.tensor([2, 3, 4]), -100, False, 0, 10)  # the whole row: fine


def _check_vocab_slices(dtype, device, vocab, cuts):
    """bwd_inplace over vocabulary slices [cuts[i], cuts[i+1]) equals the columns of the whole rows'
    float64 gradient, labels inside and outside each slice, ignored rows included."""
    logits, labels, upstream = _inputs((5, 3), vocab, dtype, device)
    labels[0, 0] = 0  # the first and last columns are someone's label
    labels[1, 0] = vocab - 1
    _, expected = reference_logprobs_and_grad(logits, labels, upstream)
    op = ops()
    _, lse = op.token_logprob_fwd(logits, labels, -100, False)
    grad = upstream.float() if dtype != torch.float64 else upstream.double()
    for a, b in zip(cuts[:-1], cuts[1:]):
        block = logits[..., a:b].clone()  # a contiguous slice, as fused_linear makes them
        op.token_logprob_bwd_inplace(grad, block, labels, lse, -100, a, vocab)
        torch.testing.assert_close(block.double(), expected[..., a:b], **tolerances(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_on_vocabulary_slices(dtype):
    _check_vocab_slices(dtype, "cpu", 2049 + 64, [0, 1, 700, 2048, 2049 + 63, 2049 + 64])


def _check_forward_slices(dtype, device, vocab, cuts):
    """A slice's lse is its own columns' log-sum-exp; logp is the label's logit minus it where the
    label is in the slice, 0 elsewhere (and on ignored rows)."""
    logits, labels, _ = _inputs((4, 3), vocab, dtype, device)
    labels[0, 0], labels[1, 0] = 0, vocab - 1
    op = ops()
    for a, b in zip(cuts[:-1], cuts[1:]):
        logp, lse = op.token_logprob_fwd(logits[..., a:b].contiguous(), labels, -100, False, a, vocab)
        x = logits[..., a:b].double()
        inside = (labels >= a) & (labels < b)
        expected_lse = torch.logsumexp(x, -1) * (labels != -100)
        expected = (x.gather(-1, (labels - a).clamp(0, b - a - 1).unsqueeze(-1)).squeeze(-1) - expected_lse) * inside
        torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(logp.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_on_vocabulary_slices(dtype):
    _check_forward_slices(dtype, "cpu", 2049 + 64, [0, 1, 700, 2049, 2049 + 64])


def test_autograd_refuses_a_vocabulary_slice():
    logits = torch.randn(3, 10, requires_grad=True)
    with pytest.raises(RuntimeError, match="whole rows only"):
        ops().token_logprob_fwd(logits[:, 2:7], torch.tensor([2, 3, 4]), -100, False, 2, 10)


def test_vocabulary_slice_bad_bounds_and_labels_raise():
    logits, labels, upstream = _inputs((4,), 10, torch.float32, "cpu", ignore_fraction=0.0)
    op = ops()
    _, lse = op.token_logprob_fwd(logits, labels, -100, False)
    with pytest.raises(RuntimeError, match="vocab_start=8 do not fit a vocabulary of vocab_size=10"):
        op.token_logprob_bwd_inplace(upstream, logits[:, :5].clone(), labels, lse, -100, 8, 10)
    with pytest.raises(RuntimeError, match="vocab_start=-1"):
        op.token_logprob_bwd_inplace(upstream, logits[:, :5].clone(), labels, lse, -100, -1, 10)
    labels[2] = 10  # outside the whole vocabulary, not just outside the slice
    with pytest.raises(RuntimeError, match=r"labels\[2\] = 10 is outside the vocabulary"):
        op.token_logprob_bwd_inplace(upstream, logits[:, :5].clone(), labels, lse, -100, 5, 10)


def test_custom_op_registration_passes_opcheck():
    logits, labels, _ = _inputs((3, 4), 37, torch.float32, "cpu")
    logits.requires_grad_(True)
    op = ops()
    torch.library.opcheck(op.token_logprob_fwd, (logits, labels, -100, False))
    _, lse = op.token_logprob_fwd(logits.detach(), labels, -100, False)
    grad = torch.randn(3, 4)
    torch.library.opcheck(op.token_logprob_bwd, (grad, logits.detach(), labels, lse, -100))
    torch.library.opcheck(op.token_logprob_bwd_inplace, (grad, logits.detach().clone(), labels, lse, -100))
    torch.library.opcheck(op.token_logprob_bwd_inplace, (grad, logits.detach()[..., 5:20].clone(), labels, lse, -100,
                                                         5, 37))
    torch.library.opcheck(op.token_logprob_fwd, (logits.detach()[..., 5:20].contiguous(), labels, -100, False, 5, 37))
    torch.library.opcheck(op.token_logprob_bwd, (grad, logits.detach()[..., 5:20].contiguous(), labels, lse, -100, 5, 37))


def test_torch_compile_fullgraph_no_graph_break():
    logits, labels, upstream = _inputs((2, 5), 41, torch.float32, "cpu")

    def f(x, y, g):
        return (token_logprobs(x, y) * g).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    compiled(x1, labels, upstream).backward()
    f(x2, labels, upstream).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# ---- CUDA kernels (a GPU session runs these; CI has no GPU) -------------------------------------


def _poison_cuda_allocator(nbytes):
    # Fill, then free, a block of the size the op will allocate: the caching allocator hands the
    # same NaN-filled memory to the op, so any element it forgets to write stays NaN.
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    del junk


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("vocab", VOCABS + [32000, 128256 + 3])
def test_cuda_kernels_match_float64_reference(dtype, vocab):
    logits, labels, upstream = _inputs((3, 7), vocab, dtype, "cuda")
    _poison_cuda_allocator(logits.numel() * logits.element_size())
    _check(logits, labels, upstream)
    _check(logits, labels, upstream, inplace=True)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_misaligned_rows_and_shifted_views(dtype):
    full = (torch.randn(2, 9, 1001, device="cuda") * 3).to(dtype)
    view = full[:, :-1, 1:]  # rows start off any 16-byte boundary, leading dims not flattenable
    labels = torch.randint(0, 1000, (2, 8), device="cuda")
    labels[0, 3] = -100
    _check(view, labels, torch.randn(2, 8, device="cuda"))


@requires_cuda
def test_cuda_many_rows_large_vocab_bf16():
    logits, labels, upstream = _inputs((257,), 128256, torch.bfloat16, "cuda")
    _check(logits, labels, upstream)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_on_vocabulary_slices(dtype):
    _check_vocab_slices(dtype, "cuda", 5003, [0, 1, 1000, 4096, 5002, 5003])
    _check_forward_slices(dtype, "cuda", 5003, [0, 1, 1000, 4096, 5002, 5003])
