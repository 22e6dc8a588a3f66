"""The RLHF math: pure functions of tensors, no models, no config. Copy freely.

Shapes: B batch, R response length, V vocab, G samples per prompt. `mask` is 1 on valid response tokens
(a contiguous prefix of each row) and 0 on padding; a mean over tokens is over all valid tokens of the batch
(unless `aggregate` is told otherwise; the preference losses are means over pairs), and nothing at a padded
position can reach a valid one. In the order the stages use them: sampling, the preference losses, then PPO's
phases (KL-shaped rewards, GAE, the clipped losses), then GRPO's and RLOO's advantages.
"""
import math

import torch
import torch.nn.functional as F


def first_eos_mask(response, eos_ids):
    """True on each row's tokens up to and including its first EOS, any of the ids `eos_ids` (all of a row
    without one): what was generated before the episode ended. (B, R) -> (B, R) bool."""
    is_eos = torch.isin(response, torch.as_tensor(eos_ids, device=response.device)).long()
    return is_eos.cumsum(1) - is_eos == 0  # no EOS strictly before this position


def logprobs_from_logits(logits, labels):
    """log p(label) at each position, (B, R, V) & (B, R) -> (B, R) float32; equals
    `log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]` (tested). Cross-entropy fuses the
    log-softmax and the pick. Row by row: without gradients (rollout, reference) the extra memory is one
    (R, V) row, not a second (B, R, V) tensor, which matters at V = 50k-150k; with gradients each row's
    float32 log-softmax is kept for the backward, as in the plain form."""
    rows = [F.cross_entropy(row.float(), label, reduction="none") for row, label in zip(logits, labels)]
    return -torch.stack(rows)


def entropy_from_logits(logits):
    """Entropy of the categorical distribution at each position: (B, R, V) -> (B, R). Row by row, as above."""
    def one(row):  # (R, V) -> (R,), in float32 one row at a time; a -inf logit (p = 0) adds 0, not 0 x -inf
        row = row.float().clamp(min=torch.finfo(torch.float32).min)
        return torch.logsumexp(row, -1) - (F.softmax(row, -1) * row).sum(-1)
    return torch.stack([one(row) for row in logits])


def masked_mean(values, mask):
    """Mean over valid entries; `where`, not a product, so NaN/inf garbage in padding cannot leak."""
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def masked_var(values, mask):
    """Population variance over valid entries."""
    return masked_mean((values - masked_mean(values, mask)) ** 2, mask)


def masked_whiten(values, mask, shift_mean=True):
    """(values - mean) / sqrt(var + 1e-8) over valid entries; the mean is kept when shift_mean=False.
    Padded positions come out as 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


def pairwise_ranking_loss(chosen_rewards, rejected_rewards):
    """-log sigmoid(r_chosen - r_rejected), mean over pairs: InstructGPT (Ouyang et al. 2022) eq. 1 with
    K = 2 replies per prompt (with K > 2, InstructGPT weighs each of a prompt's C(K, 2) pairs 1/C(K, 2)).
    logsigmoid is computed stably (softplus form), so a margin of +-400 neither overflows nor NaNs.
    (B,) x2 -> (loss, stats): the share of pairs ranked right, the mean margin."""
    margin = chosen_rewards.float() - rejected_rewards.float()  # (B,)
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}
    return loss, stats


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Direct Preference Optimisation, Rafailov et al. 2023, eq. 7: the pairwise ranking loss above, with
    the implicit reward r(y) = beta * (log pi(y) - log pi_ref(y)) of each reply in place of a reward model.
    Inputs (B,): log-probs summed over each reply's tokens. Policy == reference gives log 2."""
    chosen = beta * (chosen_logps.float() - ref_chosen_logps.float())  # (B,)
    rejected = beta * (rejected_logps.float() - ref_rejected_logps.float())
    return pairwise_ranking_loss(chosen, rejected)


def kl_k1(logprobs, ref_logprobs, mask):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi: k1 = log pi - log pi_ref (Schulman
    2020), unbiased, negative where the sample is likelier under pi_ref. (B, R) x3 -> (B, R), 0 on padding."""
    return torch.where(mask.bool(), logprobs - ref_logprobs, 0.0)


def kl_k3(logprobs, ref_logprobs, mask):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, Schulman 2020, "Approximating KL
    divergence": k3 = r - 1 - log r, r = pi_ref / pi; unbiased as k1 (`kl_k1`) is, but never negative, and
    of lower variance for nearby policies. GRPO's KL term, Shao et al. 2024, eq. 4 (there the tokens come
    from the rollout's policy, so once an update has moved pi the estimate is no longer unbiased).
    (B, R) x3 -> (B, R), 0 on padding: masked before the exp, whose overflow there would otherwise send
    inf * 0 = NaN into the gradients."""
    log_r = torch.where(mask.bool(), ref_logprobs - logprobs, 0.0)
    return torch.exp(log_r) - 1 - log_r


def sequence_kl(logprobs, ref_logprobs, mask):
    """KL(pi || pi_ref) of each sampled sequence, k1 summed over its valid tokens: (B, R) -> (B,)."""
    return kl_k1(logprobs, ref_logprobs, mask).sum(1)


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token reward r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)), plus the sequence score on
    the last valid token: Ziegler et al. 2019, eq. 2's sequence penalty split over the tokens, as their code
    (lm-human-preferences) does; the sum is the same. (B,), (B, R) x3 -> (B, R); every row has a valid
    token (the first token of a response is always generated)."""
    rewards = -kl_coef * kl_k1(logprobs, ref_logprobs, mask)  # (B, R)
    last = mask.long().sum(1) - 1  # (B,) index of the last valid token
    rewards[torch.arange(len(last)), last] += scores.to(rewards.dtype)  # rewards[b, last[b]] += scores[b]
    return rewards


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation, Schulman et al. 2016, eq. 16:
    A_t = sum_l (gamma*lam)^l delta_{t+l},  delta_t = r_t + gamma*V_{t+1} - V_t.
    The value after a row's last valid token is 0: the episode ends there, also where the token cap cut
    it (no bootstrapping; --missing-eos-penalty, where on, scores that). (B, R) x3 -> advantages, returns
    (advantages + values), (B, R) each."""
    mask = mask.bool()
    rewards, values = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
    advantages, lastgaelam = torch.zeros_like(values), torch.zeros_like(values[:, 0])  # lastgaelam: A_{t+1}
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam  # A_t = delta_t + gamma*lam*A_{t+1}
        advantages[:, t] = lastgaelam
    advantages = torch.where(mask, advantages, 0.0)
    return advantages, advantages + values


def aggregate(values, mask, loss_agg="token"):
    """A per-token loss (B, R) -> scalar. "token": the mean over all valid tokens of the batch, each token
    weighing the same. "sequence": the mean over sequences of each one's token mean (GRPO, Shao et al. 2024,
    eq. 3), which has a length bias (Liu et al. 2025, "Dr. GRPO"): a token of a long answer weighs
    less, so a long bad answer is punished less per token than a short one, and answers drift longer."""
    if loss_agg == "token":
        return masked_mean(values, mask)
    mask = mask.bool()
    return (torch.where(mask, values, 0.0).sum(1) / mask.sum(1).clamp(min=1)).mean()


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, loss_agg="token"):
    """Clipped surrogate, Schulman et al. 2017, eq. 7, as a loss to minimise:
    aggregate(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))). (B, R) x4 -> (loss, stats)."""
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)  # (B, R)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = aggregate(torch.max(unclipped, clipped), mask, loss_agg)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs, mask), mask),  # KL(old || new)
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, cliprange_value, loss_agg="token"):
    """Clipped value loss (PPO2 baselines; Andrychowicz et al. 2021 study it):
    0.5 * aggregate(max((v - R)^2, (v_clipped - R)^2)), v_clipped = old + clip(v - old, +-eps).
    (B, R) x4 -> (loss, stats); padding masked before any arithmetic, as in the policy loss."""
    mask = mask.bool()
    values, old_values, returns = (torch.where(mask, x, 0.0) for x in (values, old_values, returns))
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped, loss_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.max(loss_unclipped, loss_clipped), mask, loss_agg)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R]: 1 is a perfect critic, 0 no better than a constant."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


class KLController:
    """The KL coefficient beta. Fixed when target is None; otherwise adaptive, Ziegler et al. 2019,
    sec. 2.2: e = clip(KL / target - 1, -0.2, 0.2), beta <- beta * (1 + K_beta * e), K_beta = 0.1. A KL
    that is not a number (a skipped step's) leaves beta as it is, rather than NaN for ever after."""

    def __init__(self, kl_coef, target=None, k_beta=0.1):
        self.value, self.target, self.k_beta = kl_coef, target, k_beta

    def update(self, kl):
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + self.k_beta * error
        return self.value


def group_advantages(scores, group_size, scale=True, eps=1e-4):
    """GRPO's outcome advantage, Shao et al. 2024 (DeepSeekMath), sec. 4.1.2: each sample's score against
    the G samples of its prompt, (s - mean) / (std + eps), std unbiased (as TRL); scale=False keeps
    s - mean (Liu et al. 2025, "Dr. GRPO": the std weighs up prompts whose samples barely differ).
    Rows are consecutive groups of group_size >= 2. (B,) -> (B,); a group that ties gets 0."""
    groups = scores.float().view(-1, group_size)  # (B / G, G)
    advantages = groups - groups.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(1, keepdim=True) + eps)
    return torch.where(tied_groups(scores, group_size)[:, None], 0.0, advantages).flatten()


def tied_groups(scores, group_size):
    """Groups whose samples all score alike, by equality: their float32 mean can be a rounding off the
    common score (3 x -1.3526537), which divided by a std of that rounding plus eps is not 0.
    (B,) -> (B / G,)"""
    groups = scores.float().view(-1, group_size)  # (B / G, G)
    return (groups == groups[:, :1]).all(1)


def rloo_advantages(scores, group_size):
    """REINFORCE leave-one-out (RLOO), Ahmadian et al. 2024, after Kool et al. 2019: each sample's score
    less the mean score of the other G - 1 samples of its prompt. Rows are consecutive groups of
    group_size >= 2. (B,) -> (B,)."""
    groups = scores.float().view(-1, group_size)  # (B / G, G)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()
