"""The parts the fine-tuning scripts (finetune_lora.py, finetune_adapter.py, finetune_full.py, finetune_dpo.py) build
their runs from. Each script tells its own story (setup: the flags and every check; main: the model and the
optimizer; fit: the training loop and its step, in plain view; the checkpoints) and calls these parts, listed here in
the order a run uses them:

- before any model is loaded or process started: `TrainArgs` (the --train.* flags), `check_batch_sizes`,
  `find_resume` (the data itself: data.load_prepared_data);
- the run: `make_fabric` (devices, strategy, precision, loggers, seed; the script then calls fabric.launch;
  --strategy fsdp is FSDP2, `shard_model`, applied by fabric.setup_module), `is_fsdp`, `compile_blocks`,
  `make_optimizer`, and where it starts: `resume_settings`, `start_state` (with `load_train_state`);
- each step of the loop: `Progress` (the plan, the bar and the logged figures), `batch_indices` (the step's records),
  `pack_batch` (a micro-batch in one row), `cross_entropy_sum` (the loss over the logits; `token_cross_entropy` per
  target, with `TokenCrossEntropy`),
  `stop_if_diverged` (the stop on a loss or gradient that is not finite, or a loss stuck at a uniform guess),
  `learning_rate` (the step's rate);
- between steps: `validate` (the validation loss and a sample answer, `sample_answer`) and `save_train_state` (what
  --resume needs, sharded under FSDP; it returns the weights whole on rank 0, for the script's own checkpoint; with
  the adapter beside it: `save_adapter_and_state`);
- at the end: `finish` (the loss plot, the loggers).

The data order and the learning rate are pure functions of the step, so a resumed run continues exactly.
"""

import importlib.util
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from adapter import adapter, is_adapter_tensor, load_adapter_state_dict, save_adapter_checkpoint
from data import encode_prompt
from decode import generate, printable
from lora import is_lora_tensor, load_lora_state_dict, lora, save_lora_checkpoint
from model import LLaMA
from quantize import make_bnb_optimizer
from tokenizer import Tokenizer
from utils import one_line, peak_memory_gb

STATE_NAME = "train_state.pt"  # in --out_dir: what --resume auto continues from (save_train_state)
SHARDED_STATE_NAME = "train_state"  # the same under --strategy fsdp: a directory of torch.distributed.checkpoint files
SHARDED_META_NAME = "meta.pt"  # in that directory: the step, loss history, settings and RNG states
# steps a loss must stay near a uniform guess to count as diverged (stop_if_diverged); a spike of the tests' overfitting
# run (LoRA at learning rate 3e-2) lasted 2: 27.7 and 12.0 after 3.5, then 5.2
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
        gradient_checkpointing: recompute each Block's activations in the backward pass: far less memory for about
            1/3 more time.
        compile: compile each Block with torch.compile (inductor), which fuses RMSNorm, the rotary embeddings, SwiGLU
            and LoRA's small products into a few kernels; the first step then takes longer (the time is printed).
            By default on CUDA GPUs, unless the base is quantized (--quantize) or sharded (--strategy fsdp, with
            which it does not work), and off on CPUs, where its steps are no faster (though a third smaller in
            memory: howto/finetune_lora.md).
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


def find_resume(resume: Optional[str], out_dir: Path) -> Optional[Path]:
    """--resume: a train state (a train_state.pt, or the train_state directory of a run with --strategy fsdp), or
    "auto" for out_dir's newest when there is one."""
    if resume == "auto":
        saved = [path for path in (out_dir / STATE_NAME, out_dir / SHARDED_STATE_NAME) if path.exists()]
        return max(saved, key=lambda path: path.stat().st_mtime, default=None)
    if resume is not None and not Path(resume).exists():
        raise FileNotFoundError(f"--resume {resume}: no such file (use --resume auto for the latest in --out_dir)")
    return None if resume is None else Path(resume)


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


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """--train.optimizer: torch's AdamW, or one of bitsandbytes' 8-bit or paged variants
    (quantize.make_bnb_optimizer)."""
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return make_bnb_optimizer(name, params, lr, weight_decay)


def resume_settings(model: LLaMA, train: TrainArgs, n_records: int, **extra) -> dict:
    """What a resumed run must share with the run it continues (`load_train_state` checks it): the model's config, what
    decides the batches (their size, the seed, the number of records), the optimizer, and the script's `extra`."""
    return {
        "model": asdict(model.config),
        "batch_size": train.batch_size,
        "seed": train.seed,
        "train_records": n_records,
        "optimizer": train.optimizer,
        **extra,
    }


def start_state(
    fabric: Fabric, resume: Optional[Path], model: LLaMA, optimizer: torch.optim.Optimizer, settings: dict
) -> dict:
    """A new run's step and loss history, or, with --resume, those `load_train_state` restores."""
    if resume is None:
        return {"step": 0, "history": {"train": [], "val": []}}
    return load_train_state(fabric, resume, model, optimizer, settings)


def load_train_state(
    fabric: Fabric,
    path: Path,
    model: LLaMA,
    optimizer: torch.optim.Optimizer,
    settings: dict,
) -> dict:
    """Restores what `save_train_state` wrote into the model and optimizer, and the RNG states; returns the state the
    script saved (the step, the loss history and whatever else it keeps there, such as finetune_dpo.py's precomputed
    reference log-probabilities). The data position and the learning rate follow from the step. A state of a run
    with other `settings` is refused, naming the differences. A sharded state (a directory) loads on any number of
    processes, sharded or not: each reads the parts of the saved shards its own parameters cover."""
    sharded = path.is_dir()
    try:  # mmap: no tensor is read
        saved = torch.load(path / SHARDED_META_NAME if sharded else path, weights_only=True, mmap=not sharded)
        saved_settings = saved["settings"]
    except Exception as e:  # not a file torch.save wrote, or not one of ours
        raise ValueError(f"--resume {path} is not a {STATE_NAME} of a fine-tuning script ({one_line(e)})") from None
    theirs, ours = (
        ", ".join(sorted(set(saved_settings) - set(settings))),
        ", ".join(sorted(set(settings) - set(saved_settings))),
    )
    if theirs or ours:  # e.g. a LoRA run's "lora" where this run has "adapter"
        raise ValueError(
            f"--resume {path} was saved by another fine-tuning script (its own settings: {theirs or 'none'}; "
            f"this script's: {ours or 'none'}); resume it with the script that saved it"
        )
    differences = [
        f"{key}={saved_settings.get(key)} (now: {value})"
        for key, value in settings.items()
        if saved_settings.get(key) != value
    ]
    if differences:
        raise ValueError(
            f"--resume {path} was saved by a run with other settings: {'; '.join(differences)}; "
            "resume with the same checkpoint, data, LoRA and batch settings"
        )
    try:
        if sharded:
            load_sharded_state(path, model, optimizer)
        elif is_fsdp(fabric):  # a train_state.pt of a run on one device or DDP
            load_whole_state(saved, model, optimizer)
        else:  # strict=False: a LoRA run's file holds LoRA's weights only
            fabric.load(path, {"model": model, "optimizer": optimizer}, strict=False, weights_only=True)
    except Exception as e:  # e.g. a state of another version of this script
        raise ValueError(f"--resume {path} does not fit this run ({one_line(e)})") from None
    fabric.print(f"Resuming from {path} at step {saved['step']}")
    # the RNG as each device left it (with another device count, the nearest)
    rng = saved["rng"][fabric.global_rank % len(saved["rng"])].clone()  # a row at an offset crashes set_rng_state
    if fabric.device.type == "cuda":
        torch.cuda.set_rng_state(rng, fabric.device)
    else:
        torch.set_rng_state(rng)
    return {key: value for key, value in saved.items() if key not in ("settings", "rng", "model", "optimizer")}


def load_sharded_state(directory: Path, model: LLaMA, optimizer: torch.optim.Optimizer) -> None:
    """The weights and optimizer state of a sharded train state (`save_sharded_state`) into `model` and `optimizer`,
    sharded or not (torch.distributed.checkpoint reshards: each process reads what its parameters cover)."""
    module, optimizer = unwrapped(model, optimizer)
    saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata  # "model.<name>", "optimizer.<...>"
    weights = {name: tensor for name, tensor in get_model_state_dict(module).items() if f"model.{name}" in saved}
    optimizer_state = get_optimizer_state_dict(module, optimizer)
    no_dist = not torch.distributed.is_initialized()  # one process, no FSDP: it reads every shard itself
    dcp.load({"model": weights, "optimizer": optimizer_state}, checkpoint_id=directory, no_dist=no_dist)
    set_model_state_dict(module, weights, options=StateDictOptions(strict=False))  # a LoRA run's: LoRA's alone
    set_optimizer_state_dict(module, optimizer, optimizer_state)


def load_whole_state(saved: dict, model: LLaMA, optimizer: torch.optim.Optimizer) -> None:
    """The weights and optimizer state of a train_state.pt (`saved`, memory-mapped) into a sharded model and its
    optimizer: each process takes its shards of the whole tensors."""
    module, optimizer = unwrapped(model, optimizer)
    options = StateDictOptions(full_state_dict=True, strict=False)  # a LoRA run's: LoRA's weights alone
    set_model_state_dict(module, saved["model"], options=options)
    # optimizer.state_dict() numbers the parameters in the optimizer's order; set_optimizer_state_dict takes names
    names = {param: name for name, param in module.named_parameters()}
    order = [names[param] for group in optimizer.param_groups for param in group["params"]]
    state = saved["optimizer"]
    named = {
        "state": {order[i]: tensors for i, tensors in state["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(module, optimizer, named, options=options)


def unwrapped(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer inside Fabric's wrappers (fabric.setup_module, fabric.setup_optimizers)."""
    return getattr(model, "module", model), getattr(optimizer, "optimizer", optimizer)


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


def pack_batch(
    samples: list[dict[str, torch.Tensor]], max_seq_length: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Inputs (1, N) and next-token targets (1, N) of a micro-batch of prepared records (prepare_alpaca.py's
    {"input_ids", "labels"}, labels not shifted), each cut to `max_seq_length` tokens and then packed one after
    another into a single row, and the length of each record's part (`LLaMA.forward`'s `lengths`).

    Packed, not padded to the longest record: a padding position costs as much compute and memory as a token,
    and in a micro-batch of instruction records of mixed lengths a third of the positions would be padding.
    The model keeps the records apart (each attends only to itself, from position 0), so the logits are those
    of each record on its own."""
    samples = [{key: sample[key][:max_seq_length] for key in ("input_ids", "labels")} for sample in samples]
    input_ids = torch.cat([sample["input_ids"][:-1] for sample in samples])
    targets = torch.cat([sample["labels"][1:] for sample in samples])  # position t predicts token t + 1
    return input_ids[None], targets[None], [len(sample["input_ids"]) - 1 for sample in samples]


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of `logits` (..., vocab_size) against `targets` (...), summed over every target: ask the
    model for logits only where there is one (`LLaMA.forward`'s `logits_at`: `targets != ignore_index`).

    A sum, not a mean: the fine-tuning loops divide by the number of targets in the whole batch, which spans
    micro-batches and devices. Two things make it cheaper than F.cross_entropy over all the logits, with the same
    value and gradient: the output head, a step's largest matrix product at a vocabulary of 32000, only computes
    logits where there is a target (in instruction data the prompt, and padding if any, have none: often more than
    half of the positions), and, when there is a gradient to compute, TokenCrossEntropy keeps one tensor of the
    logits' size instead of three (hand it logits nothing else needs)."""
    return token_cross_entropy(logits, targets).sum()


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of each target (N,), in fp32 (float64 for float64 logits): minus the log-probability the
    logits (..., vocab_size) give it, with `cross_entropy_sum`'s economy of memory. finetune_dpo.py sums it per
    answer."""
    logits, targets = logits.flatten(0, -2), targets.flatten()
    if torch.is_grad_enabled() and logits.requires_grad:
        return TokenCrossEntropy.apply(logits, targets)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(x, targets, reduction="none")  # evaluation: no gradient to keep


class TokenCrossEntropy(torch.autograd.Function):
    """The cross-entropy of each row of logits (N, vocab) against targets (N,), which computes its gradient, softmax
    minus one-hot, already in the forward pass, a chunk of rows at a time, into the logits' own memory.

    F.cross_entropy keeps a log-softmax as large as the logits for the backward pass and allocates two more
    tensors that size in it (the gradients of the log-softmax and of the logits), in fp32 even for bf16 logits.
    Here the logits' memory is the only one: it ends up holding the gradient, in the logits' dtype, and fp32
    temporaries exist for one chunk at a time. The logits are `token_cross_entropy`'s own, needed by nothing else
    (a later use would be caught: the in-place writes advance their version counter)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        losses = torch.empty(logits.size(0), device=logits.device, dtype=dtype)
        chunk_size = max(1, 2**22 // logits.size(1))  # rows per chunk: 16 MB in fp32
        for start in range(0, logits.size(0), chunk_size):
            chunk, target = logits[start : start + chunk_size], targets[start : start + chunk_size]
            x = chunk.to(dtype)  # the chunk itself when the logits are fp32 (or float64), else an fp32 copy of it
            log_z = torch.logsumexp(x, dim=1)
            losses[start : start + chunk_size] = log_z - x.gather(1, target[:, None]).squeeze(1)
            x = x.sub_(log_z[:, None]).exp_()  # softmax
            x[torch.arange(len(target), device=x.device), target] -= 1
            chunk.copy_(x)  # the gradient, where the logits were
        ctx.save_for_backward(logits)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)[:, None]), None  # in place: the graph is backpropagated once


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


def save_train_state(
    fabric: Fabric,
    path: Path,
    model: LLaMA,
    optimizer: torch.optim.Optimizer,
    state: dict,
    settings: dict,
    only: Optional[Callable[[str], bool]] = None,
) -> dict[str, torch.Tensor]:
    """Writes what --resume needs to `path` (a train_state.pt): the trained weights (those whose names `only` accepts
    when it is given, such as lora.is_lora_tensor: the frozen base is not saved), the optimizer state, the step and
    loss history, the `settings` a resumed run must share, and every device's RNG state (LoRA dropout draws from it).
    Rank 0 writes it with torch.save, under a temporary name renamed
    when complete: a run killed while saving keeps the previous one. Under FSDP every device writes its shards
    instead, into the directory `path` without its suffix (`save_sharded_state`).

    Returns the weights it saved, whole, on rank 0 ({} on the others): what a script writes for use (the adapter, the
    checkpoint), so that it always agrees with the train state. Under FSDP they are gathered one at a time to rank 0's
    CPU."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = (lambda name: True) if only is None else only
    rest = {**state, "settings": settings, "rng": rng_states(fabric)}
    if is_fsdp(fabric):
        return save_sharded_state(fabric, path.with_suffix(""), model, optimizer, rest, keep)
    weights = {name: tensor for name, tensor in model.state_dict().items() if keep(name)}
    if fabric.global_rank == 0:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({**rest, "model": weights, "optimizer": optimizer.state_dict()}, tmp)
        os.replace(tmp, path)
    fabric.barrier()
    return weights if fabric.global_rank == 0 else {}


def save_sharded_state(
    fabric: Fabric,
    directory: Path,
    model: LLaMA,
    optimizer: torch.optim.Optimizer,
    rest: dict,
    keep: Callable[[str], bool],
) -> dict[str, torch.Tensor]:
    """save_train_state under FSDP: the weights `keep` selects and the optimizer state as torch.distributed.checkpoint
    files, each device writing its own shards (no device ever holds them whole), and `rest` in meta.pt. They go into
    a new directory beside `directory`; then `directory`, a link, is switched to it in one rename (a run killed while
    saving keeps the previous state) and the previous one is removed. Returns the weights, whole, on rank 0."""
    module, optimizer = unwrapped(model, optimizer)
    new = fabric.broadcast(
        tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent) if fabric.global_rank == 0 else None
    )
    weights = {name: tensor for name, tensor in get_model_state_dict(module).items() if keep(name)}
    dcp.save({"model": weights, "optimizer": get_optimizer_state_dict(module, optimizer)}, checkpoint_id=new)
    if fabric.global_rank == 0:
        torch.save(rest, Path(new) / SHARDED_META_NAME)
        link = directory.with_name(f".{directory.name}.link")
        link.unlink(missing_ok=True)
        link.symlink_to(Path(new).name)
        os.replace(link, directory)
        for old in directory.parent.glob(f".{directory.name}-*"):
            if old.name != Path(new).name:
                shutil.rmtree(old)
    fabric.barrier()
    whole = {}
    for name, tensor in weights.items():  # one at a time: a device holds at most one whole tensor more
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if fabric.global_rank == 0:
            whole[name] = tensor.cpu()
    return whole


def save_adapter_and_state(
    fabric: Fabric,
    model: LLaMA,
    optimizer: torch.optim.Optimizer,
    state: dict,
    settings: dict,
    adapter_path: Path,
    chat_template: Optional[str],
    training: Optional[dict] = None,
) -> None:
    """A LoRA or LLaMA-Adapter run's checkpoint (settings["lora"] or settings["adapter"] say which): train_state.pt
    beside `adapter_path` (`save_train_state`: the adapter's tensors and what --resume needs), then the adapter at
    `adapter_path` from the tensors just saved in it, so the two always agree. The adapter records the chat template
    of conversation data, which generate_lora.py and generate_adapter.py then prompt in, and `training`, how it was
    trained, if given (finetune_dpo.py's method and settings). Both are written under a temporary name and renamed
    when complete."""
    path = adapter_path.parent / STATE_NAME
    if "adapter" in settings:  # finetune_adapter.py's; v2 also trains the norms, which only the settings tell
        v2 = settings["adapter"]["version"] == 2
        kind, trained = adapter(**settings["adapter"]), partial(is_adapter_tensor, v2=v2)
        load_tensors, write = load_adapter_state_dict, save_adapter_checkpoint
    else:
        kind, trained = lora(**settings["lora"]), is_lora_tensor
        load_tensors, write = load_lora_state_dict, save_lora_checkpoint
    weights = save_train_state(fabric, path, model, optimizer, state, settings, only=trained)  # whole, on rank 0
    if fabric.global_rank == 0:
        with torch.device("meta"), kind:
            skeleton = LLaMA(model.config)  # no memory: only the adapter's tensors below are real
        load_tensors(skeleton, weights, path)
        write(skeleton, adapter_path, chat_template, training)  # atomic too
    fabric.barrier()


def rng_states(fabric: Fabric) -> torch.Tensor:
    """Every device's RNG state, one row per rank."""
    if fabric.device.type == "cuda":
        rng = torch.cuda.get_rng_state(fabric.device)
    else:
        rng = torch.get_rng_state()
    return fabric.all_gather(rng.to(fabric.device)).reshape(fabric.world_size, -1).cpu()


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
