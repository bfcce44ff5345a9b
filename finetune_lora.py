"""Fine-tunes a converted LLaMA checkpoint with LoRA on instruction data prepared by prepare_alpaca.py.

    python finetune_lora.py --data_dir data/alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

The base model stays frozen and only LoRA's small A and B matrices learn. On GPUs the base is held in bf16 and
LoRA in fp32 under bf16 mixed precision; the defaults (the Alpaca-LoRA recipe) fit LLaMA-7B on one 24 GB GPU.
With --quantize bnb.nf4 (QLoRA) the base is held in 4 bits, and --optimizer AdamW8bit saves optimizer memory:
see howto/quantize.md.
Every --save_interval steps and at the end, out_dir receives the adapter (a few MB, for generate_lora.py and
scripts/merge_lora.py) and train_state.pt, from which --resume continues exactly where the run stopped; also
logs/ (CSV, and TensorBoard when installed) and, at the end, loss.png. See howto/finetune_lora.md.
"""

import importlib.util
import math
import os
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
from tqdm import tqdm

from generate import generate, peak_memory_gb
from lora import load_lora_state_dict, lora, mark_only_lora_as_trainable, save_lora_checkpoint
from model import LLaMA, Block
from prepare_alpaca import check_prepared_data, generate_prompt
from tokenizer import Tokenizer
from utils import (
    cross_entropy_sum, default_precision, load_config, load_model, make_optimizer, pack_batch, precision_to_dtype,
)

ADAPTER_NAME = "lit_model_lora_finetuned.safetensors"  # the final adapter; scripts/merge_lora.py's default
STATE_NAME = "train_state.pt"
SAMPLE_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."


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
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    lora_all_linear: bool = False,
    batch_size: int = 128,
    micro_batch_size: int = 4,
    optimizer: Literal["AdamW", "AdamW8bit", "PagedAdamW8bit", "PagedAdamW"] = "AdamW",
    learning_rate: float = 3e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 100,
    max_iters: Optional[int] = None,
    epochs: int = 3,
    max_seq_length: int = 512,
    grad_clip: float = 1.0,
    eval_interval: int = 100,
    eval_iters: int = 100,
    save_interval: int = 100,
    seed: int = 1337,
    resume: Optional[str] = None,
    gradient_checkpointing: bool = False,
) -> None:
    """Fine-tune a checkpoint with LoRA on data prepared by prepare_alpaca.py.

    Args:
        data_dir: directory with train.pt, test.pt and metadata.json from prepare_alpaca.py, prepared with the
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
        lora_alpha: the update is scaled by lora_alpha / lora_r.
        lora_dropout: dropout on the input of the LoRA branch, in training only.
        lora_query: adapt the attention's query projection.
        lora_key: adapt the attention's key projection.
        lora_value: adapt the attention's value projection.
        lora_projection: adapt the attention's output projection.
        lora_mlp: adapt the MLP's gate, up and down projections.
        lora_head: adapt the output head.
        lora_all_linear: adapt every projection of attention and MLP (the head only with --lora_head).
        batch_size: records per optimizer step, all devices together.
        micro_batch_size: records per forward and backward pass on one device; gradients are accumulated over
            batch_size / (micro_batch_size x devices) of them. Lower it when memory runs out.
        optimizer: "AdamW" (torch), or bitsandbytes' "AdamW8bit" (its two moments in 8 bits: 1/4 of the memory),
            "PagedAdamW8bit" or "PagedAdamW" (state paged out to CPU memory when the GPU runs out; CUDA only).
        learning_rate: peak learning rate of the optimizer.
        weight_decay: AdamW's decoupled weight decay of the LoRA weights.
        warmup_steps: optimizer steps of linear warmup to `learning_rate`; then it decays along a cosine to 0
            at the last step.
        max_iters: optimizer steps to train for; when left out, `epochs` passes over the training records.
        epochs: passes over the training records, used when --max_iters is not given.
        max_seq_length: records are cut to this many tokens (at most the model's block_size).
        grad_clip: the gradient norm is clipped to this value (a large value turns clipping off).
        eval_interval: optimizer steps between evaluations (validation loss and a sample answer); also at the end.
        eval_iters: micro-batches of the test set each evaluation uses: always the same records.
        save_interval: optimizer steps between checkpoints (an adapter and train_state.pt); also at the end.
        seed: seed of the LoRA initialisation, the order of the records and dropout.
        resume: a train_state.pt to continue from, or "auto" for out_dir/train_state.pt when there is one.
        gradient_checkpointing: recompute activations in the backward pass: far less memory, ~1/3 more time.
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
    if quantize and strategy == "fsdp":
        raise SystemExit("error: --quantize does not work with --strategy fsdp, which shards floating-point weights; "
                         "use --strategy ddp or one device")
    config = load_config(args.checkpoint_dir)
    args.metadata = check_prepared_data(args.data_dir, args.checkpoint_dir)
    if args.metadata["vocab_size"] > config.vocab_size:
        raise SystemExit(
            f"error: {args.data_dir} holds token ids up to {args.metadata['vocab_size'] - 1}, but the model's "
            f"vocabulary has {config.vocab_size}; prepare the data with this checkpoint's tokenizer"
        )
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

    # The model: the frozen base with LoRA layers where the flags say. Under mixed precision the base is held in
    # the low dtype and LoRA in fp32, whose small updates bf16 would round away. FSDP shards each Block's
    # weights together, which needs one dtype: it keeps them all in fp32 and computes in bf16 itself.
    fsdp = isinstance(fabric.strategy, FSDPStrategy)
    mixed = args.precision.endswith("-mixed")
    base_dtype = torch.float32 if fsdp and mixed else precision_to_dtype(args.precision.replace("-mixed", "-true"))
    with lora(
        args.lora_r, args.lora_alpha, args.lora_dropout, query=args.lora_query, key=args.lora_key,
        value=args.lora_value, projection=args.lora_projection, mlp=args.lora_mlp, head=args.lora_head,
        all_linear=args.lora_all_linear,
    ) as lora_config:
        model = load_model(
            args.checkpoint_dir, device="cpu" if fsdp else fabric.device, dtype=base_dtype, quantize=args.quantize
        )
    mark_only_lora_as_trainable(model)
    trainable = [param for param in model.parameters() if param.requires_grad]
    if mixed:
        for param in trainable:
            param.data = param.data.float()
    model.gradient_checkpointing = args.gradient_checkpointing and not fsdp  # FSDP checkpoints each Block itself
    total = sum(param.numel() for param in model.parameters())
    n_trainable = sum(param.numel() for param in trainable)
    fabric.print(
        f"Trainable parameters: {n_trainable:,} of {total:,} ({100 * n_trainable / total:.3f}%), LoRA {lora_config}"
    )
    model = fabric.setup_module(model)

    # The optimizer (AdamW or one of bitsandbytes' variants) over the LoRA weights only; `train` sets its learning rate
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = make_optimizer(args.optimizer, trainable, args.learning_rate, args.weight_decay)
    optimizer = fabric.setup_optimizers(optimizer)
    max_steps = args.max_iters or math.ceil(args.epochs * len(train_data) / args.batch_size)

    state = {"step": 0, "history": {"train": [], "val": []}}
    settings = {  # what a resumed run must share with the run it continues
        "model": asdict(model.config), "lora": asdict(lora_config), "batch_size": args.batch_size, "seed": args.seed,
        "train_records": len(train_data), "optimizer": args.optimizer,
    }
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

    save(fabric, model, optimizer, state, settings, args.out_dir / ADAPTER_NAME)
    fabric.print(f"Saved the adapter to {args.out_dir / ADAPTER_NAME}")
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
            save(fabric, model, optimizer, state, settings, args.out_dir / f"lora_step-{step:06d}.safetensors")
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
    adapter_path: Path,
) -> None:
    """Writes train_state.pt (LoRA weights, optimizer, step, RNG states, loss history: what --resume needs), then
    the adapter at `adapter_path` from the LoRA tensors just saved in it, so the two always agree. Both are
    written under a temporary name and renamed when complete: a run killed while saving keeps the previous
    checkpoint. fabric.save gathers FSDP's shards into one file."""
    path = adapter_path.parent / STATE_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    train_state = {"model": model, "optimizer": optimizer, **state, "settings": settings, "rng": rng_states(fabric)}
    fabric.save(tmp, train_state, filter={"model": lambda name, _: ".lora." in name})
    if fabric.global_rank == 0:
        os.replace(tmp, path)
        with torch.device("meta"), lora(**settings["lora"]):
            skeleton = LLaMA(model.config)  # no memory: only the LoRA tensors below are real
        load_lora_state_dict(skeleton, torch.load(path, weights_only=True)["model"], path)
        save_lora_checkpoint(skeleton, adapter_path)  # atomic too
    fabric.barrier()


def load_train_state(
    fabric: Fabric,
    path: Path,
    model: LLaMA,
    optimizer: torch.optim.Optimizer,
    settings: dict,
) -> dict:
    """Restores what `save` wrote into the model and optimizer, and the RNG states; returns the step and
    loss history. The data position and the learning rate follow from the step."""
    try:
        saved = torch.load(path, weights_only=True, mmap=True)["settings"]  # mmap: no tensor is read
    except Exception as e:  # not a file torch.save wrote, or not one of ours
        message = f"error: --resume {path} is not a train_state.pt of finetune_lora.py ({one_line(e)})"
        raise SystemExit(message) from None
    differences = [
        f"{key}={saved.get(key)} (now: {value})" for key, value in settings.items() if saved.get(key) != value
    ]
    if differences:
        raise SystemExit(
            f"error: --resume {path} was saved by a run with other settings: {'; '.join(differences)}; "
            "resume with the same checkpoint, data, LoRA and batch settings"
        )
    try:
        rest = fabric.load(path, {"model": model, "optimizer": optimizer}, strict=False, weights_only=True)
    except Exception as e:  # e.g. a state of another version of this script
        raise SystemExit(f"error: --resume {path} does not fit this run ({one_line(e)})") from None
    step, history, rng = rest["step"], rest["history"], rest["rng"]
    # the RNG that LoRA dropout draws from, as each device left it (with another device count, the nearest)
    rng = rng[fabric.global_rank % len(rng)]
    if fabric.device.type == "cuda":
        torch.cuda.set_rng_state(rng, fabric.device)
    else:
        torch.set_rng_state(rng)
    return {"step": step, "history": history}


def one_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def rng_states(fabric: Fabric) -> torch.Tensor:
    """Every device's RNG state (LoRA dropout draws from it), one row per rank, for `save`."""
    if fabric.device.type == "cuda":
        rng = torch.cuda.get_rng_state(fabric.device)
    else:
        rng = torch.get_rng_state()
    return fabric.all_gather(rng.to(fabric.device)).reshape(fabric.world_size, -1).cpu()


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
