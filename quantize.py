"""Quantization with bitsandbytes: the frozen projections held in 4 or 8 bits (--quantize, QLoRA), and the choice of
optimizer (--train.optimizer: torch's AdamW, or bitsandbytes' 8-bit and paged ones). See howto/quantize.md.

bitsandbytes' own layers and optimizers, not a re-implementation: they are what QLoRA was published with, what
PEFT and transformers use, and they run on CUDA and (slower) on the CPU. utils.load_model calls `swap_in_layers`
on a model still on the meta device, then `quantize_weight` for each projection's weight as it reads the checkpoint.
"""

import logging
import sys
import warnings
from types import ModuleType
from typing import Iterable, Optional

import torch
import torch.nn as nn

# how bitsandbytes holds the frozen projections. nf4 (QLoRA's 4-bit NormalFloat) and fp4 store 4 bits per weight plus
# one scale per block of 64; "-dq" quantizes those scales too (double quantization); int8 is LLM.int8()
QUANTIZE_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8")
BNB_OPTIMIZERS = ("AdamW8bit", "PagedAdamW8bit", "PagedAdamW")


def check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"--quantize {mode!r} is not one of {', '.join(QUANTIZE_MODES)}")


def swap_in_layers(model: nn.Module, mode: str, dtype: Optional[torch.dtype] = None) -> None:
    """Swaps every projection of a model on the meta device for an empty bitsandbytes layer: Linear4bit, computing in
    `dtype` (by default the input's), or Linear8bitLt for int8. A LoRA layer (lora.LoRALinear, whose forward adds its
    update to super().forward) becomes a LoRALinear on the bitsandbytes layer instead of nn.Linear (QLoRA). A head tied
    to the embedding stays as it is: its weight is the embedding's. `quantize_weight` fills in the weights."""
    check_mode(mode)
    bnb = import_bitsandbytes()
    if mode == "bnb.int8":  # threshold 6: input columns with outliers are multiplied in 16 bits, as in the paper
        base, settings = bnb.nn.Linear8bitLt, dict(has_fp16_weights=False, threshold=6.0)
    else:
        quant_type, compress_statistics = mode.removeprefix("bnb.").removesuffix("-dq"), mode.endswith("-dq")
        base, settings = (
            bnb.nn.Linear4bit,
            dict(compute_dtype=dtype, quant_type=quant_type, compress_statistics=compress_statistics),
        )
    from adapter import AdapterV2Linear  # here: both import utils, which imports this module
    from lora import LoRALinear

    for name, layer in list(model.named_modules()):
        if not isinstance(layer, nn.Linear) or (name == "lm_head" and model.config.tie_embeddings):
            continue
        if isinstance(layer, AdapterV2Linear):
            raise ValueError(
                "LLaMA-Adapter v2 (a learned bias and scale on every projection) on a quantized base is not "
                "implemented; quantize without it, or use v1 (its prompts only)"
            )
        if isinstance(layer, LoRALinear):  # QLoRA: the LoRA layer builds itself anew over the bitsandbytes layer
            quantized = layer.on_base(base, **settings)
        else:
            quantized = base(layer.in_features, layer.out_features, bias=layer.bias is not None, **settings)
        if isinstance(quantized, bnb.nn.Linear4bit):
            # On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight at its first forward pass in eval
            # mode without gradients (validation, generation): from then on it computes in bf16, passes no gradient
            # back to the LoRA layers before it, and saves a state dict that dequantizes wrongly; the repacking also
            # asserts that out_features divide by 32. Never repacked, the layer is exact and has no shape rule.
            quantized.support_avx512bf16_for_cpu = False
        model.set_submodule(name, quantized)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes layers `swap_in_layers` put in, by the name of their weight in a checkpoint."""
    bnb = import_bitsandbytes()
    layers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {f"{name}.weight": layer for name, layer in model.named_modules() if isinstance(layer, layers)}


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The floating-point weight of a bitsandbytes layer (as PEFT dequantizes it), e.g. for DoRA's weight norm."""
    bnb = import_bitsandbytes()
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    # int8: a scale per row, on the weight until the first forward pass moves it to the layer's state
    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scales)


def quantize_weight(layer: nn.Module, weight: torch.Tensor, device: torch.device | str) -> None:
    """Gives a bitsandbytes layer its weight, quantized as it moves to `device` (on a GPU only that one weight is
    there in full precision, for a moment)."""
    bnb = import_bitsandbytes()
    if isinstance(layer, bnb.nn.Linear4bit):  # the meta weight knows the mode's settings
        old = layer.weight
        layer.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=layer,
        ).to(device)
    else:
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """--train.optimizer: torch's AdamW, or one of bitsandbytes' AdamW variants. AdamW8bit holds the two moments in 8
    bits per value (one quarter of AdamW's optimizer memory; tensors under 4096 values keep 32 bits). The paged ones
    (CUDA only) keep their state in memory that the driver pages out to the CPU when the GPU runs out, instead of
    failing; on CPU bitsandbytes runs them unpaged (PagedAdamW8bit = AdamW8bit there)."""
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name not in BNB_OPTIMIZERS:
        raise ValueError(f"--train.optimizer {name!r} is not one of AdamW, {', '.join(BNB_OPTIMIZERS)}")
    params = list(params)
    if name.startswith("Paged") and params[0].device.type != "cuda":
        print(
            f"note: --train.optimizer {name} pages its state only on CUDA; on {params[0].device.type} it runs unpaged",
            file=sys.stderr,
        )
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")  # bitsandbytes' own note
    return getattr(import_bitsandbytes().optim, name)(params, lr=lr, weight_decay=weight_decay)


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, imported only where it is used: the import alone takes seconds."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(
            f"--quantize and the 8-bit optimizers need bitsandbytes ({e}); pip install bitsandbytes"
        ) from None
    # LLM.int8() multiplies in fp16 by design; bitsandbytes would log that at every product of fp32 or bf16 inputs
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bitsandbytes
