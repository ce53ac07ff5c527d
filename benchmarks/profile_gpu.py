"""Where the time of allo's GPU paths goes: host (Python) time vs kernel time, and launch-parameter sweeps.

    python benchmarks/profile_gpu.py [--only select,update,matmul,step-memory] [--no-sweep | --sweep-parts update]

A diagnostic for a GPU session, not a benchmark (``bench_*.py`` are the benchmarks): for the
selection plan and mask writing (973M bf16 scores in Llama-3.2-1B shapes) and for MaskedAdamW steps
(973M fp32 parameters) it prints the synchronized wall time, the host time of the call (Python and
launches, measured with the GPU idle), the top functions by host time (cProfile) and the kernels by
GPU time (torch.profiler); then wall times over a few launch configurations of the Triton kernels
(module constants ``TILE``/``BLOCK``/``NUM_WARPS``). ``matmul`` times the LM-head matmuls that bound
the fused-linear op (8192 x 4096 -> 128256, bf16), alone and in the fused op's row blocks. ``step-memory`` (not in the default list) prints the
allocations alive at the peak of one ALLO improve step (bench_step's Llama-3.2-1B shape).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
import torch  # noqa: E402


def sync():
    torch.cuda.synchronize()


def wall_ms(fn, warmup=2, repeats=10):
    return H.time_fn(fn, device="cuda", warmup=warmup, repeats=repeats)["median_ms"]


def host_ms(fn, repeats=5):
    """Time until the call returns, starting with an idle GPU (launch-bound code shows here)."""
    times = H.host_times_ms(fn, repeats, before=sync)
    sync()
    return statistics.median(times)


def host_profile(fn, top=12):
    sync()
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    sync()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    print("\n".join(lines[:top + 8]))


def kernel_profile(fn, top=10):
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    try:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=60)
    except Exception:  # older names
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60)
    print(table)


def timeline(label, fn, trace_dir=None):
    """One call under torch.profiler as a timeline: the host's top-level ops and the GPU's kernels in
    start order, runs of one op merged (``aten::empty x145``), times in microseconds from the first
    host op; with the GPU's idle gaps, which is where host work is exposed. The profiler slows host ops
    (a few microseconds each), so the host lane is an upper bound. ``trace_dir``: also a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm (compiles, caches)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    events = [e for e in prof.events() if e.time_range.end > e.time_range.start]
    gpu = sorted((e for e in events if e.device_type != torch.autograd.DeviceType.CPU),
                 key=lambda e: e.time_range.start)
    host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None
                   and "Synchronize" not in e.name), key=lambda e: e.time_range.start)
    if not host:
        return
    t0 = host[0].time_range.start
    print(f"\n##### timeline {label} (us from the first host op; host ops top-level only)", flush=True)
    for lane, evs in (("host", host), ("gpu", gpu)):
        runs = []
        for e in evs:
            if runs and runs[-1][0] == e.name:
                runs[-1][1] += 1
                runs[-1][3] = e.time_range.end
            else:
                runs.append([e.name, 1, e.time_range.start, e.time_range.end])
        for name, count, a, b in runs:
            print(f"  {lane:4s} {a - t0:8.1f} {b - t0:8.1f}  {name[:70]}{f' x{count}' if count > 1 else ''}")
    idle, end = [], None
    for e in gpu:
        if end is not None and e.time_range.start - end > 5:
            idle.append((end - t0, e.time_range.start - end))
        end = max(end or 0, e.time_range.end)
    first = gpu[0].time_range.start - t0 if gpu else float("nan")
    print(f"  first kernel at {first:.1f} us; GPU idle gaps over 5 us: "
          + ", ".join(f"{d:.0f} us at {a:.0f}" for a, d in idle), flush=True)
    if trace_dir:
        prof.export_chrome_trace(os.path.join(trace_dir, f"trace_{label.replace(' ', '_')}.json"))


def report(label, fn, *, deep=True):
    print(f"\n##### {label}: wall {wall_ms(fn):.3f} ms, host {host_ms(fn):.3f} ms", flush=True)
    if deep:
        host_profile(fn)
        kernel_profile(fn)


def profile_select(sweep, trace_dir=None):
    from bench_select import llama1b_shapes, make_scores

    import allo_kernels.radix_blocked as rb
    from allo.select.topk import key_domain, plan, write_masks

    scores = make_scores(llama1b_shapes(), torch.bfloat16, "cuda")
    key32, kdt = key_domain(scores)

    def run_plan():
        return plan(scores, (0.1, 0.0), key32=key32, dtype=kdt, backend="triton", histogram="blocked")

    hi, ex = run_plan()[0]

    def run_write():
        return write_masks(scores, hi, ex, key32=key32, backend="triton", histogram="blocked")

    from allo.select.topk import band_masks

    # the default: finished on the device (allo.select.device_plan); then the host-read search's two parts
    report("select band_masks (finished on the device)", lambda: band_masks(scores, 0.1, backend="triton"))
    timeline("select band_masks", lambda: band_masks(scores, 0.1, backend="triton"), trace_dir)
    # when each launch leaves the host, without a profiler (its timeline above slows host ops ~2x): a launch
    # later than the GPU's work queued before it is where the GPU waited for the host
    at, returned = H.launch_timeline(lambda: band_masks(scores, 0.1, backend="triton"), H.DEVICE_PLAN_KERNELS, 20,
                                     before=sync)
    print("select band_masks: launches leave the host at (median ms from the call's start, 20 calls, no profiler): "
          + ", ".join(f"{name} {ms:.3f}" for name, ms in at.items())
          + f"; returns at {returned:.3f} (after its one wait)", flush=True)
    import allo_kernels.radix_boundary as rbd
    import allo_kernels.radix_window as rw

    # the masks' allocation alone (host time, ~150 tensors): one C++ call (allo._C.empty_masks, when built)
    # against torch.empty_like per mask
    from allo.ops._extension import extension_if_ready

    like = list(scores.values())
    ext = extension_if_ready()
    per_mask = lambda: [torch.empty_like(t, dtype=torch.bool) for t in like]  # noqa: E731
    print(f"select mask allocation ({len(like)} masks): empty_like per mask {host_ms(per_mask, 9):.3f} ms, "
          + (f"allo._C.empty_masks {host_ms(lambda: ext.empty_masks(like), 9):.3f} ms"
             if hasattr(ext, "empty_masks") else "allo._C.empty_masks unavailable"), flush=True)
    report("select plan (threshold search)", run_plan)
    report("select write_masks", run_write)
    # the default plan's parts: the sample and its windows (one sync), the window pass alone
    from allo.select import sampling

    src = rb.Sources(list(scores.values()))
    edge = rb.nonfinite_edge(key32, kdt)
    n = sum(s.numel() for s in scores.values())
    k = int(0.1 * n + 0.5)

    report("select sample + windows", lambda: sampling.windows(rw, src, [k], n, key32=key32, edge=edge))
    shift, lows, bits = sampling.windows(rw, src, [k], n, key32=key32, edge=edge)
    print(f"select windows: shift {shift}, lows {lows}, bits {bits}", flush=True)
    def window_pass():
        return rw.window_histogram(src, shift, lows, bits, key32=key32, edge=edge, per_tensor=shift == 0)

    report("select window pass", window_pass)
    # the default path's window pass (per-tile counts, windows from the sample on the device)
    dev_lows = sampling.speculative_lows(rw, src, [k], rw.REGISTER_BITS)

    def tile_pass():
        return rw.window_tile_counts(src, dev_lows, rw.REGISTER_BITS, key32=key32, edge=edge, positive=True)

    # the single-program steps between the passes (allo_kernels.radix_boundary), each alone: GPU time
    # (wall) and host time of the launch
    hist = rw.sample(src, key32=key32)
    tiles = tile_pass()
    for label, fn in (("lows_from_sample", lambda: rbd.lows_from_sample(hist, [k], rw.SAMPLES, rw.REGISTER_BITS)),
                      ("boundaries", lambda: rbd.boundaries(tiles, rw.REGISTER_BITS, [k], [0], dev_lows,
                                                            check_positive=True))):
        print(f"select {label}: wall {wall_ms(fn, 2, 10):.3f} ms, host {host_ms(fn):.3f} ms", flush=True)
    print(f"select window pass (per tile) {wall_ms(tile_pass, 2, 10):.3f} ms, band_masks "
          f"{wall_ms(lambda: band_masks(scores, 0.1, backend='triton'), 2, 10):.3f} ms", flush=True)
    # the kernels against the torch glue they replaced, alternated: run to run, bench_select's rows for the
    # two moved by +-0.4 ms (run 8 on the H100: 3.50 kernels, 2.95 glue; the next run 2.80 and 3.55), more
    # than the difference, which only alternated calls in one process showed (3.23 against 3.98 ms)
    compare_switch("select band_masks", "radix_boundary ", lambda: band_masks(scores, 0.1, backend="triton"), rbd,
                   "USE_KERNELS", False, ("kernels", "torch glue"), repeats=30)
    if not sweep:
        return
    # H100 2026-11-27: the (32-bin) window pass took 2.06 ms of kernel time where reading the scores takes
    # 0.63 ms, the mask writing 1.0 ms (2.45 ms wall: host work); how BLOCK, warps and pipelining stages
    # move each pass is what this measures
    base = (rb.TILE, rb.BLOCK, rb.NUM_WARPS, rb.NUM_STAGES)
    for tile, block, warps, stages in [(32768, 1024, 4, 1), (32768, 1024, 4, 4), (32768, 1024, 8, None),
                                       (32768, 2048, 4, None), (32768, 2048, 8, None), (32768, 4096, 4, None),
                                       (32768, 4096, 8, None), (65536, 4096, 8, None), (65536, 2048, 8, 4),
                                       (16384, 1024, 4, None)]:
        rb.TILE, rb.BLOCK, rb.NUM_WARPS, rb.NUM_STAGES = tile, block, warps, stages
        rb._tables.clear()
        label = f"TILE={tile} BLOCK={block} warps={warps} stages={stages or 'default'}"
        try:
            hi2, ex2 = run_plan()[0]
            assert (hi2.key, hi2.take) == (hi.key, hi.take), "sweep config changed the result"
            print(f"sweep select {label}: plan {wall_ms(run_plan, 1, 5):.3f} ms, write {wall_ms(run_write, 1, 5):.3f} ms, "
                  f"window pass {wall_ms(window_pass, 1, 5):.3f} ms, band_masks "
                  f"{wall_ms(lambda: band_masks(scores, 0.1, backend='triton'), 1, 5):.3f} ms", flush=True)
        except Exception as exc:  # a config the compiler rejects: report and go on
            print(f"sweep select {label}: FAILED {type(exc).__name__}: {exc}"[:300])
    rb.TILE, rb.BLOCK, rb.NUM_WARPS, rb.NUM_STAGES = base
    rb._tables.clear()


def l2_fetch_granularity(value: int):
    """Set the current CUDA context's maximum L2 fetch granularity (bytes, a hint the driver may clamp:
    cuCtxSetLimit(CU_LIMIT_MAX_L2_FETCH_GRANULARITY)); returns the previous value, or None when the
    driver refuses."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    old = ctypes.c_size_t()
    if cuda.cuCtxGetLimit(ctypes.byref(old), 0x05) != 0 or cuda.cuCtxSetLimit(0x05, ctypes.c_size_t(value)) != 0:
        return None
    return old.value


def profile_l2_granularity(opt, label):
    """A random 10% mask touches ~57% of the 32-byte sectors of the weights and gradients but ~81% of their
    64-byte halves of a line: if the L2 fetches 64 bytes (sector promotion), the step moves ~1.4x the
    sector bytes that bench_update's floor counts. Times the step at each granularity the driver takes."""
    sync()
    base = l2_fetch_granularity(32)
    if base is None:
        print(f"{label}: the driver does not take an L2 fetch granularity", flush=True)
        return
    try:
        for value in (32, 64, 128, base):
            l2_fetch_granularity(value)
            print(f"{label} with L2 fetch granularity {value} B (default {base}): {wall_ms(opt.step, 1, 7):.3f} ms",
                  flush=True)
    finally:
        l2_fetch_granularity(base)


def compare_switch(label, what, fn, module, name, off, names, repeats=20):
    """``fn`` with the module-level switch ``module.name`` as it is and set to ``off``, the two calls
    alternated; prints ``label: what <names[0]> X ms, <names[1]> Y ms``. A failure is printed, not
    raised (one comparison must not end a profile)."""
    try:
        t = H.time_interleaved({names[0]: fn, names[1]: H.with_setting(module, name, off, fn)},
                               device="cuda", warmup=2, repeats=repeats)
        print(f"{label}: {what}{names[0]} {t[names[0]]['median_ms']:.3f} ms, {names[1]} "
              f"{t[names[1]]['median_ms']:.3f} ms (alternated, medians of {repeats})", flush=True)
    except Exception as exc:
        print(f"{label}: {what}comparison FAILED {type(exc).__name__}: {exc}"[:300], flush=True)


def compare_align_hints(step, label):
    """The step with the kernel's alignment hints (16-byte accesses; allo_kernels.masked_adamw.ALIGN_HINTS)
    and without them (4-byte accesses, as before the hints)."""
    import allo_kernels.masked_adamw as ka

    compare_switch(label, "alignment ", step, ka, "ALIGN_HINTS", False, ("hints", "without"))


def compare_plan_checks(step, label):
    """The replayed step with its per-parameter checks in allo._C (plan_gradients) and in Python
    (allo.optim.step_plan.NATIVE_CHECKS): host time paid before the kernel starts."""
    from allo.optim import step_plan

    compare_switch(label, f"plan checks (allo._C has them: {step_plan._native_checks() is not None}) ", step,
                   step_plan, "NATIVE_CHECKS", False, ("in allo._C", "in Python"), repeats=30)


# (BLOCK, num_warps) of the MaskedAdamW kernel; the first is the default. Registers per thread grow with the
# elements a thread holds (~15 each: BLOCK 1024 / 4 warps takes 118-128, capping an SM at 16 resident warps;
# BLOCK 512 / 4 warps 48), so the smaller configurations keep more programs in flight
LAUNCH_CONFIGS = [(1024, 4), (512, 4), (256, 2), (512, 2), (1024, 8), (2048, 8)]


def planned_with(make_opt, block, warps, full_on_torch=False):
    """A MaskedAdamW (from ``make_opt()``) whose first step planned its launches with the kernel's BLOCK and
    num_warps set to ``block``/``warps`` (and fully selected parameters on the Triton kernel unless
    ``full_on_torch``); its step plan keeps them for later steps, while the module defaults are restored.
    (Setting the module constants alone changes nothing for an optimizer that has a plan already: run 6's
    sweep did that, and timed one configuration six times.)"""
    import allo.optim.masked_adamw as om
    import allo_kernels.masked_adamw as ka

    saved = ka.BLOCK, ka.NUM_WARPS, om.FULL_MASKS_ON_TORCH_FUSED
    ka.BLOCK, ka.NUM_WARPS, om.FULL_MASKS_ON_TORCH_FUSED = block, warps, full_on_torch
    ka._tables.clear()
    try:
        opt = make_opt()
        opt.step()
        planned = {(launch.constexprs["BLOCK"], launch.constexprs["num_warps"])
                   for plan in opt._plans.values() for launch, _ in plan.launches}
        if not full_on_torch and planned != {(block, warps)}:
            raise RuntimeError(f"the plan holds launches {planned}, not {(block, warps)}")
    finally:
        ka.BLOCK, ka.NUM_WARPS, om.FULL_MASKS_ON_TORCH_FUSED = saved
        ka._tables.clear()
    return opt


def sweep_launch_configs(params, masks, label):
    """The step at each of LAUNCH_CONFIGS, alternated (one optimizer each, planned with its
    configuration); at 100% also MaskedAdamW on torch's fused kernel (FULL_MASKS_ON_TORCH_FUSED, the
    default) and torch.optim.AdamW(fused=True), in the same rounds."""
    from allo.optim import MaskedAdamW

    def make():
        return MaskedAdamW(params, lr=1e-3, weight_decay=0.0, masks=masks)

    steps, opts = {}, []
    try:
        full = label.endswith("100%")
        for block, warps in LAUNCH_CONFIGS[:4] if full else LAUNCH_CONFIGS:
            opts.append(planned_with(make, block, warps))
            steps[f"triton BLOCK={block} warps={warps}"] = opts[-1].step
        if full:
            opts.append(planned_with(make, *LAUNCH_CONFIGS[0], full_on_torch=True))
            steps["MaskedAdamW on torch fused"] = opts[-1].step
            opts.append(torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True))
            steps["torch.optim.AdamW fused"] = opts[-1].step
        t = H.time_interleaved(steps, device="cuda", warmup=2, repeats=15 if full else 25)
        for name, r in t.items():
            print(f"sweep adamw {label} {name}: {r['median_ms']:.3f} ms (p20 {r['p20_ms']:.3f}, p80 "
                  f"{r['p80_ms']:.3f}; alternated)", flush=True)
    except Exception as exc:
        print(f"sweep adamw {label}: FAILED {type(exc).__name__}: {exc}"[:400], flush=True)
    finally:
        del opts, steps
        torch.cuda.empty_cache()


def profile_update(sweep, trace_dir=None):
    from bench_update import _make_masks, _shapes, held_compact_step

    from allo.optim import MaskedAdamW

    shapes = _shapes("cuda", False)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    grads = [torch.randn(s, device="cuda") for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    for kind, density in (("rows", 1), ("random", 10), ("rows", 10), ("all", 100)):
        masks = _make_masks(shapes, density, kind, "cuda")
        opt = MaskedAdamW(params, lr=1e-3, weight_decay=0.0, masks=masks)
        report(f"MaskedAdamW step {kind} {density}%", opt.step, deep=density in (1, 10) and kind != "rows" or
               (kind, density) == ("rows", 1) or density == 100)
        if (kind, density) in (("rows", 10), ("all", 100)):  # where the host time before the kernel goes
            timeline(f"MaskedAdamW step {kind} {density}%", opt.step, trace_dir)
        if (kind, density) == ("random", 10):
            try:  # (a driver call through ctypes: its failure must not end the update profile)
                profile_l2_granularity(opt, "MaskedAdamW step random 10%")
            except Exception as exc:
                print(f"L2 fetch granularity probe: FAILED {type(exc).__name__}: {exc}"[:300], flush=True)
        if density in (1, 10):
            compare_plan_checks(opt.step, f"MaskedAdamW step {kind} {density}%")
        if density == 10:
            compare_align_hints(opt.step, f"MaskedAdamW step {kind} {density}%")
            compact = MaskedAdamW(params, lr=1e-3, weight_decay=0.0, masks=masks, compact_grads=True)
            compare_align_hints(held_compact_step(compact, params, grads),
                                f"MaskedAdamW compact-grads step {kind} {density}%")
            del compact
            for p, g in zip(params, grads):  # (the compact optimizer's hooks took them)
                p.grad = g
        del opt  # (at 100% the sweep holds six optimizers' dense state, 7.6 GB each)
        if sweep and density in (10, 100):
            sweep_launch_configs(params, masks, f"{kind} {density}%")
        del masks
    # the 100% target's baseline, the same way
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
    timeline("torch fused AdamW step", opt.step, trace_dir)


def profile_matmul():
    t, h, v = 8192, 4096, 128256
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02
    logits = x @ w.t()
    gw = torch.zeros_like(w)
    flop = 2 * t * h * v
    for label, fn in [("logits = x @ W^T", lambda: x @ w.t()),
                      ("grad_x = dlogits @ W", lambda: logits @ w),
                      ("grad_W = dlogits^T @ x", lambda: logits.t() @ x),
                      ("grad_W.addmm_(dlogits^T, x)", lambda: gw.addmm_(logits.t(), x))]:
        ms = wall_ms(fn, 2, 5)
        print(f"matmul {label}: {ms:.3f} ms ({flop / ms / 1e9:.0f} TFLOP/s)", flush=True)
    for chunk in (1024, 2048):
        def chunked(chunk=chunk):
            for s in range(0, t, chunk):
                gw.addmm_(logits[s:s + chunk].t(), x[s:s + chunk])
        ms = wall_ms(chunked, 1, 3)
        print(f"matmul grad_W accumulated over chunks of {chunk}: {ms:.3f} ms", flush=True)
    # allo.ops.fused_linear's backward since 2026-11-27 (row blocks of the weight; one token chunk per
    # block at this size): per block, recompute the block's logits, then grad_x += dlogits @ W_block and
    # grad_W_block = dlogits^T @ x, both products written as fp32 by cuBLAS
    grad_x = torch.empty(t, h, device="cuda", dtype=torch.float32)
    for rows in (32064, 16032):
        def row_blocks(rows=rows):
            for r0 in range(0, v, rows):
                wb = w[r0:r0 + rows]
                blk = x @ wb.t()
                if r0:
                    grad_x.add_(torch.mm(blk, wb, out_dtype=torch.float32))
                else:
                    grad_x.copy_(torch.mm(blk, wb, out_dtype=torch.float32))
                torch.mm(blk.t(), x, out_dtype=torch.float32)
        ms = wall_ms(row_blocks, 1, 3)
        print(f"matmul fused-linear backward in row blocks of {rows} (3 products each): {ms:.3f} ms "
              f"({3 * flop / ms / 1e9:.0f} TFLOP/s)", flush=True)


def alive_at_peak(trace: list) -> tuple[int, list]:
    """From a CUDA caching-allocator trace (``torch.cuda.memory._snapshot()["device_traces"][0]``): the peak of
    allocated bytes and the allocations alive at that moment, as (bytes, where) sorted by size, ``where``
    the innermost frame in this repository (or the innermost frame)."""
    alive, total, peak, peak_alive = {}, 0, 0, {}
    for ev in trace:
        if ev["action"] == "alloc":
            alive[ev["addr"]] = ev
            total += ev["size"]
            if total > peak:
                peak, peak_alive = total, dict(alive)
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in alive:
            total -= alive.pop(ev["addr"])["size"]

    def where(ev):
        frames = ev.get("frames") or []
        mine = [f for f in frames if "/allo" in f["filename"] or "benchmarks/" in f["filename"]]
        f = (mine or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
        return f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"

    return peak, sorted(((ev["size"], where(ev)) for ev in peak_alive.values()), reverse=True)


def profile_step_memory():
    """Which tensors are alive at the peak of one ALLO improve step (bench_step's, Llama-3.2-1B shape):
    where a GB can be saved."""
    from transformers import LlamaForCausalLM

    from bench_step import AlloImprove, llama_config, make_batch

    cfg = llama_config("llama-3.2-1b-shape")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).float()
    runner = AlloImprove(model, make_batch(cfg.vocab_size, 4, 512, "cuda"), beta=0.1, eps=0.1, ratio=0.1,
                         autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16), checkpointing=True)
    runner.step()
    sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=500000)
    runner.step()
    sync()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, alive = alive_at_peak(snap["device_traces"][0])
    print(f"\n##### improve step: {before / 1e9:.2f} GB allocated before the step; {peak / 1e9:.2f} GB more "
          f"allocated at its peak (trace started with the step)")
    for size, where in alive[:15]:
        print(f"  {size / 1e6:10.1f} MB  {where}")


PARTS = ("matmul", "update", "select", "step-memory")
SWEPT_PARTS = ("select", "update")  # the parts that have launch-configuration sweeps


def _part_names(allowed):
    """An argparse ``type``: comma-separated names out of ``allowed`` (a misspelt one would run nothing)."""
    def parse(text):
        names = set(filter(None, (name.strip() for name in text.split(","))))
        unknown = sorted(names - set(allowed))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}; choose from {', '.join(allowed)}")
        return names
    return parse


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", type=_part_names(PARTS), default="select,update,matmul",
                    help=f"comma-separated parts to run, of: {', '.join(PARTS)}")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-parts", type=_part_names(SWEPT_PARTS), default="select,update",
                    help="the parts whose sweeps run (without --no-sweep)")
    ap.add_argument("--trace-dir", default=None, help="write Chrome traces of the timelines here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_gpu.py: needs a CUDA GPU")
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    parts = args.only
    swept = set() if args.no_sweep else args.sweep_parts
    failed = []
    for name, fn in (("matmul", profile_matmul), ("update", lambda: profile_update("update" in swept, args.trace_dir)),
                     ("select", lambda: profile_select("select" in swept, args.trace_dir)), ("step-memory", profile_step_memory)):
        if name in parts:
            try:  # one part failing should not hide the others' findings
                fn()
            except Exception:
                traceback.print_exc()
                failed.append(name)
            torch.cuda.empty_cache()
    if failed:  # after every part ran: gpu_check.sh records the step as FAILED, not ok
        sys.exit(f"profile_gpu.py: part(s) failed: {', '.join(failed)} (tracebacks above)")


if __name__ == "__main__":
    main()
