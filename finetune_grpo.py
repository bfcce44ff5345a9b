"""Learning from rewards with LoRA: GRPO (Shao et al. 2024, DeepSeekMath) and its corrections, on prompts prepared by
prepare_prompts.py and rewards from rewards.py.

Each step samples a group of G completions for each of its prompts from the model as it is, scores them with the
rewards (rewards.score, rewards.combine: one reward r per completion) and compares each completion with the others of
its group: its advantage is

    A = r - mean(r of its group)                 --scale_rewards none   (Dr. GRPO: no division)
    A = (r - mean) / (std of its group + 1e-4)   --scale_rewards group  (GRPO's)
    A = (r - mean) / (std of the batch + 1e-4)   --scale_rewards batch

(std with Bessel's correction; a completion no reward scored is left out of the mean and std and gets A = 0). Then the
model learns from each token t of each completion, with ρ_t = π(t) / π_old(t) the ratio of its probability under the
model to that under the model that sampled it (1 in the first pass over the rollouts, with the gradient of π; with
--num_iterations k the same rollouts are learned from k times, π_old kept from the sampling), PPO's clipped objective

    ℓ_t = -min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε_high) A) + β ρ_t KL_t,  KL_t = π_ref(t)/π(t) - log(π_ref(t)/π(t)) - 1

(KL_t: the k3 estimator of the divergence from the reference, the base model with LoRA switched off, weighted by ρ_t
so that its gradient is that of the reverse KL without bias (DeepSeek-V3.2; TRL's use_bias_correction_kl, on by
default), which changes the gradient even where ρ_t = 1; --beta 0, the default, computes no reference), summed per
loss:

    --loss grpo     the mean over completions of each completion's mean over its tokens (GRPO's paper)
    --loss bnpo     the mean over the tokens of a micro-batch, averaged over the micro-batches
    --loss dr_grpo  the sum over all tokens / (completions x --max_new_tokens) (Dr. GRPO, Liu et al. 2025: no
                    length bias)
    --loss dapo     the sum over all tokens / the number of tokens in the whole batch (DAPO, Yu et al. 2025; the
                    default, as TRL's)

With --mask_truncated_completions, completions that did not end (no stop token within --max_new_tokens) teach nothing:
their tokens are left out of the loss (they still count as completions in grpo's and dr_grpo's denominators). The
log-probabilities are the model's after dividing its logits by --temperature, as the completions were sampled.

These are TRL's GRPOTrainer's definitions (trl 1.16: `_generate_and_score_completions`, `_compute_loss`), which
tests/test_finetune_grpo.py checks in float64: the advantages, the per-token log-probabilities, the loss, the clip
fractions and KL, and every LoRA gradient. Here are the parts a step is made of, in the order it uses them:
`group_advantages` (with `nanstd`), `completion_logps` and `reference_logps`, `completion_mask`, `loss_normalizer`
and `grpo_loss`.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn.utils.rnn import pad_sequence

from lora import lora_disabled
from losses import pack_batch, token_cross_entropy
from model import LLaMA

LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
IGNORE_INDEX = -100  # the label of the prompt tokens, which are no target
# what grpo_loss adds up over the tokens of a micro-batch, TRL's names: divided by the number of tokens, the fraction
# of tokens clipped below (ρ < 1 - ε where A < 0), above (ρ > 1 + ε_high where A > 0), either, and the mean KL
TOKEN_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl")


@dataclass
class GRPO:
    """What is learned from the rewards, as the adapter's metadata and train_state.pt's settings record it."""

    loss: str = "dapo"  # one of LOSSES
    num_generations: int = 8  # G: completions per prompt, compared with each other
    scale_rewards: str = "group"  # one of SCALE_REWARDS
    epsilon: float = 0.2  # ρ is clipped below at 1 - epsilon
    epsilon_high: Optional[float] = None  # ... and above at 1 + epsilon_high (None: epsilon; DAPO: 0.28)
    beta: float = 0.0  # the weight of the KL to the reference; 0: no reference
    num_iterations: int = 1  # passes over the same rollouts
    max_new_tokens: int = 256  # the longest completion (dr_grpo's constant)
    temperature: float = 1.0  # of the sampling, and of the log-probabilities
    mask_truncated_completions: bool = False


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The advantage of each completion (completions,) from its reward (rewards.combine: NaN where no reward scored
    it), the completions of a prompt's group next to each other; and whether the spread its reward is divided by
    is zero (completions,), whose mean is TRL's frac_reward_zero_std (groups that teach nothing)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"--scale_rewards {scale_rewards} is not one of {', '.join(SCALE_REWARDS)}")
    groups = rewards.view(-1, num_generations)  # (prompts, G)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:  # "none" divides by nothing, but reports the groups whose rewards are all the same
        std = nanstd(groups, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), zero_std  # unscored completions (NaN): no advantage


def nanstd(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """The standard deviation of `x` over `dim` (all of it when None), NaNs left out, with Bessel's correction; NaN
    where fewer than two values are left. TRL's `nanstd`."""
    dims = () if dim is None else (dim,)
    mean = torch.nanmean(x, dim=dims or None, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dims or None, keepdim=True)
    count = (~x.isnan()).sum(dim=dims or None, keepdim=True).to(x.dtype)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.nan)  # x's dtype (TRL: float32)
    std = variance.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


def completion_logps(
    model: LLaMA,
    prompt_ids: list[torch.Tensor],
    completion_ids: list[torch.Tensor],
    max_seq_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The log-probability of each token of each completion after its prompt under the model (completions, longest
    completion), 0 after a completion's end, from the logits divided by `temperature`.

    The prompt + completion sequences are packed into one row without padding and go through the model in one forward
    pass (each attends only to itself), whose head computes logits at the completion tokens only (training.pack_batch
    and token_cross_entropy, as finetune_dpo.py scores its answers)."""
    sequences = [
        {
            "input_ids": torch.cat([prompt, completion]),
            "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), completion]),
        }
        for prompt, completion in zip(prompt_ids, completion_ids)
    ]
    longest = max(len(sequence["input_ids"]) for sequence in sequences)
    if longest > max_seq_length:
        raise ValueError(f"a prompt and its completion hold {longest} tokens, more than the {max_seq_length} allowed")
    input_ids, targets, lengths = pack_batch(sequences, max_seq_length)
    device = model.embed.weight.device
    input_ids, targets = input_ids.to(device), targets.to(device)
    where = targets != IGNORE_INDEX  # (1, N): the completion tokens, each predicted from the position before it
    logits = model(input_ids, lengths=lengths, logits_at=where)  # (completion tokens, vocab_size)
    if temperature != 1.0:
        logits = logits / temperature
    token_logps = -token_cross_entropy(logits, targets[where])  # (completion tokens,)
    del logits  # now held by the graph alone, which frees them once the head's backward is done
    per_completion = token_logps.split([len(completion) for completion in completion_ids])
    return pad_sequence(list(per_completion), batch_first=True)


def reference_logps(
    model: LLaMA,
    prompt_ids: list[torch.Tensor],
    completion_ids: list[torch.Tensor],
    max_seq_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`completion_logps` under the reference, the model with its LoRA layers switched off (the base model), without
    gradient."""
    with torch.no_grad(), lora_disabled(model):
        return completion_logps(model, prompt_ids, completion_ids, max_seq_length, temperature)


def completion_mask(
    lengths: list[int], truncated: list[bool], mask_truncated_completions: bool, device: Optional[torch.device] = None
) -> torch.Tensor:
    """1.0 at each completion's tokens, 0.0 after its end (completions, longest completion); with
    `mask_truncated_completions`, 0.0 throughout the completions that did not end (`truncated`: no stop token)."""
    positions = torch.arange(max(lengths), device=device)
    mask = (positions < torch.tensor(lengths, device=device)[:, None]).float()
    if mask_truncated_completions:
        mask = mask * ~torch.tensor(truncated, device=device)[:, None]
    return mask


def loss_normalizer(grpo: GRPO, n_completions: int, n_tokens: int, n_micro_batches: int) -> float:
    """What `grpo_loss`'s sum over a micro-batch is divided by, so that the sum over a batch's micro-batches (on every
    device) is the loss of the batch: its number of completions (grpo), that times --max_new_tokens (dr_grpo), its
    number of completion tokens not masked (dapo), or its number of micro-batches (bnpo, whose micro-batch term is
    already a mean over the micro-batch's tokens)."""
    if grpo.loss == "grpo":
        return n_completions
    if grpo.loss == "dr_grpo":
        return n_completions * grpo.max_new_tokens
    if grpo.loss == "dapo":
        return max(n_tokens, 1)
    return n_micro_batches


def grpo_loss(
    grpo: GRPO,
    logps: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    normalizer: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's part of the loss (the module docstring's formulas, as TRL writes them) and its TOKEN_METRICS
    summed over its tokens (len(TOKEN_METRICS),), without gradient. `logps`: `completion_logps` (completions, T), with
    gradient; `old_logps`: the same from the model that sampled them, or None in the first pass over the rollouts,
    where it is `logps` itself (detached: ρ = 1 with the gradient of π); `ref_logps`: `reference_logps`, or None with
    beta 0; `advantages`: `group_advantages` (completions,); `mask`: `completion_mask`; `normalizer`:
    `loss_normalizer`."""
    if grpo.loss not in LOSSES:
        raise ValueError(f"--loss {grpo.loss} is not one of {', '.join(LOSSES)}")
    old_logps = logps.detach() if old_logps is None else old_logps
    mask = mask.to(logps.dtype)
    epsilon_high = grpo.epsilon if grpo.epsilon_high is None else grpo.epsilon_high
    advantages = advantages.to(logps.dtype)[:, None]  # (completions, 1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - grpo.epsilon, 1 + epsilon_high)
    token_losses = -torch.min(ratio * advantages, clipped * advantages)  # (completions, T)
    kl = torch.zeros_like(token_losses)
    if grpo.beta != 0.0:
        kl = (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1) * ratio  # ρ: the bias correction
        token_losses = token_losses + grpo.beta * kl
    if grpo.loss == "grpo":
        loss = ((token_losses * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    elif grpo.loss == "bnpo":
        loss = (token_losses * mask).sum() / mask.sum().clamp(min=1.0)
    else:  # dr_grpo, dapo: a sum over the tokens, divided by a constant of the batch
        loss = (token_losses * mask).sum()

    low = (ratio < 1 - grpo.epsilon) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    metrics = torch.stack([(x * mask).sum() for x in (low, high, low | high, kl)])
    return loss / normalizer, metrics.detach()
