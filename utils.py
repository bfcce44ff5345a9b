"""Pieces every script needs: choosing a precision, loading a checkpoint directory, writing files atomically."""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import load_file

from model import LLaMA, Config


def default_precision(training: bool = False) -> str:
    """bf16 where CUDA supports it, else fp32: on CPUs bf16 matmuls are often hundreds of times slower."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed" if training else "bf16-true"
    return "32-true"


def precision_to_dtype(precision: str) -> torch.dtype:
    """The dtype weights are held in for a Fabric precision string ("bf16-true", "32-true", ...)."""
    dtypes = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "32-true": torch.float32}
    if precision not in dtypes:
        raise SystemExit(f"error: precision {precision!r} is not one of {', '.join(dtypes)}")
    return dtypes[precision]


def check_checkpoint_dir(checkpoint_dir: Path) -> None:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise SystemExit(f"error: checkpoint directory {checkpoint_dir} does not exist; see howto/download_weights.md")
    if not (checkpoint_dir / "lit_model.safetensors").is_file():
        raise SystemExit(
            f"error: {checkpoint_dir} has no lit_model.safetensors; run scripts/convert_hf_checkpoint.py "
            f"--checkpoint_dir {checkpoint_dir} first"
        )
    for name in ("model_config.json", "tokenizer.model"):
        if not (checkpoint_dir / name).is_file():
            raise SystemExit(f"error: {checkpoint_dir} has no {name}; see howto/download_weights.md")


def load_config(checkpoint_dir: Path) -> Config:
    check_checkpoint_dir(checkpoint_dir)
    return Config.from_file(Path(checkpoint_dir) / "model_config.json")


def load_model(checkpoint_dir: Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None) -> LLaMA:
    """Builds the model on the meta device (no memory) and assigns the checkpoint's tensors to it, so
    peak memory stays close to the weights' size instead of twice that."""
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        model = LLaMA(config)
    state_dict = load_file(Path(checkpoint_dir) / "lit_model.safetensors", device=str(device))
    if dtype is not None:
        for name in state_dict:  # one tensor at a time, so two copies of the model never coexist
            state_dict[name] = state_dict[name].to(dtype)
    load_weights(model, state_dict, Path(checkpoint_dir) / "lit_model.safetensors")
    return model


def load_weights(model: LLaMA, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Assigns `state_dict` to a model built on the meta device; the output head is re-tied when
    the config ties it to the embedding (safetensors files hold a shared tensor only once).

    Modules that add to the base model (LoRA's A and B in a model built inside lora.lora(), marked
    `adapter = True`) are not in a base checkpoint: they are created beside the weights, on their
    device and in their dtype, and initialised by their own `reset_parameters()`."""
    _, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    for module in model.modules():
        if getattr(module, "adapter", False) and all(p.is_meta for p in module.parameters()):
            module.to_empty(device=model.embed.weight.device).to(model.embed.weight.dtype)
            module.reset_parameters()
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing or unexpected:
        raise SystemExit(
            f"error: {source} does not match model_config.json (missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` and renames it to `path` only once writing succeeded,
    so an interrupted run never leaves a half-written file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
