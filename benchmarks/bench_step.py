"""One ALLO improve-stage training step vs. a dense DPO step as users run it today.

    python benchmarks/bench_step.py [--quick] [--json FILE] [--device cpu|cuda] [--ratio 0.1]

Both impls take one optimizer step on the same model and the same batch (pairs of prompt +
response sequences, random token ids):

* ``dense_dpo`` (baseline): a resident frozen reference model, ``torch.optim.AdamW`` on every
  parameter, log-probs from the full fp32 ``log_softmax`` of the logits (what a plain DPO loop does);
* ``dense_dpo_fused``: the same with ``AdamW(fused=True)`` (transformers 5's Trainer picks the fused
  AdamW by default where torch has one): the baseline stays the default AdamW, as in the GPU runs
  recorded so far, and this row shows how much of the gap the optimizer alone is;
* ``trl_dpo``: TRL's ``DPOTrainer`` (``training_step`` on the same batch, then its clip and the optimizer
  Trainer makes): the DPO that many users run today; left out, with a line saying so, where TRL
  cannot be imported (``pip install trl``);
* ``allo_improve``: what ``allo-train``'s improve stage runs: reference log-probs cached (no second
  model), ``MaskedAdamW`` on a ``--ratio`` mask in compact-gradient mode, the fused
  hidden-states x lm_head log-prob path, ``allo.losses.improve_loss`` on key tokens.

Memory columns: ``peak`` is the harness's transient peak of one step (bytes above what was live
before it); ``resident`` is what lives between steps (weights, reference model, optimizer state);
``total`` = resident + peak, the number the targets are about.

Cases: CPU: a small Llama (vocab 32000, hidden 256, 4 layers); GPU: the Llama-3.2-1B shape (random
weights, fp32 parameters, bf16 autocast, gradient checkpointing), 8 sequences x 512 tokens.
``--config tied-large-vocab`` (CPU): the GPU case's structure with a small trunk: vocab 128256, tied
embeddings, hidden 256, 2 layers, bf16 autocast, gradient checkpointing, 4 x 128 tokens (2 x 64 with
``--quick``). ``--before`` adds ``allo_improve_before``: the improve step without
``allo.optim.compact_embedding_grads`` and ``compact_row_grads`` (the input embedding's and the output
layer's gradients go through dense ``[V, H]`` gradients) and with autocast's weight-cast cache on (as
it ran until 2026-11-26), for a same-run comparison. It runs today's fused head, whose backward goes
through row blocks and gives an fp32 weight its fp32 gradient directly (until 2026-11-27 the head also
kept a bf16 copy of the weight and made a bf16 [V, H] gradient for autograd to cast, and held two
chunks' logits at its peak): so the real earlier step peaked higher still.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# the llama_config names (--model)
MODELS = ("small-llama", "llama-3.2-1b-shape", "tiny-llama", "tied-large-vocab")


def llama_config(name):
    from transformers import LlamaConfig

    if name == "llama-3.2-1b-shape":
        return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                           tie_word_embeddings=True, rope_theta=500000.0)
    if name == "tied-large-vocab":  # the 1B shape's vocabulary and tied embeddings on a CPU-sized trunk
        return LlamaConfig(vocab_size=128256, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=True)
    if name == "small-llama":
        return LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                           tie_word_embeddings=False)
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=8000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                           tie_word_embeddings=False)
    raise ValueError(name)


def make_batch(vocab, pairs, seq, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2 * pairs, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # the prompt: first quarter
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def _tensor_bytes(ts):
    seen, total = set(), 0
    for t in ts:
        if t is None or not torch.is_tensor(t) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def resident_bytes(models, opt):
    ts = [p for m in models for p in m.parameters()] + [b for m in models for b in m.buffers()]
    ts += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    ts += [p.grad for m in models for p in m.parameters()]
    return _tensor_bytes(ts)


class DenseDPO:
    """A plain DPO step: policy + resident reference, AdamW, full fp32 log_softmax."""

    def __init__(self, model, batch, *, beta, autocast, checkpointing, fused=False):
        self.policy = model
        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=1e-6, weight_decay=0.0,
                                     **({"fused": True} if fused else {}))
        self.batch, self.beta, self.autocast = batch, beta, autocast
        if checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _logps(self, model, ids, attn, labels):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        lab = labels[:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (lp * (lab != -100)).sum(-1)

    def backward(self):
        ids, attn, labels = self.batch
        n = ids.shape[0] // 2
        with self.autocast():
            with torch.no_grad():
                ref = self._logps(self.ref, ids, attn, labels)
            pol = self._logps(self.policy, ids, attn, labels)
        loss = -F.logsigmoid(self.beta * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))).mean()
        loss.backward()

    def step(self):
        self.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def resident(self):
        return resident_bytes([self.policy, self.ref], self.opt)


class TrlDPO:
    """TRL's ``DPOTrainer`` (what many users run today): its ``training_step`` on the same batch (policy and
    resident reference forwards through TRL's fused log-prob head, sigmoid loss), then the step its
    inner loop takes: clip to 1.0, the optimizer Trainer makes by default (AdamW, fused on CUDA), zero.
    Needs ``trl`` (a dev dependency: ``pip install trl``)."""

    def __init__(self, model, batch, *, beta, autocast_bf16, checkpointing, device):
        import tempfile

        import datasets
        import trl

        from allo.train.tokenizer import load_builtin_tokenizer

        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self._out = tempfile.TemporaryDirectory(prefix="bench_step_trl_")  # (Trainer's output_dir; removed with it)
        # (TRL needs a dataset and a tokenizer to start; the timed steps take the batch below)
        rows = datasets.Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 2)
        args = trl.DPOConfig(output_dir=self._out.name, beta=beta, report_to=[],
                             per_device_train_batch_size=batch[0].shape[0] // 2, bf16=autocast_bf16,
                             use_cpu=device.type == "cpu", gradient_checkpointing=checkpointing,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, learning_rate=1e-6,
                             max_grad_norm=1.0, save_strategy="no", disable_tqdm=True)
        self.trainer = trl.DPOTrainer(model=model, ref_model=self.ref, args=args, train_dataset=rows,
                                      processing_class=load_builtin_tokenizer())
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # (Trainer's loop sets it per batch; one batch a step)
        self.model = self.trainer.model
        self.model.train()
        ids, attn, labels = batch
        # TRL's collated batch: chosen rows then rejected rows, completion_mask over the response tokens
        self.inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": (labels != -100).long()}

    def backward(self):
        self.trainer.training_step(self.model, dict(self.inputs))  # (it deletes its inputs dict when done)

    def step(self):
        t = self.trainer
        self.backward()
        t.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)

    def resident(self):
        return resident_bytes([self.model, self.ref], self.trainer.optimizer)


class AlloImprove:
    """allo-train's improve step: cached reference log-probs, MaskedAdamW compact grads, fused log-probs."""

    def __init__(self, model, batch, *, beta, eps, ratio, autocast, checkpointing, seed=0, route_grads=True,
                 autocast_weight_cache=False):
        from allo.losses import improve_loss
        from allo.optim import MaskedAdamW, compact_embedding_grads
        from allo.select import select
        from allo.train.logps import TokenLogprobs

        self.model, self.batch, self.beta, self.eps, self.autocast = model, batch, beta, eps, autocast
        self.loss_fn = improve_loss
        g = torch.Generator().manual_seed(seed)
        # any 10% mask costs the same; random scores stand in for the warm-up's
        scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
        sel = select(scores, ratio)
        del scores
        masks = {n: m.to(next(model.parameters()).device) for n, m in sel.masks.items()}
        named = list(model.named_parameters())
        for n, p in named:
            p.requires_grad_(bool(masks[n].any()))
        self.opt = MaskedAdamW([(n, p) for n, p in named if p.requires_grad], lr=5e-6, weight_decay=0.0,
                               masks={n: masks[n] for n, p in named if p.requires_grad}, compact_grads=True)
        del masks, sel
        self.scorer = TokenLogprobs(model, autocast_weight_cache=autocast_weight_cache)
        if route_grads:  # as allo-train does: no dense [V, H] gradient from the embedding or the output layer
            compact_embedding_grads(model.get_input_embeddings(), self.opt)
            self.scorer.route_head_grads(self.opt)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids, attn, labels = batch
        self.mask = labels[:, 1:] != -100
        with torch.no_grad(), autocast():  # the cache allo-train computes once per stage
            self.ref = self.scorer(ids, attn, labels).float()

    def step(self):
        ids, attn, labels = self.batch
        n = ids.shape[0] // 2
        with self.autocast():
            lp = self.scorer(ids, attn, labels)
        m, r = self.mask, self.ref
        loss, _ = self.loss_fn(lp[:n], lp[n:], r[:n], r[n:], m[:n], m[n:], beta=self.beta, eps=self.eps)
        loss.backward()
        self.opt.clip_grad_norm_(1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def resident(self):
        return resident_bytes([self.model], self.opt) + _tensor_bytes([self.ref])


def main():
    def extra(p):
        p.add_argument("--ratio", type=H.ratio, default=0.1, help="improve-mask ratio, in (0, 1]")
        p.add_argument("--model", default=None, choices=MODELS,
                       help="small-llama (CPU default) | llama-3.2-1b-shape (GPU default) | tiny-llama | "
                            "tied-large-vocab (--config tied-large-vocab's default on the CPU)")
        p.add_argument("--config", default="default", choices=("default", "tied-large-vocab"),
                       help="tied-large-vocab: the GPU step's structure on the CPU (vocab 128256, tied "
                            "embeddings, bf16 autocast, gradient checkpointing) with a small trunk")
        p.add_argument("--before", action="store_true",
                       help="also run allo_improve_before: the step without routing the embedding's and the "
                            "output layer's gradients into the compact gradients, autocast's weight cache on")

    args = H.parse_args("ALLO improve step vs dense DPO step: time and peak memory", extra)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = args.model or ("llama-3.2-1b-shape" if cuda else ("tiny-llama" if args.quick else "small-llama"))
    pairs, seq = (4, 512) if cuda else ((4, 64) if args.quick else (4, 128))
    gpu_like = cuda or args.config == "tied-large-vocab"
    if args.config == "tied-large-vocab" and not cuda:
        name = args.model or "tied-large-vocab"
        pairs, seq = (1, 64) if args.quick else (2, 128)
    # on the GPU a step is ~0.2 s and its time spread widely over 10 repeats (H100, 2026-11-26: p20-p80
    # 142-202 ms around a 152 ms median): more of them for a median worth comparing with a target
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (3 if cuda else 2))
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else (25 if cuda else 5))
    checkpointing = gpu_like
    if gpu_like:
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        import contextlib

        autocast = contextlib.nullcontext
    from transformers import LlamaForCausalLM

    cfg = llama_config(name)
    case = f"{name} {2 * pairs}x{seq}" + (" bf16-autocast+ckpt" if gpu_like else " fp32")
    rows = []
    try:
        importlib.import_module("trl")  # (it needs `datasets` too, which the GPU machines lack)
        trl_impl = ("trl_dpo",)
    except ImportError as e:
        trl_impl = ()
        print(f"bench_step: trl_dpo not run: TRL cannot be imported ({e}); `pip install trl` adds that row")
    impls = ("dense_dpo", "dense_dpo_fused") + trl_impl + ("allo_improve",)
    for impl in impls + (("allo_improve_before",) if args.before else ()):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).float()
        batch = make_batch(cfg.vocab_size, pairs, seq, device)
        if impl == "trl_dpo":
            runner = TrlDPO(model, batch, beta=0.1, autocast_bf16=gpu_like, checkpointing=checkpointing, device=device)
        elif impl.startswith("dense_dpo"):
            runner = DenseDPO(model, batch, beta=0.1, autocast=autocast, checkpointing=checkpointing,
                              fused=impl == "dense_dpo_fused")
        else:
            before = impl == "allo_improve_before"
            runner = AlloImprove(model, batch, beta=0.1, eps=0.1, ratio=args.ratio, autocast=autocast,
                                 checkpointing=checkpointing, route_grads=not before, autocast_weight_cache=before)
        row = H.measure(case, impl, runner.step, device=device, warmup=warmup, repeats=repeats)
        row["resident_bytes"] = runner.resident()
        row["total_peak_bytes"] = row["resident_bytes"] + (row.get("peak_bytes") or 0)
        if cuda:
            row["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        rows.append(row)
        del runner, model, batch
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    rows = H.report(rows, baseline="dense_dpo", json_path=args.json, title="bench_step: one training step",
                    extra_columns=["resident_bytes", "total_peak_bytes"])
    base = next(r for r in rows if r["impl"] == "dense_dpo")
    allo = next(r for r in rows if r["impl"] == "allo_improve")
    print(f"  total peak (resident + step) allo/dense = {allo['total_peak_bytes'] / base['total_peak_bytes']:.3f} "
          f"(CPU target <= 0.6); time allo/dense = {allo['median_ms'] / base['median_ms']:.3f}")


if __name__ == "__main__":
    main()
