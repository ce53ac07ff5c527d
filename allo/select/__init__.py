"""Key-neuron selection: exact, streaming, global top-k over a whole model.

    from allo.select import select_top, select, Selection, weight_delta_scores, GradientScoreAccumulator

    scores = weight_delta_scores(warm_model, sft_model, exclude=r"embed|norm")   # lazy |theta_w - theta_0|
    sel = select(scores, 0.05)                   # exact top 5% of all elements, Selection of flat indices
    sel.save("neurons.safetensors"); print(sel.summary()); sel.plot("neurons.png")

See :mod:`allo.select.topk` for the exact semantics (counts, band, tie order, distributed).
"""

from .scores import AbsDiff, GradientScoreAccumulator, name_filter, weight_delta_scores
from .selection import Selection, row_scores, select, select_shards, select_top
from .topk import band_count

__all__ = ["select_top", "select", "select_shards", "Selection", "weight_delta_scores", "GradientScoreAccumulator",
           "AbsDiff", "row_scores", "band_count", "name_filter"]
