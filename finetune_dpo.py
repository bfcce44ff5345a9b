"""Preference tuning with LoRA: DPO, IPO or SimPO on pairs prepared by prepare_preferences.py.

    python finetune_dpo.py --data_dir data/preferences --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Each pair is a prompt with a chosen and a rejected answer, and the model learns to prefer the chosen one. With
log π(y) the log-probability of an answer y given its prompt, summed over the answer's tokens (the prompt's are no
target), and π_ref a reference model that does not change:

    --loss dpo    (Rafailov et al. 2023)  -log σ(β·[(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])
    --loss ipo    (Azar et al. 2023)      ([log π(c) - log π_ref(c)] / |c| - [log π(r) - log π_ref(r)] / |r| - 1/(2β))²
    --loss simpo  (Meng et al. 2024)      -log σ(β·[log π(c) / |c| - log π(r) / |r|] - γ), no reference model

averaged over the pairs of a batch (|y|: the answer's tokens), as TRL computes them (DPOTrainer, and CPOTrainer
with loss_type="simpo"; tests/test_finetune_dpo.py compares loss, rewards and gradients). The reference model is the
model itself with its LoRA layers switched off (lora.lora_disabled): the base, without a second copy in memory, one
forward pass without gradients per micro-batch. With --precompute_reference the reference's log-probabilities are
computed once, before the first step, from the model as training starts, and kept in train_state.pt, from which a
resumed run reads them back; that is how a run that starts from an adapter (--lora_path, e.g. one that
finetune_lora.py trained on instructions: SFT then DPO) keeps that adapter as its reference.
A micro-batch's chosen and rejected answers, each after its prompt, go through the model packed into one row without
padding (losses.pack_batch) in one forward pass, whose head computes logits at the answer tokens only.

The flags, the data order, resume (--resume), the stop on a loss that is not finite, the logs and loss.png are
finetune_lora.py's; the figures are logged under TRL's names (loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; eval_* on the test pairs). The result is an
ordinary LoRA adapter, which records the method and its settings in its metadata ("training"): generate_lora.py,
chat.py, serve.py and scripts/merge_lora.py, export_peft.py and export_gguf.py take it as they take finetune_lora.py's.
The story is here, top to bottom (setup: the flags and every check; main: the model, the optimizer and the precomputed
reference; fit: the training loop and its step; validate; save: the adapter and train_state.pt; the loss and the
log-probabilities), the parts it calls in training.py, losses.py, train_state.py, lora.py and data.py. See
howto/preference_tuning.md.
"""

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch.optim import Optimizer
from tqdm import tqdm

from data import PreparedData, file_sha256, load_prepared_data
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
from losses import pack_batch, token_cross_entropy
from model import LLaMA
from quantize import make_optimizer
from tokenizer import Tokenizer
from train_state import STATE_NAME, find_resume, resume_settings, save_train_state, start_state
from training import (
    SAMPLE_INSTRUCTION,
    Progress,
    TrainArgs,
    batch_indices,
    check_batch_sizes,
    compile_blocks,
    finish,
    is_fsdp,
    learning_rate,
    make_fabric,
    sample_answer,
    stop_if_diverged,
)
from utils import cli, default_precision, load_config, load_model, precision_to_dtype

ADAPTER_NAME = "lit_model_lora_finetuned.safetensors"  # the final adapter, as finetune_lora.py names it
LOSSES = ("dpo", "ipo", "simpo")
PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")  # a prepared pair (prepare_preferences.py)
# what each step and each validation reports, TRL's names: means over the pairs
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class Preference:
    """What is learned from the pairs, as the adapter's metadata and train_state.pt's settings record it."""

    method: str  # --loss: "dpo", "ipo" or "simpo"
    beta: float
    gamma: Optional[float]  # SimPO's target margin; None for the others
    reference: Optional[str]  # "base": the model with LoRA off, every step; "precomputed": once; None (SimPO): none

    @classmethod
    def from_flags(
        cls, loss: str, beta: float, gamma: float, precompute_reference: Optional[bool], lora_path: Optional[Path]
    ) -> "Preference":
        """From setup's flags: --gamma only for SimPO, and the reference precomputed by default with --lora_path."""
        precompute_reference = lora_path is not None if precompute_reference is None else precompute_reference
        reference = None if loss == "simpo" else "precomputed" if precompute_reference else "base"
        return cls(loss, beta, gamma if loss == "simpo" else None, reference)


def setup(
    data_dir: Path = Path("data/preferences"),
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/dpo/preferences"),
    loss: str = "dpo",
    beta: float = 0.1,
    gamma: float = 0.5,
    precompute_reference: Optional[bool] = None,
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
        batch_size=32,
        micro_batch_size=2,
        epochs=1,
        max_seq_length=1024,
        learning_rate=5e-5,
        warmup_steps=10,
        eval_interval=50,
        eval_batches=50,
        save_interval=100,
    ),
    resume: Optional[str] = None,
) -> None:
    """Tune a checkpoint with LoRA on preference pairs prepared by prepare_preferences.py.

    Args:
        data_dir: directory with train.pt, test.pt and metadata.json from prepare_preferences.py, prepared with the
            tokenizer of `checkpoint_dir`.
        checkpoint_dir: the base model, as converted by scripts/convert_hf_checkpoint.py.
        out_dir: receives the adapters, train_state.pt, logs/ and loss.png.
        loss: "dpo" (the sigmoid loss of DPO), "ipo" (IPO's squared loss on per-token log-ratios) or "simpo" (SimPO:
            per-token log-probabilities, no reference model).
        beta: DPO's and SimPO's scale of the margin (DPO: 0.1 is usual, lower strays further from the reference;
            SimPO's paper uses 2 to 10), IPO's regularisation (the margin it aims at is 1 / (2 beta)); above 0.
        gamma: SimPO's target margin, which the scaled difference of mean log-probabilities should exceed (0.5 to
            1.5 in its paper); the other losses have none.
        precompute_reference: compute the reference log-probabilities of every pair once, before the first step,
            from the model as training starts, instead of in every step with LoRA switched off (saves that forward
            pass per step; they are kept in train_state.pt). By default on with --lora_path, which needs it, and off
            otherwise.
        lora_path: an adapter to start from instead of a new one (an SFT adapter from finetune_lora.py, for SFT then
            DPO), trained further and, as it starts, the reference model. Its LoRA settings are used: leave the
            --lora_* flags but --lora_dropout out, or give the same.
        precision: "bf16-mixed" (bf16 base, fp32 LoRA), "bf16-true" (all bf16, least memory) or "32-true";
            by default bf16-mixed on GPUs with bf16 and 32-true elsewhere (bf16 on CPUs is very slow).
        quantize: hold the frozen base in 4 bits ("bnb.nf4": QLoRA; "bnb.fp4"; "-dq" quantizes their scales too) or
            8 bits ("bnb.int8") with bitsandbytes; LoRA stays in fp32 on top (see howto/quantize.md). Not with
            --strategy fsdp.
        devices: devices (GPUs, or processes on CPU) per node.
        num_nodes: machines to train on, `devices` each.
        strategy: "auto" (one device, DDP for several), "ddp" (a copy of the model per device) or "fsdp"
            (the base model sharded across devices, for bases that do not fit on one).
        lora_r: rank of the update (8 when left out).
        lora_alpha: the update is scaled by lora_alpha / lora_r (16 when left out).
        lora_dropout: dropout on the input of the LoRA branch, in training only; 0 by default, as TRL's DPOTrainer
            turns dropout off: with it the model would differ from the reference by noise.
        lora_targets: the projections LoRA adapts, as finetune_lora.py's --lora_targets ("query" and "value" when
            left out; e.g. --lora_targets all_linear).
        lora_rslora: rank-stabilised LoRA, scaling by lora_alpha / sqrt(lora_r) (off when left out).
        lora_dora: DoRA, a learned magnitude per output row (off when left out).
        lora_ranks: a rank of their own for some projections, by path: '{"blocks.0.attn.q_proj": 16}'.
        lora_alphas: an alpha of their own for some projections, by path.
        train: how to train (training.TrainArgs: --train.batch_size, --train.max_steps, ...); batch_size counts
            pairs.
        resume: a train_state.pt to continue from, or "auto" for out_dir/train_state.pt when there is one.
    """
    validate_args(loss, beta, precompute_reference, lora_path, quantize, strategy, train, devices * num_nodes)
    data_dir, checkpoint_dir, out_dir = Path(data_dir), Path(checkpoint_dir), Path(out_dir)
    data = load_pairs(data_dir, checkpoint_dir, train)
    flags = dict(r=lora_r, alpha=lora_alpha, targets=lora_targets, rslora=lora_rslora, dora=lora_dora)
    flags.update(ranks=lora_ranks, alphas=lora_alphas)
    lora_config = lora_config_for(flags, lora_path, load_config(checkpoint_dir))  # --lora_path's own, if given
    lora_config = replace(lora_config, dropout=lora_dropout)  # checked there
    preference = Preference.from_flags(loss, beta, gamma, precompute_reference, lora_path)
    resume = find_resume(resume, out_dir)
    train = train.for_records(len(data.train))  # max_steps from epochs, unless given
    precision = precision or default_precision(training=True)  # bf16-mixed on GPUs with bf16, else 32-true

    fabric = make_fabric(devices, num_nodes, strategy, precision, train, out_dir)  # seeded, logging to out_dir/logs
    fabric.launch(
        main,
        checkpoint_dir,
        out_dir,
        data,
        Tokenizer(checkpoint_dir),  # for the sample answers of validate
        lora_config,
        lora_path,
        preference,
        quantize,
        precision,
        train,
        resume,
    )


def validate_args(
    loss: str,
    beta: float,
    precompute_reference: Optional[bool],
    lora_path: Optional[Path],
    quantize: Optional[str],
    strategy: str,
    train: TrainArgs,
    devices: int,
) -> None:
    """The checks of setup's flags that need no file (`devices`: all of them, on every node). With those of the data and
    the adapter in setup, everything that can be wrong with the input is found before any model is loaded or process
    started."""
    if loss not in LOSSES:
        raise ValueError(f"--loss {loss} is not one of {', '.join(LOSSES)}")
    if not beta > 0:
        raise ValueError(f"--beta must be above 0, not {beta}")
    if precompute_reference is False and lora_path is not None:
        raise ValueError(
            "--lora_path needs --precompute_reference true: the reference is the adapter as it starts, which "
            "training moves; leave --precompute_reference out"
        )
    check_batch_sizes(train, devices)
    if quantize and strategy == "fsdp":
        raise ValueError(
            "--quantize does not work with --strategy fsdp, which shards floating-point weights; "
            "use --strategy ddp or one device"
        )


def load_pairs(data_dir: Path, checkpoint_dir: Path, train: TrainArgs) -> PreparedData:
    """The pairs prepared by prepare_preferences.py, refused when longer than the run takes: cutting them here could
    leave a pair's answers the same."""
    data = load_prepared_data(data_dir, checkpoint_dir, keys=PAIR_KEYS)
    block_size = load_config(checkpoint_dir).block_size
    if data.metadata["longest_sequence"] > min(train.max_seq_length, block_size):
        raise ValueError(
            f"{data_dir} holds a prompt and answer of {data.metadata['longest_sequence']} tokens, more than "
            f"--train.max_seq_length {train.max_seq_length} (or the model's block_size {block_size}); cutting them "
            "here could leave a pair's answers the same: prepare the data with that --max_seq_length instead"
        )
    return data


def main(
    fabric: Fabric,
    checkpoint_dir: Path,
    out_dir: Path,
    data: PreparedData,
    tokenizer: Tokenizer,
    lora_config: LoRAConfig,
    lora_path: Optional[Path],
    preference: Preference,
    quantize: Optional[str],
    precision: str,
    train: TrainArgs,
    resume: Optional[Path],
) -> None:
    """On every device: the model with LoRA (a new adapter or --lora_path's), the optimizer, the reference
    log-probabilities when they are precomputed, the training (`fit`), the final adapter."""
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
    total = sum(param.numel() for param in model.parameters())
    n_trainable = sum(param.numel() for param in trainable)
    fabric.print(
        f"Trainable parameters: {n_trainable:,} of {total:,} ({100 * n_trainable / total:.3f}%), LoRA {lora_config}"
        f"{f', starting from {lora_path}' if lora_path else ''}; {preference}"
    )
    model = fabric.setup_module(model)

    # The optimizer (AdamW or one of bitsandbytes' variants) over the LoRA weights only; fit sets its learning rate
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = make_optimizer(train.optimizer, trainable, train.learning_rate, train.weight_decay)
    optimizer = fabric.setup_optimizers(optimizer)

    start_adapter = None if lora_path is None else file_sha256(lora_path)
    settings = resume_settings(
        model, train, len(data.train), lora=asdict(lora_config), preference=asdict(preference), start=start_adapter
    )
    state = start_state(fabric, resume, model, optimizer, settings)  # step 0, or where --resume left off
    if preference.reference == "precomputed" and resume is None:
        # From the model as it starts (the base, or --lora_path's adapter), before it moves; in train_state.pt from
        # now on, so that a resumed run reads them back (load_train_state) instead of computing them from a model
        # that has learned since
        state["reference"] = {
            split: precompute_reference(fabric, model, pairs, train, data.ignore_index, split)
            for split, pairs in (("train", data.train), ("val", data.val))
        }
    fit(fabric, model, optimizer, data, tokenizer, state, settings, preference, train, out_dir)

    training = {**asdict(preference), "start_adapter": None if lora_path is None else str(lora_path)}
    save(fabric, model, optimizer, state, settings, out_dir / ADAPTER_NAME, data.chat_template, training)
    fabric.print(f"Saved the adapter to {out_dir / ADAPTER_NAME}")
    finish(fabric, state["history"], out_dir, loss_name=f"{preference.method} loss")


def fit(
    fabric: Fabric,
    model: LLaMA,
    optimizer: Optimizer,
    data: PreparedData,
    tokenizer: Tokenizer,
    state: dict,
    settings: dict,
    preference: Preference,
    train: TrainArgs,
    out_dir: Path,
) -> None:
    """The training loop, from step state["step"] to train.max_steps. A step: its train.batch_size pairs, cut into
    micro-batches of pairs, each device taking every world_size-th; per micro-batch the reference log-probabilities
    of its answers, then the model's in one forward pass, the loss of each pair and its gradients (the batch's loss
    is the mean over all its pairs, whichever micro-batch and device they are in); the update of LoRA's weights.
    Then, when due, the validation figures and a sample answer, and an adapter with train_state.pt."""
    max_seq_length = min(train.max_seq_length, model.config.block_size)
    precomputed = state.get("reference")  # {"train": (2, pairs), "val": ...} with --precompute_reference
    model.train()  # LoRA's dropout, if any, on; validate leaves the model so too
    with Progress(fabric, train, len(data.train), state["step"]) as progress:
        for step in range(state["step"], train.max_steps):
            # the step's pairs follow from its number: a resumed run reads those an unbroken one would
            indices = batch_indices(step, train.batch_size, len(data.train), train.seed)
            batch = [data.train[j] for j in indices]
            # micro-batches of train.micro_batch_size pairs; micro-batch k goes to device k % devices
            micro_batches = [
                indices[i : i + train.micro_batch_size] for i in range(0, len(indices), train.micro_batch_size)
            ]
            micro_batches = micro_batches[fabric.global_rank :: fabric.world_size]
            sums = torch.zeros(len(METRICS), device=fabric.device)  # METRICS summed over this device's pairs
            for i, micro_batch in enumerate(micro_batches):
                pairs = [data.train[j] for j in micro_batch]
                # the reference first: its forward pass is done (no gradients) before the model's graph is built
                known = None if precomputed is None else precomputed["train"][:, micro_batch]
                reference = reference_logps(model, pairs, known, preference, max_seq_length, data.ignore_index)
                # under DDP, gradients are averaged across devices once per step, after the last micro-batch
                with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                    logps, n_tokens = answer_logps(model, pairs, max_seq_length, data.ignore_index)  # (2, pairs)
                    losses, rewards = preference_loss(preference, logps, reference, n_tokens)  # (pairs,), (2, pairs)
                    # the batch's mean, in part; DDP and FSDP average gradients across devices, we want their sum
                    fabric.backward(losses.sum() / train.batch_size * fabric.world_size)
                sums += pair_metrics(losses, rewards, logps)
            metrics = fabric.all_reduce(sums, reduce_op="sum") / train.batch_size  # the whole batch's means
            loss = metrics[0].item()
            grad_norm = fabric.clip_gradients(model, optimizer, max_norm=train.grad_clip, error_if_nonfinite=False)
            stop_if_diverged(loss, grad_norm, state, out_dir / STATE_NAME)  # a NaN or inf stops before the update
            lr = learning_rate(step, train.learning_rate, train.warmup_steps, train.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            state["step"] = step = step + 1
            state["history"]["train"].append((step, loss))
            fabric.log_dict(dict(zip(METRICS, metrics.tolist())), step)
            tokens = sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in batch)
            progress.update(step, loss, lr, tokens=tokens)
            if step % train.eval_interval == 0 or step == train.max_steps:
                validate(fabric, model, data, tokenizer, state, preference, train)
            if step % train.save_interval == 0 and step < train.max_steps:  # an adapter and train_state.pt
                adapter_path = out_dir / f"lora_step-{step:06d}.safetensors"
                save(fabric, model, optimizer, state, settings, adapter_path, data.chat_template)


@torch.no_grad()
def validate(
    fabric: Fabric,
    model: LLaMA,
    data: PreparedData,
    tokenizer: Tokenizer,
    state: dict,
    preference: Preference,
    train: TrainArgs,
) -> None:
    """The figures of METRICS over the first train.eval_batches micro-batches of the test pairs (the same pairs
    every time, so the numbers compare), logged as eval_<name> (TRL's names) and the loss added to
    state["history"], and an answer to SAMPLE_INSTRUCTION, greedy, to read how training goes. Leaves the model in
    training mode."""
    max_seq_length = min(train.max_seq_length, model.config.block_size)
    model.eval()
    n = min(len(data.val), train.eval_batches * train.micro_batch_size)
    micro_batches = [list(range(i, min(i + train.micro_batch_size, n))) for i in range(0, n, train.micro_batch_size)]
    if fabric.world_size > 1:  # every device runs as many forward passes (FSDP gathers weights in each)
        micro_batches = micro_batches[: max(len(micro_batches) // fabric.world_size, 1) * fabric.world_size]
    precomputed = state.get("reference")
    sums = torch.zeros(len(METRICS) + 1, device=fabric.device)  # METRICS summed over the pairs, and their number
    for micro_batch in micro_batches[fabric.global_rank :: fabric.world_size]:
        pairs = [data.val[j] for j in micro_batch]
        known = None if precomputed is None else precomputed["val"][:, micro_batch]
        reference = reference_logps(model, pairs, known, preference, max_seq_length, data.ignore_index)
        logps, n_tokens = answer_logps(model, pairs, max_seq_length, data.ignore_index)
        losses, rewards = preference_loss(preference, logps, reference, n_tokens)
        sums += torch.cat([pair_metrics(losses, rewards, logps), torch.tensor([len(pairs)], device=fabric.device)])
    sums = fabric.all_reduce(sums, reduce_op="sum")
    metrics = dict(zip(METRICS, (sums[:-1] / sums[-1].clamp(min=1)).tolist()))
    step = state["step"]
    fabric.print(
        f"\nStep {step}: validation loss {metrics['loss']:.4f}, reward accuracy {metrics['rewards/accuracies']:.3f}, "
        f"reward margin {metrics['rewards/margins']:.4f}"
    )
    fabric.print(f"{SAMPLE_INSTRUCTION} -> {sample_answer(fabric, model, tokenizer, data.chat_template)!r}")
    state["history"]["val"].append((step, metrics["loss"]))
    fabric.log_dict({f"eval_{name}": value for name, value in metrics.items()}, step)
    model.train()


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
    needs, with the precomputed reference log-probabilities, if any), then the adapter at `adapter_path` from the
    tensors just saved in it, recording the chat template of conversation data and `training`, the method and its
    settings, when given (the final adapter's). Both are written under a temporary name and renamed when complete."""
    path = adapter_path.parent / STATE_NAME
    weights = save_train_state(fabric, path, model, optimizer, state, settings, only=is_lora_tensor)  # on rank 0
    if fabric.global_rank == 0:
        lora_config = LoRAConfig.from_dict(settings["lora"])
        save_lora_tensors(weights, lora_config, model.config, adapter_path, chat_template, training)
    fabric.barrier()


def preference_loss(
    preference: Preference, logps: torch.Tensor, reference: Optional[torch.Tensor], n_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of each pair (pairs,) and the rewards of its chosen and rejected answer (2, pairs), without
    gradient, from the answers' log-probabilities under the model (`logps`, (2, pairs): row 0 the chosen, row 1 the
    rejected, summed over their tokens), under the reference (`reference`, the same; None for SimPO) and their
    numbers of tokens (`n_tokens`). The formulas of the module docstring, as TRL writes them."""
    if preference.method == "simpo":  # the reward is the mean log-probability per token, scaled by beta
        rewards = preference.beta * logps / n_tokens.clamp(min=1)
        return -F.logsigmoid(rewards[0] - rewards[1] - preference.gamma), rewards.detach()
    log_ratios = logps - reference  # how much likelier each answer has become than under the reference
    if preference.method == "dpo":
        losses = -F.logsigmoid(preference.beta * (log_ratios[0] - log_ratios[1]))
    else:  # ipo, on log-ratios per token (TRL's normalisation, confirmed with IPO's authors)
        per_token = log_ratios / n_tokens.clamp(min=1)
        losses = (per_token[0] - per_token[1] - 1 / (2 * preference.beta)) ** 2
    return losses, preference.beta * log_ratios.detach()


def pair_metrics(losses: torch.Tensor, rewards: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """METRICS summed over a micro-batch's pairs (len(METRICS),): loss, rewards of chosen and rejected, whether the
    chosen one's is higher, by how much, and the answers' log-probabilities (summed over their tokens)."""
    return torch.stack(
        [
            losses.sum(),
            rewards[0].sum(),
            rewards[1].sum(),
            (rewards[0] > rewards[1]).float().sum(),
            (rewards[0] - rewards[1]).sum(),
            logps[0].sum(),
            logps[1].sum(),
        ]
    ).detach()


def answer_logps(
    model: LLaMA, pairs: list[dict[str, torch.Tensor]], max_seq_length: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of each pair's chosen and rejected answer after its prompt, summed over the answer's
    tokens, (2, pairs): row 0 the chosen answers, row 1 the rejected; and the number of those tokens, (2, pairs).

    The 2 x pairs sequences (prompt + answer, labels on the answer only) are packed into one row without padding
    and go through the model in one forward pass (each attends only to itself); its head computes logits at the
    answer tokens only, whose log-probabilities are then added up per sequence."""
    sequences = [
        {
            "input_ids": torch.cat([pair["prompt_ids"], pair[answer]]),
            "labels": torch.cat([torch.full_like(pair["prompt_ids"], ignore_index), pair[answer]]),
        }
        for answer in ("chosen_ids", "rejected_ids")
        for pair in pairs
    ]
    input_ids, targets, lengths = pack_batch(sequences, max_seq_length)
    device = model.embed.weight.device
    input_ids, targets = input_ids.to(device), targets.to(device)
    where = targets != ignore_index  # (1, N): the answer tokens, each predicted from the position before it
    logits = model(input_ids, lengths=lengths, logits_at=where)  # (answer tokens, vocab_size)
    token_logps = -token_cross_entropy(logits, targets[where])  # (answer tokens,)
    del logits  # now held by the graph alone, which frees them once the head's backward is done
    sequence = torch.repeat_interleave(
        torch.arange(len(sequences), device=device), torch.tensor(lengths, device=device)
    )
    sequence = sequence[where[0]]  # the sequence each answer token belongs to
    logps = torch.zeros(len(sequences), device=device, dtype=token_logps.dtype).index_add(0, sequence, token_logps)
    n_tokens = torch.bincount(sequence, minlength=len(sequences))
    return logps.view(2, len(pairs)), n_tokens.view(2, len(pairs))


def reference_logps(
    model: LLaMA,
    pairs: list[dict[str, torch.Tensor]],
    precomputed: Optional[torch.Tensor],
    preference: Preference,
    max_seq_length: int,
    ignore_index: int,
) -> Optional[torch.Tensor]:
    """The reference model's `answer_logps` of the pairs (2, pairs): the `precomputed` ones when given, else the
    model's own with its LoRA layers switched off (the base model); None for SimPO, which has no reference."""
    if preference.method == "simpo":
        return None
    if precomputed is not None:
        return precomputed.to(model.embed.weight.device)
    with torch.no_grad(), lora_disabled(model):
        return answer_logps(model, pairs, max_seq_length, ignore_index)[0]


@torch.no_grad()
def precompute_reference(
    fabric: Fabric,
    model: LLaMA,
    pairs: list[dict[str, torch.Tensor]],
    train: TrainArgs,
    ignore_index: int,
    split: str,
) -> torch.Tensor:
    """`answer_logps` of every pair (2, pairs), from the model as it is (in eval mode, no dropout), in micro-batches
    of train.micro_batch_size, each device computing every world_size-th and the sum over devices putting them
    together. Every device takes part in every forward pass (FSDP gathers weights in each): one with no micro-batch
    of its own in the last round repeats the last one, its result unused."""
    max_seq_length = min(train.max_seq_length, model.config.block_size)
    model.eval()
    logps = torch.zeros(2, len(pairs), device=fabric.device)
    starts = range(0, len(pairs), train.micro_batch_size)
    rounds = math.ceil(len(starts) / fabric.world_size)
    for round in tqdm(range(rounds), desc=f"Reference log-probabilities ({split})", disable=fabric.global_rank != 0):
        k = round * fabric.world_size + fabric.global_rank
        start = starts[min(k, len(starts) - 1)]
        indices = list(range(start, min(start + train.micro_batch_size, len(pairs))))
        values, _ = answer_logps(model, [pairs[j] for j in indices], max_seq_length, ignore_index)
        if k < len(starts):
            logps[:, indices] = values
    model.train()
    return fabric.all_reduce(logps, reduce_op="sum").cpu()


if __name__ == "__main__":
    cli(setup, as_positional=False)
