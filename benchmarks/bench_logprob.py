"""Per-token log-probs: allo's kernels against the usual PyTorch ways (and Liger-Kernel if installed).

Token-level cases time forward, backward and forward+backward of ``logits [N, V] -> logp [N]``
(upstream gradient: random per-token weights, as DPO's):

* ``torch``           log_softmax in fp32, then gather (the baseline of every ratio);
* ``torch-ce``        ``-cross_entropy(logits, labels, reduction="none")``;
* ``allo``            ``allo.ops.token_logprobs``; ``allo-inplace`` with ``inplace_backward=True``;
* ``liger``           Liger-Kernel's cross entropy (CUDA only, when installed).

Fused-linear cases time forward+backward from hidden states and the LM-head weight (gradients for
both): ``torch`` (linear, then cross_entropy), ``allo-fused`` (``fused_linear_token_logprobs``)
and ``liger-fused`` (Liger's fused linear cross entropy, when installed).

Peak memory is the extra memory over what was live before the call (inputs excluded).

    python benchmarks/bench_logprob.py [--quick] [--json FILE] [--device cpu|cuda]
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from _harness import exit_if_mismatched, int_at_least, measure, mismatch, parse_args, report

from allo.ops import extension_info, fused_linear_token_logprobs, token_logprobs

SIZES = {
    # (tokens, vocab, dtype) for token-level cases; (tokens, hidden, vocab, dtype) for fused-linear
    ("cpu", False): dict(token=(2048, 32000, torch.float32), fused=(1024, 256, 32000, torch.float32)),
    ("cpu", True): dict(token=(512, 8000, torch.float32), fused=(256, 128, 8000, torch.float32)),
    ("cuda", False): dict(token=(8192, 128256, torch.bfloat16), fused=(8192, 4096, 128256, torch.bfloat16)),
    ("cuda", True): dict(token=(2048, 32000, torch.bfloat16), fused=(2048, 1024, 32000, torch.bfloat16)),
}


def _add_arguments(parser):
    parser.add_argument("--tokens", type=int_at_least(1), help="override the number of tokens")
    parser.add_argument("--vocab", type=int_at_least(1), help="override the vocabulary size")
    parser.add_argument("--skip-fused", action="store_true", help="only the token-level cases")


def _override(given, default):
    return default if given is None else given  # not `given or default`: a given 0 is refused, not replaced


def _liger():
    if importlib.util.find_spec("liger_kernel") is None:
        print("note: Liger-Kernel is not installed (pip install liger-kernel); its rows are skipped")
        return None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # an incompatible version: say so, measure the rest
        print(f"note: Liger-Kernel is installed but could not be imported ({exc}); its rows are skipped")
        return None
    return LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss


def token_impls(device, liger):
    impls = {
        "torch": lambda x, y: torch.log_softmax(x.float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1),
        "torch-ce": lambda x, y: -F.cross_entropy(x, y, reduction="none"),
        "allo": lambda x, y: token_logprobs(x, y),
        "allo-inplace": lambda x, y: token_logprobs(x, y, inplace_backward=True),
    }
    if liger is not None and device.type == "cuda":
        ce = liger[0](reduction="none")
        impls["liger"] = lambda x, y: -ce(x, y)
    return impls


def fused_impls(device, liger):
    impls = {
        "torch": lambda h, w, y: -F.cross_entropy(h @ w.t(), y, reduction="none"),
        "allo-fused": lambda h, w, y: fused_linear_token_logprobs(h, w, y),
    }
    if device.type == "cuda":
        # the weight rows per block trade the blocks' memory against the fp32 accumulation of the hidden
        # states' gradient (see allo/ops/fused_linear.py): the default's neighbours, for a GPU session
        for r in (4096, 32768):
            impls[f"allo-fused-r{r}"] = lambda h, w, y, r=r: fused_linear_token_logprobs(h, w, y, vocab_chunk_size=r)
    if liger is not None and device.type == "cuda":
        flce = liger[1](reduction="none")
        impls["liger-fused"] = lambda h, w, y: -flce(w, h, y)
    return impls


def _note_failure(case, impl, exc):
    """A row that raised: skipped, so the other impls still run. A baseline's failure (a torch or Liger
    path out of memory at full size, say) is a note; allo's own is a wrong result, and the run exits 1
    after its report (an in-place row that stopped running once went unnoticed as a note)."""
    if impl.startswith("allo"):
        mismatch(case, impl, f"raised {type(exc).__name__}: {exc}")
    else:
        print(f"note: {impl} failed on '{case}' ({type(exc).__name__}: {exc}); row skipped")


def _tolerance(dtype):
    # relative to the largest reference value: fp32 inputs agree to rounding; bf16/fp16 baselines such as
    # cross_entropy on bf16 logits round their outputs to the input dtype
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _max_rel_err(got, want):
    """Largest |got - want| over all outputs, relative to the largest |want| (inf if any got is not finite)."""
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.detach().float(), w.detach().float()
        if not bool(torch.isfinite(g).all()):
            return math.inf
        worst = max(worst, float((g - w).abs().max()) / max(1.0, float(w.abs().max())))
    return worst


def _check(case, name, got, want, dtype):
    err = _max_rel_err(got, want)
    if not err <= _tolerance(dtype):
        mismatch(case, name, f"max relative error {err:.3g} vs torch (tolerance {_tolerance(dtype):g})")
    return err


def bench_tokens(args, device, liger, warmup, repeats):
    n, v, dtype = SIZES[(device.type, args.quick)]["token"]
    n, v = _override(args.tokens, n), _override(args.vocab, v)
    dtype_name = str(dtype).replace("torch.", "")
    logits = (torch.randn(n, v, device=device) * 2).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device=device)
    upstream = torch.rand(n, device=device)  # per-token weights: non-uniform
    rows = []
    # the reference every impl is checked against (outside the timings): fp32 log_softmax + gather
    ref_lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_grad = torch.autograd.grad(ref_lp, logits, upstream)[0]
    ref_lp = ref_lp.detach()
    for name, fn in token_impls(device, liger).items():
        # in-place backward writes the logits' gradient into the logits themselves: it gets its own copy,
        # so the other impls keep real logits (its repeats then run on its earlier gradients: the kernels'
        # work does not depend on the values). The copy is made by the graph (`+ 0`), as an LM head's logits
        # are: in-place backward refuses leaf logits, which belong to the caller
        inplace = name.endswith("inplace")

        def copy(t, inplace=inplace):
            leaf = t.detach().clone().requires_grad_(True)
            return leaf + 0 if inplace else leaf

        x = copy(logits) if inplace else logits

        def fwd(x=x):
            return fn(x, labels)

        def fwd_bwd(x=x):
            return torch.autograd.grad(fn(x, labels), x, upstream.to(torch.float32))

        try:
            checked = copy(x)
            lp = fn(checked, labels)
            err = _check(f"{n}x{v}", name, (lp, torch.autograd.grad(lp, checked, upstream)[0]), (ref_lp, ref_grad),
                         dtype)
            del checked, lp
            out = fn(x, labels)

            def bwd():
                return torch.autograd.grad(out, logits, upstream, retain_graph=True)

            modes = [("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)]
            if inplace:
                # backward overwrites the saved logits, so it cannot be repeated on one graph
                modes.pop(1)
                print(f"note: {name}: backward alone is not timed (it consumes its graph); see fwd+bwd")
            for mode, f in modes:
                case = f"{mode} {n}x{v} {dtype_name}"
                rows.append(measure(case, name, f, device=device, warmup=warmup, repeats=repeats, max_rel_err=err))
            del out
        except Exception as exc:  # noqa: BLE001 - one broken impl must not hide the others
            _note_failure(f"{n}x{v}", name, exc)
    return rows


def bench_fused(args, device, liger, warmup, repeats):
    n, hsize, v, dtype = SIZES[(device.type, args.quick)]["fused"]
    n, v = _override(args.tokens, n), _override(args.vocab, v)
    dtype_name = str(dtype).replace("torch.", "")
    hidden = (torch.randn(n, hsize, device=device)).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, hsize, device=device) / hsize**0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device=device)
    upstream = torch.rand(n, device=device)
    rows = []
    case = f"fused fwd+bwd {n}x{hsize}->{v} {dtype_name}"
    impls = fused_impls(device, liger)
    ref_lp = impls["torch"](hidden, weight, labels)
    ref = (ref_lp.detach(), *torch.autograd.grad(ref_lp, (hidden, weight), upstream.to(ref_lp.dtype)))
    del ref_lp
    for name, fn in impls.items():
        def fwd_bwd():
            return torch.autograd.grad(fn(hidden, weight, labels), (hidden, weight), upstream.to(torch.float32))

        try:
            lp = fn(hidden, weight, labels)
            got = (lp, *torch.autograd.grad(lp, (hidden, weight), upstream.to(lp.dtype)))
            err = _check(case, name, got, ref, dtype)
            del lp, got
            rows.append(measure(case, name, fwd_bwd, device=device, warmup=warmup, repeats=repeats, max_rel_err=err))
        except Exception as exc:  # noqa: BLE001
            _note_failure(case, name, exc)
    return rows


def main():
    args = parse_args(__doc__.splitlines()[0], _add_arguments)
    device = torch.device(args.device)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else (5 if device.type == "cpu" else 20))
    print(f"allo extension: {extension_info()}; threads: {torch.get_num_threads()}")
    liger = _liger()
    rows = bench_tokens(args, device, liger, warmup, repeats)
    if not args.skip_fused:
        rows += bench_fused(args, device, liger, warmup, repeats)
    report(rows, baseline="torch", json_path=args.json, extra_columns=["max_rel_err"],
           title="per-token log-probs (torch = log_softmax+gather in fp32; fused: linear + cross_entropy)")
    exit_if_mismatched()


if __name__ == "__main__":
    main()
