"""FSDP2 for the masked stages (forget, improve): shard the model, gather it back whole.

When accelerate is configured for FSDP version 2 and several processes run, a masked stage trains a
copy of the model sharded with ``torch.distributed.fsdp.fully_shard``: one FSDP unit per decoder
layer (the classes of ``model._no_split_modules``, or the plugin's ``transformer_cls_names_to_wrap``)
and the ``TokenLogprobs`` wrapper as the root unit, which holds the embeddings, the final norm and
the output layer (the fused log-prob path reads ``lm_head.weight`` inside the root's forward, where
FSDP2 has it gathered). ``MaskedAdamW`` then trains each rank's rows of every parameter.

The sharding is applied here, not by ``accelerator.prepare``: accelerate's FSDP2 wrapping puts the
output layer in a unit of its own, and on CPU accelerate ignores an FSDP configuration altogether
(it runs MULTI_CPU), while the masked stages shard the same way on CPU (gloo) and GPU (NCCL).
"""

from __future__ import annotations

import copy
import os

import torch

from .logps import TokenLogprobs

SUPPORTED = ("supported in the masked stages (forget, improve): FSDP2, DDP (accelerate's MULTI_GPU / MULTI_CPU) "
             "or one process")


class ShardedTokenLogprobs(TokenLogprobs):
    """The FSDP2 root. Returns a fresh tensor, not a view: FSDP2 hooks the root's output for
    backward, and an in-place op on a view of it would drop that hook (FSDP2 warns about views)."""

    def forward(self, input_ids, attention_mask, labels):
        return super().forward(input_ids, attention_mask, labels).clone()


def masked_stage_shards(accelerator, desc: str) -> bool:
    """True when the masked stage should shard the model (accelerate configured for FSDP2 with
    several processes); a clear error for the layouts the element masks cannot follow."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ValueError(f"{desc}: DeepSpeed is not {SUPPORTED}. For sharding, use FSDP2: `distributed_type: FSDP` "
                         "with `fsdp_config: {fsdp_version: 2}` in the accelerate config")
    if kind == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # `accelerate launch` with an FSDP config on CPU: accelerate itself falls back to MULTI_CPU
        # (the dense warm-up stage then runs DDP); the masked stages still shard
        version = int(os.environ.get("FSDP_VERSION", "1"))
    else:
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


def sharded_scorer(accelerator, model):
    """A ``TokenLogprobs`` over a copy of ``model`` sharded with FSDP2 (``model`` stays whole and
    untouched; the copy's parameters become ``Shard(0)`` DTensors on the accelerator's device)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    kwargs = _fully_shard_kwargs(accelerator, mesh)
    # the copy is what gets sharded: FSDP2 cannot be undone in place, and the stage saves `model`
    shadow = copy.deepcopy(model)
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
    return scorer


def full_state_dict(model) -> dict:
    """The whole model's state dict on the main process's CPU ({} elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_weights(model, weights: dict, *, source: str) -> None:
    """Load a full state dict into ``model`` (plain, unsharded) with a clear error if it does not fit.
    Tied weights are saved once (under the other name); anything else missing is the wrong file."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    state = model.state_dict()
    loaded = {t.data_ptr() for n, t in state.items() if n in weights}
    missing = [m for m in missing if state[m].data_ptr() not in loaded]
    if unexpected or missing:
        raise ValueError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def gather_into(model, scorer) -> None:
    """Copy the trained shards of ``scorer.model`` into the whole ``model`` on the main process."""
    full = full_state_dict(scorer.model)
    if full:
        load_full_weights(model, full, source="the gathered FSDP2 state dict")


__all__ = ["masked_stage_shards", "sharded_scorer", "full_state_dict", "load_full_weights", "gather_into",
           "SUPPORTED"]
