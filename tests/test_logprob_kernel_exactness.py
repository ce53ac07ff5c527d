"""The C++ CPU log-prob kernels (csrc/logprob.cpp) pinned where tests/test_logprob.py leaves room.

Each test below was written against a mutant of the kernels that the earlier suite let through (or
only caught by chance): the label's logit read from row ``r * V`` instead of the row's own offset on
strided logits, the in-place gradient written at ``r * V`` instead of into the view, a label just past
a vocabulary slice read from outside it, the online sum not rescaled when the maximum grows, ignored
rows left unwritten, gradients rounded other than round-to-nearest-even. References are float64 on the
already-rounded logits; vocabularies are odd and span several of the kernels' 2048-element blocks."""

import pytest
import torch

from allo.ops import token_logprobs
from allo.ops.logprob import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
V = 2 * 2048 + 51  # three blocks, the last one short and not a multiple of the 16-float vectors


def reference(logits, labels, upstream, ignore_index=-100):
    """(logp, grad) in float64 from the logits as given (any strides), by autograd on log_softmax."""
    x = logits.detach().double().requires_grad_(True)
    keep = labels != ignore_index
    logp = torch.log_softmax(x, -1).gather(-1, labels.masked_fill(~keep, 0).unsqueeze(-1)).squeeze(-1) * keep
    (grad,) = torch.autograd.grad(logp, x, upstream.double())
    return logp.detach(), grad


TOL = {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=1e-6)}


def _inputs(gen, shape, vocab, dtype, ignored=()):
    logits = (torch.randn(*shape, vocab, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    for index in ignored:
        labels[index] = -100
    upstream = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) * 3  # non-uniform
    return logits, labels, upstream


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_logits_are_read_at_each_rows_own_offset(dtype):
    # tests/test_logprob.py's "shifted view" test clones its view first (clone() of a non-dense view is
    # contiguous), so the kernels never saw strided rows: a label logit read from row r * V passed
    gen = torch.Generator().manual_seed(1)
    full, labels, upstream = _inputs(gen, (3, 6), V, dtype, ignored=[(1, 2)])
    labels = labels[:, :5].contiguous()
    upstream = upstream[:, :5].contiguous()
    leaf = full.clone().requires_grad_(True)
    view = leaf[:, :-1]  # rows 6 * V apart across the first dimension, not 5 * V
    assert not view.is_contiguous() and view.stride(-1) == 1
    logp = token_logprobs(view, labels)
    want_logp, want_grad = reference(view, labels, upstream)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=5e-5)
    logp.backward(upstream)
    torch.testing.assert_close(leaf.grad[:, :-1].double(), want_grad, **TOL[dtype])
    assert torch.all(leaf.grad[:, -1] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_on_a_strided_view_writes_into_the_view_only(dtype):
    gen = torch.Generator().manual_seed(2)
    full, labels, upstream = _inputs(gen, (3, 5), V, dtype, ignored=[(0, 1), (2, 3)])
    labels, upstream = labels[:, :4].contiguous(), upstream[:, :4].contiguous()
    full[0, 1] = float("nan")  # an ignored row: not read, its gradient is 0 whatever it holds
    want_logp, want_grad = reference(full[:, :-1].nan_to_num(), labels, upstream)

    # through autograd: a view of a computed (non-leaf) tensor, as model(...).logits[:, :-1]
    leaf = full.clone().requires_grad_(True)
    base = leaf * 1
    logp = token_logprobs(base[:, :-1], labels, inplace_backward=True)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=5e-5)
    logp.backward(upstream)
    torch.testing.assert_close(leaf.grad[:, :-1].double(), want_grad, **TOL[dtype])
    assert torch.all(leaf.grad[:, -1] == 0) and torch.all(leaf.grad[:, :-1][labels == -100] == 0)

    # the op itself: the gradient replaces the view's rows, the rows outside the view are untouched
    op = ops()
    buf = full.clone()
    _, lse = op.token_logprob_fwd(buf[:, :-1], labels, -100, True)
    op.token_logprob_bwd_inplace(upstream.float(), buf[:, :-1], labels, lse, -100)
    assert torch.equal(buf[:, -1], full[:, -1])
    torch.testing.assert_close(buf[:, :-1].double(), want_grad, **TOL[dtype])
    assert torch.all(buf[:, :-1][labels == -100] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_label_just_outside_a_vocabulary_slice_counts_nowhere_in_it(dtype):
    # slice [a, b): a label equal to b (the next slice's first column) or a - 1 is outside it: forward's
    # logp is exactly 0 there, backward writes no onehot, and nothing is read or written past the row
    gen = torch.Generator().manual_seed(3)
    vocab, a, b = V, 700, 2049 + 700
    logits, _, upstream = _inputs(gen, (4,), vocab, dtype)
    labels = torch.tensor([b, a - 1, a, b - 1])
    part = logits[:, a:b].contiguous()
    op = ops()
    logp, lse = op.token_logprob_fwd(part, labels, -100, False, a, vocab)
    x = part.double()
    want_lse = torch.logsumexp(x, -1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-5)
    assert logp[0] == 0 and logp[1] == 0
    torch.testing.assert_close(logp[2:].double(), torch.stack([x[2, 0], x[3, -1]]) - want_lse[2:], rtol=1e-6, atol=1e-5)

    whole_lse = torch.logsumexp(logits.double(), -1).float()  # backward's softmax is the whole row's
    g = upstream.float()
    for inplace in (False, True):
        buf = torch.full((5, b - a), float("nan"), dtype=dtype)  # one row more: a stray write past row 3 shows
        rows = buf[:4].copy_(part)
        if inplace:
            op.token_logprob_bwd_inplace(g, rows, labels, whole_lse, -100, a, vocab)
            got = rows
        else:
            got = op.token_logprob_bwd(g, rows, labels, whole_lse, -100, a, vocab)
        want = -g.double()[:, None] * torch.exp(x - whole_lse.double()[:, None])
        want[2, 0] += g[2]
        want[3, -1] += g[3]
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
        assert torch.isnan(buf[4]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_sum_is_rescaled_each_time_the_maximum_grows(dtype):
    # rows whose maximum rises in every block (a ramp up, and a spike in the last, short block): the sum of
    # the earlier blocks, taken relative to their maximum, must be scaled down each time
    gen = torch.Generator().manual_seed(4)
    ramp = torch.linspace(-6.0, 6.0, V)
    logits = torch.stack([ramp, ramp * 0.5, ramp.flip(0), torch.randn(V, generator=gen)])
    logits[3, -3] = 9.0
    logits[1, 2048 + 17] = 7.5  # the second block's maximum, above the third block's
    logits = logits.to(dtype)
    labels = torch.tensor([0, 2048 + 17, V - 1, V - 3])
    upstream = torch.tensor([1.0, -0.5, 2.0, 0.25])
    want_logp, want_grad = reference(logits, labels, upstream)
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, labels)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-6, atol=2e-6)
    _, lse = ops().token_logprob_fwd(logits, labels, -100, False)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), -1), rtol=1e-6, atol=2e-6)
    logp.backward(upstream)
    torch.testing.assert_close(x.grad.double(), want_grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_ignored_rows_get_exactly_zero_gradient_over_a_poisoned_buffer(dtype, inplace):
    gen = torch.Generator().manual_seed(5)
    logits, labels, upstream = _inputs(gen, (6,), 2051, dtype, ignored=[1, 4])
    logits[4] = float("nan")
    _, lse = ops().token_logprob_fwd(logits, labels, -100, False)
    want_grad = reference(logits.nan_to_num(), labels, upstream)[1]
    if inplace:
        got = logits.clone()
        ops().token_logprob_bwd_inplace(upstream.float(), got, labels, lse, -100)
    else:
        for _ in range(3):  # leave freed NaN blocks of the gradient's size for the allocator to hand out
            torch.full_like(logits, float("nan"))
        got = ops().token_logprob_bwd(upstream.float(), logits, labels, lse, -100)
    assert torch.equal(got[[1, 4]], torch.zeros(2, 2051, dtype=dtype))
    torch.testing.assert_close(got.double(), want_grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_low_precision_gradients_are_the_float64_gradient_rounded_to_nearest(dtype, inplace):
    # the kernels compute in fp32 and round once: almost every element equals the float64 gradient rounded
    # to nearest-even (the rest are fp32's ~1e-7 relative error meeting a rounding boundary). Truncation,
    # or a detour through a coarser format (fp16 through bf16), leaves a large share off by an ulp
    gen = torch.Generator().manual_seed(6)
    logits, labels, upstream = _inputs(gen, (5,), 2053, dtype, ignored=[2])
    logits = (logits.float() * 0.25).to(dtype)  # a flatter softmax: most gradients are normal numbers
    want = reference(logits, labels, upstream)[1].to(dtype)
    x = logits.clone().requires_grad_(True)
    work = x * 1 if inplace else x
    token_logprobs(work, labels, inplace_backward=inplace).backward(upstream)
    same = (x.grad == want).double().mean().item()
    assert same >= 0.99, same
    torch.testing.assert_close(x.grad.double(), want.double(), rtol=torch.finfo(dtype).eps, atol=1e-30)


_VARIANT_CHECK = r"""
import sys, torch
import allo._C
from allo.ops import token_logprobs
sys.path.insert(0, sys.argv[1])
from test_logprob_kernel_exactness import TOL, _inputs, reference
print(allo._C.logprob_simd())
gen = torch.Generator().manual_seed(5)
for dtype in (torch.float32, torch.bfloat16):
    for vocab in (1, 3, 5, 8, 17, 2047, 2 * 2048 + 51):  # tails of every vector width, and block edges
        logits, labels, upstream = _inputs(gen, (4,), vocab, dtype, ignored=[2])
        if vocab >= 3:  # a masked logit, not the label's
            logits[0, (int(labels[0]) + 1) % vocab] = float("-inf")
        leaf = logits.clone().requires_grad_(True)
        logp = token_logprobs(leaf, labels)
        logp.backward(upstream)
        ref_logp, ref_grad = reference(logits, labels, upstream)
        torch.testing.assert_close(logp.double(), ref_logp, **TOL[dtype])
        torch.testing.assert_close(leaf.grad.double(), ref_grad, **TOL[dtype])
        assert leaf.grad[2].eq(0).all()
    nan_row = torch.randn(2, 2 * 2048 + 51).to(dtype)
    nan_row[0, 2048 + 7] = float("nan")
    out = token_logprobs(nan_row, torch.tensor([0, 1]))
    assert out[0].isnan() and out[1].isfinite()
"""


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.parametrize("variant", ["sse2", "avx2", "avx512"])
def test_every_vector_width_matches_the_float64_reference(variant):
    # the kernels' vector loops are compiled once per instruction set (16, 8 and 4 floats) and the first
    # call picks one: each width this CPU can run, forced in a fresh process, against float64
    import os
    import platform
    import subprocess
    import sys

    import allo._C

    if allo._C.logprob_simd() == "generic" or platform.machine() != "x86_64":
        pytest.skip("one generic variant in this build (not GCC on x86-64)")
    need = {"sse2": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f"}}[variant]
    env = {**os.environ, "ALLO_LOGPROB_SIMD": variant}
    tests = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", _VARIANT_CHECK, tests], env=env, capture_output=True, text=True,
                         timeout=300)
    if not need <= _cpu_flags():
        assert run.returncode != 0 and f"ALLO_LOGPROB_SIMD={variant}, but this CPU has no" in run.stderr
        pytest.skip(f"this CPU has no {variant}: refused by name, as checked")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[0] == variant


def test_an_unknown_vector_width_is_refused_by_name():
    import os
    import subprocess
    import sys

    import allo._C

    code = "import torch, allo._C; allo._C.logprob_simd()"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ALLO_LOGPROB_SIMD": "avx3"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "ALLO_LOGPROB_SIMD=avx3: expected" in run.stderr
    assert allo._C.logprob_simd() in ("avx512", "avx2", "sse2", "generic")
