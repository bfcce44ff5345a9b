"""The parts the fine-tuning scripts (finetune_lora.py, finetune_adapter.py, finetune_full.py, finetune_dpo.py) build
their runs from, whatever they train. Each script tells its own story (setup: the flags and every check; main: the
model, which weights train, and the optimizer; fit: the training loop and its step, in plain view; save: its
checkpoint) and calls these parts, listed here in the order a run uses them:

- before any model is loaded or process started: `TrainArgs` (the --train.* flags), `check_batch_sizes`;
- the run: `make_fabric` (devices, strategy, precision, loggers, seed; the script then calls fabric.launch;
  --strategy fsdp is FSDP2, `shard_model`, applied by fabric.setup_module), `is_fsdp`, `compile_blocks`;
- each step of the loop: `Progress` (the plan, the bar and the logged figures), `batch_indices` (the step's records),
  `stop_if_diverged` (the stop on a loss or gradient that is not finite, or a loss stuck at a uniform guess),
  `learning_rate` (the step's rate);
- between steps: `validate` (the validation loss and a sample answer, `sample_answer`);
- at the end: `finish` (the loss plot, the loggers).

Elsewhere: the losses and the packing of a micro-batch in losses.py, the train state that --resume continues from in
train_state.py, the optimizer (AdamW or bitsandbytes') in quantize.make_optimizer, the data in data.py. The data order
and the learning rate are pure functions of the step, so a resumed run continues exactly.
"""

import importlib.util
import math
import time
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Literal, Optional

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from data import encode_prompt
from decode import generate, printable
from losses import cross_entropy_sum, pack_batch
from model import LLaMA
from tokenizer import Tokenizer
from utils import peak_memory_gb

# steps a loss must stay near a uniform guess to count as diverged (stop_if_diverged); why 5: howto/resume.md
BLOW_UP_STEPS = 5
SAMPLE_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."


@dataclass
class TrainArgs:
    """How to train, the same for LoRA and full fine-tuning: on the command line --train.NAME, in a --config file
    a `train:` section. Each script sets its own defaults (learning rate, checkpoint interval, ...).

    Args:
        batch_size: records per optimizer step, all devices together.
        micro_batch_size: records per forward and backward pass on one device; gradients are accumulated over
            batch_size / (micro_batch_size x devices) of them. Lower it when memory runs out.
        max_steps: optimizer steps to train for; when left out, `epochs` passes over the training records.
        epochs: passes over the training records, used when max_steps is not given.
        max_seq_length: records are cut to this many tokens (at most the model's block_size).
        optimizer: "AdamW" (torch), or bitsandbytes' "AdamW8bit" (its two moments in 8 bits: 1/4 of the memory),
            "PagedAdamW8bit" or "PagedAdamW" (state paged out to CPU memory when the GPU runs out; CUDA only).
        learning_rate: peak learning rate of the optimizer.
        weight_decay: AdamW's decoupled weight decay of the trained weights.
        warmup_steps: optimizer steps of linear warmup to learning_rate; then it decays along a cosine to 0 at the
            last step.
        grad_clip: the gradient norm is clipped to this value (a large value turns clipping off).
        gradient_checkpointing: recompute each Block's activations in the backward pass: far less memory for more
            time (howto/finetune_lora.md#when-it-does-not-fit-in-memory).
        compile: compile each Block with torch.compile (inductor), which fuses RMSNorm, the rotary embeddings, SwiGLU
            and LoRA's small products into a few kernels; the first step then takes longer (the time is printed).
            By default on CUDA GPUs, unless the base is quantized (--quantize) or sharded (--strategy fsdp, with
            which it does not work), and off on CPUs, where its steps are no faster (howto/finetune_lora.md#speed).
        eval_interval: optimizer steps between evaluations (validation loss and a sample answer); also at the end.
        eval_batches: micro-batches of the test set each evaluation uses: always the same records.
        save_interval: optimizer steps between checkpoints (with train_state.pt for --resume); also at the end.
        seed: seed of the order of the records and of initialisation and dropout, where there are any.
    """

    batch_size: int = 128
    micro_batch_size: int = 4
    max_steps: Optional[int] = None
    epochs: int = 3
    max_seq_length: int = 512
    optimizer: Literal["AdamW", "AdamW8bit", "PagedAdamW8bit", "PagedAdamW"] = "AdamW"
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    compile: Optional[bool] = None
    eval_interval: int = 100
    eval_batches: int = 100
    save_interval: int = 100
    seed: int = 1337

    def for_records(self, n_records: int) -> "TrainArgs":
        """These settings with max_steps filled in: when only `epochs` is given, as many steps as they take. Every
        script calls it before training; settings that would train nothing, or divide by zero, are refused here."""
        for name in ("max_steps", "epochs", "eval_interval", "save_interval", "eval_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--train.{name} {value} must be at least 1")
        return replace(self, max_steps=self.max_steps or math.ceil(self.epochs * n_records / self.batch_size))


def check_batch_sizes(train: TrainArgs, devices: int) -> None:
    if train.micro_batch_size < 1 or train.micro_batch_size > train.batch_size:
        raise ValueError(
            f"--train.micro_batch_size {train.micro_batch_size} must be between 1 and "
            f"--train.batch_size {train.batch_size}"
        )
    if train.batch_size % (train.micro_batch_size * devices):
        raise ValueError(
            f"--train.batch_size {train.batch_size} must be a multiple of --train.micro_batch_size "
            f"{train.micro_batch_size} x {devices} devices"
        )


def make_fabric(devices: int, num_nodes: int, strategy: str, precision: str, train: TrainArgs, out_dir: Path) -> Fabric:
    """The Fabric a script's main runs in (`fabric.launch(main, ...)`), on each of devices x num_nodes devices with
    `strategy`, in `precision`, logging to out_dir/logs (CSV, and TensorBoard when installed), seeded with
    train.seed. "fsdp" is FSDP2 (Fabric's ModelParallelStrategy, `shard_model` in fabric.setup_module): every device
    holds 1/world_size of each Block's weights, gradients and optimizer state."""
    if strategy == "fsdp":
        shard = partial(shard_model, mixed=precision == "bf16-mixed")
        strategy = ModelParallelStrategy(shard, data_parallel_size=devices * num_nodes, tensor_parallel_size=1)
        # Gradients are reduce-scattered into shards after every micro-batch: `fabric.no_backward_sync` (DDP's saving
        # of all but the last micro-batch's communication) has no effect, as it would keep each Block's gradient
        # whole on every device until the step's end.
        strategy._backward_sync_control = None
        warnings.filterwarnings("ignore", "The `ModelParallelStrategy` does not support skipping the gradient sync")
    loggers = [CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=10)]
    if importlib.util.find_spec("tensorboard"):
        loggers.append(TensorBoardLogger(out_dir, name="logs"))
    fabric = Fabric(devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision, loggers=loggers)
    fabric.seed_everything(train.seed)  # in every process: the DDP/FSDP workers run the script anew
    return fabric


def shard_model(model: LLaMA, device_mesh: DeviceMesh, mixed: bool) -> LLaMA:
    """--strategy fsdp's sharding, which fabric.setup_module applies: FSDP2's `fully_shard` on each Block, then on the
    rest (the embedding, the final norm, the head). Each parameter is split by rows across the devices (a DTensor);
    a Block's are gathered whole just before its forward and backward, and its gradients are reduce-scattered back
    into shards after. Frozen and trainable parameters share a Block (LoRA's A and B beside the base weights): only
    the trainable ones get gradients. With `mixed` (bf16-mixed), the gathered weights are bf16 and the gradients are
    reduced in fp32 (FSDP2's MixedPrecisionPolicy); the shards keep their own dtype. The model's own gradient
    checkpointing (--train.gradient_checkpointing) recomputes a Block's activations within its gather."""
    mesh = device_mesh["data_parallel"]
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_fsdp(fabric: Fabric) -> bool:
    """Whether the model is sharded (--strategy fsdp): then each device holds part of every Block's weights."""
    return isinstance(fabric.strategy, ModelParallelStrategy)


def compile_blocks(fabric: Fabric, model: LLaMA, train: TrainArgs, quantized: bool = False) -> bool:
    """--train.compile: compiles each Block of `model` in place (`nn.Module.compile`: the weights keep their names),
    before fabric.setup_module. Per Block, not the whole model: gradient checkpointing recomputes a Block at a time,
    and every micro-batch packs other lengths into the one row, which the Blocks are compiled for (`dynamic`)
    without the model's Python around them. By default on CUDA only, and not for a quantized base, whose
    bitsandbytes layers compile into many graph breaks. Returns whether it compiled."""
    enabled = train.compile
    if enabled is None:
        enabled = fabric.device.type == "cuda" and not quantized and not is_fsdp(fabric)
    if enabled and is_fsdp(fabric):
        raise ValueError("--train.compile does not work with --strategy fsdp; leave it out or use --strategy ddp")
    if enabled:
        for block in model.blocks:
            block.compile(dynamic=True)
        fabric.print("Compiling each Block with torch.compile: the first step includes the compilation")
    return enabled


class Progress:
    """What a run says as it goes: the plan at the start, then the progress bar (rank 0's) and what is logged each
    step: loss, learning rate, tokens/s. A context manager: the bar is closed however the loop ends (a run stopped by
    `stop_if_diverged` prints its error line after a finished bar)."""

    def __init__(self, fabric: Fabric, train: TrainArgs, n_records: int, first_step: int) -> None:
        fabric.print(
            f"Training {n_records} records for {train.max_steps} steps of {train.batch_size} records "
            f"({train.max_steps * train.batch_size / n_records:.2f} epochs), "
            f"micro-batches of {train.micro_batch_size}, "
            f"{fabric.world_size} device(s), {fabric.strategy.precision.precision}"
        )
        self.fabric, self.t0, self.tokens, self.first_step = fabric, time.perf_counter(), 0, True
        self.bar = tqdm(
            total=train.max_steps, initial=first_step, unit="step", disable=fabric.global_rank != 0, dynamic_ncols=True
        )

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exception) -> None:
        self.bar.close()

    def update(self, step: int, loss: float, learning_rate: float, tokens: int) -> None:
        """After optimizer step `step` (counted from 1), with its loss, learning rate and number of tokens."""
        if self.first_step:  # with --train.compile, mostly the compilation
            self.fabric.print(f"First step: {time.perf_counter() - self.t0:.1f} s")
            self.first_step = False
        self.tokens += tokens
        tokens_per_sec = self.tokens / (time.perf_counter() - self.t0)
        self.fabric.log_dict(
            {"train_loss": loss, "learning_rate": learning_rate, "tokens_per_sec": tokens_per_sec}, step
        )
        memory = peak_memory_gb(self.fabric.device)
        self.bar.set_postfix(
            loss=f"{loss:.4f}", tokens_per_sec=f"{tokens_per_sec:.0f}", peak_memory=f"{memory:.2f} GB", refresh=False
        )
        self.bar.update()


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


def stop_if_diverged(
    loss: float, grad_norm: torch.Tensor, state: dict, saved: Path, vocab_size: Optional[int] = None
) -> None:
    """Stops the run, before the weights are updated, when step state["step"] + 1 has diverged: when its loss or
    gradient norm is not finite; or, given the `vocab_size` the loss is a cross-entropy over, when the loss is no
    better than a uniform guess's, ln(vocab_size), to within 1, and either its gradient is exactly 0 (the output no
    longer depends on the trained weights: a far too high learning rate leaves every logit equal, loss ln(vocab_size),
    without a NaN) or it has stayed so, more than 1 above the lowest loss before, for BLOW_UP_STEPS steps (an ordinary
    spike comes back down sooner). A trained model's loss starts far below ln(vocab_size); a random one's at it, with
    a gradient. The FloatingPointError names the last train state (`saved`, or the directory of a sharded one), if
    there is one, and what to change."""
    step, history = state["step"] + 1, [loss for _, loss in state["history"]["train"]]
    split = max(0, len(history) - BLOW_UP_STEPS + 1)
    recent, before = [*history[split:], loss], history[:split]  # the last BLOW_UP_STEPS losses, and those before
    uniform = math.log(vocab_size) if vocab_size is not None else math.inf
    bar = max(uniform - 1, min(before, default=math.inf) + 1)  # a random model's start has nothing before it
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        what = f"the loss ({loss}) or its gradient (norm {float(grad_norm)}) is not finite at step {step}"
    elif loss > uniform - 1 and grad_norm == 0:
        what = (
            f"the loss at step {step} ({loss:.4f}) is no better than a uniform guess over the vocabulary "
            f"(ln {vocab_size} = {uniform:.4f}) and its gradient is 0: the output no longer depends on the weights"
        )
    elif len(recent) == BLOW_UP_STEPS and min(recent) > bar:
        what = (
            f"the loss has been no better than a uniform guess over the vocabulary (ln {vocab_size} = {uniform:.4f}) "
            f"for {BLOW_UP_STEPS} steps, up from {min(before):.4f}: {loss:.4f} at step {step}"
        )
    else:
        return
    saved = next((path for path in (saved, saved.with_suffix("")) if path.exists()), None)
    raise FloatingPointError(
        f"{what}; stopped before updating the weights. "
        + (
            f"The last good checkpoint is {saved}: resume from it with a lower --train.learning_rate"
            if saved is not None
            else "Nothing was saved; try a lower --train.learning_rate"
        )
    )


def learning_rate(step: int, peak: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate of optimizer step `step` (counted from 0): a linear warmup to `peak` over `warmup_steps`,
    then a cosine decay to 0 at `max_steps`. A function of the step alone, so a resumed run needs nothing else,
    and may lower `peak`, e.g. after a NaN."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validate(
    fabric: Fabric,
    model: LLaMA,
    val_data: list[dict[str, torch.Tensor]],
    tokenizer: Tokenizer,
    state: dict,
    train: TrainArgs,
    ignore_index: int,
    chat_template: Optional[str] = None,
) -> None:
    """The loss per target token over the first train.eval_batches micro-batches of the test set (the same records
    every time, so the numbers compare), logged and added to state["history"], and an answer to SAMPLE_INSTRUCTION,
    greedy, to read how training goes: in the Alpaca prompt, or as the one user turn of a conversation in
    `chat_template` (that of data from prepare_chat.py). Leaves the model in training mode."""
    max_seq_length = min(train.max_seq_length, model.config.block_size)
    model.eval()
    n = min(len(val_data), train.eval_batches * train.micro_batch_size)
    micro_batches = [range(i, min(i + train.micro_batch_size, n)) for i in range(0, n, train.micro_batch_size)]
    mine = micro_batches[fabric.global_rank :: fabric.world_size]
    totals = torch.zeros(2, device=fabric.device)  # summed loss, target tokens
    # every device runs as many forward passes, since under FSDP each one gathers weights from all: a device left
    # without a micro-batch runs the first one again, and does not count it
    for i in range(math.ceil(len(micro_batches) / fabric.world_size)):
        counts = i < len(mine)
        micro_batch = mine[i] if counts else micro_batches[0]
        input_ids, targets, lengths = pack_batch([val_data[j] for j in micro_batch], max_seq_length)
        input_ids, targets = input_ids.to(fabric.device), targets.to(fabric.device)
        where = targets != ignore_index
        totals[0] += counts * cross_entropy_sum(model(input_ids, lengths=lengths, logits_at=where), targets[where])
        totals[1] += counts * where.sum()
    totals = fabric.all_reduce(totals, reduce_op="sum")
    val_loss = (totals[0] / totals[1].clamp(min=1)).item()
    step = state["step"]
    perplexity = math.exp(val_loss) if val_loss < 700 else math.inf  # a diverged run's loss may be in the 1000s
    fabric.print(f"\nStep {step}: validation loss {val_loss:.4f}, perplexity {perplexity:.2f}")
    if not is_fsdp(fabric):  # under FSDP every generated token would gather the whole model
        fabric.print(f"{SAMPLE_INSTRUCTION} -> {sample_answer(fabric, model, tokenizer, chat_template)!r}")
    state["history"]["val"].append((step, val_loss))
    fabric.log_dict({"val_loss": val_loss, "val_ppl": perplexity}, step)
    model.train()


def sample_answer(fabric: Fabric, model: LLaMA, tokenizer: Tokenizer, chat_template: Optional[str]) -> str:
    """The model's greedy answer to SAMPLE_INSTRUCTION, to read how training goes: in the Alpaca prompt, or as the one
    user turn of a conversation in `chat_template`. Empty under FSDP, where every new token would gather the whole
    model."""
    if is_fsdp(fabric):
        return ""
    prompt = encode_prompt(tokenizer, {"instruction": SAMPLE_INSTRUCTION, "input": ""}, chat_template)
    max_new_tokens = min(100, model.config.block_size - len(prompt))
    output = generate(model, prompt.to(fabric.device), max_new_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids)
    return tokenizer.decode(printable(output[len(prompt) :], tokenizer))


def finish(
    fabric: Fabric, history: dict[str, list[tuple[int, float]]], out_dir: Path, loss_name: str = "cross-entropy loss"
) -> None:
    """The end of a run: out_dir/loss.png (the y axis says `loss_name`), and the loggers flushed."""
    if fabric.global_rank == 0:
        plot_losses(history, out_dir / "loss.png", loss_name)
    for logger in fabric.loggers:
        logger.finalize("success")


def plot_losses(history: dict[str, list[tuple[int, float]]], path: Path, loss_name: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    figure = Figure(figsize=(8, 5))
    ax = figure.subplots()
    ax.plot(*zip(*history["train"]), label="train", linewidth=1)
    if history["val"]:
        ax.plot(*zip(*history["val"]), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(loss_name)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")
