"""The Triton radix-selection kernels (under TRITON_INTERPRET=1 on CPU: small sizes) and the C path's
raw passes, against the plain-PyTorch key definition and the sort-based reference."""

import itertools
import os

import pytest
import torch
from conftest import requires_cuda

from allo.select import AbsDiff, radix_cpu, select_top, weight_delta_scores
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
        assert torch.equal(hist.cpu(), _ref_hist(scores, key32).cpu())
        if key32:
            for prefix in (0, 16256, -16257):  # zeros, [1, 2), (-2, -1]
                low = torch.zeros(BINS, dtype=torch.int64, device=device)
                IMPLS[impl].radix_histogram(list(scores.values()), low, key32=True, low_prefix=prefix)
                assert torch.equal(low.cpu(), _ref_hist(scores, True, prefix).cpu())


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


# ---- the blocked variant (allo_kernels.radix_blocked): block-local histograms, one launch per pass ----

from allo.select.topk import band_masks, histogram_variant  # noqa: E402
from allo_kernels import radix_blocked as RB  # noqa: E402


@pytest.fixture
def small_tiles(monkeypatch):
    # tiny tiles and steps: tensors of a few hundred elements span several tiles, tiles several steps
    monkeypatch.setattr(RB, "TILE", 128)
    monkeypatch.setattr(RB, "BLOCK", 32)
    monkeypatch.setattr(RB, "hist_block", lambda bits: 64)


def _hard_scores(dtype, device, n_tensors=6):
    """Many ties, +-0, subnormals, the dtype's extremes; 0- and 1-element tensors included."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny / 4, -info.tiny / 4, info.max, -info.max, info.max / 2,
                            info.smallest_normal, 3e-6, -3e-6], dtype=torch.float32).to(dtype)
    out = {}
    for i in range(n_tensors):
        n = (0, 1, 300, 41, 257, 130)[i % 6]
        v = (torch.randint(-5, 6, (n,)).float() * 0.5).to(dtype)
        if n > 20:
            v[torch.randperm(n)[:special.numel()]] = special
        out[f"t{i}"] = v.reshape(-1, 1) if n == 300 else v
    return {k: v.to(device) for k, v in out.items()}


def _check_band(scores, cases, **kw):
    cpu = {n: (AbsDiff(s.a.cpu(), s.b.cpu()) if hasattr(s, "a") else s.cpu()) for n, s in scores.items()}
    for ratio, ex in cases:
        ref = reference_band_masks(cpu, ratio, ex)
        got = band_masks(scores, ratio, ex, backend="triton", **kw)
        assert list(got) == list(ref)
        for n in ref:
            assert got[n].dtype == torch.bool and torch.equal(got[n].cpu(), ref[n]), (ratio, ex, n)
            # every mask its own contiguous storage: safetensors refuses masks that share one
            assert got[n].is_contiguous() and got[n].untyped_storage().nbytes() == got[n].numel(), n


CASES = ((0.1, 0.0), (0.5, 0.25), (1.0, 0.0), (0.37, 0.11), (0.0, 0.0), (0.6, 0.6))


@pytest.mark.parametrize("variant", ["blocked", "blocked-radix", "atomic"])
@pytest.mark.parametrize("dtype", DTYPES + ["mixed"])
def test_variants_match_reference(variant, dtype, device, small_tiles):
    if dtype == "mixed":  # 32-bit keys over fp32, bf16 and fp16 tensors (one launch per dtype group)
        scores = {f"{n}.{i}": s for i, d in enumerate(DTYPES) for n, s in _hard_scores(d, device, 3).items()}
    else:
        scores = _hard_scores(dtype, device)
    _check_band(scores, CASES, histogram=variant)


def test_blocked_many_small_tensors_and_counting_fallback(device, small_tiles, monkeypatch):
    scores = {f"w{i}": (torch.randint(0, 4, (int(torch.randint(0, 9, ())),)).float() * 0.25).bfloat16().to(device)
              for i in range(60)}
    _check_band(scores, ((0.3, 0.05), (0.9, 0.5)), histogram="blocked")
    # too many tensors for per-tensor histogram rows: the tie counts come from a counting pass
    monkeypatch.setattr(RB, "PER_TENSOR_BYTES", 0)
    _check_band(scores, ((0.3, 0.05), (0.9, 0.5)), histogram="blocked")


def test_blocked_weight_delta_and_rows(device, small_tiles, monkeypatch):
    a = {"w": torch.randn(37, 9, device=device), "v": torch.randn(300, device=device).bfloat16(),
         "h": torch.randn(4, 3, device=device).half(), "e": torch.zeros(0, device=device)}
    b = {"w": a["w"].clone(), "v": a["v"].clone(), "h": torch.randn(4, 3, device=device).half(),
         "e": torch.zeros(0, device=device)}
    b["w"][::3] += 0.25  # |a - b| computed in the kernel: ties at 0 and near 0.25
    b["v"][::2] = torch.randn(150, device=device).bfloat16()
    _check_band(weight_delta_scores(a, b), ((0.2, 0.0), (0.8, 0.1)), histogram="blocked")
    # row granularity through the public API, the variant picked by the environment variable
    monkeypatch.setenv("ALLO_SELECT_HISTOGRAM", "blocked")
    scores = {"w": torch.randint(0, 3, (40, 7), device=device).float(),
              "v": torch.randint(0, 3, (33,), device=device).half()}
    got = select_top(scores, 0.3, exclude_ratio=0.05, granularity="row", backend="triton")
    ref = select_top({n: s.cpu() for n, s in scores.items()}, 0.3, exclude_ratio=0.05, granularity="row",
                     backend="reference")
    for n in scores:
        assert torch.equal(got[n].cpu(), ref[n]), n


def test_variant_choice_and_nonfinite(device, monkeypatch, small_tiles):
    monkeypatch.setenv("ALLO_SELECT_HISTOGRAM", "sorted")
    with pytest.raises(ValueError, match="ALLO_SELECT_HISTOGRAM='sorted'"):
        select_top({"a": torch.ones(3, device=device)}, 0.5, backend="triton")
    monkeypatch.delenv("ALLO_SELECT_HISTOGRAM")
    assert histogram_variant() == "blocked" and histogram_variant("atomic") == "atomic"
    for dtype in DTYPES:
        x = torch.randn(200, device=device).to(dtype)
        x[123] = float("-inf") if dtype == torch.float16 else float("nan")
        with pytest.raises(ValueError, match=r"scores\['b'\].*flat index 123"):
            band_masks({"a": torch.ones(5, device=device), "b": x}, 0.1, backend="triton", histogram="blocked")


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_histogram_levels(dtype, device, small_tiles):
    scores = list(_hard_scores(dtype, device).values())
    for key32 in sorted({dtype == torch.float32, True}):
        keys = [keys_torch(s.reshape(-1).cpu(), key32).long() for s in scores]
        bits = RB.digits(key32)
        assert sum(bits) == (32 if key32 else 16)
        prefixes = [None]
        for level, b in enumerate(bits):
            shift = sum(bits[level + 1:])
            hist, per, bad = RB.histogram(scores, level, prefixes, key32=key32, edge=RB.nonfinite_edge(key32, dtype),
                                          per_tensor=True)
            for row, prefix in enumerate(prefixes):
                expect = []
                for k in keys:
                    if level == 0:
                        d = (k >> shift) + (1 << b) // 2
                    else:
                        d = (k[(k >> (shift + b)) == prefix] >> shift) & ((1 << b) - 1)
                    expect.append(torch.bincount(d, minlength=1 << b))
                assert torch.equal(per[:, row].cpu(), torch.stack(expect)), (key32, level, prefix)
                assert torch.equal(hist[row].cpu(), sum(expect))
            assert (bad is not None) == (level == 0) and (bad is None or int(bad) == 0)
            # next level: the prefixes of the two most frequent keys (two prefixes in one pass)
            allk = torch.cat(keys)
            top = allk.unique(return_counts=True)
            common = top[0][top[1].argsort(descending=True)[:2]]
            prefixes = sorted({int(c) >> sum(bits[level + 1:]) for c in common})


# ---- the sampled window pass (allo.select.sampling): the blocked variant's first pass ----

from allo.select import device_plan, sampling, topk  # noqa: E402
from allo_kernels import radix_window as RW  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES + ["diff"])
def test_blocked_sample_matches_reference(dtype, device, small_tiles):
    if dtype == "diff":
        a = [torch.randn(n, device=device).to(d) for n, d in ((300, torch.bfloat16), (5, torch.float32))]
        scores = [AbsDiff(x, torch.randn_like(x)) for x in a]
    else:
        scores = [s for s in _hard_scores(dtype, device).values()]
    key32 = dtype != torch.bfloat16 and dtype != torch.float16
    n = sum(s.numel() for s in scores)
    for seed in (0, 12345):
        hist = RW.sample(scores, key32=key32, seed=seed)
        ref, keys, weights = RW.sample_reference(scores, key32=key32, seed=seed)
        assert torch.equal(hist.cpu(), ref) and int(hist.sum()) == RW.SAMPLES * n, seed
        if key32:  # the low halves under two high halves of sampled keys (one of them the most common)
            highs = ((keys >> 16).mode().values.item(), (keys >> 16)[-1].item())
            low = RW.sample(scores, key32=True, seed=seed, highs=highs)
            ref_low, _, _ = RW.sample_reference(scores, key32=True, seed=seed, highs=highs)
            assert torch.equal(low.cpu(), ref_low) and int(low.sum()) > 0, highs
    with pytest.raises(ValueError, match="32-bit keys only"):
        RW.sample(scores, key32=False, highs=(0, 0))
    # the strata cover a tile: over many seeds every element of a small tile gets sampled
    x = torch.arange(40, device=device).float()
    seen = sum(RW.sample([x], key32=True, seed=s).cpu() for s in range(40))
    assert int((seen > 0).sum()) == 40


def _window_ref(keys, shift, low, bits):
    d = (keys >> shift) - low
    inside = (d >= 0) & (d < (1 << bits))
    return torch.bincount(d[inside], minlength=1 << bits), int((d >= (1 << bits)).sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_window_histogram(dtype, device, small_tiles, monkeypatch):
    scores = list(_hard_scores(dtype, device).values())
    key32 = dtype == torch.float32
    edge = RB.nonfinite_edge(key32, dtype)
    keys = [keys_torch(s.reshape(-1).cpu(), key32).long() for s in scores]
    one, neg, big = (int(keys_torch(torch.tensor([v]).to(dtype), key32)) for v in (1.0, -0.5, 1.5))
    # windows at shift 0 around the ties at 1.0 and at -0.5 (one pair crosses zero: the kernel's general path;
    # windows above zero take the raw-bits path), a coarse one, one-key windows; and windows of 2-8 bins,
    # which the kernel counts in registers (packed per-lane counters), through both paths and shifted
    for shift, lows, bits in ((0, [one - 3, neg - 30], 5), (0, [one - 3, big - 1], 5), (3, [(one >> 3) - 1], 6),
                              (0, [one, 0], 0), (0, [one, big], 0), (0, [one - 3, neg - 3], 3),
                              (0, [one - 1, big - 1], 2), (3, [(one >> 3) - 1], 3), (0, [one], 1)):
        hist, per, above, bad = RW.window_histogram(scores, shift, lows, bits, key32=key32, edge=edge,
                                                    per_tensor=True)
        assert int(bad) == 0
        for row, low in enumerate(lows):
            expect = [_window_ref(k, shift, low, bits) for k in keys]
            assert torch.equal(per[:, row].cpu(), torch.stack([h for h, _ in expect])), (shift, low, bits)
            assert torch.equal(hist[row].cpu(), sum(h for h, _ in expect))
            assert int(above[row]) == sum(a for _, a in expect)
            assert int(hist[row].sum()) > 0  # the cases are not empty windows
    # non-finite scores (counted per tile): +inf and -inf, in windows above zero and across it
    bad_scores = [scores[2].clone(), scores[3].clone()]
    bad_scores[0].view(-1)[7] = float("inf")
    bad_scores[1].view(-1)[9] = float("-inf")
    for lows in ([one], [0]):
        _, per, _, bad = RW.window_histogram(bad_scores, 0, lows, 5, key32=key32, edge=edge)
        assert int(bad) == 2 and per is None, lows
        _, _, _, bad = RW.window_histogram(bad_scores[1:], 0, lows, 0, key32=key32, edge=edge)
        assert int(bad) == 1, lows


def test_window_shift_and_digits():
    assert sampling.window_shift(100, 69, 5) == 0 and sampling.window_shift(100, 68, 5) == 1
    assert sampling.window_shift(-3, -40, 5) == 1  # arithmetic shifts of negative keys
    for lo, up, bits in ((-70000, 12345, 5), (5, 5, 6), (-1, 0, 5), (1 << 20, (1 << 30) - 7, 6)):
        s = sampling.window_shift(up, lo, bits)
        assert (up >> s) - (lo >> s) < (1 << bits) and (s == 0 or (up >> (s - 1)) - (lo >> (s - 1)) >= (1 << bits))
    assert topk._digits_of(0) == [] and topk._digits_of(6) == [(0, 6)]
    assert topk._digits_of(13) == [(8, 5), (4, 4), (0, 4)] and topk._digits_of(12) == [(6, 6), (0, 6)]


@pytest.fixture
def window_spy(monkeypatch):
    """Records each windowed plan's windows, its outcome, and the prefix passes that followed."""
    log = {"windows": [], "ok": [], "prefix": [], "device": []}
    windows, planned, prefix = sampling.windows, topk._plan_windowed, RB.prefix_histogram
    on_device = device_plan.band_masks_on_device

    def spy_device(*a, **k):
        out = on_device(*a, **k)
        log["device"].append(out is not None)  # False: not applicable, or the window missed
        return out

    def spy_windows(*a, **k):
        out = windows(*a, **k)
        log["windows"].append(out)
        return out

    def spy_plan(*a, **k):
        out = planned(*a, **k)
        log["ok"].append(out)
        return out

    def spy_prefix(*a, **k):
        log["prefix"].append(a[1:3])
        return prefix(*a, **k)

    monkeypatch.setattr(sampling, "windows", spy_windows)
    monkeypatch.setattr(topk, "_plan_windowed", spy_plan)
    monkeypatch.setattr(RB, "prefix_histogram", spy_prefix)
    monkeypatch.setattr(device_plan, "band_masks_on_device", spy_device)
    return log


def test_windowed_plan_paths(device, small_tiles, window_spy, monkeypatch):
    # float32: the window leaves low bits to prefix passes
    scores = {f"w{i}": torch.randn(n, device=device).abs() for i, n in enumerate((900, 7, 1100))}
    _check_band(scores, ((0.1, 0.0), (0.3, 0.02)), histogram="blocked")
    assert window_spy["ok"] == [True, True] and window_spy["windows"][0][0] > 0 and window_spy["prefix"]
    # bf16 with most scores equal: one-key windows, no histogram and no prefix pass
    for log in window_spy.values():
        log.clear()
    ties = {f"t{i}": torch.where(torch.rand(n, device=device) < 0.9, 1.0, torch.rand(n, device=device)).bfloat16()
            for i, n in enumerate((700, 1, 650))}
    _check_band(ties, ((0.5, 0.2),), histogram="blocked")
    # (finished on the device: no host-side windowed plan)
    assert window_spy["device"] == [True] and not window_spy["ok"] and window_spy["windows"][0][2] == 0
    assert not window_spy["prefix"]
    # bf16 with ~125 scores per key over 16 consecutive keys: the six-sigma window spans a few keys, so the
    # sample asks for a window of at most 8 single-key bins (counted in registers), and no prefix pass
    for log in window_spy.values():
        log.clear()
    steps = {f"s{i}": (1.0 + torch.randint(0, 16, (n,), device=device) / 128).bfloat16() for i, n in enumerate((990, 1010))}
    _check_band(steps, ((0.5, 0.0),), histogram="blocked")
    shift, _, bits = window_spy["windows"][0]
    assert window_spy["device"] == [True] and shift == 0 and 1 <= bits <= RW.REGISTER_BITS
    assert not window_spy["prefix"]
    # the same search with the thresholds read back between the passes
    for log in window_spy.values():
        log.clear()
    monkeypatch.setattr(topk, "FINISH_ON_DEVICE", False)
    _check_band(steps, ((0.5, 0.0), (0.4, 0.1)), histogram="blocked")
    assert window_spy["ok"] == [True, True] and not window_spy["device"]
    monkeypatch.setattr(topk, "FINISH_ON_DEVICE", True)
    # a window that misses the threshold: the search starts over from the top digit, still exact (the
    # device-finished search gives up first, its masks are overwritten)
    for log in window_spy.values():
        log.clear()
    monkeypatch.setattr(sampling, "Z", -40.0)  # windows far from the estimate
    _check_band(scores, ((0.1, 0.0), (0.5, 0.25)), histogram="blocked")
    _check_band(steps, ((0.5, 0.0), (0.4, 0.1)), histogram="blocked")
    assert window_spy["ok"] == [False] * 4 and window_spy["device"] == [False, False]


@pytest.mark.parametrize("variant", ["blocked", "blocked-radix"])
def test_masks_allocated_during_the_first_pass(variant, device, small_tiles, monkeypatch):
    # band_masks allocates the masks while the GPU runs the search's first pass, and writes into those
    events, made = [], []
    new_masks, write_band, window, reduced = topk._new_masks, RB.write_band, RW.window_histogram, topk._reduced

    def spy_new(srcs):
        events.append("alloc")
        made.extend(new_masks(srcs))
        return made[-len(srcs):]

    monkeypatch.setattr(topk, "_new_masks", spy_new)
    monkeypatch.setattr(RB, "write_band", lambda *a, **k: events.append("write") or write_band(*a, **k))
    monkeypatch.setattr(RW, "window_histogram", lambda *a, **k: events.append("window") or window(*a, **k))
    # _reduced reads a pass's histogram back (the search waits for the GPU there)
    monkeypatch.setattr(topk, "_reduced", lambda *a, **k: events.append("wait") or reduced(*a, **k))
    scores = _hard_scores(torch.bfloat16, device)
    _check_band(scores, ((0.3, 0.1),), histogram=variant)
    assert events.count("alloc") == 1 and events.index("alloc") < events.index("wait"), events
    if variant == "blocked":
        assert events.index("window") < events.index("alloc")
    got = band_masks(scores, 0.3, 0.1, backend="triton", histogram=variant)
    assert [m.data_ptr() for m in got.values()] == [m.data_ptr() for m in made[-len(got):]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_prefix_histogram_above_zero(dtype, device, small_tiles):
    # prefixes above zero: the kernel compares raw bits (negative scores, zeros and the masked tail read
    # as bits <= 0); one prefix at zero takes the key path
    scores = list(_hard_scores(dtype, device).values())
    key32 = dtype == torch.float32
    keys = [keys_torch(s.reshape(-1).cpu(), key32).long() for s in scores]
    one, big = (int(keys_torch(torch.tensor([v]).to(dtype), key32)) for v in (1.0, 1.5))
    for shift, bits in ((0, 5), (3, 4)):
        for prefixes in ([one >> (shift + bits), big >> (shift + bits)], [0, one >> (shift + bits)]):
            hist, per = RB.prefix_histogram(scores, shift, bits, prefixes, key32=key32, per_tensor=True)
            for row, prefix in enumerate(prefixes):
                expect = torch.stack([torch.bincount((k[(k >> (shift + bits)) == prefix] >> shift) & ((1 << bits) - 1),
                                                     minlength=1 << bits) for k in keys])
                assert torch.equal(per[:, row].cpu(), expect) and int(expect.sum()) > 0, (shift, prefixes)
                assert torch.equal(hist[row].cpu(), expect.sum(0))


def test_tile_layout_and_write_band_arguments(device):
    from allo_kernels.multi_tensor import tile_layout

    for numels in ([5, 0, 300, 1, 256, 0, 257], [0, 0], []):
        rows, first = tile_layout(numels, 128, device)
        counts = torch.tensor([(n + 127) // 128 for n in numels], dtype=torch.int64)
        expect = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
        assert rows.dtype == torch.int32 and rows.device.type == device.type and torch.equal(rows.cpu(), expect)
        assert first == (torch.cumsum(counts, 0) - counts).tolist()
    # masks of any shape are written through their addresses: they must be contiguous, of the right size
    scores = [torch.randn(6, 5, device=device), torch.randn(7, device=device)]
    args = (None, [0, 0], None, [0, 0], [False, False])
    with pytest.raises(ValueError, match=r"outs\[0\] has 30 elements \(contiguous: False\)"):
        RB.write_band(scores, [torch.empty(5, 6, dtype=torch.bool, device=device).t(),
                               torch.empty(7, dtype=torch.bool, device=device)], *args, key32=True)
    with pytest.raises(ValueError, match=r"outs\[1\] has 8 elements .* source of 7"):
        RB.write_band(scores, [torch.empty(6, 5, dtype=torch.bool, device=device),
                               torch.empty(8, dtype=torch.bool, device=device)], *args, key32=True)
    with pytest.raises(ValueError, match="1 outs for 2 sources"):
        RB.write_band(scores, [torch.empty(30, dtype=torch.bool, device=device)], *args, key32=True)


@requires_cuda
def test_blocked_write_masks_does_not_synchronize():
    # the write pass queues its kernels without waiting for the GPU: no pageable host->device copy
    # (which synchronizes the stream), no device->host read. Ties are cut, so the counting launch runs
    from allo.select.topk import key_domain, plan, write_masks

    scores = {f"w{i}": (torch.randint(0, 4, (int(n),)).float() * 0.25).bfloat16().cuda()
              for i, n in enumerate(torch.randint(1, 5000, (40,)))}
    key32, kdt = key_domain(scores)
    (hi, ex), _ = plan(scores, (0.3, 0.05), key32=key32, dtype=kdt, backend="triton", histogram="blocked")
    assert hi.partial and ex.partial
    ref = reference_band_masks({n: s.cpu() for n, s in scores.items()}, 0.3, 0.05)
    for attempt in range(2):  # the first call compiles the kernels
        RB._tables.clear()
        RB._tile_rows.clear()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if attempt else 0)
        try:
            got = write_masks(scores, hi, ex, key32=key32, backend="triton", histogram="blocked")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for n in scores:
            assert torch.equal(got[n].cpu(), ref[n]), n


@pytest.mark.parametrize("low", [0.0, 0.5])  # 0.5: both boundaries above zero, the kernel compares raw bits
@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_write_band_ranks_ties(dtype, low, device, small_tiles):
    scores = [s for s in _hard_scores(dtype, device).values()]
    key32 = dtype == torch.float32
    keys = [keys_torch(s.reshape(-1).cpu(), key32).long() for s in scores]
    # both thresholds on ties
    k_hi, k_ex = (int(keys_torch(torch.tensor([v]).to(dtype), key32)) for v in (low, 1.0))
    counts = [[int((k == key).sum()) for k in keys] for key in (k_hi, k_ex)]
    # tensor 2 (300 elements, ~3 tiles) cut by both boundaries, 4 cut by one, others all or nothing
    lim_hi = [RB.NO_LIMIT, 0, counts[0][2] - 5, 0, counts[0][4] // 2, RB.NO_LIMIT]
    lim_ex = [0, 0, 3, RB.NO_LIMIT, 0, 0]
    cut = [False, False, True, False, True, False]
    outs = [torch.full((s.numel(),), 7, dtype=torch.uint8, device=device) for s in scores]  # poison
    RB.write_band(scores, outs, k_hi, lim_hi, k_ex, lim_ex, cut, key32=key32)
    for i, (k, o) in enumerate(zip(keys, outs)):
        raw = o.cpu()
        assert ((raw == 0) | (raw == 1)).all(), "unwritten or malformed mask bytes"

        def taken(key, lim):
            rank = torch.cumsum((k == key).long(), 0) - 1
            return (k > key) | ((k == key) & (rank < lim))

        expect = taken(k_hi, lim_hi[i]) & ~taken(k_ex, lim_ex[i])
        assert torch.equal(raw.bool(), expect), i
    assert 0 < lim_hi[2] < counts[0][2] and 0 < lim_ex[2] < counts[1][2]  # the cut case is exercised


def _blocked_dist_worker(rank, out_dir):
    # test_select_dist's worker, with mixed-dtype scores and the blocked Triton variant in place of the C path
    import test_select_dist

    RB.TILE, RB.BLOCK, RB.hist_block = 128, 32, lambda bits: 64
    orig_scores = test_select_dist._scores
    test_select_dist._scores = lambda: {n: s.bfloat16() if i % 3 == 0 else s
                                        for i, (n, s) in enumerate(orig_scores().items())}
    test_select_dist.select_top = lambda local, ratio, exclude_ratio, backend: band_masks(
        local, ratio, exclude_ratio, backend="triton", histogram="blocked")
    # how often the sampled window (gathered over ranks) held the thresholds: the rest started over
    outcomes, planned = [], topk._plan_windowed
    topk._plan_windowed = lambda *a, **k: outcomes.append(planned(*a, **k)) or outcomes[-1]
    test_select_dist._worker(rank, out_dir)
    torch.save(outcomes, os.path.join(out_dir, f"windowed{rank}.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on CPU tensors runs the kernels in Triton's interpreter, "
                    "which is only on where no GPU is")
def test_blocked_under_torch_distributed(tmp_path):
    # histograms (and the non-finite count) all-reduced per pass, ties ordered across ranks
    import torch.multiprocessing as mp
    from test_select_dist import CASES, MODES, WORLD, _scores

    mp.start_processes(_blocked_dist_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    scores = {n: s.bfloat16() if i % 3 == 0 else s for i, (n, s) in enumerate(_scores().items())}
    for mode, (ratio, exclude) in itertools.product(MODES, CASES):
        ref = reference_band_masks(scores, ratio, exclude)
        for name in scores:
            # the tensor from the rank that holds it, or its dim-0 shards in rank order
            got = torch.cat([p[mode, ratio, exclude][name] for p in parts if name in p[mode, ratio, exclude]])
            assert torch.equal(got, ref[name]), (mode, ratio, exclude, name)
    windowed = [torch.load(tmp_path / f"windowed{r}.pt") for r in range(WORLD)]
    assert windowed[0] == windowed[1] and any(windowed[0])  # the ranks agree; windows were used
