"""allo.losses pinned to float64 references written in the test from METHOD.md's formulas, on random
batches: every TRL metric, every loss type, the gradients, ties, the key-token count, the forgetting
loss's normalisations, and the kernels' bf16 rounding. Written against mutation testing: each test
here fails for a specific wrong variant of the code that the older tests let through (noted per test).

The per-token log-probs are multiples of 1/64 (small ones), so sums and differences are exact in fp32:
the reference's ranking of d_t is then the code's, ties between d_t happen (and follow the tie rule),
and a pair whose chosen and rejected rewards are equal is exactly equal in the code too.
"""

import math
from decimal import Decimal

import pytest
import torch

from allo.losses import (dpo_loss, forget_loss, improve_loss, token_logprobs, token_weights_from_implicit_reward,
                         top_fraction_mask)

NAN, NEG_INF = float("nan"), float("-inf")


def logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _quantised(shape, gen, top=400):
    """Negative log-probs, multiples of 1/64: exact in fp32, sums of up to ~40 of them exact too."""
    return -torch.randint(1, top, shape, generator=gen).double() / 64


def _lengths_mask(lengths, T, starts=None):
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        s = 0 if starts is None else starts[b]
        mask[b, s:s + n] = True
    return mask


def _poison(t, mask, value):
    """``value`` (NaN, -inf) at every masked-out position: a loss must never read them."""
    return torch.where(mask, t, torch.full_like(t, value))


def _pair_batch(seed, B=7, T=23, tie_rows=(2,), few_d_values=False):
    """fp32 per-token log-probs of a preference batch with odd, per-row lengths and a late start (a
    prompt), poisoned padding; rows in ``tie_rows`` have rejected == chosen (equal rewards);
    ``few_d_values``: the rejected d_t take 7 values only (many ties among the key-token candidates)."""
    gen = torch.Generator().manual_seed(seed)
    lengths_c = torch.randint(1, T - 3, (B,), generator=gen).tolist()
    lengths_r = torch.randint(1, T - 3, (B,), generator=gen).tolist()
    starts_c = [int(torch.randint(0, T - n + 1, (1,), generator=gen)) for n in lengths_c]
    starts_r = [int(torch.randint(0, T - n + 1, (1,), generator=gen)) for n in lengths_r]
    cm, rm = _lengths_mask(lengths_c, T, starts_c), _lengths_mask(lengths_r, T, starts_r)
    pc, rc, pr, rr = (_quantised((B, T), gen) for _ in range(4))
    if few_d_values:
        rr = pr - torch.randint(-3, 4, (B, T), generator=gen).double() / 16
    for b in tie_rows:
        pr[b], rr[b], rm[b] = pc[b], rc[b], cm[b]
    pc, rc = _poison(pc, cm, NEG_INF), _poison(rc, cm, NAN)
    pr, rr = _poison(pr, rm, NAN), _poison(rr, rm, NEG_INF)
    return [t.float() for t in (pc, pr, rc, rr)] + [cm, rm]


def _rows(t, mask, b):
    """The masked-in values of row b, float64, in position order, with their positions."""
    idx = mask[b].nonzero().flatten().tolist()
    return [float(t[b, i]) for i in idx], idx


def _metrics_ref(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracies": mean([1.0 if c > r else 0.0 for c, r in zip(chosen_rewards, rejected_rewards)]),
        "rewards/margins": mean([c - r for c, r in zip(chosen_rewards, rejected_rewards)]),
        "logps/chosen": mean(chosen_logps),
        "logps/rejected": mean(rejected_logps),
    }


def _check_metrics(metrics, expected):
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
        assert not metrics[name].requires_grad, name


def _pair_loss_ref(h, beta, loss_type, e):
    """One pair's loss and its derivative with respect to h, from the formulas (dpo_loss's docstring)."""
    x = beta * h
    sig = 1 / (1 + math.exp(-x))
    if loss_type in ("sigmoid", "robust"):
        if loss_type == "sigmoid":
            loss = -(1 - e) * logsigmoid(x) - e * logsigmoid(-x)
            dx = -(1 - e) * (1 - sig) + e * sig
        else:
            loss = (-(1 - e) * logsigmoid(x) + e * logsigmoid(-x)) / (1 - 2 * e)
            dx = (-(1 - e) * (1 - sig) - e * sig) / (1 - 2 * e)
        return loss, dx * beta
    if loss_type == "hinge":
        return max(0.0, 1 - x), (-beta if 1 - x > 0 else 0.0)
    target = 1 / (2 * beta)
    return (h - target) ** 2, 2 * (h - target)


def _dpo_ref(pc, pr, rc, rr, cm, rm, beta, loss_type, e):
    B = pc.shape[0]
    losses, grads_c, grads_r = [], torch.zeros(pc.shape, dtype=torch.float64), torch.zeros(pr.shape, dtype=torch.float64)
    rewards_c, rewards_r, logps_c, logps_r = [], [], [], []
    for b in range(B):
        pcv, ic = _rows(pc, cm, b)
        rcv, _ = _rows(rc, cm, b)
        prv, ir = _rows(pr, rm, b)
        rrv, _ = _rows(rr, rm, b)
        # ipo: per-token averages over each response's own length (TRL); the others: sums
        nc, nr = (len(ic), len(ir)) if loss_type == "ipo" else (1, 1)
        lc, lr = sum(pcv) / nc, sum(prv) / nr
        ratio_c, ratio_r = (sum(pcv) - sum(rcv)) / nc, (sum(prv) - sum(rrv)) / nr
        loss, dh = _pair_loss_ref(ratio_c - ratio_r, beta, loss_type, e)
        losses.append(loss)
        for i in ic:
            grads_c[b, i] = dh / nc / B
        for i in ir:
            grads_r[b, i] = -dh / nr / B
        rewards_c.append(beta * ratio_c)
        rewards_r.append(beta * ratio_r)
        logps_c.append(lc)
        logps_r.append(lr)
    return sum(losses) / B, _metrics_ref(rewards_c, rewards_r, logps_c, logps_r), grads_c, grads_r


@pytest.mark.parametrize("loss_type, e, beta", [("sigmoid", 0.0, 0.1), ("sigmoid", 0.15, 0.3), ("robust", 0.2, 0.1),
                                                ("hinge", 0.0, 0.5), ("ipo", 0.0, 0.1), ("ipo", 0.0, 0.7)])
def test_dpo_loss_metrics_and_gradients_match_float64_reference(loss_type, e, beta):
    # kills: rewards/accuracies with >= (the tie row), ipo averaging the rejected side over the chosen
    # length (uneven lengths), hinge without its relu (beta * h > 1 on some pairs), beta missing/doubled
    pc, pr, rc, rr, cm, rm = _pair_batch(seed=11)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, metrics = dpo_loss(pc, pr, rc, rr, cm, rm, beta=beta, loss_type=loss_type, label_smoothing=e)
    expected_loss, expected_metrics, grad_c, grad_r = _dpo_ref(pc.detach(), pr.detach(), rc, rr, cm, rm, beta,
                                                               loss_type, e)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    _check_metrics(metrics, expected_metrics)
    assert 0 < expected_metrics["rewards/accuracies"] < 1
    if loss_type == "hinge":  # both sides of the hinge are exercised
        assert any(g == 0 for g in grad_c.abs().sum(-1).tolist()) and grad_c.abs().sum() > 0
    upstream = 1.7  # a non-unit upstream gradient
    (loss * upstream).backward()
    torch.testing.assert_close(pc.grad.double(), grad_c * upstream, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pr.grad.double(), grad_r * upstream, rtol=1e-5, atol=1e-7)


def test_accuracy_counts_only_strictly_larger_chosen_rewards():
    # TRL: (chosen_rewards > rejected_rewards); equal rewards are not a correct ranking (with >=, the
    # first step, where the policy is the reference and every reward is 0, would report accuracy 1)
    z = torch.full((3, 5), -1.25)
    mask = torch.ones(3, 5, dtype=torch.bool)
    _, metrics = dpo_loss(z, z, z, z, mask, mask)
    assert metrics["rewards/accuracies"].item() == 0.0
    _, metrics = improve_loss(z, z, z, z, mask, mask, policy_is_reference=True)
    assert metrics["rewards/accuracies"].item() == 0.0


def _key_tokens_ref(d, idx, eps):
    """K(y_l): max(1, floor(eps * n)) of the n response tokens with the largest -d_t, ties to the earlier
    token; eps taken as the decimal the user wrote (0.29 of 100 tokens is 29)."""
    n = len(idx)
    k = max(1, int(Decimal(repr(eps)) * n)) if n else 0
    ranked = sorted(range(n), key=lambda j: (d[j], idx[j]))  # largest -d first, then earliest
    return sorted(idx[j] for j in ranked[:k])


def _improve_ref(pc, pr, rc, rr, cm, rm, beta, eps, at_reference=False):
    B = pc.shape[0]
    losses, grads_c, grads_r = [], torch.zeros(pc.shape, dtype=torch.float64), torch.zeros(pr.shape, dtype=torch.float64)
    rewards_c, rewards_r, logps_c, logps_r, keys = [], [], [], [], []
    for b in range(B):
        pcv, ic = _rows(pc, cm, b)
        rcv, _ = _rows(rc, cm, b)
        prv, ir = _rows(pr, rm, b)
        rrv, _ = _rows(rr, rm, b)
        d = [p - r for p, r in zip(prv, rrv)]
        key = _key_tokens_ref([0.0] * len(d) if at_reference else d, ir, eps)
        keys.append(key)
        ratio_c = sum(pcv) - sum(rcv)
        ratio_r = sum(d[ir.index(i)] for i in key)
        x = beta * (ratio_c - ratio_r)
        losses.append(-logsigmoid(x))
        dh = -beta * (1 - 1 / (1 + math.exp(-x)))
        for i in ic:
            grads_c[b, i] = dh / B
        for i in key:
            grads_r[b, i] = -dh / B
        rewards_c.append(beta * ratio_c)
        rewards_r.append(beta * ratio_r)
        logps_c.append(sum(pcv))
        logps_r.append(sum(prv))  # the whole rejected response, not only its key tokens
    metrics = _metrics_ref(rewards_c, rewards_r, logps_c, logps_r)
    metrics["improve/key_tokens"] = sum(len(k) for k in keys) / B
    return sum(losses) / B, metrics, grads_c, grads_r, keys


@pytest.mark.parametrize("eps, beta", [(0.1, 0.1), (0.3, 0.25), (0.29, 0.1), (1.0, 0.05)])
def test_improve_loss_metrics_and_gradients_match_float64_reference(eps, beta):
    # kills: logps/rejected over the key tokens only, logps/chosen of the log-ratio, rewards/chosen
    # without beta; with d_t taking 7 values, ties at the k-th key token decide which tokens count
    pc, pr, rc, rr, cm, rm = _pair_batch(seed=5, B=9, T=41, tie_rows=(3,), few_d_values=True)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, metrics = improve_loss(pc, pr, rc, rr, cm, rm, beta=beta, eps=eps)
    expected_loss, expected_metrics, grad_c, grad_r, keys = _improve_ref(pc.detach(), pr.detach(), rc, rr, cm, rm,
                                                                         beta, eps)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    _check_metrics(metrics, expected_metrics)
    assert metrics["improve/key_tokens"].item() == pytest.approx(expected_metrics["improve/key_tokens"])
    upstream = -0.6
    (loss * upstream).backward()
    torch.testing.assert_close(pc.grad.double(), grad_c * upstream, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pr.grad.double(), grad_r * upstream, rtol=1e-5, atol=1e-7)
    # the gradient reaches exactly the reference's key tokens
    got = [pr.grad[b].nonzero().flatten().tolist() for b in range(pr.shape[0])]
    assert got == keys


def test_improve_loss_at_reference_uses_tie_rule_and_real_d_in_the_loss():
    pc, pr, rc, rr, cm, rm = _pair_batch(seed=8, B=5, T=31, tie_rows=())
    loss, metrics = improve_loss(pc, pr, rc, rr, cm, rm, beta=0.2, eps=0.3, policy_is_reference=True)
    expected_loss, expected_metrics, *_ = _improve_ref(pc, pr, rc, rr, cm, rm, 0.2, 0.3, at_reference=True)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    _check_metrics(metrics, expected_metrics)


@pytest.mark.parametrize("fraction", [0.07, 0.1, 0.14, 0.28, 0.29, 0.57, 0.58, 0.7, 0.9])
def test_top_fraction_count_is_floor_of_the_decimal_fraction(fraction):
    # kills: floor(fraction * n) without its 1e-9 slack (0.29 * 100 = 28.999999999999996 in binary: 28
    # key tokens instead of 29), and the count taken of the padded length
    T = 211
    n = torch.arange(1, T + 1)
    mask = torch.arange(T)[None, :] >= (T - n)[:, None]  # row i: its last i + 1 positions (late starts)
    scores = torch.randn(T, T, dtype=torch.float64)
    got = top_fraction_mask(scores, mask, fraction).sum(-1).tolist()
    assert got == [max(1, int(Decimal(repr(fraction)) * int(m))) for m in n]


def test_implicit_reward_weights_never_mark_tokens_the_warm_up_did_not_push_down():
    # kills: r_t <= 0 instead of r_t < 0 (a token whose log-prob did not change is not unaligned)
    warm = torch.tensor([[-1.0, -1.5, -2.0, -2.0, -3.0, -1.0, -4.0, -0.5, -2.5, -2.0, -1.0]])
    sft = torch.tensor([[-1.0, -1.0, -2.0, -2.0, -3.0, -1.0, -4.0, -1.0, -2.5, -2.0, -1.0]])
    mask = torch.ones_like(warm, dtype=torch.bool)
    # r = [0, -0.5, 0, 0, 0, 0, 0, +0.5, 0, 0, 0]: k = floor(0.3 * 11) = 3 but only one negative token
    w = token_weights_from_implicit_reward(warm, sft, mask, fraction=0.3)
    assert w.tolist() == [[0.0, 1.0] + [0.0] * 9]
    w = token_weights_from_implicit_reward(sft, sft, mask, fraction=0.5)  # nothing changed: nothing to forget
    assert torch.all(w == 0)


def _forget_ref(policy, ref, weights, beta, normalize):
    B = policy.shape[0]
    grad = torch.zeros(policy.shape, dtype=torch.float64)
    row_sums, counts, ratio_sums, logps = [], [], [], []
    for b in range(B):
        idx = [t for t in range(policy.shape[1]) if float(weights[b, t]) != 0]
        d = {t: float(policy[b, t]) - float(ref[b, t]) for t in idx}
        row_sums.append(sum(-float(weights[b, t]) * logsigmoid(-beta * d[t]) for t in idx))
        counts.append(len(idx))
        ratio_sums.append(sum(d.values()))
        logps.append(sum(float(policy[b, t]) for t in idx))
    total = sum(counts)
    with_tokens = [b for b in range(B) if counts[b]]
    if normalize == "batch":
        loss = sum(row_sums) / max(1, total)
        scale = [1 / max(1, total)] * B
    else:
        loss = sum(row_sums[b] / counts[b] for b in with_tokens) / max(1, len(with_tokens))
        scale = [1 / (max(1, counts[b]) * max(1, len(with_tokens))) for b in range(B)]
    for b in range(B):
        for t in range(policy.shape[1]):
            w = float(weights[b, t])
            if w != 0:
                dt = float(policy[b, t]) - float(ref[b, t])
                # d/dd_t of -w log sigma(-beta d_t) = w beta sigma(beta d_t)
                grad[b, t] = w * beta / (1 + math.exp(-beta * dt)) * scale[b]
    metrics = {
        "forget/weighted_tokens": total / B,
        "forget/log_ratio": sum(ratio_sums) / max(1, total),
        "rewards/rejected": sum(beta * s for s in ratio_sums) / B,
        "logps/rejected": sum(logps) / B,
    }
    return loss, metrics, grad


@pytest.mark.parametrize("normalize", ["batch", "sequence"])
@pytest.mark.parametrize("raw", [False, True], ids=["binary", "raw"])
def test_forget_loss_metrics_and_gradients_match_float64_reference(normalize, raw):
    # kills: "sequence" averaging over every response (also those with no weighted token), logps/rejected
    # over the whole (padded) response, normalising by the weights' sum or the sequence length
    gen = torch.Generator().manual_seed(3)
    B, T = 6, 19
    policy, ref = _quantised((B, T), gen), _quantised((B, T), gen)
    mask = _lengths_mask([19, 7, 12, 1, 15, 9], T, starts=[0, 4, 2, 18, 1, 10])
    weights = torch.where(torch.rand(B, T, generator=gen) < 0.4, 1.0, 0.0)
    if raw:  # the released scripts' raw keep-probabilities
        weights = weights * torch.rand(B, T, generator=gen).clamp(min=0.05)
    weights = weights * mask
    weights[2] = 0  # a response with no weighted token
    weights[3, 18] = 0.8 if raw else 1.0  # one of one
    policy, ref = _poison(policy, weights != 0, NEG_INF).float(), _poison(ref, weights != 0, NAN).float()
    policy.requires_grad_(True)
    loss, metrics = forget_loss(policy, ref, weights, beta=0.3, normalize=normalize)
    expected_loss, expected_metrics, grad = _forget_ref(policy.detach(), ref, weights, 0.3, normalize)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    for name, value in expected_metrics.items():
        assert metrics[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    (loss * 2.5).backward()
    torch.testing.assert_close(policy.grad.double(), grad * 2.5, rtol=1e-5, atol=1e-8)


# ---- the kernels under the losses -------------------------------------------------------------------

def _logprob_ref(logits, labels, upstream):
    x = logits.detach().double().requires_grad_(True)
    keep = labels != -100
    logp = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, 0.0)
    (grad,) = torch.autograd.grad(logp, x, upstream.double())
    return logp.detach(), grad


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradient_is_the_nearest_value_to_the_exact_one(dtype, inplace):
    # The kernels compute in fp32 and round once to the logits' dtype: to nearest (even), like torch.
    # kills: bf16 rounding by truncation (biased towards 0 by half an ulp on average), which the
    # few-ulp tolerances of the other tests let through
    gen = torch.Generator().manual_seed(21)
    R, V = 13, 2063  # a full 2048 block, then a tail that is not a multiple of the vector width
    logits = (torch.randn(R, V, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, V, (R,), generator=gen)
    labels[4] = -100
    upstream = torch.randn(R, generator=gen) * torch.rand(R, generator=gen) * 3
    x = logits.clone().requires_grad_(True)
    work = x * 1 if inplace else x
    token_logprobs(work, labels, inplace_backward=inplace).backward(upstream)
    _, expected = _logprob_ref(logits, labels, upstream)
    nearest = expected.to(dtype)
    assert torch.equal(x.grad[4], torch.zeros(V, dtype=dtype))
    same = (x.grad == nearest).double().mean().item()
    assert same > 0.99, f"only {same:.3f} of the gradient elements are the nearest {dtype} value"


TAIL_POSITIONS = [0, 15, 16, 31, 32, 2047, 2048, 2063, 2064, 2075, 2076, 2078]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_finite_logit_anywhere_in_the_row_matches_float64(dtype):
    # One logit far above the rest (500: exp(500 - the rest's maximum) overflows fp32) at vector edges, a
    # block edge and every position of the tails (V = 2079 = 2048 + 31: a 16-wide vector, then 15 singles).
    # kills: a block maximum that skips the tail of a block (the log-sum-exp then shifts by the wrong
    # maximum and the exponential overflows), and a log-sum-exp without the max shift
    V = 2079
    rows, labels = [], []
    gen = torch.Generator().manual_seed(4)
    for pos in TAIL_POSITIONS:
        for label in (pos, (pos + 7) % V):
            row = torch.randn(V, generator=gen) * 2
            row[pos] = 500.0
            rows.append(row)
            labels.append(label)
    logits, labels = torch.stack(rows).to(dtype), torch.tensor(labels)
    upstream = torch.rand(len(labels), generator=gen) + 0.5
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, labels)
    logp.backward(upstream)
    expected_logp, expected_grad = _logprob_ref(logits, labels, upstream)
    assert torch.isfinite(logp).all() and torch.isfinite(x.grad.float()).all()
    torch.testing.assert_close(logp.double(), expected_logp, rtol=1e-5, atol=1e-4)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), expected_grad, **tol)


def test_forget_loss_counts_every_non_zero_weight_whatever_its_sign():
    # METHOD.md: 1 / #{t : w_t != 0}. kills: counting only positive weights
    policy = torch.tensor([[-1.0, -2.0, -3.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -2.0, -0.5]])
    weights = torch.tensor([[1.0, -0.5, 0.0, 0.25]])
    loss, metrics = forget_loss(policy, ref, weights, beta=0.2)
    expected_loss, expected_metrics, grad = _forget_ref(policy.detach(), ref, weights, 0.2, "batch")
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["forget/weighted_tokens"].item() == 3
    loss.backward()
    torch.testing.assert_close(policy.grad.double(), grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dpo_from_logits_end_to_end_matches_float64(dtype):
    # logits -> token_logprobs (the kernels) -> dpo_loss -> gradient of the logits, against float64
    # log_softmax and the formula; prompts and padding are ignore_index, as allo-train builds them
    gen = torch.Generator().manual_seed(9)
    B, T, V, beta = 3, 9, 37, 0.3
    logits = {s: (torch.randn(B, T, V, generator=gen) * 2).to(dtype) for s in ("c", "r")}
    ref = {s: -torch.rand(B, T, generator=gen) * 4 for s in ("c", "r")}
    labels = {s: torch.randint(0, V, (B, T), generator=gen) for s in ("c", "r")}
    labels["c"][:, :2] = -100
    labels["c"][1, 6:] = -100
    labels["r"][:, :3] = -100
    labels["r"][2, 8:] = -100
    masks = {s: labels[s] != -100 for s in ("c", "r")}
    x = {s: logits[s].clone().requires_grad_(True) for s in ("c", "r")}
    lp = {s: token_logprobs(x[s], labels[s]) for s in ("c", "r")}
    loss, _ = dpo_loss(lp["c"], lp["r"], ref["c"], ref["r"], masks["c"], masks["r"], beta=beta)
    loss.backward()
    x64 = {s: logits[s].double().requires_grad_(True) for s in ("c", "r")}
    ratio = {}
    for s in ("c", "r"):
        logp = torch.log_softmax(x64[s], -1).gather(-1, labels[s].clamp(min=0)[..., None])[..., 0]
        ratio[s] = torch.where(masks[s], logp - ref[s].double(), 0.0).sum(-1)
    expected = -torch.nn.functional.logsigmoid(beta * (ratio["c"] - ratio["r"])).mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    for s in ("c", "r"):
        torch.testing.assert_close(x[s].grad.double(), x64[s].grad, **tol)
