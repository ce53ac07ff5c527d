"""Exact global top-k selection over many tensors: allo.select vs the usual ways.

Implementations (all select the top ``--ratio`` of all elements):

* ``topk-concat``  (baseline) concatenate every score tensor (fp32), ``torch.topk``, scatter into masks
* ``kthvalue``     concatenate, ``torch.kthvalue`` for the threshold, compare into masks
* ``authors``      the released ALLO scripts' approach: per tensor the top 2*ratio candidates,
                   concatenate them, global ``torch.topk`` (approximate), compare into masks
* ``allo``         ``allo.select.select_top`` (streaming radix histograms, exact), masks (CPU: the C path)
* ``allo-plan``    only the threshold search of ``allo`` (the histogram passes, no masks)

On CUDA the Triton variants are timed in the same run (``ALLO_SELECT_HISTOGRAM``), each whole
(``allo-blocked``, ``allo-blocked-radix``, ``allo-atomic``), threshold search only (``-plan``) and mask
writing only (``-write``, given the threshold), so a GPU session sees which part costs what:

* ``blocked`` (default) a sample of the keys, one pass over the window it points to (bf16: usually the
  exact key), prefix passes for the bits left; one launch per pass over all tensors. For bf16 it is
  finished on the device (thresholds, tie ranks and masks queued without reading the pass back:
  :mod:`allo.select.device_plan`; on a large model the windows come from the sample on the device too,
  one wait in all); ``allo-blocked-host-windows`` has the host read the sample to size the windows,
  ``allo-blocked-synced`` reads every pass back on the host (``-plan`` and ``-write`` time that one's
  parts), ``allo-blocked-empty-like`` allocates the masks with one ``torch.empty_like`` each instead
  of one call into the compiled extension (the default when it is built), ``allo-blocked-torch-glue``
  runs the steps between the passes as torch ops instead of single-program kernels
  (``radix_boundary.USE_KERNELS``)
* ``blocked-radix`` the same kernels, radix passes over 5-6-bit digits from the top one (no sample)
* ``atomic``  one global atomic per element into a 65536-bin histogram, one launch per tensor per pass

On CUDA two ``bandwidth floor`` rows follow: the time the bytes alone take at the copy bandwidth
measured in the same run, for allo's two passes (the scores read twice, the masks written once) and
for any exact selection (the scores read once, the masks written once).

Every allo impl whose result is timed is checked first (outside the timings) against the exact
selection, from ``torch.topk`` over the concatenated scores: its threshold ``t``, the count ``k``
and the number of ties to take (``k`` minus the elements above ``t``). Masks: exactly ``k`` selected,
every element strictly above ``t`` selected, none below, and the ties taken in the documented order
(tensors in mapping order, then flat index). ``-plan``: the threshold, ``k``, the ties taken and their
number. The ``exact`` column holds the result (``-``: not checked: the baselines); the script exits 1
after the report if any check fails.

``peak`` counts the outputs; the ``extra`` column is peak minus the output masks (N bytes), the
memory the selection itself needs. CPU default: 50M fp32 scores over many (477) tensors. CUDA
default: 973M bf16 scores in the shapes of Llama-3.2-1B's 16 blocks (hidden 2048, MLP 8192, 8 KV
heads), the embedding left out.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _harness import (copy_bandwidth, exit_if_mismatched, floor_row, int_at_least, measure, mismatch,  # noqa: E402
                      parse_args, ratio, report, with_setting)

# allo's impls: name -> band_masks' histogram, on the CPU and on CUDA; each also times NAME-plan (and on
# CUDA NAME-write). CUDA_EARLIER_FORMS: the default GPU search's earlier forms, timed on CUDA
CPU_VARIANTS = {"allo": None}
CUDA_VARIANTS = {"allo-blocked": "blocked", "allo-blocked-radix": "blocked-radix", "allo-atomic": "atomic"}
CUDA_EARLIER_FORMS = ("allo-blocked-synced", "allo-blocked-host-windows", "allo-blocked-empty-like",
                      "allo-blocked-torch-glue")
# every name --skip takes (some are timed on one device only)
IMPL_NAMES = ("topk-concat", "kthvalue", "authors", *CPU_VARIANTS, *(f"{v}-plan" for v in CPU_VARIANTS),
              *(f"{v}{part}" for v in CUDA_VARIANTS for part in ("", "-plan", "-write")), *CUDA_EARLIER_FORMS)


def skip_names(text: str) -> set[str]:
    """--skip's argparse ``type``: a set of impl names (a misspelt one would silently time everything)."""
    names = set(filter(None, (name.strip() for name in text.split(","))))
    unknown = sorted(names - set(IMPL_NAMES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown impl(s) {unknown}; choose from {', '.join(IMPL_NAMES)}")
    return names


def llama1b_shapes():
    # Llama-3.2-1B's transformer blocks and final norm; the (tied) embedding is left out, as a
    # selection usually excludes it: 973M scores
    h, inter, kv, layers = 2048, 8192, 512, 16
    shapes = []
    for _ in range(layers):
        shapes += [(h,), (h, h), (kv, h), (kv, h), (h, h), (h,), (inter, h), (inter, h), (h, inter)]
    shapes.append((h,))
    return shapes


def many_tensor_shapes(total):
    # a scaled-down transformer: blocks of matrices and vectors until `total` elements
    shapes, h = [], 256
    while sum(_numel(s) for s in shapes) < total:
        shapes += [(h,), (h, h), (h // 4, h), (h // 4, h), (h, h), (h,), (4 * h, h), (4 * h, h), (h, 4 * h)]
    return shapes


def _numel(s):
    n = 1
    for d in s:
        n *= d
    return n


def make_scores(shapes, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g, device=device, dtype=torch.float32).abs_().to(dtype)
            for i, s in enumerate(shapes)}


def topk_concat(scores, k):
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    idx = torch.topk(flat, k, sorted=False).indices
    del flat
    mask = torch.zeros(sum(s.numel() for s in scores.values()), dtype=torch.bool, device=idx.device)
    mask[idx] = True
    return mask


def kthvalue_concat(scores, k):
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    t = torch.kthvalue(flat, flat.numel() - k + 1).values
    return {n: s >= t.to(s.device) for n, s in scores.items()}


def authors(scores, k, ratio):
    # per-tensor top 2r candidates, concatenated, then a global top-k on the candidates
    cands = [torch.topk(s.reshape(-1).float(), max(1, min(s.numel(), int(2 * ratio * s.numel()))), sorted=False).values
             for s in scores.values() if s.numel()]
    allc = torch.cat(cands)
    t = torch.topk(allc, min(k, allc.numel()), sorted=False).values.min()
    return {n: s >= t.to(s.dtype) for n, s in scores.items()}


def exact_threshold(scores, k):
    """(threshold, elements above it, elements equal to it) of the top ``k`` over all scores, from
    ``torch.topk`` on a concatenated fp32 copy: the yardstick of the checks."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    thr = torch.topk(flat, k, sorted=False).values.min()
    above, ties = int((flat > thr).count_nonzero()), int((flat == thr).count_nonzero())
    return thr, above, ties


@torch.no_grad()
def check_masks(scores, masks, k, thr, above) -> str | None:
    """None if ``masks`` are the exact top ``k`` (see the module docstring), else what is wrong."""
    if not isinstance(masks, Mapping) or list(masks) != list(scores):
        return f"expected a dict of masks with the scores' names in order, got {type(masks).__name__}"
    stats = []
    for name, s in scores.items():
        m = masks[name]
        if m.dtype != torch.bool or m.shape != s.shape:
            return f"mask {name} is {m.dtype} {tuple(m.shape)}, expected torch.bool {tuple(s.shape)}"
        t = thr.to(s.dtype)  # exact: the threshold is one of the scores
        hi, tie = s > t, s == t
        # count_nonzero: a bool sum() would first copy the mask to int64
        stats.append(torch.stack([m.count_nonzero(), (hi & ~m).count_nonzero(), (m & ~hi & ~tie).count_nonzero(),
                                  tie.count_nonzero(), (m & tie).count_nonzero()]))
    stats = torch.stack(stats).cpu().tolist() if stats else []
    selected = sum(r[0] for r in stats)
    missed, below = sum(r[1] for r in stats), sum(r[2] for r in stats)
    if selected != k or missed or below:
        return f"selected {selected} of k={k}; {missed} above the threshold left out, {below} below it taken"
    left = k - above  # ties to take: the first ones in mapping order, then flat index
    for (name, s), (*_, n_tie, n_taken) in zip(scores.items(), stats):
        want = min(left, n_tie)
        if n_taken != want:
            return f"tie rule: {name} has {n_taken} of its {n_tie} ties taken, expected {want}"
        if 0 < want < n_tie:  # the cut tensor: its first `want` ties in flat order
            pos = (s.reshape(-1) == thr.to(s.dtype)).nonzero().squeeze(1)
            if not bool(masks[name].reshape(-1)[pos[:want]].all()):
                return f"tie rule: {name} takes {want} ties but not its first {want} in flat order"
        left -= want
    return None


def check_plan(boundaries, k, thr, above, ties, *, key32, dtype) -> str | None:
    """None if ``plan``'s (top, excluded) boundaries are the exact ones for ratio k, exclude 0."""
    from allo.select.topk import value_of_boundary

    hi, ex = boundaries
    got = (hi.k, value_of_boundary(hi, key32, dtype), hi.take, hi.n_eq, ex.k)
    want = (k, float(thr), k - above, ties, 0)
    return None if got == want else f"(k, threshold, ties taken, ties, excluded k) = {got}, expected {want}"


def main():
    def extra(p):
        p.add_argument("--ratio", type=ratio, default=0.1, help="fraction of the scores selected, in (0, 1]")
        p.add_argument("--numel", type=int_at_least(1), default=None, help="total score elements (CPU default 50M)")
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
        p.add_argument("--skip", type=skip_names, default=set(), help="comma-separated impls to skip")

    args = parse_args(__doc__.splitlines()[0], extra)
    from allo.select.topk import band_count, band_masks, key_domain, plan, write_masks

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if cuda and args.numel is None and not args.quick:
        shapes, label = llama1b_shapes(), "llama1b"
    else:
        total = args.numel or (5_000_000 if args.quick else 50_000_000)
        shapes, label = many_tensor_shapes(total), "many"
    scores = make_scores(shapes, dtype, device)
    n = sum(s.numel() for s in scores.values())
    k = band_count(args.ratio, n)  # allo's count (round half up of the ratio as written)
    if k == 0:
        raise SystemExit(f"--ratio {args.ratio} selects none of the {n} scores: give a larger --ratio or --numel")
    backend = "triton" if cuda else "cpu"
    case = f"{label} {n / 1e6:.0f}M {str(dtype).split('.')[-1]} x{len(shapes)} r={args.ratio}"
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    skip = args.skip
    key32, kdt = key_domain(scores)
    impls = {
        "topk-concat": lambda: topk_concat(scores, k),
        "kthvalue": lambda: kthvalue_concat(scores, k),
        "authors": lambda: authors(scores, k, args.ratio),
    }
    out_bytes = {"topk-concat": n, "kthvalue": n, "authors": n}
    variants = CUDA_VARIANTS if cuda else CPU_VARIANTS
    thr, above, ties = exact_threshold(scores, k)
    checked = {}  # impl -> None (exact) or what is wrong, for every allo impl that is timed
    for label, variant in variants.items():
        def run_plan(v=variant):
            return plan(scores, (args.ratio, 0.0), key32=key32, dtype=kdt, backend=backend, histogram=v)[0]

        impls[label] = lambda v=variant: band_masks(scores, args.ratio, backend=backend, histogram=v)
        impls[f"{label}-plan"] = run_plan
        out_bytes[label], out_bytes[f"{label}-plan"] = n, 0
        if cuda:
            hi, ex = run_plan()
            impls[f"{label}-write"] = lambda v=variant, hi=hi, ex=ex: write_masks(scores, hi, ex, key32=key32,
                                                                                backend=backend, histogram=v)
            out_bytes[f"{label}-write"] = n
        # exactness, outside the timings, of exactly what is timed
        for name in (label, f"{label}-write"):
            if name in impls and name not in skip:
                checked[name] = check_masks(scores, impls[name](), k, thr, above)
        if f"{label}-plan" not in skip:
            checked[f"{label}-plan"] = check_plan(run_plan(), k, thr, above, ties, key32=key32, dtype=kdt)
    if cuda:  # the default search's earlier forms, in the same run: what each step of it gained
        from allo.select import device_plan, topk as topk_module
        from allo_kernels import radix_boundary

        def default():
            return band_masks(scores, args.ratio, backend=backend, histogram="blocked")

        # -synced: the passes read back on the host; -host-windows: finished on the device, but the host
        # reads the sample to size the windows (the default for fewer than SPECULATE_MIN_SCORES scores)
        for label, fn in (("allo-blocked-synced", with_setting(topk_module, "FINISH_ON_DEVICE", False, default)),
                          ("allo-blocked-host-windows",
                           with_setting(device_plan, "SPECULATE_MIN_SCORES", 1 << 62, default)),
                          ("allo-blocked-empty-like", with_setting(topk_module, "ALLOCATE_IN_ONE_CALL", False, default)),
                          ("allo-blocked-torch-glue", with_setting(radix_boundary, "USE_KERNELS", False, default))):
            impls[label], out_bytes[label] = fn, n
            if label not in skip:
                checked[label] = check_masks(scores, fn(), k, thr, above)
    print(f"{case}: k={k}, threshold {float(thr)!r} ({above} above it, {ties} equal, {k - above} of them taken)")
    for name, problem in checked.items():
        if problem is None:
            print(f"{case}: {name} exact: True")
        else:
            mismatch(case, name, f"not the exact top k: {problem}")
    rows = []
    for name, fn in impls.items():
        if name in skip:
            continue
        row = measure(case, name, fn, device=device, warmup=warmup, repeats=repeats,
                      exact=(checked[name] is None) if name in checked else None)
        if row.get("peak_bytes") is not None:
            row["extra"] = max(0, row["peak_bytes"] - out_bytes[name])
            row["extra_vs_scores"] = row["extra"] / sum(s.numel() * s.element_size() for s in scores.values())
        rows.append(row)
    if cuda:
        rows += floor_rows(case, scores, n, device)
    report(rows, baseline="topk-concat", json_path=args.json, title=f"bench_select ({device.type})",
           extra_columns=["extra", "extra_vs_scores", "exact"])
    exit_if_mismatched()


def floor_rows(case, scores, n, device) -> list[dict]:
    """The time the bytes alone take at the device's copy bandwidth: allo's two passes (the window pass
    reads every score, the write pass reads them again and writes one byte of mask each), and any
    exact selection's minimum (every score read once, every mask byte written once)."""
    bandwidth = copy_bandwidth(device)
    score_bytes = sum(s.numel() * s.element_size() for s in scores.values())
    return [floor_row(case, impl, moved / bandwidth * 1e3, device)
            for impl, moved in (("bandwidth floor, two passes", 2 * score_bytes + n),
                                ("bandwidth floor, one pass", score_bytes + n))]


if __name__ == "__main__":
    main()
