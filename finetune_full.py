"""Fine-tunes every weight of a converted LLaMA checkpoint on instruction data prepared by prepare_alpaca.py.

    python finetune_full.py --data_dir data/alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --devices 8 --strategy fsdp

The same training loop as finetune_lora.py, but all weights learn. That takes about 16 bytes per parameter
(fp32 weights, gradients and AdamW's two moments) before activations: 110 GB for a 7B model, so beyond small
models it needs several GPUs with --strategy fsdp, which shards all of it across them (and recomputes each
Block's activations in the backward pass). See howto/finetune_full.md. Every --save_interval steps, out_dir
receives step-NNNNNN/ and, at the end, out_dir itself: a complete checkpoint directory (lit_model.safetensors,
model_config.json, tokenizer.model) for generate.py, and each time train_state.pt, from which --resume continues.
"""

import importlib.util
import math
import os
import shutil
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Optional

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.strategies import FSDPStrategy
from safetensors.torch import save_file
from tqdm import tqdm

from generate import generate, peak_memory_gb
from model import LLaMA, Block
from prepare_alpaca import check_prepared_data, generate_prompt
from tokenizer import Tokenizer
from utils import (
    atomic_path, cross_entropy_sum, default_precision, load_config, load_model, make_optimizer, pack_batch,
    precision_to_dtype,
)

STATE_NAME = "train_state.pt"
SAMPLE_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."


def setup(
    data_dir: Path = Path("data/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    out_dir: Path = Path("out/full/alpaca"),
    precision: Optional[Literal["bf16-mixed", "bf16-true", "32-true"]] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    batch_size: int = 128,
    micro_batch_size: int = 4,
    optimizer: Literal["AdamW", "AdamW8bit", "PagedAdamW8bit", "PagedAdamW"] = "AdamW",
    learning_rate: float = 2e-5,
    weight_decay: float = 0.0,
    warmup_steps: int = 100,
    max_iters: Optional[int] = None,
    epochs: int = 3,
    max_seq_length: int = 512,
    grad_clip: float = 1.0,
    eval_interval: int = 100,
    eval_iters: int = 100,
    save_interval: int = 1000,
    seed: int = 1337,
    resume: Optional[str] = None,
    gradient_checkpointing: bool = True,
) -> None:
    """Fine-tune all weights of a checkpoint on data prepared by prepare_alpaca.py.

    Args:
        data_dir: directory with train.pt, test.pt and metadata.json from prepare_alpaca.py, prepared with the
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
        batch_size: records per optimizer step, all devices together.
        micro_batch_size: records per forward and backward pass on one device; gradients are accumulated over
            batch_size / (micro_batch_size x devices) of them. Lower it when memory runs out.
        optimizer: "AdamW" (torch), or bitsandbytes' "AdamW8bit" (its two moments in 8 bits: 1/4 of the 8 bytes per
            parameter they take in fp32), "PagedAdamW8bit" or "PagedAdamW" (state paged out to CPU memory when the
            GPU runs out; CUDA only). See howto/quantize.md.
        learning_rate: peak learning rate of the optimizer (2e-5: Stanford Alpaca's full fine-tuning).
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: optimizer steps of linear warmup to `learning_rate`; then it decays along a cosine to 0
            at the last step.
        max_iters: optimizer steps to train for; when left out, `epochs` passes over the training records.
        epochs: passes over the training records, used when --max_iters is not given.
        max_seq_length: records are cut to this many tokens (at most the model's block_size).
        grad_clip: the gradient norm is clipped to this value (a large value turns clipping off).
        eval_interval: optimizer steps between evaluations (validation loss and a sample answer); also at the end.
        eval_iters: micro-batches of the test set each evaluation uses: always the same records.
        save_interval: optimizer steps between checkpoints (step-NNNNNN/ and train_state.pt); also at the end.
        seed: seed of the order of the records.
        resume: a train_state.pt to continue from, or "auto" for out_dir/train_state.pt when there is one.
        gradient_checkpointing: recompute each Block's activations in the backward pass: far less memory for
            about 1/3 more time.
    """
    args = SimpleNamespace(**locals())
    args.precision = precision or default_precision(training=True)
    args.data_dir, args.checkpoint_dir, args.out_dir = Path(data_dir), Path(checkpoint_dir), Path(out_dir)
    # everything that can be wrong with the input is found here, before any model is loaded or process started
    if micro_batch_size < 1 or micro_batch_size > batch_size:
        raise SystemExit(
            f"error: --micro_batch_size {micro_batch_size} must be between 1 and --batch_size {batch_size}"
        )
    if batch_size % (micro_batch_size * devices * num_nodes):
        raise SystemExit(
            f"error: --batch_size {batch_size} must be a multiple of --micro_batch_size {micro_batch_size} "
            f"x {devices * num_nodes} devices"
        )
    config = load_config(args.checkpoint_dir)
    args.metadata = check_prepared_data(args.data_dir, args.checkpoint_dir)
    if args.metadata["vocab_size"] > config.vocab_size:
        raise SystemExit(
            f"error: {args.data_dir} holds token ids up to {args.metadata['vocab_size'] - 1}, but the model's "
            f"vocabulary has {config.vocab_size}; prepare the data with this checkpoint's tokenizer"
        )
    if args.out_dir.resolve() == args.checkpoint_dir.resolve():
        raise SystemExit(f"error: --out_dir {out_dir} is the checkpoint directory; choose a new directory")
    if resume == "auto":
        args.resume = args.out_dir / STATE_NAME if (args.out_dir / STATE_NAME).is_file() else None
    elif resume is not None:
        args.resume = Path(resume)
        if not args.resume.is_file():
            raise SystemExit(f"error: --resume {resume}: no such file (use --resume auto for the latest in --out_dir)")

    if strategy == "fsdp":
        strategy = FSDPStrategy(
            auto_wrap_policy={Block}, activation_checkpointing_policy={Block} if gradient_checkpointing else None,
            state_dict_type="full", limit_all_gathers=True,
        )
    loggers = [CSVLogger(args.out_dir, name="logs", flush_logs_every_n_steps=10)]
    if importlib.util.find_spec("tensorboard"):
        loggers.append(TensorBoardLogger(args.out_dir, name="logs"))
    fabric = Fabric(devices=devices, num_nodes=num_nodes, strategy=strategy, precision=args.precision, loggers=loggers)
    fabric.launch(main, args)


def main(fabric: Fabric, args: SimpleNamespace) -> None:
    fabric.seed_everything(args.seed)
    train_data = torch.load(args.data_dir / "train.pt", weights_only=True)  # ~25 s for 50k records: read once
    val_data = torch.load(args.data_dir / "test.pt", weights_only=True)
    tokenizer = Tokenizer(args.checkpoint_dir / "tokenizer.model")

    # The model, every weight trainable. Under mixed precision the weights stay in fp32 (bf16 would round small
    # updates away) and Fabric computes in bf16. FSDP starts from a copy on the CPU and moves each Block's shard
    # to its device. The result is saved in the dtype the checkpoint came in.
    fsdp = isinstance(fabric.strategy, FSDPStrategy)
    model = load_model(args.checkpoint_dir, device="cpu" if fsdp else fabric.device)
    args.save_dtype = model.embed.weight.dtype
    model = model.to(precision_to_dtype(args.precision.replace("bf16-mixed", "32-true")))
    model.gradient_checkpointing = args.gradient_checkpointing and not fsdp  # FSDP checkpoints each Block itself
    fabric.print(f"Trainable parameters: {sum(param.numel() for param in model.parameters()):,} (all)")
    model = fabric.setup_module(model)

    # The optimizer (AdamW or one of bitsandbytes' variants) over all weights; `train` sets its learning rate
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.learning_rate, args.weight_decay)
    optimizer = fabric.setup_optimizers(optimizer)
    max_steps = args.max_iters or math.ceil(args.epochs * len(train_data) / args.batch_size)

    state = {"step": 0, "history": {"train": [], "val": []}}
    settings = {"model": asdict(model.config), "batch_size": args.batch_size, "seed": args.seed,
                "train_records": len(train_data), "optimizer": args.optimizer}  # what a resumed run must share
    if args.resume:
        state = load_train_state(fabric, args.resume, model, optimizer, settings)
        fabric.print(f"Resuming from {args.resume} at step {state['step']}")
    fabric.print(
        f"Training {len(train_data)} records for {max_steps} steps of {args.batch_size} records "
        f"({max_steps * args.batch_size / len(train_data):.2f} epochs), micro-batches of {args.micro_batch_size}, "
        f"{fabric.world_size} device(s), {args.precision}"
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train(fabric, model, optimizer, train_data, val_data, tokenizer, state, settings, max_steps, args)

    save(fabric, model, optimizer, state, settings, args.out_dir, args)
    fabric.print(f"Saved the fine-tuned checkpoint to {args.out_dir} (lit_model.safetensors, model_config.json, "
                 "tokenizer.model)")
    if fabric.global_rank == 0:
        plot_losses(state["history"], args.out_dir / "loss.png")
    for logger in fabric.loggers:
        logger.finalize("success")


def train(
    fabric: Fabric,
    model: LLaMA,
    optimizer: torch.optim.Optimizer,
    train_data: list[dict[str, torch.Tensor]],
    val_data: list[dict[str, torch.Tensor]],
    tokenizer: Tokenizer,
    state: dict,
    settings: dict,
    max_steps: int,
    args: SimpleNamespace,
) -> None:
    ignore_index = args.metadata["ignore_index"]
    max_seq_length = min(args.max_seq_length, model.config.block_size)
    progress = tqdm(
        total=max_steps, initial=state["step"], unit="step", disable=fabric.global_rank != 0, dynamic_ncols=True
    )
    t0, tokens = time.perf_counter(), 0
    model.train()
    while state["step"] < max_steps:
        # The batch, cut into micro-batches of records packed without padding (utils.pack_batch). The loss is the
        # mean over all the batch's target tokens, whichever micro-batch and device they are in.
        batch = [train_data[j] for j in batch_indices(state["step"], args.batch_size, len(train_data), args.seed)]
        n_targets = sum(int((record["labels"][1:max_seq_length] != ignore_index).sum()) for record in batch)
        micro_batches = [batch[i : i + args.micro_batch_size] for i in range(0, args.batch_size, args.micro_batch_size)]
        micro_batches = micro_batches[fabric.global_rank :: fabric.world_size]  # micro-batch k to device k % devices
        loss_sum = torch.zeros((), device=fabric.device)
        for i, micro_batch in enumerate(micro_batches):
            input_ids, targets, lengths = pack_batch(micro_batch, max_seq_length)
            input_ids, targets = input_ids.to(fabric.device), targets.to(fabric.device)
            # under DDP, gradients are averaged across devices once per step, after the last micro-batch
            with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                loss = cross_entropy_sum(model, input_ids, targets, ignore_index, lengths) / max(n_targets, 1)
                fabric.backward(loss * fabric.world_size)  # DDP and FSDP average gradients; we want their sum
            loss_sum += loss.detach()
        loss = fabric.all_reduce(loss_sum, reduce_op="sum").item()  # the whole batch's
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip, error_if_nonfinite=False)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            progress.close()
            saved = args.out_dir / STATE_NAME
            raise SystemExit(
                f"error: the loss ({loss}) or its gradient (norm {float(grad_norm)}) is not finite at step "
                f"{state['step'] + 1}; stopped before updating the weights. "
                + (f"The last good checkpoint is {saved}: resume from it with a lower --learning_rate"
                   if saved.is_file() else "Nothing was saved; try a lower --learning_rate")
            )
        lr = learning_rate(state["step"], args.learning_rate, args.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        step = state["step"]

        state["history"]["train"].append((step, loss))
        tokens += sum(min(len(record["input_ids"]), max_seq_length) for record in batch)
        tokens_per_sec = tokens / (time.perf_counter() - t0)
        fabric.log_dict({"train_loss": loss, "learning_rate": lr, "tokens_per_sec": tokens_per_sec}, step)
        memory = peak_memory_gb(fabric.device)
        progress.set_postfix(
            loss=f"{loss:.4f}", tokens_per_sec=f"{tokens_per_sec:.0f}", peak_memory=f"{memory:.2f} GB", refresh=False
        )
        progress.update()

        if step % args.eval_interval == 0 or step == max_steps:
            val_loss = validate(fabric, model, val_data, tokenizer, step, max_seq_length, args)
            state["history"]["val"].append((step, val_loss))
            fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step)
        if step % args.save_interval == 0 and step < max_steps:  # the end is saved by main
            save(fabric, model, optimizer, state, settings, args.out_dir / f"step-{step:06d}", args)
    progress.close()


@torch.no_grad()
def validate(
    fabric: Fabric,
    model: LLaMA,
    val_data: list[dict[str, torch.Tensor]],
    tokenizer: Tokenizer,
    step: int,
    max_seq_length: int,
    args: SimpleNamespace,
) -> float:
    """The loss per target token over the first eval_iters micro-batches of the test set (the same records every
    time, so the numbers compare), and an answer to SAMPLE_INSTRUCTION, greedy, to read how training goes."""
    ignore_index = args.metadata["ignore_index"]
    model.eval()
    n = min(len(val_data), args.eval_iters * args.micro_batch_size)
    micro_batches = [range(i, min(i + args.micro_batch_size, n)) for i in range(0, n, args.micro_batch_size)]
    if fabric.world_size > 1:  # every device runs as many forward passes (FSDP gathers weights in each)
        micro_batches = micro_batches[: max(len(micro_batches) // fabric.world_size, 1) * fabric.world_size]
    totals = torch.zeros(2, device=fabric.device)  # summed loss, target tokens
    for micro_batch in micro_batches[fabric.global_rank :: fabric.world_size]:
        input_ids, targets, lengths = pack_batch([val_data[j] for j in micro_batch], max_seq_length)
        input_ids, targets = input_ids.to(fabric.device), targets.to(fabric.device)
        totals[0] += cross_entropy_sum(model, input_ids, targets, ignore_index, lengths)
        totals[1] += (targets != ignore_index).sum()
    totals = fabric.all_reduce(totals, reduce_op="sum")
    val_loss = (totals[0] / totals[1].clamp(min=1)).item()
    answer = ""
    if not isinstance(fabric.strategy, FSDPStrategy):  # under FSDP every new token would gather the whole model
        prompt = tokenizer.encode(generate_prompt({"instruction": SAMPLE_INSTRUCTION, "input": ""}), bos=True)
        max_new_tokens = min(100, model.config.block_size - len(prompt))
        output = generate(model, prompt.to(fabric.device), max_new_tokens, temperature=0.0, eos_id=tokenizer.eos_id)
        answer = tokenizer.decode(output[len(prompt) :])
    fabric.print(f"\nStep {step}: validation loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}")
    fabric.print(f"{SAMPLE_INSTRUCTION} -> {answer!r}")
    model.train()
    return val_loss


def save(
    fabric: Fabric,
    model: LLaMA,
    optimizer: torch.optim.Optimizer,
    state: dict,
    settings: dict,
    checkpoint_dir: Path,
    args: SimpleNamespace,
) -> None:
    """Writes out_dir/train_state.pt (weights, optimizer, step, loss history: what --resume needs), then a
    checkpoint directory for generate.py at `checkpoint_dir`. Every file is written under a temporary name and
    renamed when complete: a run killed while saving keeps the previous checkpoint."""
    fsdp = isinstance(fabric.strategy, FSDPStrategy)
    path = args.out_dir / STATE_NAME
    state_tmp = path.with_name(f".{path.name}.tmp")
    train_state = {"model": model, "optimizer": optimizer, **state, "settings": settings}
    if fsdp:
        fabric.save(state_tmp, train_state)  # gathers the shards, a Block at a time, into one file on rank 0
    elif fabric.global_rank == 0:  # directly: fabric.save would first serialise the whole state into memory
        torch.save({**train_state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, state_tmp)
    if fabric.global_rank == 0:
        os.replace(state_tmp, path)
        # the weights: under FSDP the gathered ones in the file just written (mmap: read as they are written)
        weights = torch.load(path, weights_only=True, mmap=True)["model"] if fsdp else model.state_dict()
        if model.config.tie_embeddings:
            del weights["lm_head.weight"]  # the embedding's, stored once
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(checkpoint_dir / "lit_model.safetensors") as tmp:
            save_file({name: t.to(args.save_dtype) for name, t in weights.items()}, tmp, metadata={"format": "pt"})
        with atomic_path(checkpoint_dir / "model_config.json") as tmp:
            model.config.to_file(tmp)
        with atomic_path(checkpoint_dir / "tokenizer.model") as tmp:
            shutil.copyfile(args.checkpoint_dir / "tokenizer.model", tmp)
    fabric.barrier()


def load_train_state(
    fabric: Fabric,
    path: Path,
    model: LLaMA,
    optimizer: torch.optim.Optimizer,
    settings: dict,
) -> dict:
    """Restores what `save` wrote into the model and optimizer; returns the step and loss history. The data
    position and the learning rate follow from the step."""
    try:
        saved = torch.load(path, weights_only=True, mmap=True)["settings"]  # mmap: no tensor is read
    except Exception as e:  # not a file torch.save wrote, or not one of ours
        message = f"error: --resume {path} is not a train_state.pt of finetune_full.py ({one_line(e)})"
        raise SystemExit(message) from None
    differences = [
        f"{key}={saved.get(key)} (now: {value})" for key, value in settings.items() if saved.get(key) != value
    ]
    if differences:
        raise SystemExit(
            f"error: --resume {path} was saved by a run with other settings: {'; '.join(differences)}; "
            "resume with the same checkpoint, data and batch settings"
        )
    try:
        rest = fabric.load(path, {"model": model, "optimizer": optimizer}, weights_only=True)
    except Exception as e:  # e.g. a state of another version of this script
        raise SystemExit(f"error: --resume {path} does not fit this run ({one_line(e)})") from None
    step, history = rest["step"], rest["history"]
    return {"step": step, "history": history}


def one_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def batch_indices(step: int, batch_size: int, n_records: int, seed: int) -> list[int]:
    """The training records of optimizer step `step`: the records are read in a new random order every epoch,
    drawn from (seed, epoch). Any step's batch follows from its number alone, so a resumed run reads exactly
    the records an uninterrupted one would have."""
    indices = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, position = divmod(i, n_records)
        indices.append(epoch_order(n_records, seed, epoch)[position])
    return indices


@lru_cache(maxsize=2)
def epoch_order(n_records: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n_records, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def learning_rate(step: int, peak: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate of optimizer step `step` (counted from 0): a linear warmup to `peak` over `warmup_steps`,
    then a cosine decay to 0 at `max_steps`. A function of the step alone, so a resumed run needs nothing else,
    and may lower `peak`, e.g. after a NaN."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def plot_losses(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    figure = Figure(figsize=(8, 5))
    ax = figure.subplots()
    ax.plot(*zip(*history["train"]), label="train", linewidth=1)
    if history["val"]:
        ax.plot(*zip(*history["val"]), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(setup, as_positional=False)
