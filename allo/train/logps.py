"""Per-token log-probs of response tokens through the fused path, and the on-disk reference cache.

The policy's log-probs come from ``allo.ops.fused_linear_token_logprobs(hidden, lm_head.weight,
labels)``: the [B, T, vocab] logits are never materialised. A reference model's log-probs are the
same numbers computed once, before a stage trains, with the stage's starting weights (every ALLO
stage's reference is the model it starts from), and cached on disk: no second model is resident.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from allo._atomic import atomic_path

from .data import IGNORE_INDEX, collate


class TokenLogprobs(nn.Module):
    """Wraps a causal LM; ``forward(input_ids, attention_mask, labels)`` returns fp32 log-probs
    [B, T-1] of ``labels[:, 1:]`` (0 where ignored). Wrapped whole by DDP so gradient sync sees it.

    Under autocast the forward runs with autocast's weight-cast cache off. The cache keeps the
    low-precision copy of every fp32 weight until the outermost autocast region exits, i.e. every
    layer's copy until the forward ends, although with gradient checkpointing nothing else holds
    them (measured on the CPU, Llama-3.2-1B shape, bf16: 1.95 GB of copies alive at the end of the
    forward, the step's largest transient). Each weight is used once per forward, so nothing is cast
    twice; without checkpointing autograd saves the copies anyway, so the cache saved nothing.
    ``autocast_weight_cache=True`` leaves the cache on (the earlier behaviour, for comparisons).

    After :meth:`route_head_grads` the output layer's weight gradient goes to a MaskedAdamW's compact
    gradients (or a GradientScoreAccumulator's scores) a row block at a time, so backward makes no
    ``[V, H]`` gradient for it."""

    def __init__(self, model, *, autocast_weight_cache: bool = False):
        super().__init__()
        self.model = model
        self.autocast_weight_cache = autocast_weight_cache  # True: autocast's default (for comparisons)
        self._head_grads_to = None  # weak reference to the target of route_head_grads
        self._head_checked = False
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("allo-train's fused log-prob path needs an output layer without bias "
                             f"({type(model).__name__} has one)")

    def route_head_grads(self, target) -> None:
        """Hand the output layer's weight gradient to ``target.row_grad_sink(weight)``: a MaskedAdamW
        with compact gradients, which keeps only its selected elements (``allo.optim.compact_row_grads``),
        or an ``allo.select.GradientScoreAccumulator``; ``None`` restores the usual gradient. Held
        weakly, like the optimizer's own hooks."""
        self._head_grads_to = None if target is None else weakref.ref(target)

    def forward(self, input_ids, attention_mask, labels):
        from allo.ops import fused_linear_token_logprobs

        cache = contextlib.nullcontext() if self.autocast_weight_cache else \
            _autocast_without_weight_cache(input_ids.device.type)
        with cache:
            if not self._head_checked:
                self._check_logits_are_the_heads(input_ids, attention_mask)
                self._head_checked = True
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        param = self.model.get_output_embeddings().weight
        target = self._head_grads_to() if self._head_grads_to is not None else None
        sink = target.row_grad_sink(param) if target is not None else None
        return fused_linear_token_logprobs(hidden[:, :-1], self._head_weight(hidden), labels[:, 1:],
                                           ignore_index=IGNORE_INDEX, weight_grad_sink=sink)

    def _head_weight(self, hidden):
        """The output layer's weight as the fused op takes it: in ``hidden``'s dtype outside autocast
        (under autocast the op casts it a block at a time)."""
        weight = self.model.get_output_embeddings().weight
        if weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
            weight = weight.to(hidden.dtype)
        return weight

    @torch.no_grad()
    def _check_logits_are_the_heads(self, input_ids, attention_mask) -> None:
        """The fused path computes ``log_softmax(hidden @ W.T)``; some models' forward changes the logits
        after the output layer (Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's
        logits_scaling, muP multipliers), and their log-probs would then be silently wrong. Once, on the
        first sequence's first tokens, compare the model's own logits with the output layer's (eval mode:
        no dropout, no random numbers drawn). Every process runs it (collectives under FSDP2)."""
        ids, mask = input_ids[:1, :16], attention_mask[:1, :16]
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            head = torch.nn.functional.linear(hidden, self._head_weight(hidden)).float()
        finally:
            self.model.train(was_training)
        scale = float(logits.abs().max().clamp(min=1e-3))
        err = float((logits - head).abs().max()) / scale
        if not err <= 2e-2:  # bf16 rounding of both: ~1e-2 at most; a NaN fails too
            raise ValueError(
                f"{type(self.model).__name__}'s logits are not its output layer's (hidden @ W.T): they differ by "
                f"{err:.3g} of their largest value. Its forward transforms them (e.g. final_logit_softcapping, "
                "logit_scale, logits_scaling in the config), which allo-train's fused log-prob path does not "
                "reproduce; such models are not supported yet"
            )


@contextlib.contextmanager
def _autocast_without_weight_cache(device_type: str):
    """The autocast region in force (if any), with its weight-cast cache off (see TokenLogprobs)."""
    if not (torch.is_autocast_enabled(device_type) and torch.is_autocast_cache_enabled()):
        yield
        return
    with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False):
        yield


def response_mask(batch) -> torch.Tensor:
    return batch["labels"][:, 1:] != IGNORE_INDEX


def batch_order(examples, batch_size):
    """Batches of similar length (less padding); returns lists of indices."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt_ids"]) + len(examples[i]["response_ids"]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def compute_logps(scorer: TokenLogprobs, examples, *, pad_id, batch_size, device, autocast, progress=None) -> list[torch.Tensor]:
    """Response-token log-probs of every example (1-D fp32 tensors on CPU, in example order)."""
    was_training = scorer.training
    scorer.eval()
    out: list[torch.Tensor | None] = [None] * len(examples)
    for idx in batch_order(examples, batch_size):
        for i, lp in zip(idx, score_batch(scorer, examples, idx, pad_id=pad_id, device=device, autocast=autocast)):
            out[i] = lp
        if progress is not None:
            progress.update(len(idx))
    scorer.train(was_training)
    return out


def score_batch(scorer, examples, idx, *, pad_id, device, autocast) -> list[torch.Tensor]:
    """Response-token log-probs (1-D fp32 on CPU) of ``examples[i]`` for ``i`` in ``idx``, one batch."""
    batch = collate([examples[i] for i in idx], pad_id, device)
    with autocast():
        lp = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
    mask = response_mask(batch)
    return [lp[row][mask[row]].float().cpu() for row in range(len(idx))]


def pad_like(values: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Scatter per-example 1-D values into a [B, T] tensor at the True positions of ``mask``."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[mask] = torch.cat(values).to(mask.device)
    return out


def save_cache(path: str, named: dict[str, list[torch.Tensor]], *, key: str | None = None) -> None:
    """Ragged lists of 1-D tensors as flat tensors + offsets in one safetensors file (atomic);
    ``key``: what they were computed from (allo.train.stages.common.inputs_key), kept in its metadata."""
    from safetensors.torch import save_file

    tensors = {}
    for name, vals in named.items():
        tensors[f"{name}.values"] = torch.cat(vals).contiguous() if vals else torch.zeros(0)
        tensors[f"{name}.lengths"] = torch.tensor([v.numel() for v in vals], dtype=torch.int64)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=None if key is None else {"inputs": key})


def cache_key(path: str) -> str | None:
    """The ``key`` a cache was saved with (None: none)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("inputs")


def load_cache(path: str) -> dict[str, list[torch.Tensor]]:
    from safetensors.torch import load_file

    raw = load_file(path)
    out = {}
    for key in raw:
        if key.endswith(".values"):
            name = key[: -len(".values")]
            out[name] = list(torch.split(raw[key], raw[f"{name}.lengths"].tolist()))
    return out
