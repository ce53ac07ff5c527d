"""allo.select behaviour that mutation testing found unpinned by the other select tests (each test here
fails with a mutant of the shipped code that those tests let pass):

* row granularity ranks rows by the signed sum of their scores, and weight deltas by the sum of |a - b|;
* bf16 and fp16 scores together (no float32) compare by value (32-bit keys);
* scores and weights that are non-contiguous views are ranked by their values;
* masks streamed out in several waves (``select``'s emit path on the blocked Triton variant);
* +inf is refused by every Triton variant (the non-finite edge itself);
* the window pass counts a present key right above its window, and a window starting at key 0 counts -0.0;
* a np.float32 ratio counts as written; saved selections keep int64 indices beyond 2**31, partial reads
  (load_indices) return exactly the indices in range and check the model's shapes; summary shares.

Each compares with the sort-based reference (:mod:`allo.select.reference`) or an exact float64
computation, on fresh random inputs with many ties. Triton runs under the interpreter at small sizes."""

import pytest
import torch

from allo.select import Selection, select, select_top, weight_delta_scores
from allo.select.reference import reference_band_masks
from allo.select.topk import NonFiniteScoresError, band_masks
from allo_kernels import radix_blocked as RB
from conftest import device_for

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def small_tiles(monkeypatch):
    # tensors of a few hundred elements span several tiles under Triton's interpreter
    monkeypatch.setattr(RB, "TILE", 128)
    monkeypatch.setattr(RB, "BLOCK", 32)
    monkeypatch.setattr(RB, "hist_block", lambda bits: 64)


def _on_triton_device(scores: dict) -> dict:
    # Triton runs CUDA tensors on a GPU machine, CPU tensors only under the interpreter
    return {n: s.to(device_for("triton")) for n, s in scores.items()}


def _assert_same(got, ref, what=""):
    assert list(got) == list(ref), what
    for n in ref:
        assert got[n].dtype == torch.bool and got[n].shape == ref[n].shape, (what, n)
        assert torch.equal(got[n].cpu(), ref[n].cpu()), (what, n)


def _row_mask_ref(shapes_rows: dict, shapes: dict, ratio, ex):
    """Element masks from the reference ranking of the rows' (exact) scores."""
    ref = reference_band_masks(shapes_rows, ratio, ex)
    out = {}
    for n, shape in shapes.items():
        rows = ref[n]
        out[n] = rows.view(-1, *([1] * (len(shape) - 1))).expand(shape).contiguous() if len(shape) else rows.view(())
    return out


def _rows64(t: torch.Tensor) -> torch.Tensor:
    """Row sums in float64, handed to the reference as float32 (exact: the scores are small multiples of 0.5)."""
    t = t.double()
    s = t.reshape(1) if t.dim() == 0 else t.reshape(t.shape[0], t[0].numel() if t.shape[0] else 0).sum(1)
    assert torch.equal(s.float().double(), s)
    return s.float()


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_scores_are_signed_sums(dtype):
    # signed scores (multiples of 0.5: every row sum is exact in float32 and float64, and many rows tie):
    # a row is ranked by the sum of its scores, not of their magnitudes nor by its largest score
    shapes = {"w": (23, 5), "b": (17,), "t": (7, 3, 2), "s": (), "e": (0, 4), "v": (31, 1)}
    scores = {n: (torch.randint(-4, 5, shape).float() * 0.5).to(dtype) for n, shape in shapes.items()}
    rows = {n: _rows64(s) for n, s in scores.items()}
    assert any(bool((s < 0).any()) for s in scores.values())
    for ratio, ex in ((0.3, 0.0), (0.5, 0.1), (0.8, 0.45)):
        ref = _row_mask_ref(rows, shapes, ratio, ex)
        _assert_same(select_top(scores, ratio, exclude_ratio=ex, granularity="row", backend="cpu"), ref, (ratio, ex))
        sel = select(scores, ratio, exclude_ratio=ex, granularity="row", backend="cpu")
        _assert_same(sel.masks, ref, ("select", ratio, ex))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_of_16bit_scores_are_ranked_by_their_float32_sums(dtype):
    # long rows of 16-bit scores in [1, 2): their sums need more bits than the scores' dtype has (a sum
    # rounded to bf16/fp16 ties or reorders rows that differ); each sum is exact in float32 and float64
    from allo.select import row_scores

    shapes = {"w": (41, 96), "t": (13, 4, 24), "b": (29,)}
    scores = {n: (1 + torch.rand(shape)).to(dtype) for n, shape in shapes.items()}
    rows = {n: _rows64(s) for n, s in scores.items()}
    got = row_scores(scores)
    for n in shapes:
        assert got[n].dtype == torch.float32 and torch.equal(got[n], rows[n]), n
    for ratio, ex in ((0.3, 0.0), (0.6, 0.25)):
        ref = _row_mask_ref(rows, shapes, ratio, ex)
        _assert_same(select_top(scores, ratio, exclude_ratio=ex, granularity="row", backend="cpu"), ref, (ratio, ex))


def test_row_scores_of_weight_deltas_are_sums_of_magnitudes():
    # a weight delta's row score is the sum of |a - b| over the row (computed lazily, chunk by chunk)
    shapes = {"w": (19, 6), "h": (11,), "x": (5, 2, 3)}
    dts = {"w": torch.float32, "h": torch.bfloat16, "x": torch.float16}
    a = {n: (torch.randint(-4, 5, shape).float() * 0.5).to(dts[n]) for n, shape in shapes.items()}
    b = {n: (torch.randint(-4, 5, shape).float() * 0.5).to(dts[n]) for n, shape in shapes.items()}
    rows = {n: _rows64((a[n].double() - b[n].double()).abs()) for n in shapes}
    for ratio, ex in ((0.25, 0.0), (0.6, 0.2)):
        ref = _row_mask_ref(rows, shapes, ratio, ex)
        got = select_top(weight_delta_scores(a, b), ratio, exclude_ratio=ex, granularity="row", backend="cpu")
        _assert_same(got, ref, (ratio, ex))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bf16_and_fp16_scores_together_compare_by_value(backend):
    # two 16-bit dtypes and no float32: their bit patterns order differently, so the keys must be 32-bit
    # (values that both dtypes hold exactly; many ties across the two dtypes, which go by tensor order)
    vals = lambda n: torch.randint(-6, 7, (n,)).float() * 0.25  # noqa: E731
    scores = {"b0": vals(37).bfloat16(), "h0": vals(41).half(), "b1": vals(29).reshape(29, 1).bfloat16(),
              "h1": vals(3).half()}
    f32 = {n: s.float() for n, s in scores.items()}  # exact: the values are multiples of 0.25
    for ratio, ex in ((0.1, 0.0), (0.37, 0.11), (0.5, 0.5), (0.9, 0.2)):
        _assert_same(select_top(scores, ratio, exclude_ratio=ex, backend=backend), reference_band_masks(f32, ratio, ex),
                     (ratio, ex))


def test_bf16_and_fp16_scores_together_triton(small_tiles):
    vals = lambda n: torch.randint(-6, 7, (n,)).float() * 0.25  # noqa: E731
    scores = {"b0": vals(150).bfloat16(), "h0": vals(61).half(), "b1": vals(7).bfloat16()}
    f32 = {n: s.float() for n, s in scores.items()}  # exact: the values are multiples of 0.25
    _assert_same(band_masks(_on_triton_device(scores), 0.37, 0.11, backend="triton", histogram="blocked"),
                 reference_band_masks(f32, 0.37, 0.11))


def test_masks_streamed_out_in_several_waves(small_tiles, monkeypatch):
    # select() streams the masks out one wave of tensors at a time (few masks exist at once): thresholds cut
    # through ties in tensors of later waves, whose tie limits must be their own
    from allo.select import topk

    monkeypatch.setattr(topk, "_WRITE_WAVE", 40)
    sizes = (13, 1, 57, 0, 40, 33, 71, 2, 29)
    scores = {f"p{i}": torch.randint(0, 5, (n,)).float() * 0.5 for i, n in enumerate(sizes)}
    for ratio, ex in ((0.77, 0.35),):
        ref = reference_band_masks(scores, ratio, ex)
        got = {}
        band_masks(_on_triton_device(scores), ratio, ex, backend="triton", histogram="blocked",
                   emit=lambda n, m: got.__setitem__(n, m))
        _assert_same(got, ref, (ratio, ex))


@pytest.mark.parametrize("variant", ["blocked-radix", "atomic", "blocked"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_positive_infinity_is_refused_by_every_variant(variant, dtype, small_tiles):
    # +inf is the largest score and has the smallest non-finite key: the edge of the check itself
    x = (torch.rand(150) + 0.5).to(dtype)
    x[97] = float("inf")
    scores = {"ok": torch.ones(20, dtype=dtype), "bad": x}
    with pytest.raises(NonFiniteScoresError, match=r"scores\['bad'\].*flat index 97"):
        band_masks(_on_triton_device(scores), 0.3, backend="triton", histogram=variant)


def test_partial_reads_of_a_saved_selection(tmp_path):
    scores = {"a": torch.randint(0, 4, (9, 7)).float(), "b": torch.randint(0, 3, (40,)).float(),
              "c": torch.rand(3, 2)}
    sel = select(scores, 0.45, exclude_ratio=0.05, backend="cpu")
    path = str(tmp_path / "sel.safetensors")
    sel.save(path)
    assert Selection.load_counts(path) == {n: int(i.numel()) for n, i in sel.indices.items()}
    # ranges that start and stop exactly on selected indices, between them, empty and whole
    for n, idx in sel.indices.items():
        total = scores[n].numel()
        cuts = sorted({0, total, *idx[:3].tolist(), *(idx[-2:] + 1).tolist(), total // 2})
        for start in cuts:
            for stop in cuts:
                if start <= stop:
                    got = Selection.load_indices(path, {n: (start, stop)})[n]
                    want = idx[(idx >= start) & (idx < stop)]
                    assert got.dtype == torch.int64 and torch.equal(got, want), (n, start, stop)
    # a range that is reversed, or reaches outside the tensor, is an error (not an empty or clipped read)
    for bad in ((5, 3), (-1, 4), (0, 41)):
        with pytest.raises(ValueError, match=r"range \[-?\d+, \d+\) of 'b' is not inside its 40 elements"):
            Selection.load_indices(path, {"b": bad})
    # a model whose shapes differ is refused by every reader
    model = {"a": torch.zeros(9, 7), "b": torch.zeros(41), "c": torch.zeros(3, 2)}
    for read in (lambda: Selection.load(path, model=model), lambda: Selection.load_counts(path, model=model),
                 lambda: Selection.load_indices(path, {"a": (0, 63)}, model=model)):
        with pytest.raises(ValueError, match=r"'b' has shape \(41,\) in the model but \(40,\)"):
            read()


def test_indices_beyond_int32_survive_a_round_trip(tmp_path):
    # a tensor of 2**31 elements or more keeps int64 indices on disk (int32 would wrap them negative);
    # the Selection holds indices only, so no mask of that size is made
    big = 2**31 + 7
    sel = Selection({"huge": torch.tensor([0, 5, 2**31 - 1, 2**31, big - 1]), "small": torch.tensor([1, 2])},
                    {"huge": (big,), "small": (3,)}, {"ratio": 0.5})
    path = str(tmp_path / "sel.safetensors")
    sel.save(path)
    back = Selection.load(path)
    for n in sel.names:
        assert back.indices[n].dtype == torch.int64 and torch.equal(back.indices[n], sel.indices[n]), n
    part = Selection.load_indices(path, {"huge": (2**31 - 1, big)})["huge"]
    assert part.tolist() == [2**31 - 1, 2**31, big - 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_scores_and_weights(dtype):
    # transposed and strided views are ranked by their values in their own (row-major) order: the kernels
    # read raw memory, so the scores must be made contiguous first
    base = (torch.randint(-4, 5, (13, 9)).float() * 0.5).to(dtype)
    other = (torch.randint(-4, 5, (20,)).float() * 0.5).to(dtype)
    scores = {"t": base.t(), "s": other[::3], "c": base[:, 2]}
    assert not any(s.is_contiguous() for s in scores.values())
    dense = {n: s.contiguous() for n, s in scores.items()}
    for ratio, ex in ((0.3, 0.0), (0.6, 0.25)):
        ref = reference_band_masks(dense, ratio, ex)
        _assert_same(select_top(scores, ratio, exclude_ratio=ex, backend="cpu"), ref, (ratio, ex))
        _assert_same(select(scores, ratio, exclude_ratio=ex, backend="cpu").masks, ref, ("select", ratio, ex))
    # weight deltas of views (a state dict may hold a transposed or sliced tensor)
    a = {"w": base.t(), "v": other[1::2]}
    b = {"w": (torch.randint(-4, 5, (9, 13)).float() * 0.5).to(dtype), "v": torch.zeros(10, dtype=dtype)}
    diffs = {n: (a[n].float() - b[n].float()).abs() for n in a}
    for ratio in (0.2, 0.7):
        _assert_same(select_top(weight_delta_scores(a, b), ratio, backend="cpu"), reference_band_masks(diffs, ratio),
                     ratio)


def test_numpy_float32_ratio_counts_as_written():
    # np.float32(0.35) is 0.3499999940395355 in binary; the ratio meant is 0.35: 3.5 of 10 elements, so 4
    import numpy as np

    scores = {"a": torch.randint(0, 3, (4,)).float(), "b": torch.rand(6)}
    got = select_top(scores, np.float32(0.35), exclude_ratio=np.float32(0.05), backend="cpu")
    assert sum(int(m.sum()) for m in got.values()) == 4 - 1  # 0.05 of 10 is 0.5: 1 element excluded
    _assert_same(got, reference_band_masks(scores, 0.35, 0.05))
    sel = select(scores, np.float32(0.35), backend="cpu")
    assert sel.metadata["ratio"] == 0.35 and sel.num_selected() == 4


@pytest.mark.parametrize("finish_on_device,bits", [(False, 5), (True, 2)])
def test_window_that_ends_just_below_present_keys(finish_on_device, bits, small_tiles, monkeypatch):
    # the window pass counts the keys above each window: here the key right after the window's last bin
    # is present (and the k-th key is the window's last bin), so the count above must include it
    from allo.select import sampling, topk
    from allo_kernels.radix_select import keys_torch

    monkeypatch.setattr(topk, "FINISH_ON_DEVICE", finish_on_device)
    step = 2.0 ** -7  # one bf16 key apart near 1.0
    scores = {f"t{i}": (1.0 + torch.randint(0, 9, (n,)) * step).bfloat16() for i, n in enumerate((301, 0, 77, 1, 190))}
    keys = torch.cat([keys_torch(s.reshape(-1)).long() for s in scores.values()]).sort(descending=True).values
    tried = []

    def windows(ops, sources, ks, n, *, key32, edge, reduce=None):
        lows = [int(keys[k - 1]) - (1 << bits) + 1 for k in ks]  # [low, low + 2**bits) ends at the k-th key
        tried.append([int(keys[k - 1]) + 1 in keys.tolist() for k in ks])
        return 0, lows, bits

    monkeypatch.setattr(sampling, "windows", windows)
    for ratio, ex in ((0.3, 0.0), (0.6, 0.2)):
        _assert_same(band_masks(_on_triton_device(scores), ratio, ex, backend="triton", histogram="blocked"),
                     reference_band_masks(scores, ratio, ex), (ratio, ex))
    assert len(tried) == 2 and all(all(t) for t in tried)  # the key above each window is present


def test_summary_shares():
    # per group: selected, elements, the share of the group selected, and the group's share of the selection
    sel = Selection({"m.0.a.weight": torch.tensor([0, 1, 2]), "m.0.a.bias": torch.tensor([1]),
                     "m.1.a.weight": torch.zeros(0, dtype=torch.int64), "e": torch.zeros(0, dtype=torch.int64)},
                    {"m.0.a.weight": (4, 2), "m.0.a.bias": (4,), "m.1.a.weight": (4, 2), "e": (0,)})

    def rows(by):
        return {r.split()[0]: r.split()[1:] for r in sel.summary(by=by).splitlines()[2:]}

    assert rows("param") == {"m.0.a.weight": ["3", "8", "37.500%", "75.00%"],
                             "m.0.a.bias": ["1", "4", "25.000%", "25.00%"],
                             "m.1.a.weight": ["0", "8", "0.000%", "0.00%"], "e": ["0", "0", "-", "0.00%"],
                             "TOTAL": ["4", "20", "20.000%", "100.00%"]}
    assert rows("module") == {"m.0.a": ["4", "12", "33.333%", "100.00%"], "m.1.a": ["0", "8", "0.000%", "0.00%"],
                              "e": ["0", "0", "-", "0.00%"], "TOTAL": ["4", "20", "20.000%", "100.00%"]}
    assert rows("kind")["m.*.a"] == ["4", "20", "20.000%", "100.00%"]


@pytest.mark.parametrize("finish_on_device,dtype", [(False, torch.float16), (True, torch.bfloat16)])
def test_window_starting_at_zero_counts_negative_zero(finish_on_device, dtype, small_tiles, monkeypatch):
    # a window whose low end is key 0 is not above zero: -0.0 (raw bits 0x8000) has key 0 like +0.0, so the
    # window pass and the write pass must compare keys there, not raw bits
    from allo.select import sampling, topk

    monkeypatch.setattr(topk, "FINISH_ON_DEVICE", finish_on_device)
    scores = {}
    for i, n in enumerate((300, 1, 95)):
        v = torch.rand(n) + 0.5
        kind = torch.randint(0, 5, (n,))
        v = torch.where(kind == 0, v, torch.where(kind < 3, torch.tensor(0.0), torch.tensor(-0.0)))
        scores[f"t{i}"] = v.to(dtype)
    assert any(bool((torch.signbit(s) & (s == 0)).any()) for s in scores.values())
    taken = []

    def windows(ops, sources, ks, n, *, key32, edge, reduce=None):
        taken.append(ks)
        return 0, [0] * len(ks), 2

    monkeypatch.setattr(sampling, "windows", windows)
    for ratio, ex in ((0.5, 0.0), (0.7, 0.45)):  # ~20% of the scores are above zero: both boundaries on zeros
        _assert_same(band_masks(_on_triton_device(scores), ratio, ex, backend="triton", histogram="blocked"),
                     reference_band_masks(scores, ratio, ex), (ratio, ex))
    assert len(taken) == 2


@pytest.mark.parametrize("finish_on_device", [False, True])
def test_window_right_below_a_boundary_that_ends_a_tie_group(finish_on_device, small_tiles, monkeypatch):
    # the top k ends exactly after the last element equal to key K, and the window is [K - 4, K): every
    # element of the top k is above the window, which therefore misses the boundary (the search starts over)
    from allo.select import sampling, topk
    from allo_kernels.radix_select import keys_torch

    monkeypatch.setattr(topk, "FINISH_ON_DEVICE", finish_on_device)
    step = 2.0 ** -7
    scores = {f"t{i}": (1.0 + torch.randint(0, 9, (n,)) * step).bfloat16() for i, n in enumerate((250, 3, 120))}
    keys = torch.cat([keys_torch(s.reshape(-1)).long() for s in scores.values()])
    n = keys.numel()
    distinct = keys.unique(sorted=True).tolist()
    k_hi = int((keys >= distinct[-3]).sum())  # the top k_hi are exactly the keys >= the third largest
    k_ex = int((keys >= distinct[-1]).sum())
    asked = []

    def windows(ops, sources, ks, n_, *, key32, edge, reduce=None):
        by_k = {k_hi: distinct[-3], k_ex: distinct[-1]}
        asked.append(list(ks))
        return 0, [by_k[k] - 4 for k in ks], 2

    monkeypatch.setattr(sampling, "windows", windows)
    for ratio, ex in ((k_hi / n, 0.0), (k_hi / n, k_ex / n)):
        _assert_same(band_masks(_on_triton_device(scores), ratio, ex, backend="triton", histogram="blocked"),
                     reference_band_masks(scores, ratio, ex), (ratio, ex))
    assert asked == [[k_hi], [k_hi, k_ex]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backend_with_several_threads_matches_reference(dtype, monkeypatch):
    """The C backend shares blocks of 2**20 elements among threads from 2**24 elements per thread on: the
    other tests never get there. Forced from 1 element per thread, with 2 threads: tensors of several
    blocks and of a few elements, few distinct scores (the threshold cuts a multi-block tensor's ties),
    and an exclusion band."""
    from allo.select import radix_cpu

    monkeypatch.setattr(radix_cpu, "_MIN_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(7)
        sizes = [(1 << 20) * 2 + 3, 5, (1 << 20) + 1, 17]
        scores = {f"t{i}": (torch.randint(0, 9, (n,), generator=gen).float() / 4).to(dtype)
                  for i, n in enumerate(sizes)}
        for ratio, ex in ((0.3, 0.0), (0.55, 0.2)):
            got = select_top(scores, ratio, exclude_ratio=ex, backend="cpu")
            _assert_same(got, reference_band_masks(scores, ratio, ex), (dtype, ratio, ex))
    finally:
        torch.set_num_threads(threads)
