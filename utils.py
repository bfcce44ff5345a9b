"""Pieces the scripts share: choosing a precision, loading a checkpoint directory (quantized if asked), writing files
atomically, and the optimizer, batches and loss of fine-tuning (finetune_lora.py, finetune_full.py,
benchmarks/finetune_vs_hf.py)."""

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
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


def load_model(
    checkpoint_dir: Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None
) -> LLaMA:
    """Builds the model on the meta device (no memory) and assigns the checkpoint's tensors to it, so
    peak memory stays close to the weights' size instead of twice that.

    `quantize` (one of QUANTIZE_MODES) holds the projections in 4 or 8 bits with bitsandbytes: they are swapped for
    bitsandbytes' layers while still on the meta device, and each weight is quantized as it is moved to `device`, one
    tensor at a time, so the full-precision model never exists there, nor in CPU memory. See howto/quantize.md."""
    config = load_config(checkpoint_dir)
    path = Path(checkpoint_dir) / "lit_model.safetensors"
    with torch.device("meta"):
        model = LLaMA(config)
        if quantize is not None:
            use_bitsandbytes_layers(model, quantize, dtype)
    if quantize is not None:
        load_weights(model, load_quantized(model, path, device, dtype), path)
        return model
    state_dict = load_file(path, device=str(device))
    if dtype is not None:
        for name in state_dict:  # one tensor at a time, so two copies of the model never coexist
            state_dict[name] = state_dict[name].to(dtype)
    load_weights(model, state_dict, path)
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


# --quantize: how bitsandbytes holds the frozen projections. nf4 (QLoRA's 4-bit NormalFloat) and fp4 store 4 bits per
# weight plus one scale per block of 64; "-dq" quantizes those scales too (double quantization); int8 is LLM.int8()
QUANTIZE_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8")


def use_bitsandbytes_layers(model: LLaMA, mode: str, dtype: Optional[torch.dtype] = None) -> None:
    """Swaps every projection of a model on the meta device for an empty bitsandbytes layer: Linear4bit, computing in
    `dtype` (by default the input's), or Linear8bitLt for int8. A LoRA layer (lora.LoRALinear, whose forward adds its
    update to super().forward) becomes a LoRALinear on the bitsandbytes layer instead of nn.Linear (QLoRA). A head tied
    to the embedding stays as it is: its weight is the embedding's. The weights are quantized by `load_quantized`."""
    if mode not in QUANTIZE_MODES:
        raise SystemExit(f"error: --quantize {mode!r} is not one of {', '.join(QUANTIZE_MODES)}")
    bnb = import_bitsandbytes()
    if mode == "bnb.int8":  # threshold 6: input columns with outliers are multiplied in 16 bits, as in the paper
        base, settings = bnb.nn.Linear8bitLt, dict(has_fp16_weights=False, threshold=6.0)
    else:
        quant_type, compress_statistics = mode.removeprefix("bnb.").removesuffix("-dq"), mode.endswith("-dq")
        base, settings = bnb.nn.Linear4bit, dict(compute_dtype=dtype, quant_type=quant_type, compress_statistics=compress_statistics)
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, nn.Linear) or (name == "lm_head" and model.config.tie_embeddings):
            continue
        if hasattr(layer, "lora"):  # its LoRA A and B are created anew, on meta, and initialised by load_weights
            lora = layer.lora
            quantized = on_base(type(layer), base)(layer.in_features, layer.out_features, lora.r, lora.alpha, lora.dropout.p, **settings)
        else:
            quantized = base(layer.in_features, layer.out_features, bias=False, **settings)
        model.set_submodule(name, quantized)


@cache
def on_base(layer_class: type, base: type) -> type:
    """`layer_class` (an nn.Linear subclass) with `base` (a bitsandbytes layer) between it and nn.Linear."""
    return type(f"{layer_class.__name__}_{base.__name__}", (layer_class, base), {})


def load_quantized(model: LLaMA, path: Path, device: torch.device | str, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Reads the checkpoint one tensor at a time: the weight of each bitsandbytes layer is quantized as it moves to
    `device` (on the GPU, only that one layer is there in full precision, for a moment); returns the other tensors
    (embedding, norms), on `device` in `dtype`, for load_weights."""
    bnb = import_bitsandbytes()
    quantized = {f"{name}.weight": layer for name, layer in model.named_modules() if isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    rest = {}
    with safe_open(path, framework="pt") as f:
        names = list(f.keys())
    for name in names:
        # the file is opened anew for each tensor: the pages of an open (memory-mapped) file that were read count as the
        # process's memory until it is closed, and would add up to the whole full-precision checkpoint
        with safe_open(path, framework="pt") as f:
            tensor = f.get_tensor(name) if dtype is None else f.get_tensor(name).to(dtype)
        layer = quantized.get(name)
        if isinstance(layer, bnb.nn.Linear4bit):  # the meta weight knows the mode's settings
            old = layer.weight
            layer.weight = bnb.nn.Params4bit(
                tensor, requires_grad=False, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                quant_type=old.quant_type, quant_storage=old.quant_storage, module=layer,
            ).to(device)  # quantizes
        elif layer is not None:
            layer.weight = bnb.nn.Int8Params(tensor, requires_grad=False, has_fp16_weights=False).to(device)  # quantizes
        else:
            rest[name] = tensor.to(device)
    return rest


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, imported only where it is used: the import alone takes seconds."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise SystemExit(f"error: --quantize and the 8-bit optimizers need bitsandbytes ({e}); pip install bitsandbytes") from None
    # LLM.int8() multiplies in fp16 by design; bitsandbytes would log that at every product of fp32 or bf16 inputs
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bitsandbytes


OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "PagedAdamW")


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, from torch, or one of bitsandbytes' variants. AdamW8bit holds the two moments in 8 bits per value (one
    quarter of AdamW's optimizer memory; tensors under 4096 values keep 32 bits). The paged ones (CUDA only) keep
    their state in memory that the driver pages out to the CPU when the GPU runs out, instead of failing; on CPU
    bitsandbytes runs them unpaged (PagedAdamW8bit = AdamW8bit there)."""
    if name not in OPTIMIZERS:
        raise SystemExit(f"error: --optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    params = list(params)
    if name.startswith("Paged") and params[0].device.type != "cuda":
        print(f"note: --optimizer {name} pages its state only on CUDA; on {params[0].device.type} it runs unpaged", file=sys.stderr)
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")  # bitsandbytes' own note
    return getattr(import_bitsandbytes().optim, name)(params, lr=lr, weight_decay=weight_decay)


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


def cross_entropy_sum(
    model: LLaMA, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    lengths: Optional[list[int]] = None,
) -> torch.Tensor:
    """The model's cross-entropy on `input_ids` (B, T), summed over the `targets` (B, T) that are not `ignore_index`;
    `lengths` as `pack_batch` returns them for packed records.

    A sum, not a mean: the fine-tuning loops divide by the number of targets in the whole batch, which spans
    micro-batches and devices. Two things make it cheaper than F.cross_entropy over model(input_ids), with the
    same value and gradient: the output head, a step's largest matrix product at a vocabulary of 32000, only
    computes logits where there is a target (in instruction data the prompt, and padding if any, have none:
    often more than half of the positions), and CrossEntropySum keeps one tensor of the logits' size instead of three."""
    where = targets != ignore_index
    # the head's input (B, T, n_embd) -> (n_targets, n_embd); `model` may be a Fabric, DDP or FSDP wrapper
    hook = model.lm_head.register_forward_pre_hook(lambda head, args: (args[0][where],))
    try:
        logits = model(input_ids, lengths=lengths)  # (n_targets, vocab_size)
    finally:
        hook.remove()
    if torch.is_grad_enabled() and logits.requires_grad:
        return CrossEntropySum.apply(logits, targets[where])
    return F.cross_entropy(logits.float(), targets[where], reduction="sum")  # evaluation: no gradient to keep


class CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of logits (N, vocab) and targets (N,) that computes its gradient, softmax minus
    one-hot, already in the forward pass, a chunk of rows at a time, into the logits' own memory.

    F.cross_entropy keeps a log-softmax as large as the logits for the backward pass and allocates two more
    tensors that size in it (the gradients of the log-softmax and of the logits), in fp32 even for bf16 logits.
    Here the logits' memory is the only one: it ends up holding the gradient, in the logits' dtype, and fp32
    temporaries exist for one chunk at a time. The logits are `cross_entropy_sum`'s own, needed by nothing else
    (a later use would be caught: the in-place writes advance their version counter)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = torch.zeros((), device=logits.device, dtype=torch.float32)
        chunk_size = max(1, 2**22 // logits.size(1))  # rows per chunk: 16 MB in fp32
        for start in range(0, logits.size(0), chunk_size):
            chunk, target = logits[start : start + chunk_size], targets[start : start + chunk_size]
            x = chunk.float()  # the chunk itself when the logits are fp32, else an fp32 copy of it
            log_z = torch.logsumexp(x, dim=1)
            loss += (log_z - x.gather(1, target[:, None]).squeeze(1)).sum()
            x = x.sub_(log_z[:, None]).exp_()  # softmax
            x[torch.arange(len(target), device=x.device), target] -= 1
            chunk.copy_(x)  # the gradient, where the logits were
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None  # in place: the graph is backpropagated once
