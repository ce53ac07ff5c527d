"""Session-6 audit of allo.select: each test pins a defect found as a user would hit it (see the commit
messages); all on the CPU path, small sizes."""

import json
import warnings

import numpy as np
import pytest
import torch

from allo.select import GradientScoreAccumulator, Selection, band_count, select, select_top, weight_delta_scores
from allo.select.reference import reference_band_masks


# ---- counts: round half up of ratio * N as the ratio is written ----

@pytest.mark.parametrize("ratio,n,expect", [(0.29, 50, 15), (0.145, 100, 15), (0.7, 45, 32), (0.35, 90, 32),
                                            (0.15, 10, 2), (0.29, 100, 29), (0.05, 30, 2), (1 / 3, 3, 1)])
def test_band_count_rounds_decimal_halves_up(ratio, n, expect):
    # 0.29 * 50 is 14.5: "halves rounded up" promises 15; float arithmetic gave 14.499999999999998 -> 14
    assert band_count(ratio, n) == expect
    scores = {"a": torch.rand(n)}
    assert int(select_top(scores, ratio, backend="cpu")["a"].sum()) == expect


def test_numpy_ratios_are_fractions():
    # np.float32(0.3) is a fraction in [0, 1]; it was refused as "expected a fraction in [0, 1]"
    scores = {"a": torch.rand(10)}
    got = select_top(scores, np.float32(0.3), exclude_ratio=np.float32(0.1), backend="cpu")
    assert int(got["a"].sum()) == 2
    sel = select(scores, np.float32(0.3), backend="cpu")
    assert type(sel.metadata["ratio"]) is float  # stored as a number, not json's str() of a numpy scalar
    with pytest.raises(ValueError, match="fraction"):
        select_top(scores, torch.tensor(0.3))


# ---- row granularity: errors point at the element ----

def test_row_granularity_nonfinite_error_names_the_element():
    w = torch.ones(3, 4)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"scores\['w'\].*flat index 6"):  # row 1, column 2 of [3, 4]
        select_top({"b": torch.ones(3), "w": w}, 0.5, granularity="row", backend="cpu")


def test_row_granularity_overflowing_row_sum_is_named():
    # every score is finite; the float32 sum of a row is not
    w = torch.full((2, 4), 3e38)
    with pytest.raises(ValueError, match=r"row 0 of scores\['w'\].*overflows"):
        select_top({"w": w}, 0.5, granularity="row", backend="cpu")


# ---- GradientScoreAccumulator: each backward's gradient counts once ----

def _batch_grads(model, batches):
    grads = []
    for x in batches:
        model.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        grads.append(model.weight.grad.clone())
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("free_grads", [True, False])
@pytest.mark.parametrize("mode", ["accumulated", "sum_of_magnitudes"])
def test_accumulator_counts_each_backward_once(mode, free_grads):
    model = torch.nn.Linear(3, 2)
    batches = [torch.randn(4, 3) for _ in range(3)]
    grads = _batch_grads(model, batches)
    model(batches[0]).sum().backward()  # a stale gradient from before the accumulator: not a score
    acc = GradientScoreAccumulator(model, mode=mode, free_grads=free_grads)
    for x in batches:  # gradient accumulation: no zero_grad between the backward passes
        model(x).pow(2).sum().backward()
    got = acc.scores()["weight"]
    acc.remove()
    expect = sum(grads).abs() if mode == "accumulated" else sum(g.abs() for g in grads)
    torch.testing.assert_close(got, expect)
    assert acc.num_backward == 3
    assert (model.weight.grad is None) == free_grads


# ---- persisted selections: damaged files fail clearly, naming the file ----

def _saved(tmp_path):
    sel = select({"w": torch.rand(4, 5), "b": torch.rand(5)}, 0.3, backend="cpu")
    path = tmp_path / "sel.safetensors"
    sel.save(str(path))
    return path


@pytest.mark.parametrize("keep", [0, 5, 0.5])
def test_truncated_selection_file_is_a_clear_error(tmp_path, keep):
    path = _saved(tmp_path)
    raw = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[:int(len(raw) * keep) if isinstance(keep, float) else keep])
    for load in (Selection.load, Selection.load_counts):
        with pytest.raises(ValueError, match=r"bad\.safetensors.*(truncated|damaged)"):
            load(str(bad))


def _write(path, tensors, **meta):
    from safetensors.torch import save_file

    base = {"format": "allo.selection", "version": "1", "names": json.dumps(["w"]),
            "shapes": json.dumps({"w": [3, 3]}), "metadata": "{}"}
    base.update(meta)
    save_file(tensors, str(path), metadata={k: v for k, v in base.items() if v is not None})


_MALFORMED = {  # case -> what load says (each case's own check: the rest of its file is valid)
    "no names": "names/shapes/metadata fields are missing", "names without shapes": "names/shapes/metadata fields",
    "unsorted": "are not strictly increasing", "repeated": "are not strictly increasing",
    "float": r"are a F32 tensor of shape \[2\], not a 1-D int32/int64", "2-d": r"shape \[1, 2\], not a 1-D int32/int64",
    "other version": "has format version '2'", "no version": "has format version None",
}


@pytest.mark.parametrize("case", list(_MALFORMED))
def test_malformed_selection_file_is_a_clear_error(tmp_path, case):
    path = tmp_path / "m.safetensors"
    idx = {"unsorted": [4, 1], "repeated": [1, 1]}.get(case, [1, 4])
    t = torch.tensor(idx, dtype=torch.float32 if case == "float" else torch.int32)
    meta = {"no names": {"names": None}, "names without shapes": {"shapes": json.dumps({"v": [3, 3]})},
            "other version": {"version": "2"}, "no version": {"version": None}}.get(case, {})
    _write(path, {"indices/w": t.view(1, -1) if case == "2-d" else t}, **meta)
    with pytest.raises(ValueError, match=r"m\.safetensors.*" + _MALFORMED[case]):
        Selection.load(str(path))
    _write(path, {"indices/w": torch.tensor([1, 4], dtype=torch.int32)})  # the same file, well formed, loads
    assert Selection.load(str(path)).indices["w"].tolist() == [1, 4]


# ---- weight_delta_scores from state dicts of tied models; patterns that match nothing ----

class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


def test_state_dicts_of_tied_models_score_a_tensor_once(tmp_path):
    a, b = _Tied(), _Tied()
    with torch.no_grad():
        b.embed.weight.add_(torch.randn(6, 4))
    from_modules = weight_delta_scores(a, b)
    from_dicts = weight_delta_scores(a.state_dict(), b.state_dict())
    assert list(from_dicts) == list(from_modules) == ["embed.weight"]
    sel = select(from_dicts, 0.25, backend="cpu")
    assert sel.num_selected() == band_count(0.25, 24)
    sel.save(str(tmp_path / "s.safetensors"))
    Selection.load(str(tmp_path / "s.safetensors"), model=a)  # every selected name is a parameter of a
    untied = {"embed.weight": a.embed.weight.detach(), "head.weight": a.head.weight.detach().clone()}
    # tied on one side only: the two names are two tensors there, both are scored
    assert list(weight_delta_scores(untied, b.state_dict())) == ["embed.weight", "head.weight"]


def test_patterns_that_match_nothing_warn():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match=r"exclude pattern 'embeddings' matches no parameter"):
        weight_delta_scores(a, b, exclude="embeddings")
    with pytest.warns(UserWarning, match=r"include pattern 'nothing' matches no parameter"):
        assert list(weight_delta_scores(a, b, include=["weight", "nothing"])) == ["weight"]
    with pytest.warns(UserWarning, match=r"exclude pattern 'norm'"):
        GradientScoreAccumulator(a, exclude="norm").remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weight_delta_scores(a, b, include="weight|bias", exclude="bias")


def test_non_tensor_state_dict_entry_is_named():
    with pytest.raises(TypeError, match=r"'w'.*float"):
        weight_delta_scores({"w": 1.0}, {"w": 2.0})


def test_reference_agrees_on_counted_halves():
    scores = {"a": torch.randint(0, 3, (30,)).float(), "b": torch.rand(20)}
    got = select_top(scores, 0.29, exclude_ratio=0.07, backend="cpu")  # 14.5 and 3.5 elements: 15 - 4
    ref = reference_band_masks(scores, 0.29, 0.07)
    assert all(torch.equal(got[n], ref[n]) for n in scores)
    assert sum(int(m.sum()) for m in got.values()) == 11


def test_plot_leaves_the_users_matplotlib_backend_alone(tmp_path):
    # plot() called matplotlib.use("Agg"): a notebook's backend switched under the user
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt, torch\n"
            "from allo.select import select\n"
            "select({'layers.0.w': torch.rand(4, 4), 'layers.1.w': torch.rand(3)}, 0.3, backend='cpu')"
            f".plot({str(tmp_path / 's.png')!r})\n"
            "print(matplotlib.get_backend(), len(plt.get_fignums()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["svg", "0"]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
