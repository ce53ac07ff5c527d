"""Edges of the public selection API (allo.select): tied weights, what a Selection may hold and
write, how backward passes are counted, argument checks, and the files save/plot write."""

import os
import re
import stat

import pytest
import torch
import torch.utils.checkpoint as checkpoint

from allo.select import GradientScoreAccumulator, Selection, name_filter, select, select_top, weight_delta_scores
from allo.select.topk import NonFiniteScoresError


# ---- weight_delta_scores: tied weights listed once by a module, twice by a state dict ----

class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("order", ["module, state dict", "state dict, module"])
def test_tied_alias_only_in_the_state_dict_is_left_out(order):
    a, b = Tied(), Tied()
    pair = (a, b.state_dict()) if order == "module, state dict" else (a.state_dict(), b)
    scores = weight_delta_scores(*pair)
    assert list(scores) == ["emb.weight", "mid.weight", "mid.bias"]
    torch.testing.assert_close(scores["emb.weight"].materialize(), (a.emb.weight - b.emb.weight).abs())


def test_tied_alias_with_an_untied_tensor_on_the_other_side_is_compared():
    tied, untied = Tied().state_dict(), Tied().state_dict()
    untied["head.weight"] = torch.randn(10, 4)  # a tensor of its own: the two models differ there
    scores = weight_delta_scores(tied, untied)
    assert list(scores) == ["emb.weight", "mid.weight", "mid.bias", "head.weight"]
    torch.testing.assert_close(scores["head.weight"].materialize(), (tied["emb.weight"] - untied["head.weight"]).abs())
    # a module lists its tied tensor once: the other side's own head.weight has no counterpart
    with pytest.raises(KeyError, match=r"only in the second: \['head\.weight'\]"):
        weight_delta_scores(Tied(), untied)
    # nor is an alias dropped whose first name the other side lacks
    tied.pop("emb.weight")
    with pytest.raises(KeyError, match=r"only in the second: \['emb\.weight'\]"):
        weight_delta_scores(tied, Tied())


# ---- Selection: only contents that save writes and load reads back ----

def test_selection_names_and_index_tensors_are_checked_when_built():
    with pytest.raises(TypeError, match=r"Selection: indices name 0 is a int; .*str"):
        Selection({0: torch.tensor([1])}, {0: (4,)})
    with pytest.raises(TypeError, match=r"select: scores name 0 is a int"):
        select({0: torch.ones(3)}, 0.5)  # before the selection is made
    with pytest.raises(TypeError, match=r"indices\['w'\] is a torch\.float32 tensor .*1-D int64"):
        Selection({"w": torch.tensor([1.0])}, {"w": (4,)})
    with pytest.raises(TypeError, match=r"indices\['w'\] is a torch\.int64 tensor of shape \(1, 2\)"):
        Selection({"w": torch.tensor([[0, 1]])}, {"w": (4,)})
    with pytest.raises(TypeError, match=r"indices\['w'\] is a list"):
        Selection({"w": [0, 1]}, {"w": (4,)})
    with pytest.raises(ValueError, match=r"shapes\['w'\] is \(2, -1\); expected a tuple of non-negative ints"):
        Selection({"w": torch.tensor([0])}, {"w": (2, -1)})
    with pytest.raises(ValueError, match=r"indices\['w'\] holds 5 indices for a tensor of 4 elements"):
        Selection({"w": torch.tensor([0, 1, 2, 3, 3])}, {"w": (2, 2)})
    sel = Selection({"w": torch.tensor([0, 3], dtype=torch.int32)}, {"w": (2, 2)})
    assert sel.masks["w"].tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize("idx, problem", [([3, 1], "are not strictly increasing"), ([1, 1], "are not strictly "
                                          "increasing"), ([2, 7], "fall outside its 4 elements"),
                                          ([-1, 2], "fall outside its 4 elements")])
def test_save_refuses_indices_that_load_would_call_damaged(tmp_path, idx, problem):
    sel = Selection({"w": torch.tensor(idx)}, {"w": (2, 2)})
    path = tmp_path / "sel.safetensors"
    with pytest.raises(ValueError, match=rf"Selection\.save: the indices of 'w' {problem}; this Selection was "
                                         rf"built with bad indices.*{re.escape(str(path))} is not written"):
        sel.save(str(path))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("idx", [[7], [-1], [0, 4]])  # [0, 4]: one past the last of the 4 elements
def test_masks_of_out_of_range_indices_name_the_tensor(idx):
    sel = Selection({"w": torch.tensor(idx)}, {"w": (2, 2)})
    with pytest.raises(ValueError, match=r"Selection\.masks: the indices of 'w' fall outside its 4 elements"):
        sel.masks


def test_a_valid_selection_round_trips(tmp_path):
    sel = Selection({"w": torch.tensor([0, 2, 3])}, {"w": (2, 2)}, {"note": 1})
    sel.save(str(tmp_path / "s.safetensors"))
    back = Selection.load(str(tmp_path / "s.safetensors"))
    assert back.indices["w"].tolist() == [0, 2, 3] and back.metadata == {"note": 1}


# ---- the files save and plot write ----

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_selection_has_the_usual_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        select({"w": torch.rand(10)}, 0.5).save(str(tmp_path / "s.safetensors"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.safetensors").st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("write", ["save", "plot"])
def test_writing_into_a_missing_folder_names_the_target(tmp_path, write):
    sel = select({"layers.0.w": torch.rand(10)}, 0.5)
    path = tmp_path / "nodir" / ("s.safetensors" if write == "save" else "s.png")
    folder = re.escape(str(path.parent))
    with pytest.raises(FileNotFoundError, match=rf"Selection\.{write}: cannot write {re.escape(str(path))}: its "
                                                rf"folder {folder} does not exist; create it first"):
        getattr(sel, write)(str(path))
    assert os.listdir(tmp_path) == []


def test_plot_writes_the_format_its_suffix_names(tmp_path):
    sel = select({f"model.layers.{i}.mlp.weight": torch.rand(8) for i in range(3)}, 0.3)
    sel.plot(str(tmp_path / "p.pdf"))
    assert (tmp_path / "p.pdf").read_bytes()[:5] == b"%PDF-"
    for bad in ("p", "p.safetensors"):
        with pytest.raises(ValueError, match=rf"Selection\.plot: {re.escape(str(tmp_path / bad))} does not end in an "
                                             r"image format's suffix; give a path ending in \.png"):
            sel.plot(str(tmp_path / bad))
    assert os.listdir(tmp_path) == ["p.pdf"]


def test_per_layer_chart_has_integer_ticks(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    select({f"model.layers.{i}.mlp.weight": torch.rand(8) for i in range(3)}, 0.3).plot(str(tmp_path / "p.png"))
    ticks = figures[0].axes[1].get_xticks()  # the per-layer chart: layers 0, 1, 2
    assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks


# ---- GradientScoreAccumulator: each backward pass counts once, whichever parameters it reaches ----

def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_backward_through_only_the_last_layer_counts():
    model = _net()
    with GradientScoreAccumulator(model) as acc:
        for _ in range(3):
            model[2](torch.randn(2, 3)).sum().backward()
    assert acc.num_backward == 3


def test_conditional_paths_count_every_pass_once():
    # an MoE-like router: each pass reaches one of two experts (never both, sometimes not the first)
    experts = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])
    with GradientScoreAccumulator(experts) as acc:
        for route in (1, 1, 0, 1):
            experts[route](torch.randn(2, 3)).sum().backward()
        (experts[0](torch.randn(2, 3)) + experts[1](torch.randn(2, 3))).sum().backward()  # both: still one pass
        torch.ones(2, requires_grad=True).sum().backward()  # no tracked parameter reached: not counted
    assert acc.num_backward == 5


def test_a_reentrant_checkpointed_pass_counts_once():
    model = _net()
    with GradientScoreAccumulator(model, include=r"^0\.") as acc:  # only parameters inside the checkpoint
        for _ in range(2):
            hidden = checkpoint.checkpoint(model[0], torch.randn(2, 4, requires_grad=True), use_reentrant=True)
            model[2](torch.relu(hidden)).sum().backward()
    assert acc.num_backward == 2
    with GradientScoreAccumulator(model) as acc:  # inside the checkpoint and outside it
        hidden = checkpoint.checkpoint(model[0], torch.randn(2, 4, requires_grad=True), use_reentrant=True)
        model[2](torch.relu(hidden)).sum().backward()
    assert acc.num_backward == 1


class _SinkLinear(torch.autograd.Function):
    """x @ w.T whose weight gradient goes to a row sink (as fused_linear_token_logprobs does)."""

    @staticmethod
    def forward(ctx, x, w, sink):
        ctx.save_for_backward(x)
        ctx.sink = sink
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ctx.sink(0, g.t() @ x)
        return None, None, None


def test_a_pass_reaching_a_parameter_only_through_the_row_sink_counts():
    head = torch.nn.Linear(3, 5, bias=False)
    with GradientScoreAccumulator(head) as acc:
        for _ in range(2):
            _SinkLinear.apply(torch.randn(2, 3, requires_grad=True), head.weight,
                              acc.row_grad_sink(head.weight)).sum().backward()
    assert acc.num_backward == 2 and head.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.bool, "float32"])
def test_accumulator_dtype_must_be_a_score_dtype(dtype):
    with pytest.raises(ValueError, match=r"GradientScoreAccumulator\(dtype=.*\): expected torch\.float32, "
                                         r"torch\.bfloat16 or torch\.float16"):
        GradientScoreAccumulator(_net(), dtype=dtype)


@pytest.mark.parametrize("mode", ["sum", "magnitude", "Accumulated"])
def test_accumulator_mode_must_be_known(mode):
    # an unknown mode is refused, not run as one of the two (which would silently pick the score)
    with pytest.raises(ValueError, match=r"GradientScoreAccumulator\(mode='.*'\): expected one of"):
        GradientScoreAccumulator(_net(), mode=mode)


# ---- non-finite scores ----

def test_row_granularity_reports_nan_as_non_finite_scores():
    scores = {"a": torch.ones(2, 3), "b": torch.tensor([[1.0, 2.0], [float("nan"), 1.0]])}
    with pytest.raises(NonFiniteScoresError, match=r"scores\['b'\] holds a non-finite value \(nan\) at flat index 2"
                                                   r".*\(row 1\)") as err:
        select_top(scores, 0.5, granularity="row", backend="cpu")
    assert (err.value.name, err.value.index) == ("b", 2)
    with pytest.raises(NonFiniteScoresError, match=r"row 0 of scores\['w'\] overflows") as err:
        select_top({"w": torch.full((1, 4), 3e38)}, 0.5, granularity="row", backend="cpu")
    assert (err.value.name, err.value.index) == ("w", 0)


# ---- argument checks ----

@pytest.mark.parametrize("kw", [{"exclude": 1}, {"include": 3}, {"include": [r"\.weight", 2]}, {"exclude": b"bias"}])
def test_include_exclude_of_a_wrong_type_name_the_argument(kw):
    which = next(iter(kw))
    match = rf"{which}( pattern)?[ =].*expected a regular expression \(str or compiled re\.Pattern\) or a list"
    with pytest.raises(TypeError, match=match):
        name_filter(**kw)
    with pytest.raises(TypeError, match=match):
        weight_delta_scores(_net(), _net(), **kw)
    with pytest.raises(TypeError, match=match):
        GradientScoreAccumulator(_net(), **kw)


def test_patterns_of_the_right_types_still_work():
    keep = name_filter(include=[re.compile(r"^0\."), r"bias"], exclude=(r"^0\.bias",))
    assert [n for n, _ in _net().named_parameters() if keep(n)] == ["0.weight", "2.bias"]
    # a name matching any one of several exclude patterns is left out (not only one matching all of them)
    keep = name_filter(exclude=[r"^0\.", r"bias$"])
    assert [n for n, _ in _net().named_parameters() if keep(n)] == ["2.weight"]
    assert list(weight_delta_scores(_net(), _net(), exclude=[r"^2\.", r"weight$"])) == ["0.bias"]


def test_scores_on_two_devices_are_refused():
    # checked when the scores are taken in, whatever the backend (meta stands in for a second device)
    from allo.select.scores import normalize_scores

    scores = {"a": torch.rand(3), "b": torch.rand(2, device="meta")}
    with pytest.raises(ValueError, match=r"scores\['b'\] is on meta but earlier scores are on cpu"):
        normalize_scores(scores)
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match="put every score on one device"):
            select_top(scores, 0.5, backend=backend)


def test_select_refuses_metadata_it_records_itself():
    with pytest.raises(ValueError, match=r"select\(metadata=\.\.\.\): \['ratio', 'granularity'\] are recorded by "
                                         r"select itself"):
        select({"w": torch.rand(10)}, 0.5, metadata={"ratio": 0.9, "granularity": "row", "run": "a"})
    sel = select({"w": torch.rand(10)}, 0.5, metadata={"run": "a"}, score_source="gradient")
    assert sel.metadata == {"ratio": 0.5, "exclude_ratio": 0.0, "granularity": "element", "score_source": "gradient",
                            "run": "a"}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_every_backend_names_the_tensor_holding_a_nan_score(backend):
    scores = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan"), 2.0])}
    with pytest.raises(NonFiniteScoresError, match=r"scores\['b'\].*flat index 1") as err:
        select_top(scores, 0.5, backend=backend)
    assert (err.value.name, err.value.index) == ("b", 1)


@pytest.mark.parametrize("mode", ["sum_of_magnitudes", "accumulated"])
def test_sparse_embedding_gradients_score_like_dense_ones(mode):
    # nn.Embedding(sparse=True) hands an uncoalesced gradient (a row per lookup): each backward's
    # magnitude is that of the row's summed gradient, as with the dense gradient
    scores = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(5, 3, sparse=sparse)
        acc = GradientScoreAccumulator(emb, mode=mode)
        for tokens, signs in (([1, 1, 3], [1.0, -1.0, 2.0]), ([3, 4, 3], [-1.0, 0.5, -2.0])):
            out = emb(torch.tensor(tokens))
            (out * torch.tensor(signs).unsqueeze(1) * torch.arange(1.0, 4.0)).sum().backward()
        scores[sparse] = acc.scores()["weight"]
        assert acc.num_backward == 2
    assert scores[True].layout == torch.strided and torch.equal(scores[True], scores[False])
    assert scores[False][1].eq(0).all() and scores[False][3].ne(0).all()  # +1 and -1 lookups of row 1 cancel


def test_weight_delta_scores_follow_the_models_parameter_order_whichever_side_it_is_on():
    # equal scores are taken in the scores' order; a state dict read from a safetensors file lists its
    # names sorted, so ties would be broken differently by the argument order of a symmetric |a - b|
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    sorted_sd = {n: t.detach() + 0.5 for n, t in sorted(model.state_dict().items())}  # every delta ties
    assert list(sorted_sd) != [n for n, _ in model.named_parameters()]
    first, second = weight_delta_scores(model, sorted_sd), weight_delta_scores(sorted_sd, model)
    assert list(first) == list(second) == [n for n, _ in model.named_parameters()]
    a, b = select(first, 0.1), select(second, 0.1)
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)
    assert a.indices["0.weight"].tolist() == [0, 1, 2, 3]  # the first parameter's first elements
    # two state dicts: the first one's order, as documented
    assert list(weight_delta_scores(sorted_sd, dict(model.state_dict()))) == list(sorted_sd)
