"""The Triton radix-selection kernels (under TRITON_INTERPRET=1 on CPU: small sizes) and the C path's
raw passes, against the plain-PyTorch key definition and the sort-based reference."""

import pytest
import torch

from allo.select import radix_cpu, select_top, weight_delta_scores
from allo.select.reference import reference_band_masks
from allo_kernels import radix_select
from allo_kernels.radix_select import BINS, keys_torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = {"triton": radix_select, "cpu": radix_cpu}


def _scores(dtype, device):
    special = torch.tensor([0.0, -0.0, 1e-40, 3e-6, -3e-6, 1e-7])  # zeros, subnormals of fp32/bf16 and fp16
    vals = torch.cat([torch.randint(-4, 5, (300,)).float() * 0.5, torch.randn(200), special])
    vals = vals[torch.randperm(vals.numel())].to(dtype)
    return {"a": vals[:137].reshape(-1, 1).to(device), "b": vals[137:138].to(device), "c": vals[138:138].to(device),
            "d": vals[138:].reshape(-1, 23).to(device)}


def _ref_hist(scores, key32, low_prefix=None):
    keys = torch.cat([keys_torch(s.reshape(-1), key32).long() for s in scores.values()])
    if low_prefix is None:
        bins = (keys >> 16) + 32768 if key32 else keys + 32768
    else:
        bins = keys[(keys >> 16) == low_prefix] & 0xFFFF
    return torch.bincount(bins, minlength=BINS)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_histogram_passes(impl, dtype, device):
    if impl == "cpu" and device.type != "cpu":
        pytest.skip("the C path runs on CPU tensors")
    scores = _scores(dtype, device)
    for key32 in sorted({dtype == torch.float32, True}):
        hist = torch.zeros(BINS, dtype=torch.int64, device=device)
        IMPLS[impl].radix_histogram(list(scores.values()), hist, key32=key32)
        assert torch.equal(hist.cpu(), _ref_hist(scores, key32))
        if key32:
            for prefix in (0, 16256, -16257):  # zeros, [1, 2), (-2, -1]
                low = torch.zeros(BINS, dtype=torch.int64, device=device)
                IMPLS[impl].radix_histogram(list(scores.values()), low, key32=True, low_prefix=prefix)
                assert torch.equal(low.cpu(), _ref_hist(scores, True, prefix))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_pass_writes_every_element(impl, dtype, device):
    if impl == "cpu" and device.type != "cpu":
        pytest.skip("the C path runs on CPU tensors")
    x = _scores(dtype, device)["d"].reshape(-1)
    keys = keys_torch(x.cpu()).long()
    k_hi, k_ex = int(keys.kthvalue(max(1, keys.numel() // 3)).values), int(keys.kthvalue(keys.numel() - 5).values)
    for hi, hi_t, ex, ex_t in ((k_hi, True, None, False), (k_hi, False, k_ex, True), (k_hi, True, k_ex, False),
                               (None, True, None, False)):
        out = torch.full((x.numel(),), 7, dtype=torch.uint8, device=device).view(torch.bool)  # poison
        IMPLS[impl].radix_write(x, out, hi, hi_t, ex, ex_t, key32=dtype == torch.float32)
        raw = out.view(torch.uint8).cpu()
        assert ((raw == 0) | (raw == 1)).all(), "unwritten or malformed mask bytes"
        expect = torch.zeros_like(keys, dtype=torch.bool) if hi is None else (keys >= hi if hi_t else keys > hi)
        if ex is not None:
            expect &= (keys < ex) if ex_t else (keys <= ex)
        assert torch.equal(raw.bool(), expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_select_matches_reference(dtype, device):
    scores = _scores(dtype, device)
    for ratio, ex in ((0.1, 0.0), (0.5, 0.25), (1.0, 0.0)):
        got = select_top(scores, ratio, exclude_ratio=ex, backend="triton")
        ref = reference_band_masks({n: s.cpu() for n, s in scores.items()}, ratio, ex)
        for n in scores:
            assert torch.equal(got[n].cpu(), ref[n]), n


def test_triton_lazy_weight_delta(device):
    a = {"w": torch.randn(9, 7, device=device), "v": torch.randn(6, device=device).bfloat16(),
         "h": torch.randn(4, 3, device=device).half()}
    b = {"w": torch.randn(9, 7, device=device), "v": a["v"].clone(), "h": torch.randn(4, 3, device=device).half()}
    lazy = weight_delta_scores(a, b)
    dense = {n: (a[n].float() - b[n].float()).abs().cpu() for n in a}
    for ratio in (0.2, 0.8):
        got = select_top(lazy, ratio, backend="triton")
        ref = reference_band_masks(dense, ratio)
        for n in a:
            assert torch.equal(got[n].cpu(), ref[n]), n


@pytest.mark.parametrize("impl", list(IMPLS))
def test_tie_counting_and_positions(impl, device):
    if impl == "cpu" and device.type != "cpu":
        pytest.skip("the C path runs on CPU tensors")
    for dtype in DTYPES:
        scores = _scores(dtype, device)
        for key32 in sorted({dtype == torch.float32, True}):
            for value in (0.0, 1.5, -2.0):
                key = int(keys_torch(torch.tensor([value], dtype=dtype), key32))
                counts = IMPLS[impl].count_equal(list(scores.values()), key, key32=key32)
                for c, s in zip(counts, scores.values()):
                    expect = (keys_torch(s.reshape(-1).cpu(), key32) == key).nonzero().view(-1)
                    assert c == expect.numel()
                    pos = IMPLS[impl].equal_positions(s, key, c, key32=key32)
                    assert torch.equal(pos.cpu(), expect)
