"""Learning from rewards with LoRA: GRPO (Shao et al. 2024, DeepSeekMath) and its corrections, on prompts prepared by
prepare_prompts.py and rewards from rewards.py.

    python finetune_grpo.py --data_dir data/prompts --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --rewards number_match --num_generations 8 --max_new_tokens 64

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
fractions and KL, and every LoRA gradient.

A step: --train.batch_size prompts (the data order of training.batch_indices), G completions each sampled in one
batched decode (decode.decode_all: every row at its own position, each stopping at the tokenizer's stop ids) from a
torch.Generator seeded from the step (a resumed run samples what an unbroken one would), their rewards and advantages,
then --num_iterations optimizer updates over micro-batches of --train.micro_batch_size completions (each prompt
computed once for its completions in the micro-batch: completion_logps; Blocks recomputed in the backward pass by
default, --train.gradient_checkpointing, as TRL does). Under DDP and
FSDP every device samples the whole batch's completions, the same ones (same weights, same generator), so that they
agree without communication and FSDP's gathers stay in step; the updates' micro-batches are shared out. The result is
an ordinary LoRA adapter recording the method and its settings ("training"), as finetune_dpo.py's.
The story is here, top to bottom (setup: the flags and every check; main: the model and the optimizer; fit: the
training loop and its step; validate: the mean reward on the test prompts, greedy; rollouts: the sampling), then the
parts of the step: `group_advantages` (with `nanstd`), `completion_logps` and `reference_logps`, `completion_mask`,
`loss_normalizer` and `grpo_loss`. See howto/grpo.md.
"""

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from lightning.fabric import Fabric
from torch.nn.utils.rnn import pad_sequence
from torch.optim import Optimizer

from data import PreparedData, file_sha256, load_prepared_data
from decode import Completion, check_sampling, decode_all
from lora import (
    LoRAConfig,
    is_lora_tensor,
    load_lora_checkpoint,
    lora,
    lora_config_for,
    lora_disabled,
    mark_only_lora_as_trainable,
    save_lora_tensors,
)
from losses import token_cross_entropy
from model import LLaMA
from quantize import make_optimizer
from rewards import RewardFunction, combine, load_rewards, score
from tokenizer import Tokenizer
from train_state import STATE_NAME, find_resume, resume_settings, save_train_state, start_state
from training import (
    Progress,
    TrainArgs,
    batch_indices,
    compile_blocks,
    finish,
    is_fsdp,
    learning_rate,
    make_fabric,
    plot_losses,
    stop_if_diverged,
)
from utils import cli, default_precision, load_config, load_model, packed_linears, precision_to_dtype

ADAPTER_NAME = "lit_model_lora_finetuned.safetensors"  # the final adapter, as finetune_lora.py names it

LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
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
    top_k: Optional[int] = None  # sampling among the k likeliest tokens only
    top_p: Optional[float] = None  # ... and among those whose probabilities add up to top_p
    mask_truncated_completions: bool = False


def setup(
    data_dir: Path = Path("data/prompts"),
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/grpo/prompts"),
    rewards: list[str] = ["number_match"],
    reward_weights: Optional[list[float]] = None,
    format_pattern: Optional[str] = None,
    loss: str = "dapo",
    num_generations: int = 8,
    scale_rewards: str = "group",
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    num_iterations: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    mask_truncated_completions: bool = False,
    lora_path: Optional[Path] = None,
    precision: Optional[Literal["bf16-mixed", "bf16-true", "32-true"]] = None,
    quantize: Optional[Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"]] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    lora_r: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    lora_dropout: float = 0.0,
    lora_targets: Optional[Union[list[str], str]] = None,
    lora_rslora: Optional[bool] = None,
    lora_dora: Optional[bool] = None,
    lora_ranks: Optional[dict[str, int]] = None,
    lora_alphas: Optional[dict[str, float]] = None,
    train: TrainArgs = TrainArgs(
        batch_size=8,
        micro_batch_size=16,
        epochs=1,
        max_seq_length=1024,
        learning_rate=1e-4,
        warmup_steps=5,
        eval_interval=20,
        eval_batches=2,
        save_interval=50,
        gradient_checkpointing=True,  # as TRL's: completions x their length make large micro-batches
    ),
    resume: Optional[str] = None,
) -> None:
    """Tune a checkpoint with LoRA from rewards (GRPO) on prompts prepared by prepare_prompts.py.

    Args:
        data_dir: directory with train.pt, test.pt and metadata.json from prepare_prompts.py, prepared with the
            tokenizer of `checkpoint_dir`.
        checkpoint_dir: the base model, as converted by scripts/convert_hf_checkpoint.py.
        out_dir: receives the adapters, train_state.pt, logs/, loss.png and reward.png.
        rewards: the reward functions: built-ins of rewards.py (number_match, exact_match, format) or
            path/to/file.py:function, TRL's signature `fn(prompts, completions, **fields) -> list[float | None]`.
        reward_weights: a weight per reward (1 each when left out); the reward is their weighted sum.
        format_pattern: the regular expression of the `format` reward.
        loss: "grpo", "dr_grpo", "dapo" or "bnpo": how the token losses are averaged (module docstring).
        num_generations: G, the completions sampled per prompt and compared with each other; at least 2.
        scale_rewards: "group" (advantages divided by the group's spread, GRPO's), "batch" (by the batch's) or "none"
            (Dr. GRPO's).
        epsilon: the ratio to the sampling model's probability is clipped below at 1 - epsilon.
        epsilon_high: ... and above at 1 + epsilon_high (epsilon when left out; DAPO uses 0.28).
        beta: the weight of the KL to the base model (LoRA off); 0 computes no reference.
        num_iterations: optimizer updates over each step's completions (more than 1: the later ones clipped).
        max_new_tokens: the longest completion.
        temperature: of the sampling, above 0 (and of the log-probabilities the loss uses).
        top_k: sample among the k likeliest tokens only.
        top_p: sample among the likeliest tokens whose probabilities add up to top_p.
        mask_truncated_completions: completions that reach max_new_tokens without a stop token teach nothing.
        lora_path: an adapter to start from (an SFT adapter from finetune_lora.py) instead of a new one; its LoRA
            settings are used: leave the --lora_* flags but --lora_dropout out, or give the same.
        precision: "bf16-mixed" (bf16 base, fp32 LoRA), "bf16-true" or "32-true"; by default bf16-mixed on GPUs with
            bf16 and 32-true elsewhere.
        quantize: hold the frozen base in 4 or 8 bits with bitsandbytes (QLoRA, howto/quantize.md); not with fsdp.
        devices: devices (GPUs, or processes on CPU) per node.
        num_nodes: machines to train on, `devices` each.
        strategy: "auto" (one device, DDP for several), "ddp" or "fsdp" (the base sharded across devices).
        lora_r: rank of the update (8 when left out).
        lora_alpha: the update is scaled by lora_alpha / lora_r (16 when left out).
        lora_dropout: dropout on the input of the LoRA branch in the updates; 0 by default (sampling is without it).
        lora_targets: the projections LoRA adapts ("query" and "value" when left out; e.g. all_linear).
        lora_rslora: rank-stabilised LoRA (off when left out).
        lora_dora: DoRA (off when left out).
        lora_ranks: a rank of their own for some projections, by path: '{"blocks.0.attn.q_proj": 16}'.
        lora_alphas: an alpha of their own for some projections, by path.
        train: how to train (training.TrainArgs): batch_size counts prompts (each step learns from batch_size x G
            completions), micro_batch_size counts completions per forward and backward pass; eval_batches x
            micro_batch_size test prompts are scored at each evaluation.
        resume: a train_state.pt to continue from, or "auto" for out_dir/train_state.pt when there is one.
    """
    # everything that can be wrong with the input is found here, before any model is loaded or process started
    grpo = GRPO(
        loss=loss,
        num_generations=num_generations,
        scale_rewards=scale_rewards,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        beta=beta,
        num_iterations=num_iterations,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        mask_truncated_completions=mask_truncated_completions,
    )
    check_flags(grpo, train, devices * num_nodes, quantize, strategy)
    functions = load_rewards(rewards, format_pattern)  # a missing file or function stops here
    if reward_weights is not None and len(reward_weights) != len(functions):
        raise ValueError(f"--reward_weights has {len(reward_weights)} weights for {len(functions)} rewards; one each")
    data_dir, checkpoint_dir, out_dir = Path(data_dir), Path(checkpoint_dir), Path(out_dir)
    data = load_prepared_data(data_dir, checkpoint_dir, keys=("prompt_ids",))  # another tokenizer's data stops here
    check_prompts(data, data_dir, grpo, min(train.max_seq_length, load_config(checkpoint_dir).block_size))
    tokenizer = Tokenizer(checkpoint_dir)  # the stop ids, and the completions' text for the rewards
    flags = dict(r=lora_r, alpha=lora_alpha, targets=lora_targets, rslora=lora_rslora, dora=lora_dora)
    flags.update(ranks=lora_ranks, alphas=lora_alphas)
    lora_config = replace(lora_config_for(flags, lora_path, load_config(checkpoint_dir)), dropout=lora_dropout)
    resume = find_resume(resume, out_dir)
    train = train.for_records(len(data.train))  # max_steps from epochs (of prompts), unless given
    precision = precision or default_precision(training=True)  # bf16-mixed on GPUs with bf16, else 32-true

    fabric = make_fabric(devices, num_nodes, strategy, precision, train, out_dir)  # seeded, logging to out_dir/logs
    fabric.launch(
        main,
        checkpoint_dir,
        out_dir,
        data,
        tokenizer,
        (functions, reward_weights),
        lora_config,
        lora_path,
        grpo,
        quantize,
        precision,
        train,
        resume,
    )


def check_flags(grpo: GRPO, train: TrainArgs, devices: int, quantize: Optional[str], strategy: str) -> None:
    """setup's checks of its flags, each error naming the flag."""
    if grpo.loss not in LOSSES:
        raise ValueError(f"--loss {grpo.loss} is not one of {', '.join(LOSSES)}")
    if grpo.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"--scale_rewards {grpo.scale_rewards} is not one of {', '.join(SCALE_REWARDS)}")
    if grpo.num_generations < 2:
        raise ValueError(
            f"--num_generations {grpo.num_generations}: GRPO learns by comparing the completions of a prompt with "
            "each other, which needs at least 2 (8 is usual)"
        )
    if not grpo.epsilon > 0 or not (grpo.epsilon_high is None or grpo.epsilon_high > 0) or grpo.beta < 0:
        raise ValueError(
            f"--epsilon and --epsilon_high must be above 0 and --beta at least 0, not {grpo.epsilon}, "
            f"{grpo.epsilon_high} and {grpo.beta}"
        )
    if grpo.num_iterations < 1:
        raise ValueError(f"--num_iterations must be at least 1, not {grpo.num_iterations}")
    if grpo.temperature <= 0:
        raise ValueError(f"--temperature must be above 0, not {grpo.temperature}: greedy completions are all alike")
    check_sampling(grpo.temperature, grpo.top_k, grpo.top_p, grpo.max_new_tokens)
    completions = train.batch_size * grpo.num_generations
    if train.micro_batch_size < 1 or completions % (train.micro_batch_size * devices):
        raise ValueError(
            f"--train.batch_size {train.batch_size} x --num_generations {grpo.num_generations} = {completions} "
            f"completions must be a multiple of --train.micro_batch_size {train.micro_batch_size} (completions) x "
            f"{devices} devices"
        )
    if quantize and strategy == "fsdp":
        raise ValueError("--quantize does not work with --strategy fsdp; use --strategy ddp or one device")


def check_prompts(data: PreparedData, data_dir: Path, grpo: GRPO, context: int) -> None:
    """That the data are prompts (prepare_prompts.py's), each of which leaves room for --max_new_tokens in the
    `context` (the shorter of --train.max_seq_length and the model's block_size)."""
    if not data.metadata.get("prompts"):
        raise ValueError(f"{data_dir} does not hold prompts; prepare them with prepare_prompts.py")
    longest = max(len(record["prompt_ids"]) for record in data.train + data.val)
    if longest + grpo.max_new_tokens > context:
        raise ValueError(
            f"{data_dir} holds a prompt of {longest} tokens, which with --max_new_tokens {grpo.max_new_tokens} is more "
            f"than the {context} tokens of the context (--train.max_seq_length, or the model's block_size); lower "
            "--max_new_tokens or prepare the prompts with a smaller --max_prompt_length"
        )


def main(
    fabric: Fabric,
    checkpoint_dir: Path,
    out_dir: Path,
    data: PreparedData,
    tokenizer: Tokenizer,
    rewards: tuple[list[tuple[str, RewardFunction]], Optional[list[float]]],
    lora_config: LoRAConfig,
    lora_path: Optional[Path],
    grpo: GRPO,
    quantize: Optional[str],
    precision: str,
    train: TrainArgs,
    resume: Optional[Path],
) -> None:
    """On every device: the model with LoRA (a new adapter or --lora_path's), the optimizer, the training (`fit`),
    the final adapter, the plots."""
    # The model: the frozen base with LoRA layers, as finetune_lora.py builds it. Under mixed precision the base is
    # held in the low dtype and LoRA in fp32 (FSDP shards both, each in its dtype).
    mixed = precision.endswith("-mixed")
    base_dtype = precision_to_dtype(precision.replace("-mixed", "-true"))
    device = "cpu" if is_fsdp(fabric) else fabric.device  # FSDP: fabric.setup_module moves each device's shards
    with lora(**asdict(lora_config)):
        model = load_model(checkpoint_dir, device=device, dtype=base_dtype, quantize=quantize)
    mark_only_lora_as_trainable(model)
    trainable = [param for param in model.parameters() if param.requires_grad]
    if mixed:
        for param in trainable:
            param.data = param.data.float()
    if lora_path is not None:  # into the fp32 LoRA weights, not rounded to the base's dtype on the way
        load_lora_checkpoint(model, lora_path)
    model.gradient_checkpointing = train.gradient_checkpointing  # recompute activations in the backward pass
    compile_blocks(fabric, model, train, quantized=quantize is not None)  # --train.compile: by default on CUDA
    n_trainable, total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    fabric.print(
        f"Trainable parameters: {n_trainable:,} of {total:,} ({100 * n_trainable / total:.3f}%), LoRA {lora_config}"
        f"{f', from {lora_path}' if lora_path else ''}; {grpo}; rewards {', '.join(name for name, _ in rewards[0])}"
    )
    model = fabric.setup_module(model)

    # The optimizer (AdamW or one of bitsandbytes' variants) over the LoRA weights only; fit sets its learning rate
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = fabric.setup_optimizers(
        make_optimizer(train.optimizer, trainable, train.learning_rate, train.weight_decay)
    )

    names, weights = [name for name, _ in rewards[0]], rewards[1]
    start = None if lora_path is None else file_sha256(lora_path)
    settings = resume_settings(
        model, train, len(data.train), lora=asdict(lora_config), grpo=asdict(grpo), rewards=names, start=start
    )
    state = start_state(fabric, resume, model, optimizer, settings)  # step 0, or where --resume left off
    state.setdefault("rewards", {"train": [], "val": []})  # the mean reward of each step, and on the test prompts
    fit(fabric, model, optimizer, data, tokenizer, rewards, state, settings, grpo, train, out_dir)

    training = {**asdict(grpo), "method": "grpo", "rewards": names, "reward_weights": weights}
    training["start_adapter"] = None if lora_path is None else str(lora_path)
    save(fabric, model, optimizer, state, settings, out_dir / ADAPTER_NAME, data.chat_template, training)
    fabric.print(f"Saved the adapter to {out_dir / ADAPTER_NAME}")
    finish(fabric, state["history"], out_dir, loss_name=f"{grpo.loss} loss")
    if fabric.global_rank == 0:  # sampled, at each step; greedy, on the test prompts
        plot_losses(state["rewards"], out_dir / "reward.png", "mean reward (train: sampled, validation: greedy)")


def fit(
    fabric: Fabric,
    model: LLaMA,
    optimizer: Optimizer,
    data: PreparedData,
    tokenizer: Tokenizer,
    rewards: tuple[list[tuple[str, RewardFunction]], Optional[list[float]]],
    state: dict,
    settings: dict,
    grpo: GRPO,
    train: TrainArgs,
    out_dir: Path,
) -> None:
    """The training loop, from step state["step"] to train.max_steps. A step: its train.batch_size prompts, G
    completions of each sampled in one batched decode, their rewards and advantages; the log-probabilities of the
    model that sampled them (with more than one pass) and of the reference (beta > 0); then num_iterations updates,
    each over all the completions in micro-batches, micro-batch k on device k % devices. Then, when due, the mean
    reward on the test prompts, and an adapter with train_state.pt."""
    max_seq_length, device = min(train.max_seq_length, model.config.block_size), fabric.device
    if state["step"] == 0:  # where it starts from
        validate(fabric, model, data, tokenizer, rewards, state, grpo, train)
    with Progress(fabric, train, len(data.train), state["step"]) as progress:
        for step in range(state["step"], train.max_steps):
            t0 = time.perf_counter()
            # the step's prompts follow from its number, and its completions from a generator seeded with it
            records = [data.train[j] for j in batch_indices(step, train.batch_size, len(data.train), train.seed)]
            generator = torch.Generator(device).manual_seed(train.seed * 1_000_003 + step)
            batch = sample_and_score(model, tokenizer, records, rewards, grpo, generator)
            prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
            lengths, truncated, advantages = batch["lengths"], batch["truncated"], batch["advantages"].to(device)
            n_tokens = int(completion_mask(lengths, truncated, grpo.mask_truncated_completions).sum())
            t_generation = time.perf_counter() - t0

            starts = range(0, len(lengths), train.micro_batch_size)
            normalizer = loss_normalizer(grpo, len(lengths), n_tokens, len(starts))  # the parts add up to the batch
            micro_batches = [slice(i, i + train.micro_batch_size) for i in starts]
            micro_batches = micro_batches[fabric.global_rank :: fabric.world_size]
            mask_truncated = grpo.mask_truncated_completions
            masks = [completion_mask(lengths[mb], truncated[mb], mask_truncated, device) for mb in micro_batches]
            # what the updates compare with: the model that sampled (from the second pass on it has moved) and the base
            old, ref = fixed_logps(model, prompt_ids, completion_ids, micro_batches, grpo, max_seq_length)
            lr = learning_rate(step, train.learning_rate, train.warmup_steps, train.max_steps)
            losses, sums = [], torch.zeros(len(TOKEN_METRICS), device=device)  # TOKEN_METRICS over the passes
            for _ in range(grpo.num_iterations):  # each pass over the completions is an optimizer update
                loss = torch.zeros((), device=device)
                for i, mb in enumerate(micro_batches):
                    # under DDP, gradients are averaged across devices once per update, after the last micro-batch
                    with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                        logps = completion_logps(
                            model, prompt_ids[mb], completion_ids[mb], max_seq_length, grpo.temperature
                        )
                        part, metrics = grpo_loss(grpo, logps, old[i], ref[i], advantages[mb], masks[i], normalizer)
                        # the batch's loss, in part; DDP and FSDP average gradients across devices, we want their sum
                        fabric.backward(part * fabric.world_size)
                    loss, sums = loss + part.detach(), sums + metrics
                losses.append(fabric.all_reduce(loss, reduce_op="sum").item())
                grad_norm = fabric.clip_gradients(model, optimizer, max_norm=train.grad_clip, error_if_nonfinite=False)
                stop_if_diverged(losses[-1], grad_norm, state, out_dir / STATE_NAME)  # a NaN stops before the update
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums = fabric.all_reduce(sums, reduce_op="sum") / max(n_tokens, 1) / grpo.num_iterations

            state["step"] = step = step + 1
            loss = sum(losses) / len(losses)
            state["history"]["train"].append((step, loss))
            state["rewards"]["train"].append((step, torch.nanmean(batch["reward"]).item()))
            figures = step_figures(rewards[0], batch, sums, grpo)
            figures.update({"time/generation": t_generation, "time/update": time.perf_counter() - t0 - t_generation})
            fabric.log_dict(figures, step)
            progress.bar.set_description(f"reward {figures['reward']:.3f}", refresh=False)
            progress.update(step, loss, lr, tokens=sum(len(p) for p in prompt_ids) + sum(lengths))
            if step % train.eval_interval == 0 or step == train.max_steps:
                validate(fabric, model, data, tokenizer, rewards, state, grpo, train)
            if step % train.save_interval == 0 and step < train.max_steps:  # an adapter and train_state.pt
                adapter_path = out_dir / f"lora_step-{step:06d}.safetensors"
                save(fabric, model, optimizer, state, settings, adapter_path, data.chat_template)


def save(
    fabric: Fabric,
    model: LLaMA,
    optimizer: Optimizer,
    state: dict,
    settings: dict,
    adapter_path: Path,
    chat_template: Optional[str],
    training: Optional[dict] = None,
) -> None:
    """Writes train_state.pt beside `adapter_path` (train_state.save_train_state: the LoRA tensors and what --resume
    needs), then the adapter at `adapter_path` from the tensors just saved in it, recording the chat template and
    `training`, the method and its settings, when given (the final adapter's). Both written whole or not at all."""
    path = adapter_path.parent / STATE_NAME
    weights = save_train_state(fabric, path, model, optimizer, state, settings, only=is_lora_tensor)  # on rank 0
    if fabric.global_rank == 0:
        lora_config = LoRAConfig.from_dict(settings["lora"])
        save_lora_tensors(weights, lora_config, model.config, adapter_path, chat_template, training)
    fabric.barrier()


@torch.no_grad()
def validate(
    fabric: Fabric,
    model: LLaMA,
    data: PreparedData,
    tokenizer: Tokenizer,
    rewards: tuple[list[tuple[str, RewardFunction]], Optional[list[float]]],
    state: dict,
    grpo: GRPO,
    train: TrainArgs,
) -> None:
    """The mean reward of the model's greedy completions of the first train.eval_batches x train.micro_batch_size
    test prompts (the same every time, so the numbers compare; every device computes them all), logged as
    eval_reward and eval_rewards/<name>/mean, added to state["rewards"]["val"]; and the first one's completion, to
    read."""
    records = data.val[: train.eval_batches * train.micro_batch_size]
    chunk = train.batch_size * grpo.num_generations  # as many rows as a step's rollouts decode together
    completions = []
    for i in range(0, len(records), chunk):
        completions += rollouts(model, tokenizer, records[i : i + chunk], grpo, generator=None)
    texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in completions]
    per_reward = score(rewards[0], [r["prompt"] for r in records], texts, fields(records, 1))
    reward = torch.nanmean(combine(per_reward, rewards[1])).item()
    figures = {"eval_reward": reward}
    figures.update(
        {f"eval_rewards/{name}/mean": torch.nanmean(per_reward[:, j]).item() for j, (name, _) in enumerate(rewards[0])}
    )
    fabric.print(f"\nStep {state['step']}: mean reward {reward:.4f} on {len(records)} test prompts (greedy)")
    fabric.print(f"{records[0]['prompt']!r} -> {texts[0]!r}")
    state["rewards"]["val"].append((state["step"], reward))
    fabric.log_dict(figures, state["step"])


def sample_and_score(
    model: LLaMA,
    tokenizer: Tokenizer,
    records: list[dict],
    rewards: tuple[list[tuple[str, RewardFunction]], Optional[list[float]]],
    grpo: GRPO,
    generator: torch.Generator,
) -> dict:
    """A step's rollouts: G completions of each record's prompt (`rollouts`), their text, their rewards under each
    function (`per_reward`, rewards.score) and weighed into one (`reward`, rewards.combine), and their advantages
    (`group_advantages`); the prompts' and completions' ids, the completions' lengths and which were cut at
    max_new_tokens (`truncated`), one entry per completion, a prompt's G side by side."""
    G = grpo.num_generations
    completions = rollouts(model, tokenizer, records, grpo, generator)
    texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in completions]
    per_reward = score(rewards[0], [r["prompt"] for r in records for _ in range(G)], texts, fields(records, G))
    reward = combine(per_reward, rewards[1])  # (completions,), NaN where no reward scored one
    advantages, zero_std = group_advantages(reward, G, grpo.scale_rewards)
    return {
        "prompt_ids": [record["prompt_ids"] for record in records for _ in range(G)],
        "completion_ids": [torch.tensor(c.tokens) for c in completions],
        "lengths": [len(c.tokens) for c in completions],
        "truncated": [c.finish_reason == "length" for c in completions],
        "per_reward": per_reward,
        "reward": reward,
        "advantages": advantages,
        "zero_std": zero_std,
    }


@torch.no_grad()
def fixed_logps(
    model: LLaMA,
    prompt_ids: list[torch.Tensor],
    completion_ids: list[torch.Tensor],
    micro_batches: list[slice],
    grpo: GRPO,
    max_seq_length: int,
) -> tuple[list[Optional[torch.Tensor]], list[Optional[torch.Tensor]]]:
    """What a step's updates compare with, per micro-batch, computed before the first: the log-probabilities of the
    model that sampled the completions (with num_iterations > 1; the first pass uses its own, detached) and of the
    reference, the base with LoRA off (with beta > 0); None where not needed."""
    old, ref = [], []
    for mb in micro_batches:
        prompts, completions = prompt_ids[mb], completion_ids[mb]
        if grpo.num_iterations > 1:
            old.append(completion_logps(model, prompts, completions, max_seq_length, grpo.temperature))
        else:
            old.append(None)
        ref.append(
            reference_logps(model, prompts, completions, max_seq_length, grpo.temperature) if grpo.beta else None
        )
    return old, ref


def rollouts(
    model: LLaMA, tokenizer: Tokenizer, records: list[dict], grpo: GRPO, generator: Optional[torch.Generator]
) -> list[Completion]:
    """G completions of each record's prompt, side by side (all of a prompt's next to each other), sampled with
    `generator` at the temperature, top-k and top-p of `grpo`; one greedy completion each without a generator. All
    in one batched decode (decode.decode_all) with LoRA as it is (on a CPU each layer's W + ΔW packed into a copy for
    the span, the model's weights unmerged: utils.packed_linears), in eval mode (no dropout), each ending at one of
    the tokenizer's stop ids (kept in the completion) or after max_new_tokens."""
    n = 1 if generator is None else grpo.num_generations
    sampling = (0.0, None, None) if generator is None else (grpo.temperature, grpo.top_k, grpo.top_p)
    completions = [
        Completion(record["prompt_ids"].tolist(), grpo.max_new_tokens, *sampling, generator, tokenizer.stop_ids)
        for record in records
        for _ in range(n)
    ]
    training = model.training
    model.eval()
    with packed_linears(model):  # on a CPU: the products of many rows 1.5-2x as fast
        decode_all(model, completions)
    model.train(training)
    return completions


def fields(records: list[dict], n: int) -> dict[str, list]:
    """The records' fields the rewards get (all but the ids and the prompt: "answer", ...), one list each, every
    record's value `n` times (its completions side by side); None where a record has no such field."""
    names = dict.fromkeys(name for record in records for name in record if name not in ("prompt_ids", "prompt"))
    return {name: [record.get(name) for record in records for _ in range(n)] for name in names}


def step_figures(
    functions: list[tuple[str, RewardFunction]], batch: dict, token_metrics: torch.Tensor, grpo: GRPO
) -> dict[str, float]:
    """What a step logs (`batch`: sample_and_score's), TRL's names: the reward's mean and spread, each reward's, the
    share of groups whose rewards are all equal (they teach nothing), the completions' length and the share cut at
    max_new_tokens, the clip fractions (`token_metrics`: TOKEN_METRICS per token), and the KL with beta > 0."""
    per_reward, reward, lengths, truncated = batch["per_reward"], batch["reward"], batch["lengths"], batch["truncated"]
    figures = {"reward": torch.nanmean(reward).item(), "reward_std": nanstd(reward).item()}
    for j, (name, _) in enumerate(functions):
        figures[f"rewards/{name}/mean"] = torch.nanmean(per_reward[:, j]).item()
        figures[f"rewards/{name}/std"] = nanstd(per_reward[:, j]).item()
    figures["frac_reward_zero_std"] = batch["zero_std"].double().mean().item()  # of completions: the share of groups
    figures["completions/mean_length"] = sum(lengths) / len(lengths)
    figures["completions/clipped_ratio"] = sum(truncated) / len(truncated)
    figures.update(zip(TOKEN_METRICS, token_metrics.tolist()))
    if not grpo.beta:
        del figures["kl"]
    return figures


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

    One forward pass over one row without padding: each prompt once, followed by its completions that follow one
    another in the list (a group's), each of which attends to the prompt and to itself (LLaMA.forward's `lengths`
    (prompt, n1, n2, ...)). A group's G completions thus cost one prompt, not G (the same values: the prompt's
    activations do not depend on what follows it; with LoRA dropout, one draw of it for the prompt instead of G).
    The head computes logits only where they predict a completion token: at each prompt's last token, which predicts
    the first token of every completion of it, and at every completion token but the last."""
    pieces, lengths, logits_at, rows = [], [], [], []  # rows: the logits that predict each completion token
    n_logits = 0
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        if len(prompt) + len(completion) > max_seq_length:
            n = len(prompt) + len(completion)
            raise ValueError(f"a prompt and its completion hold {n} tokens, more than the {max_seq_length} allowed")
        if i == 0 or not torch.equal(prompt, prompt_ids[i - 1]):  # a prompt not yet in the row
            pieces.append(prompt)
            lengths.append([len(prompt)])
            logits_at += [False] * (len(prompt) - 1) + [True]
            prompt_row, n_logits = n_logits, n_logits + 1
        pieces.append(completion)
        lengths[-1].append(len(completion))
        logits_at += [True] * (len(completion) - 1) + [False]
        rows += [prompt_row, *range(n_logits, n_logits + len(completion) - 1)]
        n_logits += len(completion) - 1
    device = model.embed.weight.device
    input_ids = torch.cat(pieces)[None].to(device)
    logits_at = torch.tensor(logits_at, device=device)[None]
    logits = model(input_ids, lengths=lengths, logits_at=logits_at)
    # a prompt's last logits G times; index_select, not logits[rows], whose gradient adds the G rows up in parallel
    # on CPUs, in no fixed order (a resumed run would not repeat an unbroken one bit for bit)
    logits = logits.index_select(0, torch.tensor(rows, device=device))  # (completion tokens, vocab_size)
    if temperature != 1.0:
        logits = logits / temperature
    targets = torch.cat(completion_ids).to(device)
    token_logps = -token_cross_entropy(logits, targets)  # (completion tokens,)
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


if __name__ == "__main__":
    cli(setup, as_positional=False)
