"""minrlhf: RLHF as InstructGPT did it (SFT, a pairwise reward model, PPO), then DPO, GRPO and RLOO, small
enough to read.
The pieces to copy: losses (the math), models (value head, reward model), data (rows to batches)."""
from .offline import offline_without_dns

offline_without_dns()  # before data.py imports datasets, and with it huggingface_hub
from .data import (DataError, check_columns, check_prompts, collate_pairs, collate_prompts, collate_sft,
                   decode_response, encode_pair, encode_preference, encode_prompt, encode_rl_prompt,
                   encode_sft, ensure_pad_token, is_chat, load_rows, pad, pad_with_mask,
                   prompts_before_replies, sequence_length, split_hh, stop_token_ids, to_device, tokenize)
from .losses import (KLController, aggregate, compute_gae, dpo_loss, entropy_from_logits, explained_variance,
                     first_eos_mask, group_advantages, kl_k1, kl_k3, kl_penalized_rewards,
                     logprobs_from_logits, masked_mean, masked_var, masked_whiten, pairwise_ranking_loss,
                     ppo_policy_loss, ppo_value_loss, rloo_advantages, sequence_kl, tied_groups)
from .models import (Critic, PolicyWithValueHead, full_pair_scores, load_causal_lm, load_reward_model,
                     pair_scores, position_ids, position_limit, reply_logprobs,
                     response_logprobs, response_positions, reward_scores, sampled_logprobs, score_pairs,
                     score_texts, vocab_size, within_positions)
