"""Host (Python) time of the blocked Triton selection, measured without a GPU.

    python benchmarks/profile_select_host.py [--scale 32] [--repeats 50] [--profile]

The Triton kernel launches of :mod:`allo_kernels.radix_blocked` are replaced by no-ops and the calls
run on CPU tensors of Llama-3.2-1B's 145 shapes, each dimension divided by ``--scale`` (host cost
depends on the number of tensors, not their size). The boundaries come from one real ``plan`` under
the Triton interpreter first. Prints the median host time of ``write_masks`` (cache warm: repeated
calls, as in a training loop; cold: the launch-table cache cleared before each call), of the three
histogram passes of the radix search, and of the sampled start's sample + window pass (the searches
of the sample's histogram run on the CPU here, on an empty histogram), then when each launch of the
device-finished selection (allo.select.device_plan, the default on a GPU) leaves the host. What this
cannot show: on CUDA, synchronous host->device copies also wait for the GPU queue (see
``benchmarks/profile_gpu.py`` for the GPU view).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
import torch  # noqa: E402

import allo_kernels.radix_blocked as rb  # noqa: E402
import allo_kernels.radix_window as rw  # noqa: E402
from allo.select.topk import key_domain, plan, write_masks  # noqa: E402
from bench_select import llama1b_shapes, make_scores  # noqa: E402


class _NoLaunch:
    """A kernel stand-in: launching it does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_ms(fn, repeats, before=None):
    """'median (min) ms': the minimum is the steadier number on a shared CPU."""
    times = H.host_times_ms(fn, repeats, before)
    return f"{statistics.median(times):.3f} ({min(times):.3f})"


def clear_caches():
    for name in ("_tables", "_tile_rows"):  # launch tables and tile layouts
        cache = getattr(rb, name, None)
        if cache is not None:
            cache.clear()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=H.int_at_least(1), default=32, help="divide every dimension by this")
    p.add_argument("--ratio", type=H.ratio, default=0.1)
    p.add_argument("--seed", type=int, default=1, help="scores' seed (1: the threshold cuts a tensor's ties)")
    p.add_argument("--repeats", type=H.int_at_least(1), default=50)
    p.add_argument("--profile", action="store_true", help="also print cProfile's top entries of write_masks")
    args = p.parse_args()

    shapes = [tuple(max(1, d // args.scale) for d in s) for s in llama1b_shapes()]
    scores = make_scores(shapes, torch.bfloat16, "cpu", seed=args.seed)
    key32, kdt = key_domain(scores)
    (hi, ex), n = plan(scores, (args.ratio, 0.0), key32=key32, dtype=kdt, backend="triton", histogram="blocked")
    cut = hi.partial and hi.counts is not None and any(0 < hi.take - s < c for s, c in
                                                      zip(_cumsum0(hi.counts), hi.counts))
    print(f"{len(scores)} tensors, {n} scores, ratio {args.ratio}: threshold key {hi.key}, "
          f"{hi.take}/{hi.n_eq} ties taken ({'a tensor is cut' if cut else 'no tensor cut'})")

    kernels = {(mod, k): getattr(mod, k) for mod, names in (
        (rb, ("_blocked_hist_kernel", "_blocked_count_kernel", "_blocked_write_kernel")),
        (rw, ("_blocked_sample_kernel", "_blocked_window_kernel"))) for k in names}
    for mod, k in kernels:
        setattr(mod, k, _NoLaunch())
    try:
        def write():
            return write_masks(scores, hi, ex, key32=key32, backend="triton", histogram="blocked")

        srcs = list(scores.values())
        edge = rb.nonfinite_edge(key32, kdt)
        passes = [(0, [None], False), (1, [3, 5], False), (len(rb.digits(key32)) - 1, [7], True)]

        # as plan() passes them (revisions before radix_blocked.Sources: the list, to time a baseline)
        prepared = rb.Sources(srcs) if hasattr(rb, "Sources") else srcs

        def hist_all():
            for level, prefixes, per in passes:
                rb.histogram(prepared, level, prefixes, key32=key32, edge=edge, per_tensor=per)

        from allo.select import sampling

        k = int(args.ratio * n + 0.5)

        def windowed():
            shift, lows, bits = sampling.windows(rw, prepared, [k], n, key32=key32, edge=edge)
            rw.window_histogram(prepared, 0, [lows[0]], rw.WINDOW_BITS[key32], key32=key32, edge=edge,
                                per_tensor=True)

        for _ in range(3):
            write()
            hist_all()
            windowed()
        warm = host_ms(write, args.repeats)
        cold = host_ms(write, args.repeats, before=clear_caches)
        hist = host_ms(hist_all, args.repeats)
        print(f"host ms, median (min) of {args.repeats}:")
        print(f"write_masks: {warm} tables cached, {cold} caches cleared before each call")
        print(f"histogram, 3 passes: {hist}")
        print(f"sample + windows + window pass: {host_ms(windowed, args.repeats)}")
        if args.profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(10):
                write()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(15)
    finally:
        for (mod, k), v in kernels.items():
            setattr(mod, k, v)
    device_plan_timeline(scores, args.ratio, args.repeats)


def device_plan_timeline(scores, ratio: float, repeats: int) -> None:
    """When each launch of the default GPU selection (allo.select.device_plan) leaves the host, from the
    start of the call, with every kernel stubbed: the host time in front of the first kernel, and between
    launches, is what the GPU waits for (on a GPU it adds to the wall time). The boundaries are taken as
    found (the flags say so), so the call returns after its one wait. (On this CPU ~0.15 ms in front of the
    first launch is torch.zeros of the sample's 65536-bin histogram, a fill kernel on a GPU.)"""
    import allo.select.device_plan as dp
    from allo.select import topk

    boundaries, speculate = dp.boundaries, dp.SPECULATE_MIN_SCORES

    def found(*args, **kwargs):
        bounds, ties, flags = boundaries(*args, **kwargs)
        flags.fill_(0)[0] = 1  # inside the windows, every score finite
        return bounds, ties, flags

    try:
        dp.boundaries, dp.SPECULATE_MIN_SCORES = found, 0  # the windows from the sample, as for a large model
        at, returned = H.launch_timeline(lambda: topk.band_masks(scores, ratio, backend="triton", histogram="blocked"),
                                         H.DEVICE_PLAN_KERNELS, repeats, launch=False, warmup=3)
    finally:
        dp.boundaries, dp.SPECULATE_MIN_SCORES = boundaries, speculate
    print(f"device-finished selection, launches leave the host at (median ms from the call's start, of {repeats}):")
    for name, ms in at.items():
        print(f"  {name:24s} {ms:.3f}")
    print(f"  {'return':24s} {returned:.3f}")


def _cumsum0(xs):
    out, t = [], 0
    for x in xs:
        out.append(t)
        t += x
    return out


if __name__ == "__main__":
    main()
