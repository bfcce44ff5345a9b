"""The train state: what --resume needs to continue a run exactly where it stopped, and how it is written and read.

- `find_resume` (--resume: a file, a directory, or "auto" for the newest in --out_dir), `resume_settings` (what a
  resumed run must share with the one it continues), `start_state` (step 0, or with --resume `load_train_state`);
- `save_train_state`: the trained weights (those a function such as lora.is_lora_tensor accepts; every one by
  default), the optimizer state, the step, the loss history, the settings and every device's RNG state, in
  train_state.pt, or under --strategy fsdp as torch.distributed.checkpoint shards (`save_sharded_state`), which
  `load_train_state` reads back on any number of processes. It returns the weights whole on rank 0, from which a
  script writes its own checkpoint (the adapter, the fine-tuned model: the scripts' `save`), so that the two agree.

The data order and the learning rate are pure functions of the step (training.batch_indices, training.learning_rate),
so they need no saving. See howto/resume.md.
"""

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from lightning.fabric import Fabric
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from model import LLaMA
from training import TrainArgs, is_fsdp
from utils import one_line

STATE_NAME = "train_state.pt"  # in --out_dir: what --resume auto continues from (save_train_state)
SHARDED_STATE_NAME = "train_state"  # the same under --strategy fsdp: a directory of torch.distributed.checkpoint files
SHARDED_META_NAME = "meta.pt"  # in that directory: the step, loss history, settings and RNG states


def find_resume(resume: Optional[str], out_dir: Path) -> Optional[Path]:
    """--resume: a train state (a train_state.pt, or the train_state directory of a run with --strategy fsdp), or
    "auto" for out_dir's newest when there is one."""
    if resume == "auto":
        saved = [path for path in (out_dir / STATE_NAME, out_dir / SHARDED_STATE_NAME) if path.exists()]
        return max(saved, key=lambda path: path.stat().st_mtime, default=None)
    if resume is not None and not Path(resume).exists():
        raise FileNotFoundError(f"--resume {resume}: no such file (use --resume auto for the latest in --out_dir)")
    return None if resume is None else Path(resume)


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


def rng_states(fabric: Fabric) -> torch.Tensor:
    """Every device's RNG state, one row per rank."""
    if fabric.device.type == "cuda":
        rng = torch.cuda.get_rng_state(fabric.device)
    else:
        rng = torch.get_rng_state()
    return fabric.all_gather(rng.to(fabric.device)).reshape(fabric.world_size, -1).cpu()
