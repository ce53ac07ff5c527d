"""FSDP2 for allo-train: shard the model, gather it back whole.

When accelerate is configured for FSDP version 2 and several processes run, the warm-up stage
(full-parameter DPO, ``torch.optim.AdamW``), the select stage (importance scores and the exact
selection) and the masked stages (forget, improve, ``MaskedAdamW``) use the model sharded with
``torch.distributed.fsdp.fully_shard``: one FSDP unit per decoder layer (the classes of
``model._no_split_modules``, or the plugin's ``transformer_cls_names_to_wrap``) and the
``TokenLogprobs`` wrapper as the root unit, which holds the embeddings, the final norm and the
output layer (the fused log-prob path reads ``lm_head.weight`` inside the root's forward, where
FSDP2 has it gathered). Each rank then holds, trains and scores its rows of every parameter
(``Shard(0)``); the eval stage scores and generates with the sharded model too, and ``prepare`` samples with it
(its built-in task's SFT training stays on the main process).

Host memory: only the main process (rank 0) reads the weights; the others build the model on the
meta device from its config. Every rank builds the sharded module on the meta device too, allocates
only its own shards and receives them from rank 0 one tensor at a time. Rank 0's whole model is the
only whole copy anywhere, on its CPU, and never runs: it is the broadcast's source, and the trained
weights are gathered back into it one parameter at a time (checkpoints, end of stage), never as a
second full state dict. The stage's reference log-probs (and the forget stage's warm-up log-probs,
with the warm-up weights broadcast into the same shards and the stage's own put back after) come
from the sharded module too, every rank scoring its share of the batches (``sharded_logps``).
The eval stage scores and generates with one sharded module into which each evaluated model is
broadcast in turn (``sharded_logps``, ``sharded_generate``).

The sharding is applied here, not by ``accelerator.prepare``: accelerate's FSDP2 wrapping puts the
output layer in a unit of its own, and on CPU accelerate ignores an FSDP configuration altogether
(it runs MULTI_CPU), while allo-train shards the same way on CPU (gloo) and GPU (NCCL).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from .logps import TokenLogprobs, batch_order, score_batch

SUPPORTED = ("supported in the masked stages (forget, improve): FSDP2, DDP (accelerate's MULTI_GPU / MULTI_CPU) "
             "or one process")


class ShardedTokenLogprobs(TokenLogprobs):
    """The FSDP2 root. Returns a fresh tensor, not a view: FSDP2 hooks the root's output for
    backward, and an in-place op on a view of it would drop that hook (FSDP2 warns about views)."""

    def forward(self, input_ids, attention_mask, labels):
        return super().forward(input_ids, attention_mask, labels).clone()

    def generate(self, *args, **kwargs):
        """The model's ``generate`` run as a forward of this root (``sharded_scorer`` registers it with
        ``register_fsdp_forward_method``): FSDP2 gathers the root's own parameters (embeddings, final
        norm, output layer) for the whole generation, and each decoder layer's hooks gather that layer
        at every step. ``self.model.generate`` called directly would skip the root's hooks and read the
        root's parameters as shards."""
        return self.model.generate(*args, **kwargs)


def _fsdp_version(accelerator) -> int | None:
    """The FSDP version accelerate is configured for, or None without FSDP."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # `accelerate launch` with an FSDP config on CPU: accelerate itself falls back to MULTI_CPU;
        # allo-train still shards
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def fsdp2_shards(accelerator) -> bool:
    """True when accelerate is configured for FSDP2 and several processes run: the warm-up and
    select stages then shard the model (``sharded_scorer``). Any other setup keeps their other
    path (DDP / FSDP1 / DeepSpeed through ``accelerator.prepare`` for the warm-up, the main process
    alone for select); the masked stages ask :func:`masked_stage_shards`, which refuses the rest."""
    return _fsdp_version(accelerator) == 2 and accelerator.num_processes > 1


def masked_stage_shards(accelerator, desc: str) -> bool:
    """True when the masked stage should shard the model (accelerate configured for FSDP2 with
    several processes); a clear error for the layouts the element masks cannot follow."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(f"{desc}: DeepSpeed is not {SUPPORTED}. For sharding, use FSDP2: `distributed_type: FSDP` "
                         "with `fsdp_config: {fsdp_version: 2}` in the accelerate config")
    version = _fsdp_version(accelerator)
    if version is None:
        return False
    if version != 2:
        raise ValueError(f"{desc}: FSDP version {version} is not {SUPPORTED}; switch to FSDP2 with "
                         "`fsdp_version: 2` under `fsdp_config` in the accelerate config (FSDP_VERSION=2)")
    return accelerator.num_processes > 1


def _fully_shard_kwargs(accelerator, mesh) -> dict:
    from accelerate.utils import DistributedType

    kwargs = {"mesh": mesh}
    plugin = getattr(accelerator.state, "fsdp_plugin", None) if accelerator.distributed_type == DistributedType.FSDP else None
    if plugin is not None:
        kwargs["reshard_after_forward"] = plugin.reshard_after_forward
        if plugin.mixed_precision_policy is not None:
            kwargs["mp_policy"] = plugin.mixed_precision_policy
        if plugin.cpu_offload is not None:
            kwargs["offload_policy"] = plugin.cpu_offload
    elif "FSDP_RESHARD_AFTER_FORWARD" in os.environ:
        kwargs["reshard_after_forward"] = os.environ["FSDP_RESHARD_AFTER_FORWARD"].lower() == "true"
    return kwargs


def _layer_classes(accelerator, model) -> set[str]:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) or getattr(model, "_no_split_modules", None) or []
    return set(names)


def _shard_device(accelerator, kwargs) -> torch.device:
    from torch.distributed.fsdp import CPUOffloadPolicy

    return torch.device("cpu") if isinstance(kwargs.get("offload_policy"), CPUOffloadPolicy) else accelerator.device


def sharded_scorer(accelerator, model, *, prepare: Callable | None = None):
    """A ``TokenLogprobs`` over ``model``'s architecture sharded with FSDP2, holding ``model``'s weights.

    ``model`` is whole on the main process (rank 0) and may be on the meta device elsewhere (see
    ``load_model(..., empty=True)``); it is left untouched. Every rank builds the same architecture
    on the meta device, shards it, allocates only its own shards and receives them from rank 0, one
    tensor at a time (``set_model_state_dict`` with ``broadcast_from_rank0``): no rank ever holds a
    second whole copy. ``prepare(module)`` runs on that module before sharding (requires_grad,
    gradient checkpointing)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from .model import empty_model

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    kwargs = _fully_shard_kwargs(accelerator, mesh)
    # FSDP2 cannot be undone in place, and the main process saves `model` whole: a new module is sharded
    shadow = empty_model(model.config, dtype=next(model.parameters()).dtype, model_class=type(model))
    if prepare is not None:
        prepare(shadow)
    classes = _layer_classes(accelerator, shadow)
    layers = [m for m in shadow.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"FSDP2: found no decoder layer to shard in {type(model).__name__} (looked for "
                         f"{sorted(classes) or 'model._no_split_modules, which is empty'}); set "
                         "`fsdp_transformer_layer_cls_to_wrap` in the accelerate config")
    for layer in layers:
        fully_shard(layer, **kwargs)
    scorer = ShardedTokenLogprobs(shadow)
    fully_shard(scorer, **kwargs)
    register_fsdp_forward_method(scorer, "generate")
    # only now is memory allocated, for this rank's shards. to_empty also empties the buffers, which
    # the model's __init__ computed (non-persistent ones are not broadcast): put them back. Loading
    # into allocated shards (not meta ones, with assign=True) keeps tied weights tied and the device ours
    buffers = {name: b.clone() for name, b in shadow.named_buffers()}
    shadow.to_empty(device=_shard_device(accelerator, kwargs))
    with torch.no_grad():
        for name, b in buffers.items():
            shadow.get_buffer(name).copy_(b)
    load_weights(scorer, model)
    return scorer


def reshard(scorer) -> None:
    """Free every unsharded parameter of the FSDP2 module ``scorer``. A forward without backward
    may leave some gathered (the root's, or all with ``reshard_after_forward=False``): memory of
    the whole model on every rank, and a stale copy the next forward would use instead of the shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in scorer.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def load_weights(scorer, model) -> None:
    """Put the weights of the main process's whole ``model`` into every rank's shards of the FSDP2
    module ``scorer``: rank 0 broadcasts them one tensor at a time (``set_model_state_dict`` with
    ``broadcast_from_rank0``) into the shards' memory. Every rank calls it; ``model`` is read on
    rank 0 only (elsewhere it may be None or on the meta device)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    reshard(scorer)
    main = torch.distributed.get_rank() == 0
    set_model_state_dict(scorer.model, model.state_dict() if main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


@torch.no_grad()
def sharded_logps(scorer, examples, *, pad_id, batch_size, device, autocast, progress=None) -> list | None:
    """``compute_logps`` through the FSDP2 module ``scorer``, the work split over the ranks: the
    batches are those one process scores (same order, same padding, so the values differ from its
    only by summation order), rank ``r`` scores batches ``r, r + world, ...``, and the main process
    (rank 0) gets every example's log-probs; the other ranks get None. Each forward all-gathers
    every layer from all ranks, so every rank runs as many as the busiest: one short of a batch
    scores the first (shortest) batch again and drops the result."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    batches = batch_order(examples, batch_size)
    was_training = scorer.training
    scorer.eval()
    mine = {}
    for first in range(0, len(batches), world):
        b = first + rank
        idx = batches[b] if b < len(batches) else batches[0]
        lps = score_batch(scorer, examples, idx, pad_id=pad_id, device=device, autocast=autocast)
        if b < len(batches):
            mine.update(zip(idx, lps))
        if progress is not None:
            progress.update(sum(len(x) for x in batches[first:first + world]))
    scorer.train(was_training)
    reshard(scorer)
    parts = _gather_to_main(mine)
    if parts is None:
        return None
    out: list[torch.Tensor | None] = [None] * len(examples)
    for part in parts:
        for i, lp in part.items():
            out[i] = lp
    return out


def sharded_generate(scorer, tokenizer, prompts: list[str], *, batch_size: int, seed: int = 0,
                     num_return_sequences: int = 1, **kwargs) -> list | None:
    """Greedy (or sampled) responses of the FSDP2 module ``scorer`` for every prompt, the work split
    over the ranks: rank ``r`` generates for the ``r``-th contiguous share of ``prompts`` in batches of
    at most ``batch_size`` sequences (as :func:`allo.train.model.generate` counts them: prompts x
    ``num_return_sequences``); the main process (rank 0) gets every prompt's responses in order (as
    ``generate`` returns them), the other ranks None. Each forward all-gathers every layer from all
    ranks, so every rank runs as many ``model.generate`` calls, one per batch (a rank short of a batch
    generates for the first prompts again and drops the result), and each call runs as many forwards
    (``synced_gpus``: a rank whose sequences all ended keeps stepping until every rank's have).
    Sampling (``do_sample``): each rank's batch ``b`` is sampled with its own seed, derived from
    ``seed``, the rank and ``b`` (:func:`batch_seed`): reproducible for a given seed and number of
    ranks, but other random streams than one process's, so the samples differ from its.
    ``kwargs`` go to ``generate`` (max_new_tokens, do_sample, temperature, top_p, progress, desc, ...)."""
    import torch.distributed as dist

    from .model import generate

    world, rank = dist.get_world_size(), dist.get_rank()
    share = -(-len(prompts) // world)
    mine = prompts[rank * share:(rank + 1) * share]
    size = max(1, min(batch_size // num_return_sequences, share))  # prompts per batch
    texts = []
    for b, first in enumerate(range(0, share, size)):
        chunk = mine[first:first + size]
        # one model.generate call per batch on every rank: generate's batches hold size prompts
        out = generate(scorer, tokenizer, chunk or prompts[:size], batch_size=size * num_return_sequences,
                       num_return_sequences=num_return_sequences, seed=batch_seed(seed, rank, b),
                       synced_gpus=True, **kwargs)
        if chunk:
            texts.extend(out)
    reshard(scorer)
    parts = _gather_to_main(texts)
    return None if parts is None else [t for part in parts for t in part]


def _gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` in rank order on the main process (rank 0); None elsewhere."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def batch_seed(seed: int, rank: int, batch: int) -> int:
    """The sampling seed of ``rank``'s ``batch``-th generate call in :func:`sharded_generate`: a hash of
    the three, so that no two ranks or batches share a random stream (seed + rank + batch would)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{batch}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def gather_into(model, scorer) -> None:
    """Copy the trained shards of ``scorer.model`` into the whole ``model`` of the main process (rank 0),
    one parameter at a time: every rank takes part in each all-gather, and a gathered tensor lives only
    until it is copied, so the main process never holds a second whole copy (a full state dict would
    be one). Parameters that do not require grad were never trained and are skipped."""
    whole = dict(model.named_parameters()) if torch.distributed.get_rank() == 0 else None
    for name, p in scorer.model.named_parameters():
        if not p.requires_grad:
            continue
        shard = p.detach()
        if shard.device.type != shard.device_mesh.device_type:  # CPU-offloaded shards: gather on the mesh's device
            shard = shard.to(shard.device_mesh.device_type)
        full = shard.full_tensor()
        if whole is not None:
            whole[name].copy_(full)
        del full


__all__ = ["fsdp2_shards", "masked_stage_shards", "sharded_scorer", "load_weights", "reshard", "sharded_logps",
           "sharded_generate", "batch_seed", "gather_into", "SUPPORTED"]
