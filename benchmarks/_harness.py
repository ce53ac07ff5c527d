"""Shared harness for every benchmark script: arguments, timing, peak memory, table and JSON.

Each ``bench_*.py`` builds its cases, then for every (case, impl) calls :func:`measure`, collects
the rows and ends with :func:`report`. Rows are dicts with at least ``case``, ``impl``,
``median_ms`` and, where measured, ``peak_bytes`` (extra bytes allocated while the function ran,
above what was live before it). ``report`` prints a table with each row's ratio to the case's
baseline (measured in the same run) and writes ``--json FILE``.

Timing: warm-up calls first, then ``repeats`` timed calls; the median is reported (p20/p80 too, linearly
interpolated: :func:`percentile`).
On CUDA, device events around each call, after at least ``CUDA_WARMUP_MS`` of warm-up (a count of
calls is no warm-up for a 0.3 ms step: the GPU's clocks are still rising) and with the L2 cache
flushed before each timed call (as ``triton.testing.do_bench`` does: in training, forward and
backward run between two optimizer steps, so a step never finds its tensors in L2; without the flush
a 1% mask's ~50 MB of touched data would partly sit in the H100's 50 MB L2 and read as faster than
any training step); on CPU, ``time.perf_counter``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the call. On CPU there is no
allocator counter, so we read the kernel's own high-water mark of the process (``VmHWM``, reset
through ``/proc/self/clear_refs``) after telling glibc to hand every large block straight back to
the OS (a fixed 64 KiB mmap threshold) and to return its free memory (``malloc_trim``), so a freed
buffer cannot hide a later allocation. It counts every byte the process touched, including
allocator overhead; measurements of different impls are therefore comparable with each other,
which is what the tables need. It reads low by up to :func:`cpu_peak_shortfall_bytes` (a few hundred
KB on a 2-core machine, ~2 MB with 16 cores): since Linux 6.2 a process's RSS is kept in per-CPU
counters, and /proc reports their sum without the deltas each CPU has not yet folded in.

Timed CPU calls do not run under that threshold: under it every temporary of 64 KiB or more is a
fresh mmap, page-faulted in on every call (a 16 MB log_softmax: ~4000 faults, 3.5x its time), a
cost a user's process does not pay, falling mostly on the baselines (they allocate more) and so
inflating allo's ratios. They run under glibc's steady state in a long-running process (its
dynamic mmap threshold stops rising at 32 MiB, the trim threshold at twice that), on a thread of
their own, so the heap blocks they leave stay in that thread's malloc arena, not in the heap whose
peak is measured.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, Iterable

import torch

try:
    from resource import RUSAGE_THREAD, getrusage  # page faults of the timing thread (Linux)
except ImportError:  # other systems: no count, the warm-up is the given number of calls
    RUSAGE_THREAD = None

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # running `python benchmarks/bench_x.py` from a checkout
    sys.path.insert(0, _ROOT)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
# (mmap threshold, trim threshold) in bytes. Timing: where glibc's dynamic thresholds settle in a
# process that frees large blocks (setting either one disables the dynamic adjustment, so both are
# set to their settled values). Measuring: every allocation of 64 KiB or more is its own mmap and
# goes back to the OS on free, so RSS tracks live bytes.
_TIMING_THRESHOLDS = (32 * 2**20, 64 * 2**20)
_MEASURING_THRESHOLDS = (64 * 1024, 128 * 1024)


def _load_libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _load_libc()


def _set_malloc_thresholds(thresholds) -> None:
    if _LIBC is None:
        return
    mmap_bytes, trim_bytes = thresholds
    _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, trim_bytes)


_set_malloc_thresholds(_MEASURING_THRESHOLDS)
_timed_since_measured = [False]  # peak_bytes settles the heap with one untimed call first


def _timed_in_own_arena(loop: Callable[[], object]) -> None:
    """Run ``loop()`` (timed CPU calls) on a short-lived thread under the timing thresholds.

    glibc serves a thread from its own malloc arena (a finished thread's arena goes to the next new
    thread), so the heap blocks the timed calls free stay in that arena, away from the main
    thread's heap that :func:`peak_bytes` measures: a block reused from a heap stays resident after
    it is freed, so a measured call that freed one block and took another would count both. Grad
    and inference mode are carried over; other thread-local modes (e.g. autocast) are not: ``fn``
    sets its own."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    failure = []

    def run():
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                loop()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            failure.append(exc)

    _set_malloc_thresholds(_TIMING_THRESHOLDS)
    _timed_since_measured[0] = True
    try:
        thread = threading.Thread(target=run, name="time_fn")
        thread.start()
        thread.join()
    finally:
        _set_malloc_thresholds(_MEASURING_THRESHOLDS)
    if failure:
        raise failure[0]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum`` (a 0 or negative count fails later, far from
    its cause: no timings for a median, or a size silently replaced by the default)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}: give an integer >= {minimum}")
        return value
    return parse


def ratio(text: str) -> float:
    """An argparse ``type``: a fraction of the elements selected, in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not a fraction of the elements: give a ratio in (0, 1]")
    return value


def parse_args(description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (under 60 s on a 2-core CPU)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list of objects to FILE")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--repeats", type=int_at_least(1), default=None, help="timed repetitions per measurement")
    parser.add_argument("--warmup", type=int_at_least(0), default=None,
                        help="untimed calls before timing (on CUDA, then more until CUDA_WARMUP_MS have passed)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.json is not None:
        # checked now, not when report() writes it after the whole run (which a bad path then threw away)
        problem = json_path_problem(args.json)
        if problem:
            parser.error(f"--json {args.json}: {problem}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: not a device name; give cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):  # timing and peak memory are measured on these two only
        parser.error(f"--device {args.device}: the benchmarks run on cpu or cuda, not {device.type}")
    # by type, not the string: "cuda:0" is a CUDA device too
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda" and device.index is not None:
        # the timing events, synchronize() and the memory counters read the current device: made the one asked
        # for (cuda:1 timed and measured cuda:0 before, where nothing ran)
        torch.cuda.set_device(device)
    return args


def json_path_problem(path: str) -> str | None:
    """Why :func:`write_json` could not write ``path``, or None: what a ``--json FILE`` is checked for up front."""
    if os.path.isdir(path):
        return "is a directory; give a file name (e.g. DIR/results.json)"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist; create it first"
    if not os.access(folder, os.W_OK | os.X_OK):  # the file is written next to it as FILE.tmp, then renamed
        return f"cannot write in the folder {folder}"
    return None


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# CUDA timing (see the module docstring): warm-up time, and the bytes written before each timed call to
# evict what the last call left in L2 (4x the H100's 50 MB L2)
CUDA_WARMUP_MS = 25.0
L2_FLUSH_BYTES = 256 * 2**20
_l2_flush: dict = {}

# CPU timing: after the warm-up calls, more rounds while the timing thread still page-faults, until two
# rounds in a row fault nothing, for at most this long. glibc's heap takes ~10 calls of a function with
# MB-sized temporaries to settle (the heap grows for a while: the freed block does not take the next,
# aligned request, and the new pages fault in; a 4 MB log_softmax output: 512 faults a call for 8-10
# calls, one call between without, then none), so three warm-up calls left half the timed calls
# faulting (seen 2026-11-28). A function still faulting after this long maps its blocks afresh each
# call (>= 32 MiB), as it would in a user's process
CPU_SETTLE_S = 2.0


def flush_l2(device) -> None:
    """Evict the L2 cache of ``device`` (a CUDA device) by writing ``L2_FLUSH_BYTES``; then wait, so the
    next call starts on an idle GPU (its host work is timed, as before)."""
    device = torch.device(device)
    buf = _l2_flush.get(device)
    if buf is None:
        buf = _l2_flush[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    buf.zero_()
    torch.cuda.synchronize(device)


def _thread_page_faults() -> int:
    """Minor page faults of the calling thread so far (0 where the OS does not say)."""
    return getrusage(RUSAGE_THREAD).ru_minflt if RUSAGE_THREAD is not None else 0


def time_fn(fn: Callable[[], object], *, device, warmup: int = 3, repeats: int = 10) -> dict:
    """Median, p20 and p80 wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    return time_interleaved({"fn": fn}, device=device, warmup=warmup, repeats=repeats)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], *, device, warmup: int = 3, repeats: int = 10) -> dict:
    """:func:`time_fn` for several functions at once, their calls alternated (order reversed every other
    round: A B, B A, ...) so that slow drift of the machine (clocks, temperature, other jobs) falls on
    all of them alike: how to compare implementations whose difference is smaller than the spread
    between runs (on an H100, back-to-back runs of one optimizer step moved by up to 7%). Returns
    ``{name: {"median_ms", "p20_ms", "p80_ms", "repeats"}}``."""
    device = torch.device(device)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}

    def call_ms(fn) -> float:
        if device.type == "cuda":
            flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def warm_round() -> int:
        faults = _thread_page_faults()
        for name in names:
            fns[name]()
        return _thread_page_faults() - faults

    def loop():
        faults = [0, 0]  # of the last two warm-up rounds
        for _ in range(warmup):
            faults = [faults[1], warm_round()]
        if device.type == "cpu" and warmup and any(faults):
            # until two rounds in a row fault nothing (one may, between two that do): CPU_SETTLE_S at most
            deadline = time.perf_counter() + CPU_SETTLE_S
            while any(faults) and time.perf_counter() < deadline:
                faults = [faults[1], warm_round()]
        synchronize(device)
        if device.type == "cuda":  # then until CUDA_WARMUP_MS have passed (clocks up)
            t0 = time.perf_counter()
            while (time.perf_counter() - t0) * 1e3 < CUDA_WARMUP_MS:
                for name in names:
                    fns[name]()
                synchronize(device)
        for r in range(repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(call_ms(fns[name]))

    if device.type == "cuda":
        loop()
    else:
        _timed_in_own_arena(loop)
    return {name: {"median_ms": statistics.median(ts), "p20_ms": percentile(ts, 0.2), "p80_ms": percentile(ts, 0.8),
                   "repeats": repeats} for name, ts in times.items()}


def percentile(values, f: float) -> float:
    """The ``f`` quantile (0 <= f <= 1) of ``values`` by linear interpolation between the sorted values (numpy's
    default, ``statistics.quantiles(method="inclusive")``). Element ``int(f * n)``, used until 2026-11-28, read
    high: of 5 repeats its p80 was the slowest."""
    ts = sorted(values)
    pos = f * (len(ts) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ts) - 1)
    return ts[lo] + (ts[hi] - ts[lo]) * (pos - lo)


def copy_bandwidth(device) -> float:
    """Bytes per second (read + written) of the faster of a large copy and a large in-place update,
    the yardstick of the benchmarks' bandwidth floors. In-place counts too because a copy pays for
    reading the destination lines before writing them, which an in-place update does not."""
    n = 64 * 2**20  # 256 MB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for fn in (lambda: dst.copy_(src), lambda: src.mul_(1.0)):
        # the fastest of several runs: a floor must not inherit a slow moment of a shared machine
        best = min([best] + [time_fn(fn, device=device, warmup=1, repeats=1)["median_ms"] for _ in range(6)])
    return 2 * n * 4 / (best / 1e3)


def floor_row(case: str, impl: str, ms: float, device, **extra) -> dict:
    """A computed (not timed) row: ``ms`` is what the bytes alone take at :func:`copy_bandwidth`."""
    return {"case": case, "impl": impl, "device": str(device), "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
            "peak_bytes": None, **extra}


# The Triton kernels of the default GPU selection (allo.select.device_plan), in launch order: the launches
# benchmarks/profile_select_host.py and profile_gpu.py time
DEVICE_PLAN_KERNELS = (("allo_kernels.radix_window", "_blocked_sample_kernel"),
                       ("allo_kernels.radix_boundary", "_lows_kernel"),
                       ("allo_kernels.radix_window", "_blocked_window_kernel"),
                       ("allo_kernels.radix_boundary", "_boundaries_kernel"),
                       ("allo_kernels.radix_blocked", "_blocked_write_ranked_kernel"))


def launch_timeline(fn: Callable[[], object], kernels, repeats: int, *, launch: bool = True,
                    before: Callable[[], object] | None = None, warmup: int = 2) -> tuple[dict, float]:
    """When each launch of ``kernels`` ((module name, attribute) pairs: Triton kernels that their module
    looks up at call time) leaves the host, in ms from the start of a call of ``fn``: ``({name: median},
    median ms until the call returns)`` over ``repeats`` calls after ``warmup``, no profiler. A kernel
    launched twice in a call shows as ``name`` and ``name#2``. ``launch=False``: the launches do nothing
    (host time alone, e.g. on a CPU). ``before()`` runs untimed ahead of each call (a GPU sync)."""
    import importlib

    marks: list = []

    class Marked:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            go = self.kernel[grid] if launch else None

            def run(*args, **kwargs):
                marks.append((self.name, time.perf_counter()))
                return go(*args, **kwargs) if go is not None else None
            return run

    saved = {(importlib.import_module(mod), name): None for mod, name in kernels}
    at: dict = {}
    returned = []
    try:
        for mod, name in saved:
            saved[(mod, name)] = getattr(mod, name)
            setattr(mod, name, Marked(name.strip("_").replace("_kernel", ""), saved[(mod, name)]))
        for r in range(warmup + repeats):
            if before is not None:
                before()
            marks.clear()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            if r >= warmup:
                seen: dict = {}
                for name, t in marks:
                    seen[name] = seen.get(name, 0) + 1
                    at.setdefault(name if seen[name] == 1 else f"{name}#{seen[name]}", []).append((t - t0) * 1e3)
                returned.append((t1 - t0) * 1e3)
    finally:
        for (mod, name), kernel in saved.items():
            if kernel is not None:
                setattr(mod, name, kernel)
    return {name: statistics.median(ts) for name, ts in at.items()}, statistics.median(returned)


def with_setting(module, name: str, value, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``module.name`` set to ``value`` (restored after each call): a module-level switch
    timed against its default in the same run."""
    def run():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn()
        finally:
            setattr(module, name, saved)
    return run


def host_times_ms(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> list[float]:
    """How long each of ``repeats`` calls of ``fn()`` takes to return (ms), ``before()`` run untimed
    ahead of each: the host side of launch-bound code (with ``before`` synchronizing a GPU, the time
    until the kernels are queued, not run)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_supported() -> bool:
    return platform.system() == "Linux" and os.path.exists("/proc/self/clear_refs")


def cpu_peak_shortfall_bytes() -> int:
    """How far below the truth a CPU :func:`peak_bytes` may read, at most: each CPU can hold up to
    ``max(32, 2 x CPUs)`` pages of RSS changes unfolded (percpu_counter_batch), at the reading before
    the call as at the high-water mark. A bound, not a correction: most readings are closer."""
    cpus = os.cpu_count() or 1
    return 2 * cpus * max(32, 2 * cpus) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(fn: Callable[[], object], *, device) -> int | None:
    """Extra bytes at the peak of one call of ``fn()`` over what was in use just before it.

    Whatever ``fn`` returns is dropped before the next measurement. On CPU, right after
    :func:`time_fn`, ``fn`` is called once more (unmeasured) first. Returns None where the platform
    offers no way to measure it.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return int(peak)
    if not cpu_peak_supported():
        return None
    if _timed_since_measured[0]:
        # the first call after timed ones still finds blocks they left (measured: +6.6 MB on a 24 MB
        # peak of torch's linear + cross_entropy backward, exact from the second call): settle first
        _timed_since_measured[0] = False
        fn()  # its result is dropped at once
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)  # free heap memory back to the OS: reusing it would not show in RSS
    before_kib = _read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = fn()
    peak_kib = _read_status_kib("VmHWM")
    del out
    return max(0, (peak_kib - before_kib) * 1024)


def measure(case: str, impl: str, fn: Callable[[], object], *, device, warmup: int, repeats: int,
            memory: bool = True, **extra) -> dict:
    """One row: timing of ``fn`` and (optionally) its peak extra memory, plus any ``extra`` fields."""
    row = {"case": case, "impl": impl, "device": str(device)}
    row.update(time_fn(fn, device=device, warmup=warmup, repeats=repeats))
    if memory:
        row["peak_bytes"] = peak_bytes(fn, device=device)
    row.update(extra)
    return row


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()  # the current device (--device cuda:N made it so)
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# Wrong results found by a script's checks: (case, impl, what is wrong). A wrong result must not look
# fast: each is printed at once, the table is still reported, then exit_if_mismatched() exits with 1.
MISMATCHES: list[tuple[str, str, str]] = []


def mismatch(case: str, impl: str, what: str) -> None:
    MISMATCHES.append((case, impl, what))
    print(f"MISMATCH: {impl} on '{case}': {what}")


def exit_if_mismatched() -> None:
    """Exit with status 1 (after the report) if any result was wrong."""
    if MISMATCHES:
        sys.exit(f"{len(MISMATCHES)} wrong result(s):\n" + "\n".join(f"  {i} on '{c}': {w}" for c, i, w in MISMATCHES))


def report(rows: Iterable[dict], *, baseline: str, json_path: str | None = None, title: str = "",
           extra_columns: Iterable[str] = ()) -> list[dict]:
    """Print a table with ``speedup`` (baseline time / this time) and ``mem_ratio`` (this peak /
    baseline peak) per case, against the row whose impl is ``baseline``; write JSON if asked."""
    rows = list(rows)
    base = {r["case"]: r for r in rows if r["impl"] == baseline}
    for r in rows:
        b = base.get(r["case"])
        r["baseline"] = baseline
        r["speedup_vs_baseline"] = (b["median_ms"] / r["median_ms"]) if b and r["median_ms"] > 0 else None
        if b and r.get("peak_bytes") is not None and b.get("peak_bytes"):
            r["mem_ratio_vs_baseline"] = r["peak_bytes"] / b["peak_bytes"]
        else:
            r["mem_ratio_vs_baseline"] = None
    extra_columns = list(extra_columns)
    header = ["case", "impl", "median ms", "p20-p80 ms", "peak", *extra_columns, f"x faster vs {baseline}", "mem ratio"]
    table = []
    for r in rows:
        table.append([
            r["case"], r["impl"], f"{r['median_ms']:.3f}", _fmt_spread(r.get("p20_ms"), r.get("p80_ms")),
            _fmt_bytes(r.get("peak_bytes")),
            *[_fmt_extra(c, r.get(c)) for c in extra_columns],
            "-" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.2f}",
            "-" if r["mem_ratio_vs_baseline"] is None else f"{r['mem_ratio_vs_baseline']:.3f}",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    env = environment()
    if title:
        print(f"\n{title}")
    print("  " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for line in table:
        print("  " + "  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    if json_path:
        for r in rows:
            r.setdefault("env", env)
        write_json(json_path, rows)
        print(f"  wrote {len(rows)} rows to {json_path}")
    return rows


def _strict(v):
    # NaN/inf are not JSON (json.dump would write bare NaN that strict parsers reject): a metric that does
    # not apply, or could not be measured, is null
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return v


def write_json(path: str, obj) -> None:
    """Strict JSON (non-finite floats -> null), written atomically: a crash never leaves half a file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(_strict(obj), f, indent=1, default=str, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        # no stray FILE.tmp left beside the file that could not be written (e.g. when FILE is a directory)
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


# extra columns that hold bytes (besides any named *_bytes): bench_select's "extra" (peak minus the output),
# bench_update's "state" (optimizer state)
BYTE_COLUMNS = frozenset({"extra", "state"})


def _fmt_extra(key, v):
    # bytes by the column's name, not by size: a count (bench_update's unselected_changed) is not bytes
    if v is not None and not isinstance(v, bool) and (key in BYTE_COLUMNS or key.endswith("_bytes")):
        return _fmt_bytes(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _fmt_spread(p20, p80):
    # rows with no spread (bench_alignment's summaries: one median over seeds) show none, not 0.000-0.000
    return "-" if p20 is None or p80 is None else f"{p20:.3f}-{p80:.3f}"
