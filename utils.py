"""Pieces every script shares: the command line with one-line errors (`cli`, `one_line`), choosing a precision,
loading a checkpoint directory (quantized if asked), writing files atomically, and the device helpers (the CPU
decoding layout, peak memory). The training parts of the fine-tuning scripts are in training.py (losses.py,
train_state.py), the data pieces in data.py, bitsandbytes' quantization in quantize.py."""

import json
import os
import resource
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model import Config, LLaMA
from quantize import quantize_weight, quantized_layers, swap_in_layers

# What a user's mistake raises in the library (a missing or broken file, a bad flag or combination, a missing package,
# a run that diverged): `cli` turns these into one line. Anything else is a bug, and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)

# The files that make up a checkpoint's tokenizer (tokenizer.py): tokenizer.model or tokenizer.json, and the others
# when the repository has them. Copied as a whole into every checkpoint directory made from another.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)


def cli(function: Callable, **kwargs) -> None:
    """Runs `function` as the script's command line (jsonargparse.CLI: its keyword arguments are the flags, its
    docstring the --help). The library raises ordinary exceptions; here, the one place that does it for every script,
    a user's mistake becomes one line on stderr and exit status 1 instead of a traceback."""
    from jsonargparse import CLI

    try:
        CLI(function, **kwargs)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None


def one_line(error: BaseException) -> str:
    """An exception as one line: its message's first line (an OSError's as "path: reason"), or its type's name."""
    message = str(error).strip()
    if isinstance(error, OSError) and error.filename and error.strerror:  # FileNotFoundError(2, "No such file", path)
        message = f"{error.filename}: {error.strerror}"
    return message.splitlines()[0] if message else type(error).__name__


def default_precision(training: bool = False) -> str:
    """bf16 where CUDA supports it, else fp32: on CPUs bf16 matmuls are far slower (howto/finetune_lora.md)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed" if training else "bf16-true"
    return "32-true"


def precision_to_dtype(precision: str) -> torch.dtype:
    """The dtype weights are held in for a Fabric precision string ("bf16-true", "32-true", ...)."""
    dtypes = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "32-true": torch.float32}
    if precision not in dtypes:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(dtypes)}")
    return dtypes[precision]


def check_checkpoint_dir(checkpoint_dir: Path) -> None:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ValueError(f"checkpoint directory {checkpoint_dir} does not exist; see howto/download_weights.md")
    if not (checkpoint_dir / "lit_model.safetensors").is_file():
        raise ValueError(
            f"{checkpoint_dir} has no lit_model.safetensors; run scripts/convert_hf_checkpoint.py "
            f"--checkpoint_dir {checkpoint_dir} first"
        )
    if not (checkpoint_dir / "model_config.json").is_file():
        raise ValueError(f"{checkpoint_dir} has no model_config.json; see howto/download_weights.md")
    if not any((checkpoint_dir / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise ValueError(f"{checkpoint_dir} has no tokenizer.model or tokenizer.json; see howto/download_weights.md")


def copy_tokenizer(source_dir: Path, destination_dir: Path) -> list[str]:
    """Copies every file of TOKENIZER_FILES that `source_dir` has into `destination_dir`, each atomically;
    returns their names."""
    names = [name for name in TOKENIZER_FILES if (Path(source_dir) / name).is_file()]
    for name in names:
        with atomic_path(Path(destination_dir) / name) as tmp:
            shutil.copyfile(Path(source_dir) / name, tmp)
    return names


def load_config(checkpoint_dir: Path) -> Config:
    check_checkpoint_dir(checkpoint_dir)
    return Config.from_file(Path(checkpoint_dir) / "model_config.json")


def load_model(
    checkpoint_dir: Path,
    device: torch.device | str = "cpu",
    dtype: Optional[torch.dtype] = None,
    quantize: Optional[str] = None,
) -> LLaMA:
    """Builds the model on the meta device (no memory) and gives it the checkpoint's tensors one at a time, each
    converted to `dtype` on its way: peak memory stays within a tensor of the weights' size in `dtype`.

    `quantize` (one of quantize.QUANTIZE_MODES) holds the projections in 4 or 8 bits with bitsandbytes: they
    are swapped for bitsandbytes' layers while still on the meta device, and each weight is quantized as it moves to
    `device`, so the full-precision model never exists there, nor in CPU memory. See howto/quantize.md."""
    config = load_config(checkpoint_dir)
    path = Path(checkpoint_dir) / "lit_model.safetensors"
    with torch.device("meta"):
        model = LLaMA(config)
        if quantize is not None:
            swap_in_layers(model, quantize, dtype)
    quantized = quantized_layers(model) if quantize is not None else {}
    state_dict = {}
    for name, tensor in read_tensors(path, dtype):
        if name in quantized:
            quantize_weight(quantized[name], tensor, device)
        else:
            state_dict[name] = tensor.to(device)
    load_weights(model, state_dict, path)
    return model


def read_tensors(path: Path, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file, one at a time, in `dtype` if given. The file is opened anew for each:
    the pages of a memory-mapped file that were read count as the process's memory until it is closed, and would
    otherwise add up to the whole file beside the converted copy (howto/inference.md#memory)."""
    try:
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
        for name in names:
            with safe_open(path, framework="pt") as f:
                tensor = f.get_tensor(name)
            yield name, tensor if dtype is None else tensor.to(dtype)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a complete safetensors file ({e}); convert or download it again") from None


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a PyTorch .bin read with weights_only=True (no pickled code) and
    memory-mapped (only the tensors in use are read), as Hub checkpoints and PEFT adapters ship them."""
    try:
        if Path(path).suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a download cut short, or a .bin that holds more than tensors
        raise ValueError(f"{path} is not a complete weight file ({one_line(e)}); download it again") from None


def load_weights(model: LLaMA, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Assigns `state_dict` to a model built on the meta device; the output head is re-tied when
    the config ties it to the embedding (safetensors files hold a shared tensor only once).

    Modules that add to the base model (LoRA's A and B in a model built inside lora.lora(), LLaMA-Adapter's prompts
    and v2's biases and scales inside adapter.adapter(), marked `adapter = True`) are not in a base checkpoint: they
    are created beside the weights, on their device and in their dtype, and initialised by their own
    `reset_parameters()`; then the layer holding one, if it has a `base_loaded()`, is told that its base weight is in
    (an adapter that starts from it: lora.LoRALinear.base_loaded)."""
    _, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    fresh = []
    for module in model.modules():
        if getattr(module, "adapter", False) and all(p.is_meta for p in module.parameters()):
            module.to_empty(device=model.embed.weight.device).to(model.embed.weight.dtype)
            module.reset_parameters()
            fresh.append(module)
    for module in model.modules():
        if hasattr(module, "base_loaded") and any(child in fresh for child in module.children()):
            module.base_loaded()
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match model_config.json (missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )


def read_safetensors_metadata(path: Path, what: str) -> dict[str, str]:
    """The metadata of a safetensors file, read without its tensors (an adapter's settings and base config); `what`
    names the file in the error of a missing one ("LoRA checkpoint")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file ({e})") from None


def save_adapter_file(
    path: Path,
    tensors: dict[str, torch.Tensor],
    kind: str,
    settings: dict,
    config: Config,
    chat_template: Optional[str] = None,
    training: Optional[dict] = None,
) -> None:
    """Writes an adapter's tensors to a safetensors file that describes itself: its metadata holds the settings under
    `kind` ("lora" for lora.py, "adapter" for adapter.py: what the readers tell the kinds apart by), the base model's
    config, the chat template of the conversations it was trained on, if any, and under "training" how it was
    trained, if given (for people and tools reading the file; nothing here depends on it)."""
    metadata = {"format": "pt", kind: json.dumps(settings), "model_config": json.dumps(asdict(config))}
    if chat_template is not None:
        metadata["chat_template"] = chat_template
    if training is not None:
        metadata["training"] = json.dumps(training)
    with atomic_path(path) as tmp:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)


def assign_adapter_tensors(
    model: LLaMA, state_dict: dict[str, torch.Tensor], allowed: dict[str, torch.Tensor], source: Path
) -> None:
    """Assigns an adapter's tensors to the model's parameters `allowed` (by name, as lora.lora_state_dict and
    adapter.adapter_state_dict give them), after checking every name and shape; also works for a base left on the meta
    device."""
    missing = [name for name in allowed if name not in state_dict]
    unexpected = [name for name in state_dict if name not in allowed]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for name, tensor in state_dict.items():
        if tensor.shape != allowed[name].shape:
            raise ValueError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the model's is {tuple(allowed[name].shape)}"
            )
    # copied into the model's own parameters (their device and dtype); a model on the meta device takes them as they are
    model.load_state_dict(state_dict, strict=False, assign=any(allowed[name].is_meta for name in state_dict))


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


def plain_projections(model: LLaMA) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, attribute, layer) of each float32 projection of `model` on a CPU that is a plain product: an nn.Linear,
    or a LoRA layer whose update is merged; not a LoRA layer applying its update, nor a quantized layer."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            plain = type(child) is torch.nn.Linear or getattr(child, "merged", False)
            if plain and isinstance(child, torch.nn.Linear) and on_cpu_in_fp32(child.weight):
                yield parent, name, child


def on_cpu_in_fp32(weight: torch.Tensor) -> bool:
    """Whether a weight is a whole float32 tensor on a CPU (not a shard of FSDP's, nor quantized codes)."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and type(weight.data) is torch.Tensor


class SplitLinear(torch.nn.Module):
    """An nn.Linear (the same weight and bias, no copy) whose product with a single row is split into one part of the
    outputs per thread, as one batched product. MKL runs a matrix-vector product on one core however many threads
    it has, and a batch of them one per core: for one row on a CPU the weight is read at 16-28 GB/s instead of 11-17
    (the figures: howto/inference.md#speed). Several rows go to F.linear as they are."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters, under the same names
        self.parts = torch.get_num_threads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_row = x.numel() == self.in_features and self.parts > 1
        if not one_row or self.out_features % self.parts or not self.weight.is_contiguous():
            return F.linear(x, self.weight, self.bias)
        weight = self.weight.view(self.parts, self.out_features // self.parts, self.in_features)
        y = torch.matmul(x.reshape(1, 1, -1).expand(self.parts, 1, -1), weight.transpose(1, 2))  # (parts, 1, out/parts)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def split_linears(model: LLaMA) -> None:
    """Each plain projection of `model` on a CPU (plain_projections, a head tied to the embedding too) as a
    SplitLinear, for decoding one row at a time."""
    for parent, name, layer in plain_projections(model):
        setattr(parent, name, SplitLinear(layer))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 weight (out, in) laid out in oneDNN's blocks for `packed_product` (a copy: 0.2 s for 440 MB)."""
    # packed for about 16 rows, the layout that measured fastest from 4 to 32 (oneDNN takes any number)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16)


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight as `pack_weight` gave it; no gradient flows through it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(torch.nn.Module):
    """An nn.Linear for inference on a CPU, its float32 weight laid out once in oneDNN's blocks for its matrix
    products (torch.ops.mkldnn's, with which torch.compile's CPU backend packs weights). For 4 to 32 rows at a time
    (serving, batched evaluation, GRPO's rollouts) it multiplies 1.5-2x as fast as MKL on nn.Linear's layout; for one
    row SplitLinear is faster (the figures: howto/inference.md#speed). torch.compile cannot trace it."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bias = linear.in_features, linear.out_features, linear.bias
        self.packed = pack_weight(linear.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The plain weight (a copy), for what reads it: multilora's DoRA norms."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # oneDNN's op has no backward: a gradient would be wrong
            raise RuntimeError("a PackedLinear is for inference: run it under torch.no_grad(), or leave packed_linears")
        return packed_product(x, self.packed, self.bias)


class PackedProjections(torch.nn.Module):
    """Projections of one input (attention's q, k and v; the MLP's gate and up) as one product of their weights side by
    side, packed (pack_weight), a LoRA layer's with its update merged: for decoding many rows on a CPU one product
    instead of three or two (model.py's `qkv` and `gate_up`). A LoRA layer computes its own product within
    lora.lora_disabled or recording gradients; the plain projections become PackedParts of this one, without weights of
    their own."""

    def __init__(self, projections: list[torch.nn.Linear], weights: list[torch.Tensor]) -> None:
        """weights: the one each projection multiplies by (a LoRA layer's merged_weight)."""
        super().__init__()
        self.projections = list(projections)  # as in the block (pack_linears puts PackedParts); not submodules
        self.sizes = [layer.out_features for layer in projections]
        self.in_features, self.out_features = projections[0].in_features, sum(self.sizes)
        self.packed = pack_weight(torch.cat(weights))
        biases = [layer.bias for layer in projections]  # all or none: model.py gives them one setting (Config)
        self.bias = None if biases[0] is None else torch.cat([bias.detach() for bias in biases])

    @property
    def weight(self) -> torch.Tensor:
        """The parts' weights side by side, plain (a copy)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.requires_grad and torch.is_grad_enabled():  # oneDNN's op has no backward: a gradient would be wrong
            raise RuntimeError("PackedProjections are for inference: run them under torch.no_grad(), or unpack")
        ys = packed_product(x, self.packed, self.bias).split(self.sizes, dim=-1)
        # a LoRA layer computes alone where its own product differs: disabled, or its parameters recording gradients
        alone = [
            not isinstance(layer, PackedPart) and (torch.is_grad_enabled() or getattr(layer, "disabled", False))
            for layer in self.projections
        ]
        return tuple(layer(x) if own else y for layer, y, own in zip(self.projections, ys, alone))


class PackedPart(torch.nn.Module):
    """A plain projection fused into a PackedProjections, in its place (q_proj, ...) without a weight of its own (the
    weights held once, not twice): for what computes it alone (a product of the whole group, sliced) or reads its
    weight (a copy: multilora's DoRA norms)."""

    def __init__(self, group: PackedProjections, index: int) -> None:
        super().__init__()
        self.in_features, self.out_features = group.projections[index].in_features, group.sizes[index]
        self.start = sum(group.sizes[:index])
        self.packed, self.group_bias = group.packed, group.bias  # the group's tensors, not copies

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()[self.start : self.start + self.out_features]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return None if self.group_bias is None else self.group_bias[self.start : self.start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("a PackedPart is for inference: run it under torch.no_grad(), or unpack")
        return packed_product(x, self.packed, self.group_bias)[..., self.start : self.start + self.out_features]


def pack_linears(model: LLaMA, fuse: bool = False) -> list[tuple[torch.nn.Module, str, Optional[torch.nn.Module]]]:
    """Each plain projection of `model` on a CPU (plain_projections) as a PackedLinear, where PyTorch has oneDNN; a
    head that shares the embedding's weight too, as a second copy of it (113 MB for SmolLM2's 49,152 x 576 in fp32:
    its product with 8 rows then takes 4.5 ms instead of 18.5). Each LoRA layer on a CPU that applies its update gets
    its weight with the update merged, packed (its `packed`, a copy: lora.LoRALinear computes its whole product with it
    outside autograd, the model's own weights unmerged). With `fuse`, a block's q, k and v (gate and up) that are
    all such products become one PackedProjections instead, its plain parts PackedParts of it (not with a
    LLaMA-Adapter prompt, which computes k and v alone). Returns (parent, attribute, layer before) of each module set,
    for `packed_linears`."""
    replaced = []
    if not torch.backends.mkldnn.is_available():
        return replaced
    plain, adapted = list(plain_projections(model)), lora_bases(model)
    fused, updated = set(), {id(layer) for layer in adapted}
    packable = {id(layer) for _, _, layer in plain} | updated

    def weight(layer: torch.nn.Linear) -> torch.Tensor:  # a merged LoRA layer's weight holds its update already
        return layer.merged_weight() if id(layer) in updated else layer.weight

    groups = [(b.attn, "qkv", ("q_proj", "k_proj", "v_proj")) for b in model.blocks if b.attn.adaption_prompt is None]
    groups += [(b.mlp, "gate_up", ("gate_proj", "up_proj")) for b in model.blocks]
    for parent, name, parts in groups if fuse else []:
        layers = [getattr(parent, part) for part in parts]
        if all(id(layer) in packable for layer in layers):
            group = PackedProjections(layers, [weight(layer) for layer in layers])
            setattr(parent, name, group)
            replaced.append((parent, name, None))
            fused.update(id(layer) for layer in layers)
            for index, (part, layer) in enumerate(zip(parts, layers)):
                if id(layer) not in updated:  # a LoRA layer stays, to compute alone within lora_disabled
                    group.projections[index] = PackedPart(group, index)
                    setattr(parent, part, group.projections[index])
                    replaced.append((parent, part, layer))
    for parent, name, layer in plain:
        if id(layer) not in fused:
            setattr(parent, name, PackedLinear(layer))
            replaced.append((parent, name, layer))
    for layer in adapted:
        if id(layer) not in fused:
            layer.packed = pack_weight(weight(layer))
    return replaced


def lora_bases(model: LLaMA) -> list[torch.nn.Module]:
    """The LoRA layers of `model` applying their update (not merged) over a float32 base weight on a CPU."""
    return [
        layer
        for layer in model.modules()
        if hasattr(layer, "lora") and hasattr(layer, "packed") and not layer.merged and on_cpu_in_fp32(layer.weight)
    ]


@contextmanager
def packed_linears(model: LLaMA) -> Iterator[None]:
    """pack_linears for a span of decoding many rows while training (GRPO's rollouts on a CPU); on leaving, the model
    as it was and the copies freed. Packing takes about 0.3 s for 450 MB of weights, a rollout's products run 1.5-2x
    as fast (howto/inference.md)."""
    replaced = pack_linears(model, fuse=True)
    try:
        yield
    finally:
        for parent, name, layer in replaced:
            setattr(parent, name, layer)
        for layer in lora_bases(model):
            layer.packed = None


def peak_memory_gb(device: torch.device) -> float:
    """CUDA's peak allocation on GPU; on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / (1e9 if sys.platform == "darwin" else 1e6)  # bytes on macOS, kilobytes on Linux
