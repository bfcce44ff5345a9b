"""LoRA: Low-Rank Adaptation of the frozen pretrained model (https://arxiv.org/abs/2106.09685).

A LoRA layer keeps the pretrained weight W (out x in) frozen and learns a low-rank update
ΔW = B·A · alpha/r, with A (r x in) and B (out x r). B starts at zero, so training starts from the
base model exactly. After training ΔW can be folded into W (`merge_lora_weights`) so inference costs
nothing extra, or kept apart so one base model serves many small adapters.

    with lora(r=8, alpha=16, dropout=0.05, query=True, value=True):
        model = load_model(checkpoint_dir)  # the base weights; LoRA's A and B get their initial values
    mark_only_lora_as_trainable(model)
    ...  # train
    save_lora_checkpoint(model, "out/lora/adapter.safetensors")  # a few MB, self-describing
    model = load_lora_model(checkpoint_dir, "out/lora/adapter.safetensors", merge=True)  # for inference
"""

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import model as llama
from model import LLaMA, Config
from utils import atomic_path, load_config, load_model

# What each projection of model.py is called by the `lora()` flags (model.linear's `role`)
TARGETS = ("query", "key", "value", "projection", "mlp", "head")
ROLES = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "projection",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "lm_head": "head"}


@dataclass
class LoRAConfig:
    """The LoRA settings, as `lora()` takes them and LoRA checkpoints record them."""

    r: int = 8  # rank of the update: trainable parameters grow linearly with it
    alpha: float = 16  # the update is scaled by alpha / r, so changing r keeps the step size comparable
    dropout: float = 0.05  # dropout on the LoRA branch's input, during training only
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False  # the attention output projection
    mlp: bool = False  # gate, up and down projections
    head: bool = False  # the output head

    def __post_init__(self):
        if self.r < 1:
            raise SystemExit(f"error: the LoRA rank r must be at least 1, not {self.r}")
        if not 0 <= self.dropout < 1:
            raise SystemExit(f"error: the LoRA dropout must be in [0, 1), not {self.dropout}")

    @property
    def targets(self) -> list[str]:
        return [target for target in TARGETS if getattr(self, target)]


class LoRA(nn.Module):
    """The low-rank update of one linear layer, applied as x·Aᵀ·Bᵀ·alpha/r without ever building ΔW."""

    adapter = True  # not part of a base checkpoint: utils.load_weights initialises it instead

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.empty(out_features, r))
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        nn.init.zeros_(self.B)  # ΔW = 0: a fresh LoRA model is the base model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (…, in) -> (…, r) -> (…, out); scaling the narrow (…, r) tensor is cheaper than the output
        return (self.dropout(x) @ self.A.T * self.scaling) @ self.B.T

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scaling  # (out, in)


class LoRALinear(nn.Linear):
    """An nn.Linear (its `weight` frozen and where a checkpoint expects it) plus a LoRA update.

    The LoRA part only uses the base layer's forward (`super().forward`), so a quantized base fits in as a subclass of
    LoRALinear and bitsandbytes' Linear4bit or Linear8bitLt, `base_settings` going to the latter: that is QLoRA, made
    by utils.load_model(..., quantize=...). Its weight holds 4- or 8-bit codes, which `merge` refuses to add ΔW to."""

    def __init__(
        self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, bias: bool = False, **base_settings
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, **base_settings)
        self.lora = LoRA(in_features, out_features, r, alpha, dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return super().forward(x)  # a plain linear layer
        return super().forward(x) + self.lora(x)

    @torch.no_grad()
    def merge(self) -> None:
        """W += ΔW in place; the forward pass is then a plain linear layer."""
        if not self.weight.is_floating_point():
            raise SystemExit(
                "error: cannot merge LoRA into a quantized base (--quantize): its 4- or 8-bit weights would round the "
                "small update away; keep LoRA separate (--merge false), or merge into the full-precision checkpoint "
                "with scripts/merge_lora.py and quantize that"
            )
        if not self.merged:
            self.weight += self.lora.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= ΔW in place, e.g. to train on after merging for a quick evaluation."""
        if self.merged:
            self.weight -= self.lora.delta_weight().to(self.weight.dtype)
            self.merged = False


@contextmanager
def lora(
    r: int,
    alpha: float,
    dropout: float,
    enabled: bool = True,
    query: bool = True,
    key: bool = False,
    value: bool = True,
    projection: bool = False,
    mlp: bool = False,
    head: bool = False,
    all_linear: bool = False,
) -> Iterator[LoRAConfig]:
    """A `LLaMA(config)` built inside this context has LoRA layers in the chosen places. `all_linear`
    adapts every projection of attention and MLP (today's common practice; the head only with `head`)."""
    if all_linear:
        query = key = value = projection = mlp = True
    config = LoRAConfig(r, alpha, dropout, query, key, value, projection, mlp, head)
    plain_linear = llama.linear

    def linear(in_features: int, out_features: int, role: str) -> nn.Linear:
        if enabled and getattr(config, role):
            return LoRALinear(in_features, out_features, r, alpha, dropout)
        return plain_linear(in_features, out_features, role)

    llama.linear = linear
    try:
        yield config
    finally:
        llama.linear = plain_linear


def get_lora_config(model: LLaMA) -> Optional[LoRAConfig]:
    """The LoRA settings a model was built with, read off its layers; None for a model without LoRA."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        return None
    first = next(iter(layers.values())).lora
    targets = {ROLES[name.rpartition(".")[2]] for name in layers}
    return LoRAConfig(first.r, first.alpha, first.dropout.p, **{target: target in targets for target in TARGETS})


def mark_only_lora_as_trainable(model: LLaMA, bias: str = "none", norms: bool = False) -> None:
    """Freezes the base model: only LoRA's A and B learn, plus, when asked, biases ("all", or
    "lora_only" for those of LoRA layers; model.py's layers have none) and the RMSNorm weights."""
    trainable = {id(param) for param in lora_state_dict(model, bias, norms).values()}
    for param in model.parameters():
        param.requires_grad = id(param) in trainable


def lora_state_dict(model: LLaMA, bias: str = "none", norms: bool = False) -> dict[str, torch.Tensor]:
    """What an adapter consists of: every LoRA A and B, plus the biases and RMSNorm weights that
    `mark_only_lora_as_trainable` was told to train (pass it the same arguments)."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', not {bias!r}")
    # the state dict's names are the checkpoint's, also through a wrapper such as Fabric's; keep_vars: the parameters
    state_dict = model.state_dict(keep_vars=True)
    adapted = {name.partition(".lora.")[0] for name in state_dict if ".lora." in name}  # blocks.0.attn.q_proj, ...
    selected = {}
    for name, param in state_dict.items():
        module, _, kind = name.rpartition(".")
        is_bias = kind == "bias" and (bias == "all" or (bias == "lora_only" and module in adapted))
        if ".lora." in name or is_bias or (norms and module.endswith("norm")):
            selected[name] = param
    return selected


def merge_lora_weights(model: LLaMA) -> None:
    """Folds every LoRA update into its layer's weight, so inference runs at the base model's speed."""
    if isinstance(model.lm_head, LoRALinear) and model.config.tie_embeddings:
        # merging into a head that shares the embedding's weight would change the embedding too
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        model.config = replace(model.config, tie_embeddings=False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()


def save_lora_checkpoint(model: LLaMA, path: Path, bias: str = "none", norms: bool = False) -> None:
    """Writes the adapter (`lora_state_dict`) to a safetensors file whose metadata holds the LoRA settings
    and the base model's config, so that loading it never asks for r, alpha or the targets again."""
    lora_config = get_lora_config(model)
    if lora_config is None:
        raise ValueError("the model has no LoRA layers to save; build it inside lora()")
    state_dict = {name: param.detach().cpu().contiguous() for name, param in lora_state_dict(model, bias, norms).items()}
    metadata = {"format": "pt", "lora": json.dumps(asdict(lora_config)), "model_config": json.dumps(asdict(model.config))}
    with atomic_path(path) as tmp:
        save_file(state_dict, tmp, metadata=metadata)


def read_lora_config(path: Path) -> tuple[LoRAConfig, Config]:
    """The LoRA settings and the base model's config recorded in a LoRA checkpoint, read without its tensors."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: LoRA checkpoint {path} not found")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as e:
        raise SystemExit(f"error: {path} is not a safetensors file ({e})") from None
    if "lora" not in metadata or "model_config" not in metadata:
        raise SystemExit(
            f"error: {path} has no LoRA settings in its metadata; it was not written by lora.save_lora_checkpoint "
            "(for an adapter trained with Hugging Face PEFT, run scripts/import_peft.py first)"
        )
    return LoRAConfig(**json.loads(metadata["lora"])), Config(**json.loads(metadata["model_config"]))


def load_lora_model(
    checkpoint_dir: Path,
    lora_path: Path,
    device: torch.device | str = "cpu",
    dtype: Optional[torch.dtype] = None,
    merge: bool = False,
    quantize: Optional[str] = None,
) -> LLaMA:
    """The base model of `checkpoint_dir` with LoRA where the adapter at `lora_path` says, the adapter
    loaded, and merged into the weights when `merge` (for inference at the base model's speed). `quantize` holds the
    base in 4 or 8 bits (utils.QUANTIZE_MODES), LoRA on top; an adapter trained with or without it fits either way."""
    lora_config, base_config = read_lora_config(lora_path)
    check_same_base(base_config, load_config(checkpoint_dir), lora_path)  # before the slow part
    with lora(**asdict(lora_config)):
        model = load_model(checkpoint_dir, device, dtype, quantize)
    load_lora_checkpoint(model, lora_path)
    if merge:
        merge_lora_weights(model)
    return model


def load_lora_checkpoint(model: LLaMA, path: Path) -> None:
    """Loads an adapter written by `save_lora_checkpoint` into a model built inside `lora()` with the
    same settings on the same base; any mismatch exits with one line that names it."""
    lora_config, base_config = read_lora_config(path)
    check_same_base(base_config, model.config, path)
    ours = get_lora_config(model)
    if ours is None:
        raise SystemExit(f"error: the model has no LoRA layers for {path}; build it with lora.load_lora_model")
    differences = [
        f"{field}={getattr(lora_config, field)} (model: {getattr(ours, field)})"
        for field in ("r", "alpha", *TARGETS)
        if getattr(lora_config, field) != getattr(ours, field)
    ]
    if differences:
        raise SystemExit(
            f"error: {path} holds LoRA with other settings than the model's: {', '.join(differences)}; "
            "build the model with lora.load_lora_model, which reads them from the checkpoint"
        )
    load_lora_state_dict(model, load_file(path), path)


def check_same_base(adapter_base: Config, model_config: Config, path: Path) -> None:
    # block_size only limits the sequence length; every other field changes the weights or their meaning
    differences = [
        f"{field}={value} (model: {getattr(model_config, field)})"
        for field, value in asdict(adapter_base).items()
        if field != "block_size" and value != getattr(model_config, field)
    ]
    if differences:
        raise SystemExit(
            f"error: {path} was trained on another base model: {', '.join(differences)}; "
            "use the checkpoint directory it was trained on"
        )


def load_lora_state_dict(model: LLaMA, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Assigns adapter tensors to the model's LoRA parameters (and RMSNorm weights or biases trained
    with them), after checking every name and shape; also works for a base left on the meta device."""
    required = lora_state_dict(model)
    allowed = lora_state_dict(model, bias="all", norms=True)
    missing = [name for name in required if name not in state_dict]
    unexpected = [name for name in state_dict if name not in allowed]
    if missing or unexpected:
        raise SystemExit(f"error: {source} does not fit the model (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for name, tensor in state_dict.items():
        if tensor.shape != allowed[name].shape:
            raise SystemExit(f"error: {source}: {name} has shape {tuple(tensor.shape)}, the model's is {tuple(allowed[name].shape)}")
    # copied into the model's own parameters (their device and dtype); a model on the meta device takes them as they are
    model.load_state_dict(state_dict, strict=False, assign=any(allowed[name].is_meta for name in state_dict))
