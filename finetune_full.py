"""Fine-tunes every weight of a converted LLaMA checkpoint on instruction data prepared by prepare_alpaca.py.

    python finetune_full.py --data_dir data/alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --devices 8 --strategy fsdp

The same training loop as finetune_lora.py, but all weights learn. That takes about 16 bytes per parameter
(fp32 weights, gradients and AdamW's two moments) before activations: 110 GB for a 7B model, so beyond small
models it needs several GPUs with --strategy fsdp, which shards all of it across them (and recomputes each
Block's activations in the backward pass). See howto/finetune_full.md. Every --train.save_interval steps, out_dir
receives step-NNNNNN/ and, at the end, out_dir itself: a complete checkpoint directory (lit_model.safetensors,
model_config.json, the tokenizer's files) for generate.py, and each time train_state.pt, from which --resume continues.
"""

from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Optional

import torch
from lightning.fabric import Fabric
from safetensors.torch import save_file
from torch.optim import Optimizer

from model import LLaMA
from tokenizer import Tokenizer
from training import (
    STATE_NAME,
    TrainArgs,
    check_batch_sizes,
    compile_blocks,
    find_resume,
    finish,
    is_fsdp,
    launch,
    load_data,
    make_optimizer,
    resume_settings,
    save_train_state,
    start_state,
    train_steps,
    validate,
)
from utils import atomic_path, cli, copy_tokenizer, load_model, precision_to_dtype


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
    train_data, val_data, metadata = load_data(data_dir, checkpoint_dir)
    ignore_index, chat_template = metadata["ignore_index"], metadata.get("chat_template")  # a template: conversations
    tokenizer = Tokenizer(checkpoint_dir)  # for the sample answers of validate
    resume = find_resume(resume, out_dir)
    train = train.for_records(len(train_data))  # max_steps from epochs, unless given
    launch(main, SimpleNamespace(**locals()))  # main on every device, seeded, in --precision (by device by default)


def main(fabric: Fabric, args: SimpleNamespace) -> None:
    # The model, every weight trainable. Under mixed precision the weights stay in fp32 (bf16 would round small
    # updates away) and Fabric computes in bf16. FSDP starts from a copy on the CPU and moves each Block's shard
    # to its device. The result is saved in the dtype the checkpoint came in.
    fsdp = is_fsdp(fabric)
    model = load_model(args.checkpoint_dir, device="cpu" if fsdp else fabric.device)
    args.save_dtype = model.embed.weight.dtype
    model = model.to(precision_to_dtype(args.precision.replace("bf16-mixed", "32-true")))
    model.gradient_checkpointing = args.train.gradient_checkpointing and not fsdp  # FSDP checkpoints each Block itself
    compile_blocks(fabric, model, args.train)  # --train.compile: by default on CUDA
    fabric.print(f"Trainable parameters: {sum(param.numel() for param in model.parameters()):,} (all)")
    model = fabric.setup_module(model)

    # The optimizer (AdamW or one of bitsandbytes' variants) over all weights; train_step sets its learning rate
    train = args.train
    optimizer = make_optimizer(train.optimizer, model.parameters(), train.learning_rate, train.weight_decay)
    optimizer = fabric.setup_optimizers(optimizer)

    settings = resume_settings(model, train, len(args.train_data))
    state = start_state(fabric, args.resume, model, optimizer, settings)

    # The training loop; each step (training.train_step) is a batch, its loss and gradients, and every weight's update
    for step in train_steps(fabric, model, optimizer, state, args.train_data, train, args.ignore_index, args.out_dir):
        if step % train.eval_interval == 0 or step == train.max_steps:
            validate(fabric, model, args.val_data, args.tokenizer, state, train, args.ignore_index, args.chat_template)
        if step % train.save_interval == 0 and step < train.max_steps:  # a checkpoint directory and train_state.pt
            save(fabric, model, optimizer, state, settings, args.out_dir / f"step-{step:06d}", args)

    save(fabric, model, optimizer, state, settings, args.out_dir, args)
    fabric.print(
        f"Saved the fine-tuned checkpoint to {args.out_dir} (lit_model.safetensors, model_config.json, "
        "the tokenizer's files)"
    )
    finish(fabric, state["history"], args.out_dir)


def save(
    fabric: Fabric,
    model: LLaMA,
    optimizer: Optimizer,
    state: dict,
    settings: dict,
    checkpoint_dir: Path,
    args: SimpleNamespace,
) -> None:
    """Writes out_dir/train_state.pt (training.save_train_state: every weight and what --resume needs), then a
    checkpoint directory for generate.py at `checkpoint_dir`, in the dtype the run started from. Every file is written
    under a temporary name and renamed when complete: a run killed while saving keeps the previous checkpoint."""
    path = args.out_dir / STATE_NAME
    save_train_state(fabric, path, model, optimizer, state, settings)
    if fabric.global_rank == 0:
        # under FSDP only the file just written holds the gathered weights (mmap: read as they are written out)
        weights = torch.load(path, weights_only=True, mmap=True)["model"] if is_fsdp(fabric) else model.state_dict()
        if model.config.tie_embeddings:
            del weights["lm_head.weight"]  # the embedding's, stored once
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(checkpoint_dir / "lit_model.safetensors") as tmp:
            save_file({name: t.to(args.save_dtype) for name, t in weights.items()}, tmp, metadata={"format": "pt"})
        with atomic_path(checkpoint_dir / "model_config.json") as tmp:
            model.config.to_file(tmp)
        copy_tokenizer(args.checkpoint_dir, checkpoint_dir)
    fabric.barrier()


if __name__ == "__main__":
    cli(setup, as_positional=False)
