"""Plain-PyTorch reference of the band selection, for tests: concatenate, sort, cut.

It needs several copies of all the scores (float64 concatenation plus a sort), which is exactly
what the streaming path avoids; it exists to define the answer, not to be used on a real model.
"""

from __future__ import annotations

import torch

from .scores import AbsDiff, normalize_scores
from .topk import band_count, check_ratios


def _flat64(s) -> torch.Tensor:
    t = s.materialize() if isinstance(s, AbsDiff) else s
    # float64 holds every fp32/bf16/fp16 value exactly; + 0.0 turns -0.0 into +0.0
    return t.reshape(-1).to(torch.float64) + 0.0


def reference_band_masks(scores, ratio, exclude_ratio=0.0) -> dict[str, torch.Tensor]:
    """Masks of the elements ranked in [k(exclude_ratio), k(ratio)) by (score desc, tensor order,
    flat index): a stable descending sort of the concatenation."""
    ratio, exclude_ratio = check_ratios(ratio, exclude_ratio, "reference_band_masks")
    sources = normalize_scores(scores, "reference_band_masks")
    flats = [_flat64(s) for s in sources.values()]
    allv = torch.cat(flats) if flats else torch.zeros(0, dtype=torch.float64)
    n = allv.numel()
    k_hi, k_ex = band_count(ratio, n), band_count(exclude_ratio, n)
    if n and not torch.isfinite(allv).all():
        from .topk import _name_nonfinite  # (topk imports this module's users lazily too)

        _name_nonfinite(sources, None, "reference_band_masks")  # the backends' error, naming the tensor
    order = torch.sort(allv, descending=True, stable=True).indices
    flat_mask = torch.zeros(n, dtype=torch.bool, device=allv.device)  # `order` is on the scores' device
    flat_mask[order[k_ex:k_hi]] = True
    out, start = {}, 0
    for (name, s), f in zip(sources.items(), flats):
        out[name] = flat_mask[start:start + f.numel()].view(s.shape).to(s.device)
        start += f.numel()
    return out


def topk_threshold(scores, ratio) -> float | None:
    """The k-th largest score by ``torch.topk`` over the concatenation (None when k == 0)."""
    allv = torch.cat([_flat64(s) for s in normalize_scores(scores, "topk_threshold").values()])
    k = band_count(ratio, allv.numel())
    if k == 0:
        return None
    return float(torch.topk(allv, k).values.min())


def kthvalue_threshold(scores, ratio) -> float | None:
    """The same threshold by ``torch.kthvalue`` (the (N-k+1)-th smallest)."""
    allv = torch.cat([_flat64(s) for s in normalize_scores(scores, "kthvalue_threshold").values()])
    n = allv.numel()
    k = band_count(ratio, n)
    if k == 0:
        return None
    return float(torch.kthvalue(allv, n - k + 1).values)
