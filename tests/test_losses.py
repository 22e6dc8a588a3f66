"""The RLHF math against analytic values and brute-force references."""
import math

import pytest
import torch
import torch.nn.functional as F

from minrlhf import (KLController, aggregate, compute_gae, dpo_loss, entropy_from_logits, explained_variance,
                     first_eos_mask, group_advantages, kl_k1, kl_k3, kl_penalized_rewards, logprobs_from_logits,
                     masked_mean, masked_whiten, pairwise_ranking_loss, ppo_policy_loss, ppo_value_loss,
                     rloo_advantages, sequence_kl, tied_groups)

# two rows: 4 valid tokens, then 2 valid tokens and 2 of padding
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


def garbage_in_padding(x):
    """The same tensor with NaN and inf where MASK is 0 (row 2's last two columns): a product with the mask
    (0 x NaN = NaN) would let them through."""
    junk = torch.tensor([-1e30, 7.0, float("nan"), float("inf")]).repeat(x.shape[0], 1)[:, : x.shape[1]]
    return torch.where(MASK.bool(), x, junk)


def test_masked_mean_is_token_level_and_ignores_padding():
    x = torch.tensor([[1.0, 2, 3, 4], [10, 20, 0, 0]])
    assert masked_mean(x, MASK).item() == pytest.approx(40 / 6)
    assert masked_mean(garbage_in_padding(x), MASK).item() == pytest.approx(40 / 6)


def test_masked_whiten():
    x = torch.randn(2, 4) * 3 + 5
    w = masked_whiten(garbage_in_padding(x), MASK)
    valid = x[MASK.bool()]
    expected = (valid - valid.mean()) / torch.sqrt(valid.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(w[MASK.bool()], expected)
    assert (w[~MASK.bool()] == 0).all()
    kept = masked_whiten(x, MASK, shift_mean=False)
    torch.testing.assert_close(kept[MASK.bool()], expected + valid.mean())


def test_pairwise_ranking_loss():
    r = torch.randn(5)
    assert pairwise_ranking_loss(r, r)[0].item() == pytest.approx(math.log(2))
    chosen = torch.tensor([400.0, -400.0], requires_grad=True)
    loss, stats = pairwise_ranking_loss(chosen, torch.zeros(2))
    loss.backward()
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == 0.0
    assert loss.item() == pytest.approx(200.0)  # (0 + 400) / 2, no overflow in float32
    assert torch.isfinite(chosen.grad).all()
    assert chosen.grad.tolist() == pytest.approx([0.0, -0.5])


def test_dpo_loss_against_a_hand_computed_value():
    """Rafailov et al. 2023, eq. 7, written out: -log sigmoid(beta * ((c - c_ref) - (r - r_ref)))."""
    chosen = torch.tensor([-10.0, -3.0], requires_grad=True)
    rejected = torch.tensor([-12.0, -2.0], requires_grad=True)
    ref_chosen, ref_rejected, beta = torch.tensor([-11.0, -3.0]), torch.tensor([-11.0, -4.0]), 0.5
    loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    margins = [0.5 * ((-10 + 11) - (-12 + 11)), 0.5 * ((-3 + 3) - (-2 + 4))]  # 1.0 and -1.0
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    assert loss.item() == pytest.approx(expected)
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == pytest.approx(0.0)
    loss.backward()  # descent raises the chosen replies' log-probs and lowers the rejected ones'
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_dpo_loss_at_the_reference_and_at_extreme_margins():
    logps = torch.randn(4) * 30
    loss, stats = dpo_loss(logps, logps - 5, logps, logps - 5, beta=0.1)  # policy == reference
    assert loss.item() == pytest.approx(math.log(2)) and stats["margin"].item() == 0.0
    chosen = torch.tensor([4000.0, -4000.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0.1)  # margins +-400
    loss.backward()
    assert loss.item() == pytest.approx(200.0) and torch.isfinite(chosen.grad).all()
    assert chosen.grad.tolist() == pytest.approx([0.0, -0.05])


def gae_reference(rewards, values, length, gamma, lam):
    """Eq. 16 written out as a double sum over one row of `length` valid tokens."""
    v = values[:length].tolist() + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(length)]
    return [sum((gamma * lam) ** l * deltas[t + l] for l in range(length - t)) for t in range(length)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (1.0, 0.0)])
def test_compute_gae_matches_equation_16(gamma, lam):
    rewards, values = torch.randn(2, 4), torch.randn(2, 4)
    adv, ret = compute_gae(garbage_in_padding(rewards), garbage_in_padding(values), MASK, gamma, lam)
    for row, length in enumerate([4, 2]):
        expected = gae_reference(rewards[row].tolist(), values[row], length, gamma, lam)
        assert adv[row, :length].tolist() == pytest.approx(expected, abs=1e-5)
        assert (adv[row, length:] == 0).all()
    torch.testing.assert_close(ret[MASK.bool()], (adv + values)[MASK.bool()])


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values = torch.randn(2, 4), torch.randn(2, 4)
    adv, _ = compute_gae(rewards, values, MASK, 1.0, 1.0)
    masked_rewards = rewards * MASK
    to_go = masked_rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv[MASK.bool()], (to_go - values)[MASK.bool()])


def test_policy_loss_zero_gradient_outside_clip_band():
    # token 0: A > 0 and ratio 1.5 > 1.2 (clipped); token 1: A < 0 and ratio 0.5 < 0.8 (clipped);
    # token 2: inside the band; token 3: A > 0 and ratio 0.5 (the unclipped term is larger: not clipped)
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones(1, 4)
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    loss.backward()
    assert logprobs.grad[0, :2].tolist() == [0.0, 0.0]
    assert (logprobs.grad[0, 2:] != 0).all()
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    expected = torch.tensor([-1.2, 0.8, -1.1, -0.5]).mean()  # max(-A r, -A clip(r)) per token
    assert loss.item() == pytest.approx(expected.item())
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.5])
    assert stats["approx_kl"].item() == pytest.approx((ratio - 1 - ratio.log()).mean().item(), rel=1e-5)


def test_policy_loss_ignores_padding_garbage():
    """NaN or inf in padding: the loss, its stats and the gradients as without them, 0 in padding."""
    logprobs, old, adv = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    clean, dirty_logprobs = logprobs.clone().requires_grad_(), garbage_in_padding(logprobs).requires_grad_()
    clean_loss, clean_stats = ppo_policy_loss(clean, old, adv, MASK, 0.2)
    dirty_loss, dirty_stats = ppo_policy_loss(dirty_logprobs, garbage_in_padding(old), garbage_in_padding(adv),
                                              MASK, 0.2)
    (clean_loss + dirty_loss).backward()
    assert dirty_loss.item() == pytest.approx(clean_loss.item())
    assert {k: v.item() for k, v in dirty_stats.items()} == pytest.approx({k: v.item() for k, v in clean_stats.items()})
    assert torch.isfinite(dirty_logprobs.grad).all()
    torch.testing.assert_close(dirty_logprobs.grad, clean.grad * MASK)
    ratio = torch.exp(logprobs - old)[MASK.bool()].mean()  # the valid tokens' mean ratio
    assert clean_stats["ratio"].item() == pytest.approx(ratio.item())


def test_value_loss():
    old = torch.zeros(1, 3)
    values = torch.tensor([[0.5, 0.1, -0.5]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 0.0]])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 3), cliprange_value=0.2)
    loss.backward()
    # token 0: clipped 0.2 -> (0.8)^2 > (0.5)^2 so the clipped term wins and the gradient is 0
    # token 1: inside the band; token 2: clipped -0.2 -> 0.04 < 0.25, unclipped wins
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01 + 0.25) / 3)
    assert values.grad[0, 0].item() == 0.0 and values.grad[0, 2].item() != 0.0
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    dirty, _ = ppo_value_loss(garbage_in_padding(torch.ones(2, 4)), garbage_in_padding(old.new_zeros(2, 4)),
                              garbage_in_padding(torch.full((2, 4), 2.0)), MASK, 0.2)
    assert dirty.item() == pytest.approx(0.5 * 1.8 ** 2)


def test_value_loss_clipfrac_counts_where_the_clipped_term_wins():
    """Old values 0, band 0.2: tokens 2 and 3 overshoot returns the clip keeps them from (the clipped term is
    the larger, the max), token 1 the unclipped: 2 of 3."""
    values, returns = torch.tensor([[1.0, 1.0, -1.0]]), torch.tensor([[0.0, 2.0, -2.0]])
    _, stats = ppo_value_loss(values, torch.zeros(1, 3), returns, torch.ones(1, 3), cliprange_value=0.2)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)


def test_an_all_padding_mask_gives_zero_not_nan():
    """The copyable means on a batch (or a row) without a valid token: 0, as its contribution should be."""
    values, none = torch.randn(2, 3), torch.zeros(2, 3)
    assert masked_mean(values, none).item() == 0.0
    assert aggregate(values, torch.tensor([[1, 1, 0], [0, 0, 0]]), "sequence").item() == pytest.approx(
        values[0, :2].mean().item() / 2)


def test_masked_whiten_of_nearly_constant_values():
    """(x - mean) / sqrt(var + 1e-8): values that barely differ are not blown up to variance 1."""
    values = torch.tensor([[1.0, 1.0 + 1e-5, 1.0 - 1e-5]], dtype=torch.float64)
    mean, var = values.mean(), values.var(unbiased=False)
    torch.testing.assert_close(masked_whiten(values, torch.ones(1, 3)), (values - mean) / torch.sqrt(var + 1e-8))


def test_value_loss_garbage_in_padding_reaches_no_gradient():
    """NaN or inf in padded values, old values or returns: the loss and every gradient as without them, 0 in
    padding (0 * NaN would be NaN)."""
    values = torch.tensor([[0.5, 0.1, -0.5, 0.3], [1.0, 2.0, 0.0, 0.0]])
    old, returns = values.flip(1) * 0.9, torch.ones(2, 4)
    nan = torch.tensor([float("nan"), float("inf")]).repeat(2, 2)  # NaN in column 2, inf in 3

    def garbage(x):
        return torch.where(MASK.bool(), x, nan)
    clean, dirty = values.clone().requires_grad_(), garbage(values).requires_grad_()
    clean_loss, _ = ppo_value_loss(clean, old * MASK, returns * MASK, MASK, 0.2)
    dirty_loss, _ = ppo_value_loss(dirty, garbage(old), garbage(returns), MASK, 0.2)
    (clean_loss + dirty_loss).backward()
    assert dirty_loss.item() == pytest.approx(clean_loss.item())
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[~MASK.bool()] == 0).all()
    torch.testing.assert_close(dirty.grad, clean.grad * MASK)


def test_value_loss_per_sequence_mean():
    """loss_agg="sequence": the mean over rows of each row's token mean, as the policy loss takes it."""
    values, returns = torch.zeros(2, 4), torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 0.0, 0.0]])
    token, _ = ppo_value_loss(values, values, returns, MASK, 10.0)
    sequence, _ = ppo_value_loss(values, values, returns, MASK, 10.0, loss_agg="sequence")
    assert token.item() == pytest.approx(0.5 * (4 * 1 + 2 * 9) / 6)
    assert sequence.item() == pytest.approx(0.5 * (1 + 9) / 2)


def test_kl_penalized_rewards():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-1.0, -2.0, 0.0, 0.0]])
    rewards = kl_penalized_rewards(torch.tensor([3.0, -1.0]), garbage_in_padding(logprobs), ref, MASK, 0.1)
    expected = torch.tensor([[-0.05, 0.0, 0.05, 3.0], [0.1, -1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_first_eos_mask_keeps_each_row_through_its_first_eos():
    response = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 2, 9]])  # EOS = 2
    assert first_eos_mask(response, 2).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    # several ids end a reply (EOS 2, end of turn 7): the first of either
    assert first_eos_mask(response, [2, 7]).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


def test_logprobs_and_entropy_match_torch():
    logits, labels = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)
    torch.testing.assert_close(logprobs_from_logits(logits.bfloat16(), labels), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())
    logits[..., :4] = float("-inf")  # tokens a logits processor ruled out: probability 0, no entropy
    torch.testing.assert_close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_logprobs_match_hugging_face_loss():
    from tiny import make_causal_lm
    model = make_causal_lm("llama", vocab_size=64)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    ours = -logprobs_from_logits(out.logits[:, :-1], ids[:, 1:]).mean()  # (B, T-1): token t+1 given <= t
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert ours.item() == pytest.approx(F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item(), rel=1e-5)


def test_explained_variance():
    returns = torch.randn(2, 4)
    assert explained_variance(returns, returns, MASK).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros(2, 4), returns - masked_mean(returns, MASK), MASK).item() == pytest.approx(0.0, abs=1e-6)
    # by hand over the 6 valid tokens: returns 1 2 3 4 | 1 3 (mean 7/3), residuals R - V 0 0 0 1 | 0 -1;
    # 1 - var(residuals) / var(returns), population variances; the padding's garbage changes nothing
    returns = garbage_in_padding(torch.tensor([[1.0, 2, 3, 4], [1, 3, 0, 0]]))
    values = garbage_in_padding(torch.tensor([[1.0, 2, 3, 3], [1, 4, 0, 0]]))
    var_returns = sum((r - 7 / 3) ** 2 for r in (1, 2, 3, 4, 1, 3)) / 6
    var_residuals = sum(e ** 2 for e in (0, 0, 0, 1, 0, -1)) / 6  # their mean is 0
    assert explained_variance(values, returns, MASK).item() == pytest.approx(1 - var_residuals / var_returns)


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(0.05)
    assert fixed.update(100.0) == 0.05
    adaptive = KLController(0.1, target=6.0)
    assert adaptive.update(12.0) == pytest.approx(0.1 * 1.02)  # error clipped at +0.2
    assert adaptive.update(6.0) == pytest.approx(0.1 * 1.02)  # on target: unchanged
    assert adaptive.update(3.0) == pytest.approx(0.1 * 1.02 * 0.98)  # error clipped at -0.2
    unclipped = KLController(0.1, target=6.0)
    assert unclipped.update(6.6) == pytest.approx(0.1 * (1 + 0.1 * 0.1))  # e = 6.6 / 6 - 1 = 0.1, K_beta = 0.1
    assert unclipped.update(5.7) == pytest.approx(0.1 * 1.01 * (1 - 0.1 * 0.05))  # e = -0.05
    assert adaptive.update(float("nan")) == adaptive.update(float("inf")) == pytest.approx(0.1 * 1.02 * 0.98)


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])  # two prompts x G = 4; the second ties
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # unbiased: divide by G - 1
    expected = [-1.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 1.5 / (std + 1e-4), 0, 0, 0, 0]
    torch.testing.assert_close(group_advantages(scores, 4), torch.tensor(expected))
    torch.testing.assert_close(group_advantages(scores, 4, scale=False),
                               torch.tensor([-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0]))
    pairs = group_advantages(torch.tensor([0.0, 2.0, 7.0, 7.0]), 2)  # groups of 2: +-1 / (sqrt(2) + eps), a tie
    torch.testing.assert_close(pairs, torch.tensor([-1, 1, 0, 0]) / (math.sqrt(2) + 1e-4))
    assert torch.isfinite(group_advantages(torch.full((4,), 3.0), 4)).all()  # a tie is 0, never 0 / 0
    tie = torch.full((3,), -1.3526537418365479)  # whose float32 mean is one rounding off the scores: still 0
    assert group_advantages(tie, 3).eq(0).all() and group_advantages(tie, 3, scale=False).eq(0).all()
    assert tied_groups(torch.cat([tie, torch.tensor([1.0, 1.0, 2.0])]), 3).tolist() == [True, False]


def test_rloo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    # 1 - mean(2, 3, 4) = -2, 2 - mean(1, 3, 4) = -2/3, ...; a tied group gets 0
    torch.testing.assert_close(rloo_advantages(scores, 4), torch.tensor([-2, -2 / 3, 2 / 3, 2, 0, 0, 0, 0]))
    torch.testing.assert_close(rloo_advantages(torch.tensor([0.0, 2.0]), 2), torch.tensor([-2.0, 2.0]))
    # the leave-one-out baseline is the group mean's, scaled by G / (G - 1)
    torch.testing.assert_close(rloo_advantages(scores, 4), group_advantages(scores, 4, scale=False) * 4 / 3)


def test_aggregate_token_and_sequence_means():
    values = garbage_in_padding(torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 5.0, 0.0, 0.0]]))
    assert aggregate(values, MASK, "token").item() == pytest.approx((4 + 8) / 6)  # every token alike
    assert aggregate(values, MASK, "sequence").item() == pytest.approx((1 + 4) / 2)  # every sequence alike


def test_kl_k3_is_an_unbiased_nonnegative_estimate():
    """E over y ~ pi of k3 is KL(pi || pi_ref) exactly: sum_y pi(y) k3(y) against the closed form."""
    torch.manual_seed(0)
    logp, ref = torch.log_softmax(torch.randn(3, 50), -1), torch.log_softmax(torch.randn(3, 50), -1)
    k3 = kl_k3(logp, ref, torch.ones_like(logp))  # every y of the vocabulary, as if sampled
    assert (k3 >= 0).all()
    torch.testing.assert_close((logp.exp() * k3).sum(-1), (logp.exp() * (logp - ref)).sum(-1))
    assert kl_k3(logp, logp, torch.ones_like(logp)).abs().max() == 0


def test_kl_k3_gradients_ignore_padding():
    """A log-ratio that overflows exp() in padding (inf * 0 = NaN in a backward through `where`) changes
    neither the loss nor any gradient: GRPO's KL term, as train.py aggregates it."""
    ref = torch.tensor([[-1.2, -0.5, -2.0, -1.0], [-0.7, -1.0, 0.0, 0.0]])
    grads = []
    for padding in (-1.0, -1e4):  # the second: exp(ref - logprob) = exp(1e4) = inf in the padding
        logprobs = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, -0.2, padding, padding]], requires_grad=True)
        loss = aggregate(kl_k3(logprobs, ref, MASK), MASK)
        loss.backward()
        grads.append((loss.detach(), logprobs.grad))
    (loss, grad), (loss_junk, grad_junk) = grads
    assert torch.isfinite(grad_junk).all() and loss_junk == loss
    torch.testing.assert_close(grad_junk, grad)
    assert (grad[~MASK.bool()] == 0).all()


def test_kl_k1_is_the_log_ratio_on_valid_tokens():
    logprobs = garbage_in_padding(torch.tensor([[-1.0, -2.0, -1.0, -1.0], [-0.5, -0.5, 0.0, 0.0]]))
    ref = torch.full((2, 4), -1.0)
    torch.testing.assert_close(kl_k1(logprobs, ref, MASK), torch.tensor([[0.0, -1, 0, 0], [0.5, 0.5, 0, 0]]))


def test_sequence_kl_sums_log_ratios_over_valid_tokens():
    logprobs = garbage_in_padding(torch.tensor([[-1.0, -2.0, -1.0, -1.0], [-0.5, -0.5, 0.0, 0.0]]))
    ref = torch.tensor([[-1.5, -1.0, -1.0, -2.0], [-1.0, -1.0, -1.0, -1.0]])
    torch.testing.assert_close(sequence_kl(logprobs, ref, MASK), torch.tensor([0.5 - 1 + 0 + 1, 0.5 + 0.5]))
