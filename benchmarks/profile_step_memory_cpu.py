"""What is alive at the peak of one ALLO improve step, measured on the CPU (no GPU needed).

    python benchmarks/profile_step_memory_cpu.py [--config llama-3.2-1b-shape] [--pairs 1] [--seq 64]
                                                 [--bf16] [--checkpointing] [--before]

The CPU counterpart of ``profile_gpu.py --only step-memory``: it runs ``bench_step``'s improve step
(``AlloImprove``) once to warm up, prints the harness's peak (VmHWM) of a second step, then runs a
third under a ``TorchDispatchMode`` that tracks every live storage, and prints what was alive at the
step's peak and at the forward's peak, grouped by the op that made it. With the real model shape and
few tokens the parameter-sized parts (weight copies, [vocab, hidden] gradients) are as on the GPU,
and the token-sized ones scale with the tokens (the GPU case: 8 x 512). ``--before``: the step without
the memory fixes of 2026-11-26 and -27 (embedding and output-layer gradients not routed, autocast weight-cast cache on).

Caveats: the tracker sees tensors made by dispatched ops only; and under it an in-place add of
autograd's gradient buffers can happen out of place (its peak may then hold one [vocab, hidden]
gradient more than the harness's peak shows). The selection is a random 10% mask, not the exact top
10% (any 10% mask costs the same memory; the exact one takes minutes on this CPU at 1B scale).
Session 4 (2026-11-26) used it to find that the 1B-shaped step's peak was autocast's weight-cast
cache at the end of the forward, not the embedding gradients.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import _harness as H  # noqa: E402
import bench_step as B  # noqa: E402


class LiveStorages(TorchDispatchMode):
    """Tracks the CPU storages that ops make and keeps the set alive at the highest total, overall and
    during the forward (ops outside any autograd node)."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage address -> (weak reference, bytes, made by, shape, dtype)
        self.current = 0
        self.peak, self.peak_at, self.peak_set = 0, "", []
        self.forward_peak, self.forward_set = 0, []

    def _alive(self):
        return [(v[1], v[2], v[3], v[4]) for v in self.live.values() if not v[0].expired()]

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node()
        where = f"{node.name() if node is not None else 'forward'}:{func.__name__}"
        for key in [k for k, v in self.live.items() if v[0].expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes(), where, tuple(t.shape), t.dtype)
                    self.current += storage.nbytes()
        if self.current > self.peak:
            self.peak, self.peak_at, self.peak_set = self.current, where, self._alive()
        if node is None and self.current > self.forward_peak:
            self.forward_peak, self.forward_set = self.current, self._alive()
        return out


def show(title, alive, top=12):
    groups = collections.defaultdict(lambda: [0, 0])
    for nbytes, where, shape, dtype in alive:
        g = groups[(where, shape, str(dtype).replace("torch.", ""))]
        g[0] += nbytes
        g[1] += 1
    print(f"{title}: {sum(g[0] for g in groups.values()) / 1e6:.1f} MB")
    for (where, shape, dtype), (nbytes, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {nbytes / 1e6:9.1f} MB  x{count:<3d} {where:50s} {shape} {dtype}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama-3.2-1b-shape", choices=B.MODELS, help="a bench_step.llama_config name")
    p.add_argument("--pairs", type=H.int_at_least(1), default=1)
    p.add_argument("--seq", type=H.int_at_least(2), default=64)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as on the GPU)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (as on the GPU)")
    p.add_argument("--before", action="store_true", help="without the session-4 memory fixes")
    args = p.parse_args()
    from transformers import LlamaForCausalLM

    import allo.select

    cfg = B.llama_config(args.config)
    start = time.time()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    batch = B.make_batch(cfg.vocab_size, args.pairs, args.seq, torch.device("cpu"))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def random_selection(scores, ratio, **_):
        g = torch.Generator().manual_seed(1)
        return types.SimpleNamespace(masks={n: torch.rand(s.shape, generator=g) < ratio for n, s in scores.items()})

    allo.select.select = random_selection  # what AlloImprove calls for its mask
    runner = B.AlloImprove(model, batch, beta=0.1, eps=0.1, ratio=0.1, autocast=autocast,
                           checkpointing=args.checkpointing, route_grads=not args.before,
                           autocast_weight_cache=args.before)
    runner.step()  # warm-up: plans, caches
    print(f"{args.config}, {args.pairs * 2} x {args.seq} tokens, bf16 autocast {args.bf16}, checkpointing "
          f"{args.checkpointing}, before {args.before} (set up in {time.time() - start:.0f} s)")
    print(f"harness peak of one step (VmHWM): {H.peak_bytes(runner.step, device='cpu') / 1e6:.1f} MB")
    tracker = LiveStorages()
    with tracker:
        runner.step()
    show(f"tracked peak, at {tracker.peak_at}", tracker.peak_set)
    show("forward's peak", tracker.forward_set)


if __name__ == "__main__":
    main()
