# Run 11 (H100, 2026-11-27): band_masks with radix_boundary's kernels, with torch glue for both steps, and
# with the lows kernel only, alternated (order reversed every other round), 60 calls each. Run from the
# repository root; now part of benchmarks/profile_gpu.py --only select (kernels vs glue).
import sys, torch, statistics
sys.path.insert(0, "benchmarks")
import bench_select as B
from allo.select.topk import band_masks
from allo.select import device_plan
from allo_kernels import radix_boundary as R
scores = B.make_scores(B.llama1b_shapes(), torch.bfloat16, torch.device("cuda"))
def run():
    return band_masks(scores, 0.1, backend="triton", histogram="blocked")
def setv(v):
    R.USE_KERNELS = v in ("kernels", "lows")
    device_plan.boundaries = R.boundaries if v == "kernels" else R.boundaries_reference
V = ["kernels", "glue", "lows"]
t = {v: [] for v in V}
for v in V:
    setv(v); run(); run()
torch.cuda.synchronize()
for i in range(60):
    for v in (V if i % 2 else V[::-1]):
        setv(v)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(); s.record(); m = run(); e.record(); torch.cuda.synchronize()
        t[v].append(s.elapsed_time(e)); del m
for v in V:
    x = sorted(t[v]); print(v, "median %.3f p20 %.3f p80 %.3f" % (statistics.median(x), x[12], x[48]))
