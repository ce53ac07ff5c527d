"""Under torch.distributed (2 CPU processes, gloo) the ranks' masks together equal the single-process
masks, whether the ranks hold different tensors or dim-0 shards of every tensor."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from allo.select import select, select_shards, select_top

WORLD = 2


def _scores():
    g = torch.Generator().manual_seed(1234)
    out = {}
    for i in range(9):
        rows = int(torch.randint(2, 40, (), generator=g))
        # few distinct values: the thresholds cut through ties, which must be ordered across ranks
        out[f"layers.{i}.weight"] = (torch.randint(0, 12, (rows, 3), generator=g).float() * 0.5)
    out["lm_head.weight"] = torch.rand(17, 3, generator=g)
    return out


def _shard(t, rank):
    # dim-0 shards in rank order, like FSDP2's local shards
    return t.tensor_split(WORLD, dim=0)[rank].contiguous()


MODES = ("partition", "shards", "mixed_dtypes", "empty_rank")
CASES = ((0.3, 0.05), (0.1, 0.0), (1.0, 0.5))


def _whole(mode):
    """The scores of all ranks together, for a mode: the ranks of "mixed_dtypes" hold bf16 and fp32 tensors
    (alone, each would search 16-bit or 32-bit keys, in a different number of passes); in "empty_rank"
    rank 1 holds nothing and rank 0 only bf16 scores."""
    scores = _scores()
    if mode in ("mixed_dtypes", "empty_rank"):
        half = list(scores)[:len(scores) // WORLD] if mode == "mixed_dtypes" else list(scores)
        scores = {n: s.bfloat16() if n in half else s for n, s in scores.items()}
    return scores


def _local(mode, rank):
    scores = _whole(mode)
    names = list(scores)
    if mode == "shards":
        return {n: _shard(s, rank) for n, s in scores.items()}
    if mode == "empty_rank":
        return scores if rank == 0 else {}
    return {n: scores[n] for n in names[rank * len(names) // WORLD:(rank + 1) * len(names) // WORLD]}


def _worker(rank, out_dir):
    # a file rendezvous: a free TCP port picked beforehand can be taken by another process meanwhile
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)  # ranks whose collectives do not pair up would hang
    try:
        results = {}
        for mode in MODES:
            local = _local(mode, rank)
            for ratio, exclude in CASES:
                results[mode, ratio, exclude] = select_top(local, ratio, exclude_ratio=exclude, backend="cpu")
        # select_shards: each rank's dim-0 block of every tensor; rank dst gets the whole tensors' Selection
        shapes = {n: tuple(s.shape) for n, s in _whole("shards").items()}
        mine = _local("shards", rank)
        for granularity, dst in (("element", 0), ("row", 1)):
            sel = select_shards(mine, 0.3, shapes=shapes, exclude_ratio=0.05, granularity=granularity,
                                metadata={"made_up": 1}, backend="cpu", dst=dst)
            results["select_shards", granularity] = None if sel is None else (sel.indices, sel.shapes, sel.metadata)
        try:  # shapes= that the ranks' rows do not add up to: every rank refuses (none waits in a collective)
            select_shards(mine, 0.3, shapes={**shapes, "lm_head.weight": (18, 3)}, backend="cpu")
            results["rows missing"] = None
        except ValueError as e:
            results["rows missing"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        faulthandler.cancel_dump_traceback_later()
        dist.destroy_process_group()


def test_ranks_together_equal_single_process(tmp_path):
    # one spawn for every case: starting processes is the slow part
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for mode in MODES:
        for ratio, exclude in CASES:
            expect = select_top(_whole(mode), ratio, exclude_ratio=exclude, backend="cpu")
            got_parts = [p[mode, ratio, exclude] for p in parts]
            for name, mask in expect.items():
                if mode != "shards":
                    got = next(p[name] for p in got_parts if name in p)
                else:
                    got = torch.cat([p[name] for p in got_parts], dim=0)
                assert torch.equal(got, mask), (mode, ratio, exclude, name)
            total = sum(int(m.sum()) for p in got_parts for m in p.values())
            assert total == sum(int(m.sum()) for m in expect.values())
    for granularity, dst in (("element", 0), ("row", 1)):
        want = select(_whole("shards"), 0.3, exclude_ratio=0.05, granularity=granularity, metadata={"made_up": 1},
                      backend="cpu")
        assert parts[1 - dst]["select_shards", granularity] is None
        indices, shapes, metadata = parts[dst]["select_shards", granularity]
        assert shapes == want.shapes and metadata == want.metadata and list(indices) == want.names
        for name in want.names:
            assert torch.equal(indices[name], want.indices[name]), (granularity, name)
        assert 0 < want.num_selected() < want.num_total()
    for p in parts:
        assert "'lm_head.weight' hold 17 rows together, the tensor 18" in p["rows missing"]


def test_histograms_of_cpu_scores_reduce_through_the_gpu_under_nccl(monkeypatch):
    # FSDP2 with CPU offload keeps scores (so histograms) on the CPU; NCCL reduces only CUDA tensors.
    # No NCCL here: the backend and the reduction are stand-ins, the routing is what is checked.
    import allo.select.topk as topk

    seen = []
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: seen.append(t.device) or t.mul_(2))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    hist = torch.arange(4)
    assert topk._reduce_device(hist, group="g") == torch.device("cuda", 0)
    monkeypatch.setattr(topk, "_reduce_device", lambda t, group: torch.device("meta"))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: seen.append(t.device))
    with pytest.raises(NotImplementedError):  # meta -> cpu cannot copy data: proves the detour was taken
        topk._all_reduce(hist, "g")
    assert seen == [torch.device("meta")]
    monkeypatch.setattr(topk, "_reduce_device", lambda t, group: t.device)  # gloo: reduced in place
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: t.mul_(2))
    assert topk._all_reduce(hist, "g") is hist and hist.tolist() == [0, 2, 4, 6]
