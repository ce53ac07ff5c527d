"""The blocked Triton search finished on the device (:mod:`allo.select.device_plan`), under
TRITON_INTERPRET=1 on CPU: its per-tile window counts and ranked write pass against plain-PyTorch
references, and its masks against the sort-based reference and the host-read search."""

import warnings

import pytest
import torch
from conftest import requires_cuda

from allo.select import device_plan, sampling, topk
from allo.select.reference import reference_band_masks
from allo.select.topk import NonFiniteScoresError, band_count, band_masks
from allo_kernels import radix_blocked as RB
from allo_kernels import radix_window as RW
from allo_kernels.radix_select import keys_torch

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def small_tiles(monkeypatch):
    # tensors of a few hundred elements span several tiles, tiles several steps
    monkeypatch.setattr(RB, "TILE", 128)
    monkeypatch.setattr(RB, "BLOCK", 32)
    monkeypatch.setattr(RB, "hist_block", lambda bits: 64)


def _clustered(dtype, device, signed=False):
    """Scores on a few neighbouring keys (long runs of ties, cut inside tiles and tensors); 0- and
    1-element tensors; ``signed``: zeros and negative scores too, so windows can start at or below zero."""
    out = {}
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # one key apart near 1.0
    for i, n in enumerate((300, 0, 41, 1, 257, 130)):
        v = 1.0 + torch.randint(0, 7, (n,)) * step
        if signed:
            v = v * torch.randint(-1, 2, (n,))
        out[f"t{i}"] = v.to(dtype).reshape(-1, 1).to(device) if n == 300 else v.to(dtype).to(device)
    return out


def _kth_keys(scores, ks):
    keys = torch.cat([keys_torch(s.reshape(-1).cpu()).long() for s in scores.values()]).sort(descending=True).values
    return [int(keys[k - 1]) for k in ks]


def _forced_windows(monkeypatch, scores, bits, offset, log):
    """The sample replaced by windows of ``2**bits`` single keys, each boundary's k-th key at ``offset``
    bins above the window's low end (clamped into the window); ``offset`` None: a window just below the
    key (a miss)."""
    def windows(ops, sources, ks, n, *, key32, edge, reduce=None):
        keys = _kth_keys(scores, ks)
        if offset is None:
            lows = [k + 1 for k in keys]
        else:
            lows = [k - min(offset, (1 << bits) - 1) for k in keys]
        log.append((0, lows, bits))
        return 0, lows, bits

    monkeypatch.setattr(sampling, "windows", windows)


def _device_masks(scores, ratio, ex, monkeypatch):
    """band_masks through the device-finished search, which must have been taken (not fallen back)."""
    taken = []
    finish = device_plan.band_masks_on_device

    def spy(*a, **k):
        out = finish(*a, **k)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(device_plan, "band_masks_on_device", spy)
    got = band_masks(scores, ratio, ex, backend="triton", histogram="blocked")
    monkeypatch.setattr(device_plan, "band_masks_on_device", finish)
    return got, taken


CASES = ((0.3, 0.0), (0.3, 0.1), (0.5, 0.49), (1.0, 0.0), (0.2, 0.2), (0.004, 0.0))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bits,offset", [(0, 0), (2, 1), (3, 7), (5, 17)])
@pytest.mark.parametrize("signed", [False, True])
def test_device_finish_matches_reference(dtype, bits, offset, signed, device, small_tiles, monkeypatch):
    scores = _clustered(dtype, device, signed)
    cpu = {n: s.cpu() for n, s in scores.items()}
    log = []
    _forced_windows(monkeypatch, scores, bits, offset, log)
    for ratio, ex in CASES:
        ref = reference_band_masks(cpu, ratio, ex)
        got, taken = _device_masks(scores, ratio, ex, monkeypatch)
        assert taken == [True], (ratio, ex)
        assert list(got) == list(ref)
        for name in ref:
            assert got[name].dtype == torch.bool and got[name].shape == ref[name].shape
            assert torch.equal(got[name].cpu(), ref[name]), (ratio, ex, name)
            assert got[name].untyped_storage().nbytes() == got[name].numel(), name  # own storage each
        n = sum(s.numel() for s in scores.values())
        assert sum(int(m.sum()) for m in got.values()) == band_count(ratio, n) - band_count(ex, n)
    # the windows that were tried hold the thresholds both above zero and (signed) at or below it
    assert any(min(lows) > 0 for _, lows, _ in log)
    if signed:
        assert any(min(lows) <= 0 for _, lows, _ in log)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("ex", [0.1, 0.0])
def test_device_finish_window_miss_falls_back(dtype, ex, device, small_tiles, monkeypatch):
    scores = _clustered(dtype, device)
    _forced_windows(monkeypatch, scores, 2, None, [])
    ref = reference_band_masks({n: s.cpu() for n, s in scores.items()}, 0.3, ex)
    got, taken = _device_masks(scores, 0.3, ex, monkeypatch)
    assert taken == [False]  # gave up; the general search (missing the same window) started over
    for name in ref:
        assert torch.equal(got[name].cpu(), ref[name]), name


def test_device_finish_when_it_applies(device, small_tiles, monkeypatch):
    bf16 = _clustered(torch.bfloat16, device)
    log = []
    _forced_windows(monkeypatch, bf16, 2, 1, log)
    assert _device_masks(bf16, 0.3, 0.0, monkeypatch)[1] == [True]
    # float32 scores, or bf16 mixed with fp16 (32-bit keys either way: prefix passes need the host): not
    # tried, the general search runs
    f32 = {n: s.float() for n, s in bf16.items()}
    assert _device_masks(f32, 0.3, 0.0, monkeypatch)[1] == []
    mixed = dict(bf16, extra=torch.ones(40, dtype=torch.float16, device=device))
    assert _device_masks(mixed, 0.3, 0.0, monkeypatch)[1] == []
    # a ratio whose count is 0 keeps nothing, without a pass
    got, taken = _device_masks(bf16, 1e-9, 0.0, monkeypatch)
    assert taken == [False]
    assert not any(bool(m.any()) for m in got.values())
    # off: the thresholds are read back between passes
    monkeypatch.setattr(topk, "FINISH_ON_DEVICE", False)
    assert _device_masks(bf16, 0.3, 0.0, monkeypatch)[1] == []


def test_device_finish_with_the_real_sample(device, small_tiles, monkeypatch):
    # no forced windows: on 6000 bf16 scores over 16 keys the sample's windows are single keys
    scores = {f"s{i}": (1.0 + torch.randint(0, 16, (n,), device=device) / 128).bfloat16()
              for i, n in enumerate((2990, 3010))}
    for ratio, ex in ((0.5, 0.0), (0.5, 0.45)):
        ref = reference_band_masks({n: s.cpu() for n, s in scores.items()}, ratio, ex)
        got, taken = _device_masks(scores, ratio, ex, monkeypatch)
        assert taken == [True], (ratio, ex)
        for name in ref:
            assert torch.equal(got[name].cpu(), ref[name]), (ratio, ex, name)


def test_device_finish_allocates_masks_while_the_window_pass_runs(device, small_tiles, monkeypatch):
    # queued in this order: window pass, then the masks' allocation (host work the GPU pass hides), then the write
    events = []
    window, new_masks, write = RW.window_tile_counts, topk._new_masks, RB.write_band_ranked
    monkeypatch.setattr(RW, "window_tile_counts", lambda *a, **k: events.append("window") or window(*a, **k))
    monkeypatch.setattr(topk, "_new_masks", lambda *a, **k: events.append("alloc") or new_masks(*a, **k))
    monkeypatch.setattr(RB, "write_band_ranked", lambda *a, **k: events.append("write") or write(*a, **k))
    scores = _clustered(torch.bfloat16, device)
    _forced_windows(monkeypatch, scores, 3, 2, [])
    _, taken = _device_masks(scores, 0.3, 0.1, monkeypatch)
    assert taken == [True] and events == ["window", "alloc", "write"], events


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_device_finish_nonfinite_names_the_tensor(value, device, small_tiles, monkeypatch):
    scores = _clustered(torch.bfloat16, device)
    scores["t4"].view(-1)[200] = value
    finite = {n: torch.nan_to_num(s, posinf=1.0, neginf=1.0, nan=1.0) for n, s in scores.items()}
    _forced_windows(monkeypatch, finite, 2, 1, [])  # windows around the thresholds of the finite scores
    with pytest.raises(NonFiniteScoresError, match="t4"):
        band_masks(scores, 0.3, 0.1, backend="triton", histogram="blocked")


@pytest.fixture
def speculate(monkeypatch):
    # windows from the sample on the device, as for a large model, at any size
    monkeypatch.setattr(device_plan, "SPECULATE_MIN_SCORES", 0)


def test_speculative_windows_match_reference(device, small_tiles, speculate, monkeypatch):
    scores = _clustered(torch.bfloat16, device)
    cpu = {n: s.cpu() for n, s in scores.items()}
    waits = []
    windows = sampling.windows
    monkeypatch.setattr(sampling, "windows", lambda *a, **k: waits.append(1) or windows(*a, **k))
    for ratio, ex in CASES:
        ref = reference_band_masks(cpu, ratio, ex)
        got, taken = _device_masks(scores, ratio, ex, monkeypatch)
        assert taken == [ratio * 1158 >= 0.5], (ratio, ex)  # (a count of 0 keeps nothing, without a pass)
        for name in ref:
            assert torch.equal(got[name].cpu(), ref[name]), (ratio, ex, name)
    assert not waits  # the host never read the sample
    # fp16 (keys 8x finer than bf16's: the estimate is too coarse for a window of 8) has the host size them
    got, taken = _device_masks(_clustered(torch.float16, device), 0.3, 0.0, monkeypatch)
    assert taken == [True] and waits == [1]
    assert device_plan.speculates(1 << 30, torch.bfloat16) and not device_plan.speculates(1 << 30, torch.float16)


@pytest.mark.parametrize("speculative", [False, True])
def test_device_finish_with_torch_glue(speculative, device, small_tiles, monkeypatch):
    # the steps between the passes as torch ops (radix_boundary.USE_KERNELS off: bench_select's comparison)
    # give the same masks
    from allo_kernels import radix_boundary

    monkeypatch.setattr(radix_boundary, "USE_KERNELS", False)
    scores = _clustered(torch.bfloat16, device)
    if speculative:
        monkeypatch.setattr(device_plan, "SPECULATE_MIN_SCORES", 0)
    else:
        _forced_windows(monkeypatch, scores, 2, 1, [])
    cpu = {n: s.cpu() for n, s in scores.items()}
    for ratio, ex in CASES:
        ref = reference_band_masks(cpu, ratio, ex)
        got, taken = _device_masks(scores, ratio, ex, monkeypatch)
        assert taken == [ratio * 1158 >= 0.5], (ratio, ex)
        for name in ref:
            assert torch.equal(got[name].cpu(), ref[name]), (ratio, ex, name)


@pytest.mark.parametrize("shift", [100, -100, "signed"])
def test_speculative_windows_that_miss_fall_back(shift, device, small_tiles, speculate, monkeypatch):
    # windows far off the thresholds, or (signed scores) not above zero: the general search, same masks
    scores = _clustered(torch.bfloat16, device, signed=shift == "signed")
    if shift != "signed":
        lows = sampling.speculative_lows
        monkeypatch.setattr(sampling, "speculative_lows", lambda *a, **k: lows(*a, **k) + shift)
    cpu = {n: s.cpu() for n, s in scores.items()}
    for ratio, ex in ((0.3, 0.1), (0.3, 0.0)) if shift != "signed" else ((0.9, 0.0), (0.99, 0.5)):
        ref = reference_band_masks(cpu, ratio, ex)
        got, taken = _device_masks(scores, ratio, ex, monkeypatch)
        assert taken == [False], (ratio, ex)
        for name in ref:
            assert torch.equal(got[name].cpu(), ref[name]), (ratio, ex, name)


def test_speculative_windows_nonfinite_names_the_tensor(device, small_tiles, speculate):
    scores = _clustered(torch.bfloat16, device)
    scores["t2"].view(-1)[3] = float("nan")
    with pytest.raises(NonFiniteScoresError, match="t2"):
        band_masks(scores, 0.3, 0.0, backend="triton", histogram="blocked")


def _tile_counts_ref(scores, lows, bits):
    """Per tile (TILE elements of one tensor, in source order): each window's bins and above-count,
    and the non-finite flag, as window_tile_counts lays them out."""
    rows = []
    for s in scores:
        keys = keys_torch(s.reshape(-1).cpu()).long()
        for start in range(0, keys.numel(), RB.TILE):
            k = keys[start:start + RB.TILE]
            row = []
            for low in (lows[0], lows[-1]):
                d = k - low
                inside = (d >= 0) & (d < (1 << bits))
                row += torch.bincount(d[inside], minlength=1 << bits).tolist() + [int((d >= (1 << bits)).sum())]
            f = s.reshape(-1)[start:start + RB.TILE].float().cpu()
            rows.append(row + [int(not bool(torch.isfinite(f).all()))])
    return torch.tensor(rows, dtype=torch.int32).view(-1, 2 * (1 << bits) + 3)


@pytest.mark.parametrize("dtype", HALF)
def test_window_tile_counts(dtype, device, small_tiles, monkeypatch):
    scores = list(_clustered(dtype, device, signed=True).values())
    one, neg = (int(keys_torch(torch.tensor([v]).to(dtype))) for v in (1.0, -1.0))
    scores[2].view(-1)[5] = float("inf")  # a non-finite flag in one tile
    edge = RB.nonfinite_edge(False, dtype)
    empty = torch.empty

    def poisoned(*a, **k):  # every column of the output must be written
        return empty(*a, **k).fill_(-7)

    monkeypatch.setattr(RW.torch, "empty", poisoned)
    for lows, bits in (([one], 0), ([one + 1, one + 3], 0), ([one - 1], 2), ([one, neg - 2], 3), ([neg - 5], 5),
                       ([one + 2, one - 30], 5)):
        got = RW.window_tile_counts(scores, lows, bits, key32=False, edge=edge)
        expect = _tile_counts_ref(scores, lows, bits)
        assert got.dtype == torch.int32 and got.shape == expect.shape, (lows, bits)
        assert torch.equal(got.cpu(), expect), (lows, bits)
        if min(lows) > 0:  # the lows as the device path passes them: an int64 tensor of 1 or 2 on the device
            got = RW.window_tile_counts(scores, torch.tensor(lows, device=device), bits, key32=False, edge=edge,
                                        positive=True)
            assert torch.equal(got.cpu(), expect), ("on the device", lows, bits)
    monkeypatch.setattr(RW.torch, "empty", empty)
    with pytest.raises(ValueError, match="launch groups"):
        RW.window_tile_counts(scores + [torch.ones(3, dtype=torch.float32, device=device)], [one], 0, key32=True,
                              edge=edge)


def _tie_ranks(keys, key_hi, key_ex):
    """Per tile, in source order: (rank of its first element equal to key_hi among all of them, their count
    in the tile, the same for key_ex)."""
    seen, rows = {key_hi: 0, key_ex: 0}, []
    for k in keys:
        for start in range(0, k.numel(), RB.TILE):
            t = k[start:start + RB.TILE]
            counts = {key: int((t == key).sum()) for key in seen}
            rows.append([seen[key_hi], counts[key_hi], seen[key_ex], counts[key_ex]])
            for key, c in counts.items():
                seen[key] += c
    return rows


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("signed", [False, True])
def test_write_band_ranked_against_reference(dtype, signed, device, small_tiles):
    # arbitrary boundaries and tie ranks (not from a search): the kernel's rule, element by element
    scores = list(_clustered(dtype, device, signed).values())
    keys = [keys_torch(s.reshape(-1).cpu()).long() for s in scores]
    flat = torch.cat(keys)
    distinct = flat.unique()
    for key_hi, key_ex in ((int(distinct[-4]), int(distinct[-2])), (int(distinct[-3]), int(distinct[-3])),
                           (int(distinct[0]), int(distinct[-1]))):
        n_hi, n_ex = int((flat == key_hi).sum()), int((flat == key_ex).sum())
        for take_hi, take_ex, has_ex in ((n_hi // 3, n_ex // 2, True), (0, 0, True), (n_hi, n_ex - 1, True),
                                        (n_hi // 2 + 1, 0, False)):
            tile_ties = torch.tensor(_tie_ranks(keys, key_hi, key_ex), dtype=torch.int64, device=device)
            bounds = torch.tensor([key_hi, take_hi, key_ex, take_ex], dtype=torch.int64, device=device)
            outs = [torch.full(s.shape, 7, dtype=torch.uint8, device=device) for s in scores]  # poisoned
            positive = key_hi > 0 and (key_ex > 0 or not has_ex)
            RB.write_band_ranked(scores, outs, bounds, tile_ties, has_hi=True, has_ex=has_ex, positive=positive,
                                 key32=False)
            ranks = {}
            for key in (key_hi, key_ex):
                eq = flat == key
                ranks[key] = torch.zeros_like(flat)
                ranks[key][eq] = torch.arange(int(eq.sum()))
            keep = (flat > key_hi) | ((flat == key_hi) & (ranks[key_hi] < take_hi))
            if has_ex:
                keep &= ~((flat > key_ex) | ((flat == key_ex) & (ranks[key_ex] < take_ex)))
            got = torch.cat([o.reshape(-1).cpu() for o in outs])
            assert torch.equal(got, keep.to(torch.uint8)), (key_hi, key_ex, take_hi, take_ex, has_ex)
    with pytest.raises(ValueError, match="expected \\("):
        RB.write_band_ranked(scores, outs, bounds, tile_ties[1:], has_hi=True, has_ex=True, positive=False,
                             key32=False)


@requires_cuda
@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("ex", [0.1, 0.0])  # a band, or one boundary
def test_device_finish_waits_once(speculative, ex, monkeypatch):
    # the final check is the only read back from the GPU after the sample's windows (read by the host,
    # one more wait), or (speculative: windows from the sample on the device) at all
    if speculative:
        monkeypatch.setattr(device_plan, "SPECULATE_MIN_SCORES", 0)
    scores = {f"w{i}": (1.0 + torch.randint(0, 16, (int(n),)) / 128).bfloat16().cuda()
              for i, n in enumerate(torch.randint(100_000, 400_000, (30,)))}
    # (an exclusion band the sample can window: a top 1% would get a window up to the largest key)
    ref = reference_band_masks({n: s.cpu() for n, s in scores.items()}, 0.3, ex)
    windows, marks = sampling.windows, []
    for attempt in range(2):  # the first call compiles the kernels
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")

            def spy(*a, **k):
                out = windows(*a, **k)
                marks.append(len(caught))
                return out

            monkeypatch.setattr(sampling, "windows", spy)
            torch.cuda.set_sync_debug_mode("warn" if attempt else 0)
            try:
                got, taken = _device_masks(scores, 0.3, ex, monkeypatch)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert taken == [True]
        for n in scores:
            assert torch.equal(got[n].cpu(), ref[n]), n
    assert bool(marks) != speculative
    after = [str(w.message) for w in caught[marks[-1] if marks else 0:] if "synchroniz" in str(w.message)]
    assert len(after) == 1, after
