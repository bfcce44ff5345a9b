"""Fine-tunes every weight of a converted LLaMA checkpoint on instruction data prepared by prepare_alpaca.py.

    python finetune_full.py --data_dir data/alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --devices 8 --strategy fsdp

The training loop of finetune_lora.py (its own copy, `fit`, to change here alone), but all weights learn. That takes
about 16 bytes per parameter (fp32 weights, gradients and AdamW's two moments) before activations: 110 GB for a 7B
model, so beyond small models it needs several GPUs with --strategy fsdp, which shards all of it across them (and
recomputes each Block's activations in the backward pass). See howto/finetune_full.md. Every --train.save_interval
steps, out_dir receives step-NNNNNN/ and, at the end, out_dir itself: a complete checkpoint directory
(lit_model.safetensors, model_config.json, the tokenizer's files) for generate.py, and each time train_state.pt, from
which --resume continues.
"""

from pathlib import Path
from typing import Literal, Optional

import torch
from lightning.fabric import Fabric
from safetensors.torch import save_file
from torch.optim import Optimizer

from data import PreparedData, load_prepared_data
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
from utils import atomic_path, cli, copy_tokenizer, default_precision, load_model, precision_to_dtype


def setup(
    data_dir: Path = Path("data/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    out_dir: Path = Path("out/full/alpaca"),
    precision: Optional[Literal["bf16-mixed", "bf16-true", "32-true"]] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    train: TrainArgs = TrainArgs(learning_rate=2e-5, save_interval=1000, gradient_checkpointing=True),
    resume: Optional[str] = None,
) -> None:
    """Fine-tune all weights of a checkpoint on data prepared by prepare_alpaca.py.

    Args:
        data_dir: directory with train.pt, test.pt and metadata.json from prepare_alpaca.py (instructions) or
            prepare_chat.py (conversations, whose chat template the sample answers then use), prepared with the
            tokenizer of `checkpoint_dir`.
        checkpoint_dir: the model to start from, as converted by scripts/convert_hf_checkpoint.py.
        out_dir: receives the fine-tuned checkpoint, step-NNNNNN/ directories, train_state.pt, logs/ and loss.png.
        precision: "bf16-mixed" (fp32 weights, bf16 compute), "bf16-true" (all bf16: half the memory, but small
            updates to bf16 weights are lost to rounding) or "32-true"; by default bf16-mixed on GPUs with bf16
            and 32-true elsewhere (bf16 on CPUs is very slow).
        devices: devices (GPUs, or processes on CPU) per node.
        num_nodes: machines to train on, `devices` each.
        strategy: "auto" (one device, DDP for several), "ddp" (a full copy of weights, gradients and optimizer
            state per device) or "fsdp" (all three sharded across devices: what models beyond ~1B need).
        train: how to train (training.TrainArgs: --train.batch_size, --train.max_steps, ...).
        resume: a train_state.pt to continue from, or "auto" for out_dir/train_state.pt when there is one.
    """
    # everything that can be wrong with the input is found here, before any model is loaded or process started
    check_batch_sizes(train, devices * num_nodes)
    data_dir, checkpoint_dir, out_dir = Path(data_dir), Path(checkpoint_dir), Path(out_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--out_dir {out_dir} is the checkpoint directory; choose a new directory")
    data = load_prepared_data(data_dir, checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)  # for the sample answers of validate
    resume = find_resume(resume, out_dir)
    train = train.for_records(len(data.train))  # max_steps from epochs, unless given
    precision = precision or default_precision(training=True)  # bf16-mixed on GPUs with bf16, else 32-true

    fabric = make_fabric(devices, num_nodes, strategy, precision, train, out_dir)  # seeded, logging to out_dir/logs
    fabric.launch(main, checkpoint_dir, out_dir, data, tokenizer, precision, train, resume)


def main(
    fabric: Fabric,
    checkpoint_dir: Path,
    out_dir: Path,
    data: PreparedData,
    tokenizer: Tokenizer,
    precision: str,
    train: TrainArgs,
    resume: Optional[Path],
) -> None:
    """On every device: the model, the optimizer, the training (`fit`), the fine-tuned checkpoint."""
    # The model, every weight trainable. Under mixed precision the weights stay in fp32 (bf16 would round small
    # updates away) and Fabric computes in bf16. FSDP starts from a copy on the CPU and moves each Block's shard
    # to its device. The result is saved in the dtype the checkpoint came in.
    model = load_model(checkpoint_dir, device="cpu" if is_fsdp(fabric) else fabric.device)
    save_dtype = model.embed.weight.dtype
    model = model.to(precision_to_dtype(precision.replace("bf16-mixed", "32-true")))
    model.gradient_checkpointing = train.gradient_checkpointing  # recompute activations in the backward pass
    compile_blocks(fabric, model, train)  # --train.compile: by default on CUDA
    fabric.print(f"Trainable parameters: {sum(param.numel() for param in model.parameters()):,} (all)")
    model = fabric.setup_module(model)

    # The optimizer (AdamW or one of bitsandbytes' variants) over all weights; fit sets its learning rate
    optimizer = make_optimizer(train.optimizer, model.parameters(), train.learning_rate, train.weight_decay)
    optimizer = fabric.setup_optimizers(optimizer)

    settings = resume_settings(model, train, len(data.train))
    state = start_state(fabric, resume, model, optimizer, settings)  # step 0, or where --resume left off
    fit(fabric, model, optimizer, data, tokenizer, state, settings, train, out_dir, checkpoint_dir, save_dtype)

    save(fabric, model, optimizer, state, settings, out_dir, out_dir, checkpoint_dir, save_dtype)  # into out_dir
    fabric.print(
        f"Saved the fine-tuned checkpoint to {out_dir} (lit_model.safetensors, model_config.json, "
        "the tokenizer's files)"
    )
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
    checkpoint_dir: Path,
    save_dtype: torch.dtype,
) -> None:
    """The training loop, from step state["step"] to train.max_steps. A step: its train.batch_size records, cut into
    micro-batches packed without padding, each device taking every world_size-th; the loss, the mean over all the
    batch's target tokens whichever micro-batch and device they are in, and its gradients; the update of every
    weight. Then, when due, the validation loss and a sample answer, and a checkpoint directory with train_state.pt."""
    max_seq_length = min(train.max_seq_length, model.config.block_size)
    model.train()  # validate leaves the model so too
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
            if step % train.save_interval == 0 and step < train.max_steps:  # a checkpoint directory and train_state.pt
                step_dir = out_dir / f"step-{step:06d}"
                save(fabric, model, optimizer, state, settings, out_dir, step_dir, checkpoint_dir, save_dtype)


def save(
    fabric: Fabric,
    model: LLaMA,
    optimizer: Optimizer,
    state: dict,
    settings: dict,
    out_dir: Path,
    destination: Path,
    checkpoint_dir: Path,
    dtype: torch.dtype,
) -> None:
    """Writes out_dir/train_state.pt (train_state.save_train_state: every weight and what --resume needs), then a
    checkpoint directory for generate.py at `destination`: the weights in `dtype` (the run's starting checkpoint's),
    its config, and the tokenizer of `checkpoint_dir`. Every file is written under a temporary name and renamed when
    complete: a run killed while saving keeps the previous checkpoint."""
    weights = save_train_state(fabric, out_dir / STATE_NAME, model, optimizer, state, settings)  # on rank 0
    if fabric.global_rank == 0:
        if model.config.tie_embeddings:
            del weights["lm_head.weight"]  # the embedding's, stored once
        destination.mkdir(parents=True, exist_ok=True)
        with atomic_path(destination / "lit_model.safetensors") as tmp:
            save_file({name: t.to(dtype) for name, t in weights.items()}, tmp, metadata={"format": "pt"})
        with atomic_path(destination / "model_config.json") as tmp:
            model.config.to_file(tmp)
        copy_tokenizer(checkpoint_dir, destination)
    fabric.barrier()


if __name__ == "__main__":
    cli(setup, as_positional=False)
