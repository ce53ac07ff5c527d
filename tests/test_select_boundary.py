"""The single-program steps of the device-finished selection (:mod:`allo_kernels.radix_boundary`)
against their plain-PyTorch references, under TRITON_INTERPRET=1 on CPU (natively on a GPU)."""

import pytest
import torch

from allo_kernels import radix_boundary as RBd
from allo_kernels.radix_boundary import SAMPLE_BINS


@pytest.fixture
def poisoned_outputs(monkeypatch):
    # every element the kernels return must be written by them
    empty = torch.empty

    def poisoned(*a, **k):
        return empty(*a, **k).fill_(-7)

    monkeypatch.setattr(RBd.torch, "empty", poisoned)


def _histogram(kind, gen):
    hist = torch.zeros(SAMPLE_BINS, dtype=torch.int64)
    if kind == "dense":  # every key sampled, weights as a tile's count (full tiles and short ones)
        hist += torch.randint(0, 3, (SAMPLE_BINS,), generator=gen) * torch.randint(1, 2049, (SAMPLE_BINS,), generator=gen)
    else:  # a few clusters of keys, as |scores| of one sign give
        for centre in (16200, 16337, 40000):
            idx = centre + torch.randint(-40, 40, (500,), generator=gen)
            hist.index_add_(0, idx, torch.randint(1, 2049, (500,), generator=gen))
    return hist


@pytest.mark.parametrize("kind", ["dense", "clustered"])
@pytest.mark.parametrize("bits", [0, 2, 3])
def test_lows_from_sample_matches_reference(kind, bits, device, poisoned_outputs):
    gen = torch.Generator().manual_seed(bits)
    hist = _histogram(kind, gen)
    samples = 16
    total = int(hist.sum()) // samples
    for ks in ([1], [total], [total // 10], [total // 10, total // 100], [total // 3, 1], [7, 7]):
        got = RBd.lows_from_sample(hist.to(device), ks, samples, bits)
        want = RBd.lows_from_sample_reference(hist, ks, samples, bits)
        assert got.dtype == torch.int64 and got.shape == (len(ks),)
        assert torch.equal(got.cpu(), want), (ks, got, want)
    # targets met exactly by a bin's weight at or above it (the largest such bin is the estimate)
    hist = (hist // samples) * samples
    excl = hist.cumsum(0) - hist
    total = int(hist.sum())
    nonzero = hist.nonzero().view(-1)
    exact = [(total - int(excl[b])) // samples for b in nonzero[[1, len(nonzero) // 2, -1]]]
    for ks in ([exact[0]], [exact[1], exact[2]]):
        got = RBd.lows_from_sample(hist.to(device), ks, samples, bits)
        assert torch.equal(got.cpu(), RBd.lows_from_sample_reference(hist, ks, samples, bits)), ks
    with pytest.raises(ValueError, match="expected 1 or 2"):
        RBd.lows_from_sample(hist.to(device)[:100], [5], samples, bits)


def _tiles(ntiles, bits, gen):
    bins = 1 << bits
    cols = 2 * (bins + 1) + 1
    t = torch.randint(0, 40, (ntiles, cols), generator=gen, dtype=torch.int32)
    t[:, -1] = (torch.rand(ntiles, generator=gen) < 0.01).int()  # the non-finite flag column
    t[:, bins] += 1  # keys above each window, so that a k above it exists
    t[:, 2 * bins + 1] += 1
    return t


def _k_in_window(tiles, bits, window, where):
    """A k whose boundary falls inside the window (``where`` 0..1 along it), or just outside (above the
    window's top: ``where`` -1; below its bottom: 2)."""
    bins = 1 << bits
    counts = tiles.sum(0, dtype=torch.int64)
    base = window * (bins + 1)
    above, inside = int(counts[base + bins]), int(counts[base:base + bins].sum())
    if where == -1:
        return max(1, above)  # k <= above: the k-th largest key is above the window
    if where == 2:
        return above + inside + 1
    return above + 1 + int(where * (inside - 1))


CASES = [([0], [(0, 0.5)]), ([0], [(0, 0.0)]), ([0], [(0, 1.0)]), ([0, 1], [(0, 0.7), (1, 0.2)]),
         ([1, 0], [(1, 0.3), (0, 0.9)]), ([0, 0], [(0, 0.4), (0, 0.8)]), ([0], [(0, -1)]), ([0], [(0, 2)]),
         ([0, 1], [(0, 0.5), (1, 2)])]


@pytest.mark.parametrize("bits", [0, 2, 3, 5])
@pytest.mark.parametrize("ntiles", [1, 7, 2100])
@pytest.mark.parametrize("lows_on_device", [False, True])
def test_boundaries_match_reference(bits, ntiles, lows_on_device, device, poisoned_outputs):
    gen = torch.Generator().manual_seed(ntiles + bits)
    tiles = _tiles(ntiles, bits, gen)
    for windows, spec in CASES:
        ks = [_k_in_window(tiles, bits, w, where) for w, where in spec]
        inside = all(0 <= where <= 1 for _, where in spec)
        for lows, check_positive in (([16300, 16290], False), ([16300, -5], True), ([-3, 9], False)):
            lows = lows[:len(ks)]
            arg = torch.tensor(lows, dtype=torch.int64, device=device) if lows_on_device else lows
            got = RBd.boundaries(tiles.to(device), bits, ks, windows, arg, check_positive=check_positive)
            want = RBd.boundaries_reference(tiles, bits, ks, windows, lows, check_positive=check_positive)
            ok = inside and (not check_positive or min(lows) > 0)
            label = (windows, spec, lows, check_positive)
            assert got[2].cpu().tolist() == want[2].tolist() == [int(ok), int(tiles[:, -1].sum())], label
            if ok:  # otherwise the rest is meaningless
                assert torch.equal(got[0].cpu(), want[0]), label
                assert got[1].shape == (ntiles, 4) and torch.equal(got[1].cpu(), want[1]), label


def test_boundaries_bad_arguments(device):
    tiles = _tiles(5, 2, torch.Generator().manual_seed(0)).to(device)
    with pytest.raises(ValueError, match="expected int32"):
        RBd.boundaries(tiles, 3, [5], [0], [1])
    with pytest.raises(ValueError, match="expected 1 or 2"):
        RBd.boundaries(tiles, 2, [5, 6, 7], [0, 1, 0], [1, 2, 3])
    with pytest.raises(ValueError, match="windows 0 or 1"):
        RBd.boundaries(tiles, 2, [5], [2], [1])
