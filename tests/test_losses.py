"""allo.losses against values computed by hand (math module, not the code under test)."""

import math

import pytest
import torch

from allo.losses import (dpo_loss, forget_loss, improve_loss, token_logprobs, token_weights_from_implicit_reward,
                         token_weights_from_probs, top_fraction_mask)

TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected"}
NEG_INF = float("-inf")


def logsigmoid(x):
    return -math.log1p(math.exp(-x))


def _pair():
    # Padding holds -inf log-probs: the masks, not multiplication, must keep them out.
    policy_chosen = torch.tensor([[-1.0, -2.0, NEG_INF]], requires_grad=True)
    ref_chosen = torch.tensor([[-1.5, -2.0, NEG_INF]])
    chosen_mask = torch.tensor([[True, True, False]])
    policy_rejected = torch.tensor([[-3.0, -1.0, NEG_INF]], requires_grad=True)
    ref_rejected = torch.tensor([[-2.0, -1.0, NEG_INF]])
    rejected_mask = torch.tensor([[True, True, False]])
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask


def test_dpo_sigmoid_by_hand():
    args = _pair()
    loss, metrics = dpo_loss(*args, beta=0.1)
    # chosen log-ratio (-3) - (-3.5) = 0.5; rejected (-4) - (-3) = -1; h = 1.5
    assert loss.item() == pytest.approx(-logsigmoid(0.15), rel=1e-6)
    assert set(metrics) == TRL_METRICS
    expected = {"rewards/chosen": 0.05, "rewards/rejected": -0.1, "rewards/accuracies": 1.0, "rewards/margins": 0.15,
                "logps/chosen": -3.0, "logps/rejected": -4.0}
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-6), name
        assert not metrics[name].requires_grad
    loss.backward()
    s = 1 - 1 / (1 + math.exp(-0.15))  # d(-log sigma(x))/dx = -(1 - sigma(x))
    torch.testing.assert_close(args[0].grad, torch.tensor([[-0.1 * s, -0.1 * s, 0.0]]))
    torch.testing.assert_close(args[1].grad, torch.tensor([[0.1 * s, 0.1 * s, 0.0]]))


def test_dpo_hinge_and_ipo_by_hand():
    loss, _ = dpo_loss(*_pair(), beta=0.1, loss_type="hinge")
    assert loss.item() == pytest.approx(0.85, rel=1e-6)
    loss, metrics = dpo_loss(*_pair(), beta=0.1, loss_type="ipo")
    # per-token means: chosen -1.5 vs -1.75 -> 0.25; rejected -2 vs -1.5 -> -0.5; h = 0.75
    assert loss.item() == pytest.approx((0.75 - 5.0) ** 2, rel=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.075, abs=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*_pair(), loss_type="kto")


def test_dpo_label_smoothing_conservative_and_robust_by_hand():
    # h = 1.5 (see test_dpo_sigmoid_by_hand), beta h = 0.15, e = 0.2
    e, x = 0.2, 0.15
    loss, _ = dpo_loss(*_pair(), beta=0.1, label_smoothing=e)
    assert loss.item() == pytest.approx(-(1 - e) * logsigmoid(x) - e * logsigmoid(-x), rel=1e-6)
    args = _pair()
    loss, metrics = dpo_loss(*args, beta=0.1, loss_type="robust", label_smoothing=e)
    assert loss.item() == pytest.approx((-(1 - e) * logsigmoid(x) + e * logsigmoid(-x)) / (1 - 2 * e), rel=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.15, abs=1e-6)
    loss.backward()
    sig = 1 / (1 + math.exp(-x))
    # d/dx of the robust loss: (-(1 - e)(1 - sigma(x)) - e sigma(x)) / (1 - 2e); dx/d(policy chosen token) = beta
    g = 0.1 * (-(1 - e) * (1 - sig) - e * sig) / (1 - 2 * e)
    torch.testing.assert_close(args[0].grad, torch.tensor([[g, g, 0.0]]))
    # without smoothing, robust is plain sigmoid DPO
    plain, _ = dpo_loss(*_pair(), beta=0.1)
    robust, _ = dpo_loss(*_pair(), beta=0.1, loss_type="robust")
    assert robust.item() == pytest.approx(plain.item(), rel=1e-7)
    with pytest.raises(ValueError, match=r"dpo_loss: label_smoothing is 0.5; expected a probability in \[0, 0.5\)"):
        dpo_loss(*_pair(), label_smoothing=0.5)
    with pytest.raises(ValueError, match="dpo_loss: label_smoothing applies to the sigmoid and robust loss types, not 'ipo'"):
        dpo_loss(*_pair(), loss_type="ipo", label_smoothing=0.1)


def test_forget_loss_normalises_by_number_of_nonzero_weights():
    policy = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, NEG_INF]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, NEG_INF]])
    weights = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.5, 0.0]])
    loss, metrics = forget_loss(policy, ref, weights, beta=0.1)
    # d = [[0.5, 0, -1], [0, 1, -]]: three non-zero weights (not six tokens, not a weight sum of 2.5)
    total = logsigmoid(-0.05) + logsigmoid(0.1) + 0.5 * logsigmoid(-0.1)
    assert loss.item() == pytest.approx(-total / 3, rel=1e-6)
    assert metrics["forget/weighted_tokens"].item() == pytest.approx(1.5)
    assert metrics["forget/log_ratio"].item() == pytest.approx((0.5 - 1 + 1) / 3, rel=1e-6)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.1 * (-0.5 + 1) / 2, rel=1e-6)
    loss.backward()
    # d/dd [-w log sigma(-beta d)] / 3 = w * beta * sigma(beta d) / 3
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = torch.tensor([[0.1 * sig(0.05) / 3, 0.0, 0.1 * sig(-0.1) / 3], [0.0, 0.5 * 0.1 * sig(0.1) / 3, 0.0]])
    torch.testing.assert_close(policy.grad, expected)

    loss_seq, _ = forget_loss(policy, ref, weights, beta=0.1, normalize="sequence")
    per_row = [-(logsigmoid(-0.05) + logsigmoid(0.1)) / 2, -(0.5 * logsigmoid(-0.1)) / 1]
    assert loss_seq.item() == pytest.approx(sum(per_row) / 2, rel=1e-6)


def test_forget_loss_without_weighted_tokens_is_zero_with_zero_gradient():
    policy = torch.randn(2, 4, requires_grad=True)
    loss, _ = forget_loss(policy, torch.randn(2, 4), torch.zeros(2, 4))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(policy.grad == 0)


def _improve_batch():
    T = 30
    lengths = [10, 25]  # own lengths; the padded length is 30
    policy_rejected = torch.full((2, T), -1.0)
    ref_rejected = torch.full((2, T), -1.0)
    rejected_mask = torch.zeros(2, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        rejected_mask[b, :n] = True
    # row 0: the most negative d is at token 4; row 1: at tokens 20 and 3
    policy_rejected[0, 4] = -3.0
    policy_rejected[0, 6] = -2.0
    policy_rejected[1, 20] = -5.0
    policy_rejected[1, 3] = -4.0
    policy_rejected[1, 9] = -2.5
    policy_rejected[1, 27] = -9.0  # padding: must never be a key token
    policy_chosen = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    ref_chosen = torch.tensor([[-1.2, -1.1, 0.0], [-2.5, 0.0, 0.0]])
    chosen_mask = torch.tensor([[True, True, False], [True, False, False]])
    return policy_chosen, policy_rejected.requires_grad_(True), ref_chosen, ref_rejected, chosen_mask, rejected_mask


def test_improve_loss_key_tokens_are_a_fraction_of_the_own_length():
    pc, pr, rc, rr, cm, rm = _improve_batch()
    loss, metrics = improve_loss(pc, pr, rc, rr, cm, rm, beta=0.1, eps=0.1)
    # k = max(1, floor(0.1 * n)): 1 of 10 (token 4), 2 of 25 (tokens 20 and 3); 3 each if it were the padded 30
    h0 = (0.2 + 0.1) - (-2.0)
    h1 = 0.5 - (-4.0 - 3.0)
    assert loss.item() == pytest.approx(-(logsigmoid(0.1 * h0) + logsigmoid(0.1 * h1)) / 2, rel=1e-6)
    assert metrics["improve/key_tokens"].item() == pytest.approx(1.5)
    assert TRL_METRICS <= set(metrics)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.1 * (-2.0 - 7.0) / 2, rel=1e-6)
    loss.backward()
    # gradient reaches the key tokens only; the choice itself has none
    assert {tuple(i) for i in pr.grad.nonzero().tolist()} == {(0, 4), (1, 20), (1, 3)}


def test_improve_loss_ties_pick_earliest_tokens_and_eps_is_validated():
    scores = torch.zeros(1, 12)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 2:12] = True  # 10 tokens, all tied (first improving step: d = 0)
    assert top_fraction_mask(scores, mask, 0.3).nonzero()[:, 1].tolist() == [2, 3, 4]
    assert top_fraction_mask(scores, mask, 0.01).sum() == 1  # at least one token
    assert top_fraction_mask(scores, torch.zeros_like(mask), 0.5).sum() == 0  # empty response: none
    with pytest.raises(ValueError, match="eps"):
        improve_loss(*_improve_batch(), eps=0.0)


def test_improve_loss_with_the_policy_at_the_reference_ignores_rounding_in_d():
    # before the first step the policy is the reference: d = 0 by definition, but the two log-prob passes
    # round differently (on a GPU ~1e-7 relative); the key tokens must be the tie rule's, not the noise's
    g = torch.Generator().manual_seed(0)
    ref_r = -torch.rand(2, 9, generator=g) * 5 - 0.5
    ref_c = -torch.rand(2, 9, generator=g) * 5 - 0.5
    noisy_r = ref_r * (1 + 1e-7 * torch.randn(2, 9, generator=g))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False  # the second response starts later: its earliest tokens are 3, 4
    args = (ref_c.clone(), noisy_r.clone().requires_grad_(), ref_c, ref_r, mask, mask)
    _, by_noise = improve_loss(*args, eps=0.25)
    loss, at_ref = improve_loss(*args, eps=0.25, policy_is_reference=True)
    loss.backward()
    assert {tuple(i) for i in args[1].grad.nonzero().tolist()} == {(0, 0), (0, 1), (1, 3)}  # k = 2 of 9, 1 of 6
    assert at_ref["improve/key_tokens"].item() == by_noise["improve/key_tokens"].item() == 1.5
    noise_grad = torch.autograd.grad(improve_loss(*args, eps=0.25)[0], args[1])[0]
    assert {tuple(i) for i in noise_grad.nonzero().tolist()} != {(0, 0), (0, 1), (1, 3)}  # (noise picks others)


def test_token_weights_from_probs():
    p = torch.tensor([[0.2, 0.5, 0.7, 0.49]])
    mask = torch.tensor([[True, True, True, False]])
    assert token_weights_from_probs(p, mask).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(token_weights_from_probs(p, mask, mode="raw"), torch.tensor([[0.2, 0.5, 0.7, 0.0]]))
    with pytest.raises(ValueError, match="mode"):
        token_weights_from_probs(p, mode="soft")


def test_token_weights_from_implicit_reward():
    warm = torch.tensor([[-4.0, -2.0, -1.5, -3.0, -1.1, -1.0, -1.0, -1.0, -1.0, -1.0],
                         [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    sft = torch.full((2, 10), -1.0)
    sft[1] = -2.0  # warm-up raised every token of row 1: nothing to forget there
    mask = torch.ones(2, 10, dtype=torch.bool)
    w = token_weights_from_implicit_reward(warm, sft, mask, fraction=0.2)
    assert w[0].nonzero()[:, 0].tolist() == [0, 3]  # log-ratios -3 and -2, the two most negative
    assert torch.all(w[1] == 0)


def test_token_logprobs_is_reexported_and_differentiable():
    logits = torch.randn(2, 3, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    lp = token_logprobs(logits, labels)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0])
    lp.sum().backward()
    assert logits.grad is not None


def test_ipo_pair_with_an_empty_response_averages_it_as_zero():
    # ipo divides each response's sums by its own token count, at least 1: a response with no scored
    # token (all prompt or padding after truncation) contributes 0, not 0 / 0 = NaN to the whole batch.
    # kills: the count without clamp(min=1) on either side
    pc, pr, rc, rr, cm, rm = (t.detach().clone() for t in _pair())
    pc, pr, rc, rr = (torch.cat([t, torch.full_like(t, -0.75)]) for t in (pc, pr, rc, rr))
    cm = torch.cat([cm, torch.zeros_like(cm)])  # pair 2: empty chosen response
    rm = torch.cat([rm, torch.tensor([[True, False, False]])])
    for empty_side in ("chosen", "rejected"):
        masks = (cm, rm) if empty_side == "chosen" else (rm.flip(0), cm.flip(0))
        args = (pc, pr, rc, rr) if empty_side == "chosen" else (pr.flip(0), pc.flip(0), rr.flip(0), rc.flip(0))
        x = args[0].clone().requires_grad_(True)
        loss, metrics = dpo_loss(x, *args[1:], *masks, beta=0.1, loss_type="ipo")
        # pair 1 (pair 2 after the flip): h = 0.75 as in test_dpo_hinge_and_ipo_by_hand; the other pair:
        # the empty side 0, the non-empty one token of -0.75 - (-0.75) = 0; h = 0
        h = 0.75 if empty_side == "chosen" else -0.75
        assert loss.item() == pytest.approx(((h - 5.0) ** 2 + (0 - 5.0) ** 2) / 2, rel=1e-6), empty_side
        assert all(torch.isfinite(v) for v in metrics.values()), empty_side
        loss.backward()
        assert torch.isfinite(x.grad).all(), empty_side


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_every_loss_refuses_a_beta_that_is_not_positive(beta):
    # beta = 0 makes every loss a constant (log 2 for DPO) with zero gradient: training would silently do
    # nothing; a negative beta trains the other way. kills: the checks dropped, or `beta < 0`
    args = _pair()
    for loss_type in ("sigmoid", "ipo", "hinge", "robust"):
        with pytest.raises(ValueError, match="beta must be > 0"):
            dpo_loss(*args, beta=beta, loss_type=loss_type)
    with pytest.raises(ValueError, match="beta must be > 0"):
        improve_loss(*args, beta=beta)
    with pytest.raises(ValueError, match="beta must be > 0"):
        forget_loss(args[0], args[2], args[4].float(), beta=beta)


def test_losses_refuse_mismatched_batches_and_non_2d_inputs():
    # one chosen response against three rejected ones would broadcast into three "pairs" without a word;
    # [B, T, 1] inputs would sum over the wrong dimension. kills: the batch-size and the 2-D checks dropped
    pc, pr, rc, rr, cm, rm = (t.detach() for t in _pair())
    three = [t.expand(3, -1) for t in (pr, rr, rm)]
    for loss in (dpo_loss, improve_loss):
        with pytest.raises(ValueError, match="1 chosen but 3 rejected"):
            loss(pc, three[0], rc, three[1], cm, three[2])
        with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
            loss(*(t.unsqueeze(-1) for t in (pc, pr, rc, rr, cm, rm)))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        forget_loss(pr.unsqueeze(-1), rr.unsqueeze(-1), rm.float().unsqueeze(-1))
    with pytest.raises(ValueError, match="same"):
        top_fraction_mask(torch.zeros(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="must share a"):  # [1, T] would broadcast against [B, T]
        token_weights_from_implicit_reward(torch.zeros(2, 3), torch.zeros(1, 3), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("e", [-0.1, 0.5, 0.7])
def test_label_smoothing_outside_its_range_is_refused(e):
    # TRL's label smoothing is a probability of flipped labels in [0, 0.5): a negative one would push the
    # two responses apart harder than DPO itself, 0.5 divides robust DPO by 0. kills: `0 <=` dropped
    for loss_type in ("sigmoid", "robust"):
        with pytest.raises(ValueError, match=r"expected a probability in \[0, 0.5\)"):
            dpo_loss(*_pair(), loss_type=loss_type, label_smoothing=e)


def test_forget_loss_refuses_an_unknown_normalisation():
    # a typo ("batches", "per_sequence") must not silently select one of the two normalisations
    policy, ref, weights = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="normalize must be 'batch' or 'sequence'"):
        forget_loss(policy, ref, weights, normalize="batches")


def test_raw_token_weights_carry_no_gradient_to_the_reward_model():
    # mode="raw" passes p_t through as the weight: the forgetting loss must not train the token-level
    # reward model that produced it (its probabilities are inputs, as in the released scripts).
    # kills: the raw weights without .detach()
    p = torch.tensor([[0.2, 0.5, 0.7]], requires_grad=True)
    w = token_weights_from_probs(p, mode="raw")
    assert not w.requires_grad
    policy = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    forget_loss(policy, torch.full((1, 3), -1.2), w)[0].backward()
    assert p.grad is None and policy.grad is not None
