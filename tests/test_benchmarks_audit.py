"""Audit of the benchmark scripts (benchmarks/_harness.py, bench_update, bench_select, bench_logprob):
what they report must be what a user would see, and a wrong result must not look fast. Tiny sizes."""

import os
import resource
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import _harness as H  # noqa: E402

linux_only = pytest.mark.skipif(not H.cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")


def _faulting(fn):
    """``fn`` that records the page faults of each call (of the calling thread) in ``.faults``."""
    def call():
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        out = fn()
        call.faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
        return out

    call.faults = []
    return call


@linux_only
def test_timed_calls_do_not_page_fault_their_temporaries():
    # The harness once fixed glibc's mmap threshold at 64 KiB for the whole process, timing included:
    # every temporary of 64 KiB or more was a fresh mmap, page-faulted in on each call (a 16 MB
    # log_softmax paid ~4000 faults a call, 3.5x its time; torch AdamW's --quick step 2x), which a
    # user's process (glibc's threshold rises to 32 MiB) does not pay. The baselines allocate more
    # than allo's kernels, so their ratios were inflated.
    x = torch.randn(256, 4096)  # log_softmax's output is a 4 MB temporary: 1024 pages
    fn = _faulting(lambda: torch.log_softmax(x, -1))
    # glibc's heap takes a few calls to settle (and the kernel may still take pages back now and
    # then): the median call is what the harness reports
    H.time_fn(fn, device="cpu", warmup=5, repeats=9)
    assert sorted(fn.faults[-9:])[4] < 100, fn.faults
    H.peak_bytes(fn, device="cpu")  # measuring in between changes nothing for the next timing
    fn.faults.clear()
    H.time_fn(fn, device="cpu", warmup=5, repeats=9)
    assert sorted(fn.faults[-9:])[4] < 100, fn.faults


@linux_only
def test_peak_bytes_still_sees_a_temporary_the_timed_calls_reused():
    x = torch.randn(256, 4096)

    def fn():
        return torch.log_softmax(x, -1).sum()

    H.time_fn(fn, device="cpu", warmup=2, repeats=3)
    assert 3.9e6 <= H.peak_bytes(fn, device="cpu") <= 12e6


@linux_only
def test_peak_bytes_counts_small_blocks_after_timing():
    # blocks under 64 KiB always come from a malloc arena: the timed calls (which run with larger
    # thresholds) must not leave resident free blocks where the measured call would take them unseen
    def fn():
        return [torch.ones(3000) for _ in range(1000)]  # 12 KB each, 12 MB in all

    H.time_fn(fn, device="cpu", warmup=1, repeats=2)
    assert H.peak_bytes(fn, device="cpu") >= 11e6
    H.time_fn(fn, device="cpu", warmup=1, repeats=2)
    assert H.peak_bytes(fn, device="cpu") >= 11e6


@linux_only
def test_peak_right_after_timing_equals_a_peak_without_timing():
    # linear + cross_entropy backward (torch's fused-head baseline in bench_logprob): its first
    # measured call after the timed ones read ~27% high before the harness settled the heap first
    import torch.nn.functional as F

    h = torch.randn(256, 128).requires_grad_()
    w = (torch.randn(8000, 128) / 128**0.5).requires_grad_()
    y, u = torch.randint(0, 8000, (256,)), torch.rand(256)

    def fn():
        return torch.autograd.grad(-F.cross_entropy(h @ w.t(), y, reduction="none"), (h, w), u)

    untimed = min(H.peak_bytes(fn, device="cpu") for _ in range(2))
    H.time_fn(fn, device="cpu", warmup=1, repeats=3)
    after_timing = H.peak_bytes(fn, device="cpu")
    assert abs(after_timing - untimed) <= 0.1 * untimed, (after_timing, untimed)


def test_bench_logprob_flags_a_wrong_result():
    # bench_logprob compared nothing: a fast wrong kernel would have looked good. Now every impl's
    # log-probs and gradients are checked against fp32 log_softmax + gather before it is timed
    import bench_logprob as B

    want = (torch.randn(8), torch.randn(8, 5))
    B.MISMATCHES.clear()
    assert B._check("c", "right", (want[0] + 1e-7, want[1]), want, torch.float32) <= 1e-4
    assert not B.MISMATCHES
    B._check("c", "wrong", (want[0], torch.zeros(8, 5)), want, torch.float32)
    B._check("c", "nan", (want[0] * float("nan"), want[1]), want, torch.float32)
    assert [m[1] for m in B.MISMATCHES] == ["wrong", "nan"]
    B.MISMATCHES.clear()
