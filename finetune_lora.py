"""Fine-tunes a converted LLaMA checkpoint with LoRA on instruction data prepared by prepare_alpaca.py, or conversations
prepared by prepare_chat.py.

    python finetune_lora.py --data_dir data/alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

The base model stays frozen and only LoRA's small A and B matrices learn (with --lora_dora also a magnitude per
output row). On GPUs the base is held in bf16 and LoRA in fp32 under bf16 mixed precision; the defaults (the
Alpaca-LoRA recipe) fit LLaMA-7B on one 24 GB GPU.
With --quantize bnb.nf4 (QLoRA) the base is held in 4 bits, and --train.optimizer AdamW8bit saves optimizer memory:
see howto/quantize.md.
Every --train.save_interval steps and at the end, out_dir receives the adapter (a few MB, for generate_lora.py and
scripts/merge_lora.py) and train_state.pt, from which --resume continues exactly where the run stopped; also
logs/ (CSV, and TensorBoard when installed) and, at the end, loss.png. See howto/finetune_lora.md.
The story is here, top to bottom (setup: the flags and every check; main: the model and the optimizer; fit: the
training loop and its step; save: the adapter and train_state.pt), the parts it calls in training.py, losses.py,
train_state.py, lora.py and data.py.
"""

from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from lightning.fabric import Fabric
from torch.optim import Optimizer

from data import PreparedData, load_prepared_data
from lora import LoRAConfig, is_lora_tensor, lora, mark_only_lora_as_trainable, save_lora_tensors
from losses import cross_entropy_sum, pack_batch
from model import LLaMA
from quantize import make_optimizer
from tokenizer import Tokenizer
from train_state import STATE_NAME, find_resume, resume_settings, save_train_state, start_state
from training import (
    Progress,
    TrainArgs,
    batch_indices,
    check_batch_sizes,
    compile_blocks,
    finish,
    is_fsdp,
    learning_rate,
    make_fabric,
    stop_if_diverged,
    validate,
)
from utils import cli, default_precision, load_model, precision_to_dtype

ADAPTER_NAME = "lit_model_lora_finetuned.safetensors"  # the final adapter; scripts/merge_lora.py's default


def setup(
    data_dir: Path = Path("data/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    out_dir: Path = Path("out/lora/alpaca"),
    precision: Optional[Literal["bf16-mixed", "bf16-true", "32-true"]] = None,
    quantize: Optional[Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"]] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_targets: Union[list[str], str] = ["query", "value"],
    lora_rslora: bool = False,
    lora_dora: bool = False,
    train: TrainArgs = TrainArgs(learning_rate=3e-4, save_interval=100, gradient_checkpointing=False),
    resume: Optional[str] = None,
) -> None:
    """Fine-tune a checkpoint with LoRA on data prepared by prepare_alpaca.py.

    Args:
        data_dir: directory with train.pt, test.pt and metadata.json from prepare_alpaca.py (instructions) or
            prepare_chat.py (conversations, whose chat template the sample answers then use), prepared with the
            tokenizer of `checkpoint_dir`.
        checkpoint_dir: the base model, as converted by scripts/convert_hf_checkpoint.py.
        out_dir: receives the adapters, train_state.pt, logs/ and loss.png.
        precision: "bf16-mixed" (bf16 base, fp32 LoRA), "bf16-true" (all bf16, least memory) or "32-true";
            by default bf16-mixed on GPUs with bf16 and 32-true elsewhere (bf16 on CPUs is very slow).
        quantize: hold the frozen base in 4 bits ("bnb.nf4": QLoRA; "bnb.fp4"; "-dq" quantizes their scales too) or
            8 bits ("bnb.int8") with bitsandbytes, quantized one layer at a time while loading; LoRA stays in fp32
            on top, and the adapter is the same as without (see howto/quantize.md). Not with --strategy fsdp.
        devices: devices (GPUs, or processes on CPU) per node.
        num_nodes: machines to train on, `devices` each.
        strategy: "auto" (one device, DDP for several), "ddp" (a copy of the model per device) or "fsdp"
            (the base model sharded across devices, for bases that do not fit on one).
        lora_r: rank of the LoRA update; trainable parameters grow linearly with it.
        lora_alpha: the update is scaled by lora_alpha / lora_r (lora_alpha / sqrt(lora_r) with --lora_rslora).
        lora_dropout: dropout on the input of the LoRA branch, in training only.
        lora_targets: the projections LoRA adapts, some of "query", "key", "value", "projection" (the attention's
            output), "gate", "up", "down" (the MLP's), "head", or the shorthands "attention" (query, key, value,
            projection), "mlp" (gate, up, down) and "all_linear" (every projection but the head): one name
            (--lora_targets all_linear) or a list (--lora_targets '[all_linear, head]').
        lora_rslora: rank-stabilised LoRA: scale the update by lora_alpha / sqrt(lora_r), so that higher ranks keep
            learning (Kalajdzievski 2023); PEFT's use_rslora.
        lora_dora: DoRA: also learn each output row's magnitude over the normalised W + ΔW (Liu et al. 2024), closer
            to full fine-tuning at low ranks, for a slower step (howto/finetune_lora.md); PEFT's use_dora.
        train: how to train (training.TrainArgs: --train.batch_size, --train.max_steps, ...).
        resume: a train_state.pt to continue from, or "auto" for out_dir/train_state.pt when there is one.
    """
    # everything that can be wrong with the input is found here, before any model is loaded or process started
    check_batch_sizes(train, devices * num_nodes)
    if quantize and strategy == "fsdp":
        raise ValueError(
            "--quantize does not work with --strategy fsdp, which shards floating-point weights; "
            "use --strategy ddp or one device"
        )
    data_dir, checkpoint_dir, out_dir = Path(data_dir), Path(checkpoint_dir), Path(out_dir)
    data = load_prepared_data(data_dir, checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)  # for the sample answers of validate
    lora_config = LoRAConfig(lora_r, lora_alpha, lora_dropout, lora_targets, lora_rslora, lora_dora)
    resume = find_resume(resume, out_dir)
    train = train.for_records(len(data.train))  # max_steps from epochs, unless given
    precision = precision or default_precision(training=True)  # bf16-mixed on GPUs with bf16, else 32-true

    fabric = make_fabric(devices, num_nodes, strategy, precision, train, out_dir)  # seeded, logging to out_dir/logs
    fabric.launch(main, checkpoint_dir, out_dir, data, tokenizer, lora_config, quantize, precision, train, resume)


def main(
    fabric: Fabric,
    checkpoint_dir: Path,
    out_dir: Path,
    data: PreparedData,
    tokenizer: Tokenizer,
    lora_config: LoRAConfig,
    quantize: Optional[str],
    precision: str,
    train: TrainArgs,
    resume: Optional[Path],
) -> None:
    """On every device: the model with LoRA, the optimizer, the training (`fit`), the final adapter."""
    # The model: the frozen base with LoRA layers on --lora_targets. Under mixed precision the base is held in the
    # low dtype and LoRA in fp32, whose small updates bf16 would round away (FSDP shards both, each in its dtype).
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
    model.gradient_checkpointing = train.gradient_checkpointing  # recompute activations in the backward pass
    compile_blocks(fabric, model, train, quantized=quantize is not None)  # --train.compile: by default on CUDA
    total = sum(param.numel() for param in model.parameters())
    n_trainable = sum(param.numel() for param in trainable)
    fabric.print(
        f"Trainable parameters: {n_trainable:,} of {total:,} ({100 * n_trainable / total:.3f}%), LoRA {lora_config}"
    )
    model = fabric.setup_module(model)

    # The optimizer (AdamW or one of bitsandbytes' variants) over the LoRA weights only; fit sets its learning rate
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = make_optimizer(train.optimizer, trainable, train.learning_rate, train.weight_decay)
    optimizer = fabric.setup_optimizers(optimizer)

    settings = resume_settings(model, train, len(data.train), lora=asdict(lora_config))
    state = start_state(fabric, resume, model, optimizer, settings)  # step 0, or where --resume left off
    fit(fabric, model, optimizer, data, tokenizer, state, settings, train, out_dir)

    # train_state.pt, then the adapter from the LoRA tensors just saved in it (the adapter records the chat template
    # of conversation data, which generate_lora.py then prompts in)
    save(fabric, model, optimizer, state, settings, out_dir / ADAPTER_NAME, data.chat_template)
    fabric.print(f"Saved the adapter to {out_dir / ADAPTER_NAME}")
    finish(fabric, state["history"], out_dir)


def fit(
    fabric: Fabric,
    model: LLaMA,
    optimizer: Optimizer,
    data: PreparedData,
    tokenizer: Tokenizer,
    state: dict,
    settings: dict,
    train: TrainArgs,
    out_dir: Path,
) -> None:
    """The training loop, from step state["step"] to train.max_steps. A step: its train.batch_size records, cut into
    micro-batches packed without padding, each device taking every world_size-th; the loss, the mean over all the
    batch's target tokens whichever micro-batch and device they are in, and its gradients; the update of LoRA's
    weights. Then, when due, the validation loss and a sample answer, and an adapter with train_state.pt."""
    max_seq_length = min(train.max_seq_length, model.config.block_size)
    model.train()  # LoRA's dropout on; validate leaves the model so too
    with Progress(fabric, train, len(data.train), state["step"]) as progress:
        for step in range(state["step"], train.max_steps):
            # the step's records follow from its number: a resumed run reads those an unbroken one would
            batch = [data.train[i] for i in batch_indices(step, train.batch_size, len(data.train), train.seed)]
            n_targets = sum(int((r["labels"][1:max_seq_length] != data.ignore_index).sum()) for r in batch)
            # micro-batches of train.micro_batch_size records; micro-batch k goes to device k % devices
            micro_batches = [
                batch[i : i + train.micro_batch_size] for i in range(0, len(batch), train.micro_batch_size)
            ]
            micro_batches = micro_batches[fabric.global_rank :: fabric.world_size]
            loss_sum = torch.zeros((), device=fabric.device)
            for i, micro_batch in enumerate(micro_batches):
                input_ids, targets, lengths = pack_batch(micro_batch, max_seq_length)
                input_ids, targets = input_ids.to(fabric.device), targets.to(fabric.device)
                where = targets != data.ignore_index  # the head computes logits only where there is a target
                # under DDP, gradients are averaged across devices once per step, after the last micro-batch
                with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                    logits = model(input_ids, lengths=lengths, logits_at=where)  # (targets, vocab_size)
                    loss = cross_entropy_sum(logits, targets[where]) / max(n_targets, 1)  # the batch's mean, in part
                    del logits  # now held by the loss's graph alone, which frees them once the head's backward is done
                    fabric.backward(loss * fabric.world_size)  # DDP and FSDP average gradients; we want their sum
                loss_sum += loss.detach()
            loss = fabric.all_reduce(loss_sum, reduce_op="sum").item()  # the whole batch's
            grad_norm = fabric.clip_gradients(model, optimizer, max_norm=train.grad_clip, error_if_nonfinite=False)
            # a NaN, an inf, or a loss back near a uniform guess over the vocabulary stops before the update
            stop_if_diverged(loss, grad_norm, state, out_dir / STATE_NAME, model.config.vocab_size)
            lr = learning_rate(step, train.learning_rate, train.warmup_steps, train.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            state["step"] = step = step + 1
            state["history"]["train"].append((step, loss))
            progress.update(step, loss, lr, tokens=sum(min(len(r["input_ids"]), max_seq_length) for r in batch))
            if step % train.eval_interval == 0 or step == train.max_steps:
                validate(fabric, model, data.val, tokenizer, state, train, data.ignore_index, data.chat_template)
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
) -> None:
    """Writes train_state.pt beside `adapter_path` (train_state.save_train_state: the LoRA tensors and what --resume
    needs), then the adapter at `adapter_path` from the tensors just saved in it, so the two always agree. The adapter
    records the chat template of conversation data, which generate_lora.py then prompts in. Both are written under a
    temporary name and renamed when complete."""
    path = adapter_path.parent / STATE_NAME
    weights = save_train_state(fabric, path, model, optimizer, state, settings, only=is_lora_tensor)  # on rank 0
    if fabric.global_rank == 0:
        save_lora_tensors(weights, LoRAConfig.from_dict(settings["lora"]), model.config, adapter_path, chat_template)
    fabric.barrier()


if __name__ == "__main__":
    cli(setup, as_positional=False)
