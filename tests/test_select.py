"""allo.select core semantics on the CPU path, against the sort-based reference and torch.topk/kthvalue."""

import math

import pytest
import torch

from allo.select import band_count, select_top, weight_delta_scores
from allo.select.reference import kthvalue_threshold, reference_band_masks, topk_threshold
from allo_kernels.radix_select import keys_torch, value_of_key

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tied_scores(dtype, n_tensors=25, max_len=60, signed=True):
    # few distinct values, so thresholds almost always cut through a group of equal scores
    out = {}
    for i in range(n_tensors):
        n = int(torch.randint(0, max_len, ()))
        v = torch.randint(-6 if signed else 0, 7, (n,)).to(torch.float32) * 0.25
        out[f"layer.{i}.w"] = v.to(dtype)
    return out


def _assert_same(a, b):
    assert list(a) == list(b)
    for n in a:
        assert a[n].dtype == torch.bool and a[n].shape == b[n].shape, n
        assert torch.equal(a[n], b[n]), f"mask of {n} differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio,exclude", [(0.1, 0.0), (0.05, 0.0), (0.5, 0.2), (0.3, 0.3), (1.0, 0.0), (0.0, 0.0),
                                           (1.0, 0.999), (0.77, 0.01)])
def test_ties_match_reference(dtype, ratio, exclude):
    scores = _tied_scores(dtype)
    got = select_top(scores, ratio, exclude_ratio=exclude, backend="cpu")
    _assert_same(got, reference_band_masks(scores, ratio, exclude))
    n = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in got.values()) == band_count(ratio, n) - band_count(exclude, n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_agrees_with_topk_and_kthvalue(dtype):
    scores = {f"p{i}": torch.randn(int(torch.randint(1, 3000, ())), 3).to(dtype) for i in range(7)}
    for ratio in (0.01, 0.1, 0.5, 0.999):
        masks = select_top(scores, ratio, backend="cpu")
        t = topk_threshold(scores, ratio)
        assert t == kthvalue_threshold(scores, ratio)
        sel = torch.cat([s[m].double() for s, m in zip(scores.values(), masks.values())])
        rest = torch.cat([s[~m].double() for s, m in zip(scores.values(), masks.values())])
        assert sel.min().item() == t
        assert rest.numel() == 0 or rest.max().item() <= t


@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_boundary_is_the_kth_largest_score(dtype):
    # plan's boundary is the k-th largest score itself (torch.topk's last value), with take = k - #(scores
    # above it) of its n_eq ties; not an equivalent cut "all of a higher key, 0 ties of the next key"
    from allo.select.topk import key_domain, plan, value_of_boundary

    scores = {**_tied_scores(dtype, n_tensors=9, max_len=80), "r": torch.randn(301).to(dtype)}
    allv = torch.cat([s.reshape(-1).double() for s in scores.values()])
    key32, kdt = key_domain(scores)
    for ratio, ex in ((0.1, 0.0), (0.37, 0.05), (0.5, 0.5), (0.9, 0.2), (1.0, 0.01)):
        bounds, n = plan(scores, (ratio, ex), key32=key32, dtype=kdt, backend="cpu")
        assert n == allv.numel()
        for bd, r in zip(bounds, (ratio, ex)):
            k = band_count(r, n)
            assert bd.k == k
            if k == 0:
                assert bd.key is None and value_of_boundary(bd, key32, kdt) is None
                continue
            thr = torch.topk(allv, k).values[-1].item()
            assert value_of_boundary(bd, key32, kdt) == thr == topk_threshold(scores, r), (ratio, ex, r)
            assert (bd.n_eq, bd.take) == (int((allv == thr).sum()), k - int((allv > thr).sum())), (ratio, ex, r)


def test_negative_zero_equals_positive_zero():
    # +0.0 first in tensor order, -0.0 later: a value comparison ties them, and ties go by tensor order
    scores = {"a": torch.tensor([0.0, 1.0, -0.0]), "b": torch.tensor([-0.0, 0.0, -1.0]), "c": torch.tensor([-0.0])}
    for ratio in (1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7):
        _assert_same(select_top(scores, ratio, backend="cpu"), reference_band_masks(scores, ratio))
    m = select_top(scores, 3 / 7, backend="cpu")  # 1.0, then the first two zeros in (tensor, index) order
    assert m["a"].tolist() == [True, True, True] and not m["b"].any() and not m["c"].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormals_and_extremes(dtype):
    info = torch.finfo(dtype)
    special = torch.tensor([info.tiny / 4, -info.tiny / 4, info.tiny, info.max, -info.max, info.max / 2, 0.0, -0.0,
                            info.tiny / 2, -info.tiny / 2, info.smallest_normal], dtype=torch.float32).to(dtype)
    scores = {"s": special, "r": torch.randn(100).to(dtype) * 1e-3, "x": special.flip(0)}
    for ratio in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9):
        _assert_same(select_top(scores, ratio, backend="cpu"), reference_band_masks(scores, ratio))


def test_keys_are_order_preserving():
    for dtype in DTYPES:
        x = torch.cat([torch.randn(2000) * 10 ** torch.randint(-40, 38, (2000,)).float(),
                       torch.tensor([0.0, -0.0, 1e-45, -1e-45])]).to(dtype)
        x = x[torch.isfinite(x)]
        k = keys_torch(x).long()
        xs = x.double()
        i, j = torch.randint(0, x.numel(), (2, 20000))
        assert torch.equal(k[i] < k[j], xs[i] < xs[j])
        assert torch.equal(k[i] == k[j], xs[i] == xs[j])
        for key in k[:50].tolist():
            v = value_of_key(key, dtype)
            assert keys_torch(torch.tensor([v], dtype=dtype)).item() == key


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_scores_name_the_tensor(bad, dtype):
    scores = {"ok": torch.rand(50).to(dtype), "model.layers.3.mlp.up_proj.weight": torch.rand(4, 5).to(dtype)}
    scores["model.layers.3.mlp.up_proj.weight"][2, 1] = bad
    with pytest.raises(ValueError, match=r"up_proj\.weight.*flat index 11"):
        select_top(scores, 0.1, backend="cpu")


def test_empty_and_single_element_tensors():
    scores = {"empty": torch.zeros(0), "one": torch.tensor([3.0]), "empty2d": torch.zeros(0, 4),
              "scalar": torch.tensor(2.0), "v": torch.tensor([1.0, 5.0])}
    for ratio in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        got = select_top(scores, ratio, backend="cpu")
        _assert_same(got, reference_band_masks(scores, ratio))
        assert got["empty2d"].shape == (0, 4) and got["scalar"].shape == ()
    all_empty = {"a": torch.zeros(0), "b": torch.zeros(0, 3)}
    got = select_top(all_empty, 0.5, backend="cpu")
    assert got["a"].shape == (0,) and got["b"].shape == (0, 3)


def test_thousands_of_small_tensors():
    scores = {f"t{i}": torch.randint(0, 50, (int(torch.randint(0, 9, ())),)).float() for i in range(3000)}
    for ratio, ex in ((0.1, 0.0), (0.4, 0.05)):
        _assert_same(select_top(scores, ratio, exclude_ratio=ex, backend="cpu"),
                     reference_band_masks(scores, ratio, ex))


def test_mixed_dtypes_compare_by_value():
    # 1.5 in bf16, fp16 and fp32 are the same score; 1 + 2**-20 (fp32 only) is above all of them
    scores = {"b": torch.tensor([1.5, 1.0], dtype=torch.bfloat16), "h": torch.tensor([1.5, 2.0], dtype=torch.float16),
              "f": torch.tensor([1.5, 1 + 2**-20], dtype=torch.float32)}
    for ratio in (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6):
        _assert_same(select_top(scores, ratio, backend="cpu"), reference_band_masks(scores, ratio))
    m = select_top(scores, 3 / 6, backend="cpu")
    assert m["h"].tolist() == [True, True] and m["b"].tolist() == [True, False] and not m["f"].any()


def test_large_random_fp32_exact_count():
    scores = {f"p{i}": torch.randn(int(torch.randint(1000, 200_000, ()))) for i in range(12)}
    n = sum(s.numel() for s in scores.values())
    got = select_top(scores, 0.07, exclude_ratio=0.01, backend="cpu")
    _assert_same(got, reference_band_masks(scores, 0.07, 0.01))
    assert sum(int(m.sum()) for m in got.values()) == band_count(0.07, n) - band_count(0.01, n)


def test_weight_delta_scores_lazy_matches_materialized():
    a = {"w": torch.randn(33, 17), "h": torch.randn(40).bfloat16(), "x": torch.randn(5, 5).half()}
    b = {"w": a["w"] + torch.randn(33, 17) * 1e-3, "h": torch.randn(40).bfloat16(), "x": a["x"].clone()}
    lazy = weight_delta_scores(a, b)
    dense = {n: (a[n].float() - b[n].float()).abs() for n in a}
    for ratio in (0.05, 0.3, 0.9):  # "x" is all ties at 0.0
        _assert_same(select_top(lazy, ratio, backend="cpu"), reference_band_masks(dense, ratio))



def test_weight_delta_scores_of_models_in_different_dtypes():
    # a bf16/fp16 fine-tune against its fp32 base (and every other pairing): each side is read in its own
    # dtype and the delta taken in float32
    a, b = {}, {}
    for i, (da, db) in enumerate((da, db) for da in DTYPES for db in DTYPES if da != db):
        n = 211 + 37 * i
        base = torch.randn(n)
        a[f"{i}.w"] = base.to(da)
        b[f"{i}.w"] = (base + torch.randn(n) * torch.rand(n) * 0.3).to(db)
    lazy = weight_delta_scores(a, b)
    dense = {n: (a[n].float() - b[n].float()).abs() for n in a}
    for ratio in (0.07, 0.5):
        _assert_same(select_top(lazy, ratio, backend="cpu"), reference_band_masks(dense, ratio))

def test_weight_delta_scores_modules_and_filters():
    m1, m2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)), \
        torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    s = weight_delta_scores(m1, m2, exclude=r"^1\.")
    assert list(s) == ["0.weight", "0.bias"]
    s = weight_delta_scores(m1, m2, include=r"weight$")
    assert list(s) == ["0.weight", "1.weight"]
    with pytest.raises(KeyError, match="only in the second"):
        weight_delta_scores({"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        weight_delta_scores({"a": torch.zeros(2)}, {"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="valid regular expression"):
        weight_delta_scores(m1, m2, include="(")


def test_row_granularity():
    scores = {"w": torch.rand(10, 6), "b": torch.rand(10), "s": torch.tensor(0.5), "e": torch.zeros(0, 3),
              "z": torch.zeros(4, 0), "t": torch.rand(3, 2, 2)}
    rows = {"w": scores["w"].sum(1), "b": scores["b"], "s": scores["s"].reshape(1), "e": torch.zeros(0),
            "z": torch.zeros(4), "t": scores["t"].reshape(3, -1).sum(1)}
    for ratio, ex in ((0.2, 0.0), (0.5, 0.1), (1.0, 0.0)):
        got = select_top(scores, ratio, exclude_ratio=ex, granularity="row", backend="cpu")
        ref_rows = reference_band_masks(rows, ratio, ex)
        for n, s in scores.items():
            assert got[n].shape == s.shape
            expect = ref_rows[n].view(-1, *([1] * (s.dim() - 1))).expand(s.shape) if s.dim() else ref_rows[n].view(())
            assert torch.equal(got[n], expect), n


def test_bad_arguments():
    s = {"a": torch.rand(5)}
    with pytest.raises(ValueError, match="exclude_ratio"):
        select_top(s, 0.1, exclude_ratio=0.2)
    with pytest.raises(ValueError, match=r"ratio=1.5"):
        select_top(s, 1.5)
    with pytest.raises(ValueError, match="granularity"):
        select_top(s, 0.1, granularity="column")
    with pytest.raises(TypeError, match="mapping"):
        select_top(torch.rand(5), 0.1)
    with pytest.raises(TypeError, match="int64"):
        select_top({"a": torch.arange(5)}, 0.1)
    with pytest.raises(ValueError, match="backend"):
        select_top(s, 0.1, backend="gpu")


def test_count_rule_rounds_half_up():
    assert band_count(0.05, 30) == 2 and band_count(0.25, 10) == 3 and band_count(0.29, 100) == 29
    assert band_count(0.0, 10**12) == 0 and band_count(1.0, 7) == 7
    assert band_count(0.1, 50_000_000) == 5_000_000 and math.isclose(band_count(1 / 3, 3), 1)


def _mask_properties(masks, like):
    return [(m.dtype, tuple(m.shape), m.is_contiguous(), m.device, m.requires_grad) for m in masks], \
        [(torch.bool, tuple(t.shape), True, t.device, False) for t in like]


@pytest.mark.parametrize("one_call", [True, False])
def test_new_masks_have_the_shapes_and_their_own_storage(monkeypatch, one_call):
    """The masks selection writes into: bool, contiguous, of each source's shape (an AbsDiff's too),
    each with its own storage (safetensors refuses shared ones), whichever way they are allocated."""
    from allo.ops import load_extension
    from allo.select import topk

    load_extension()  # the one-call path when allowed: allo._C.empty_masks
    monkeypatch.setattr(topk, "ALLOCATE_IN_ONE_CALL", one_call)
    w = torch.nn.Parameter(torch.randn(7, 5))  # a weight delta's first operand is a model's parameter
    like = [torch.randn(3, 4), torch.randn(6, 2).t(), torch.zeros(0, 3), torch.randn(()), w]
    srcs = like[:-1] + [topk.AbsDiff(w, w.detach() + 1)]
    masks = topk._new_masks(srcs)
    got, want = _mask_properties(masks, like)
    assert got == want
    ptrs = [m.untyped_storage().data_ptr() for m in masks if m.numel()]
    assert len(set(ptrs)) == len(ptrs)


def test_new_masks_never_compile_the_extension(monkeypatch):
    """Without a prebuilt allo._C, allocating masks uses torch.empty_like: selecting must not start a
    just-in-time build of the extension (it is only faster host work)."""
    import importlib

    from allo.ops import _extension
    from allo.select import topk

    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_prebuilt", None)
    real_import = importlib.import_module

    def no_prebuilt(name, *a, **k):
        if name == "allo._C":
            raise ModuleNotFoundError("No module named 'allo._C'", name="allo._C")
        return real_import(name, *a, **k)

    monkeypatch.setattr(_extension.importlib, "import_module", no_prebuilt)
    monkeypatch.setattr(_extension, "_jit_build", lambda: pytest.fail("a mask allocation started a build"))
    assert _extension.extension_if_ready() is None
    masks = topk._new_masks([torch.randn(4, 3)])
    assert masks[0].shape == (4, 3) and masks[0].dtype == torch.bool
