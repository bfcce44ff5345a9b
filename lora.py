"""LoRA: Low-Rank Adaptation of the frozen pretrained model (https://arxiv.org/abs/2106.09685).

A LoRA layer keeps the pretrained weight W (out x in) frozen and learns a low-rank update
ΔW = B·A · alpha/r, with A (r x in) and B (out x r). B starts at zero, so training starts from the
base model exactly. After training ΔW can be folded into W (`merge_lora_weights`) so inference costs
nothing extra, or kept apart so one base model serves many small adapters.

    with lora(r=8, alpha=16, dropout=0.05, targets=("query", "value")):
        model = load_model(checkpoint_dir)  # the base weights; LoRA's A and B get their initial values
    mark_only_lora_as_trainable(model)
    ...  # train
    save_lora_checkpoint(model, "out/lora/adapter.safetensors")  # a few MB, self-describing
    model = load_lora_model(checkpoint_dir, "out/lora/adapter.safetensors", merge=True)  # for inference
"""

import json
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

import model as llama
from model import Config, LLaMA
from utils import (
    assign_adapter_tensors,
    load_config,
    load_model,
    packed_product,
    read_safetensors_metadata,
    save_adapter_file,
)

# The places LoRA can adapt, as lora(targets=...), the --lora_targets flag and adapter files name them, and the
# projection of model.py each one is (the last part of model.linear's `name`, also the Hugging Face / PEFT module name)
TARGETS = {
    "query": "q_proj",
    "key": "k_proj",
    "value": "v_proj",
    "projection": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
    "head": "lm_head",
}
# names that stand for several targets; "all_linear" is every projection but the head (PEFT's "all-linear")
SHORTHANDS = {
    "attention": ("query", "key", "value", "projection"),
    "mlp": ("gate", "up", "down"),
    "all_linear": ("query", "key", "value", "projection", "gate", "up", "down"),
}


@dataclass
class LoRAConfig:
    """The LoRA settings, as `lora()` takes them and LoRA checkpoints record them."""

    r: int = 8  # rank of the update: trainable parameters grow linearly with it
    alpha: float = 16  # the update is scaled by alpha / r, so changing r keeps the step size comparable
    dropout: float = 0.05  # dropout on the LoRA branch's input, during training only
    targets: tuple[str, ...] = ("query", "value")  # keys of TARGETS or SHORTHANDS
    rslora: bool = False  # rank-stabilised LoRA: the update scaled by alpha / sqrt(r) instead (Kalajdzievski 2023)
    dora: bool = False  # DoRA: a learned magnitude per output row over the normalised W + ΔW (Liu et al. 2024)
    ranks: dict[str, int] = field(default_factory=dict)  # module path ("blocks.0.attn.q_proj") -> its own r
    alphas: dict[str, float] = field(default_factory=dict)  # module path -> its own alpha

    def __post_init__(self):
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        targets += [target for shorthand in targets for target in SHORTHANDS.get(shorthand, ())]
        unknown = [target for target in targets if target not in TARGETS and target not in SHORTHANDS]
        if unknown or not targets:
            raise ValueError(f"LoRA targets {list(self.targets)} must be some of {', '.join([*TARGETS, *SHORTHANDS])}")
        self.targets = tuple(target for target in TARGETS if target in targets)  # one spelling: TARGETS' order
        self.ranks, self.alphas = dict(self.ranks), dict(self.alphas)
        for r in (self.r, *self.ranks.values()):
            if not isinstance(r, int) or r < 1:
                raise ValueError(f"a LoRA rank r must be a whole number of at least 1, not {r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"the LoRA dropout must be in [0, 1), not {self.dropout}")

    @classmethod
    def from_dict(cls, values: dict) -> "LoRAConfig":
        """From asdict() of one, or from an adapter written before `targets` existed (a flag per target)."""
        if "targets" not in values:
            values = {
                **{key: values[key] for key in ("r", "alpha", "dropout")},
                "targets": [target for target in (*TARGETS, *SHORTHANDS) if values.get(target)],
            }
        return cls(**values)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The rank and alpha of the projection at `path`: its own from `ranks` and `alphas`, else `r` and `alpha`."""
        return self.ranks.get(path, self.r), self.alphas.get(path, self.alpha)

    def adapts(self, path: str) -> bool:
        """Whether the projection of model.py at `path` ("blocks.0.attn.q_proj", "lm_head") gets a LoRA layer."""
        return any(path.rpartition(".")[2] == TARGETS[target] for target in self.targets)


class LoRA(nn.Module):
    """The low-rank update of one linear layer, applied as x·Aᵀ·Bᵀ·scaling without ever building ΔW; with DoRA also
    the magnitude of each output row of W + ΔW, which LoRALinear applies."""

    adapter = True  # not part of a base checkpoint: utils.load_weights initialises it instead

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float,
        rslora: bool = False,
        dora: bool = False,
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.empty(out_features, r))
        self.magnitude = nn.Parameter(torch.empty(out_features)) if dora else None
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        nn.init.zeros_(self.B)  # ΔW = 0: a fresh LoRA model is the base model
        if self.magnitude is not None:
            nn.init.ones_(self.magnitude)  # a placeholder: LoRALinear.reset_magnitude sets ‖W‖ once W is loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (…, in) -> (…, r) -> (…, out); scaling the narrow (…, r) tensor is cheaper than the output
        return (self.dropout(x) @ self.A.T * self.scaling) @ self.B.T

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scaling  # (out, in)


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """What ΔW = B·A is scaled by: alpha / r, or rsLoRA's alpha / sqrt(r), which keeps the update's size steady
    as r grows."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def dora_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + scaling·B·A‖ of each output row (out,): DoRA's denominator, in one product."""
    return torch.linalg.norm(torch.addmm(weight, B, A, alpha=scaling), dim=1)


def base_weight(layer: nn.Linear) -> torch.Tensor:
    """A projection's weight W in floating point: a quantized base's dequantized (quantize.dequantize)."""
    if layer.weight.is_floating_point():
        return layer.weight
    from quantize import dequantize

    return dequantize(layer)


class LoRALinear(nn.Linear):
    """An nn.Linear (its `weight` frozen and where a checkpoint expects it) plus a LoRA update.

    The LoRA part only uses the base layer's forward (`super().forward`) and its weight (`base_weight`), so a quantized
    base fits in as a subclass of LoRALinear and bitsandbytes' Linear4bit or Linear8bitLt, `base_settings` going to the
    latter: that is QLoRA, made by utils.load_model(..., quantize=...). Its weight holds 4- or 8-bit codes, which
    `merge` refuses to add ΔW to."""

    # W + ΔW (DoRA's scaling too) in oneDNN's layout, set for a span of decoding on a CPU (utils.packed_linears: GRPO's
    # rollouts): outside autograd the whole product in one call, without the LoRA products and their small ops
    packed: Optional[torch.Tensor] = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float,
        rslora: bool = False,
        dora: bool = False,
        bias: bool = False,
        **base_settings,
    ) -> None:
        if dora and bias:
            raise ValueError(
                "DoRA on projections with a bias (a merged LLaMA-Adapter v2 checkpoint) is not implemented; use LoRA"
            )
        super().__init__(in_features, out_features, bias=bias, **base_settings)
        self.lora = LoRA(in_features, out_features, r, alpha, dropout, rslora, dora)
        self.merged = False
        self.disabled = False  # the base projection alone, within `lora_disabled`
        if dora:
            self.reset_magnitude()  # again by utils.load_weights once the checkpoint's weight is in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.is_grad_enabled() and not self.disabled:  # decoding on a CPU
            return packed_product(x, self.packed, self.bias)
        result = super().forward(x)
        if self.merged or self.disabled:
            return result  # a plain linear layer
        if self.lora.magnitude is None:
            return result + self.lora(x)
        # DoRA, as PEFT computes it: each output row i scaled by f_i = m_i / ‖W_i + ΔW_i‖, the norm a constant to
        # autograd (the paper's section 4.3); a quantized W is dequantized once, for both uses below
        weight = base_weight(self)
        factor = self.lora.magnitude / self.weight_norm(weight).to(x.dtype)
        if not self.training or self.lora.dropout.p == 0:
            return factor * (result + self.lora(x))  # f ⊙ (W + ΔW)·x
        # with dropout the rescaling applies to the dropped-out input, as in PEFT:
        # W·x + f ⊙ (W + ΔW)·drop(x) - W·drop(x)
        x = self.lora.dropout(x)
        base = F.linear(x, weight.to(x.dtype))
        return result - base + factor * (base + (x @ self.lora.A.T * self.lora.scaling) @ self.lora.B.T)

    def on_base(self, base: type, **base_settings) -> "LoRALinear":
        """A new layer with this one's shape and LoRA settings over `base`, a subclass of nn.Linear such as
        bitsandbytes' Linear4bit (QLoRA: quantize.swap_in_layers), `base_settings` going to it; on the meta device,
        its LoRA is initialised with its weight (utils.load_weights)."""
        lora = self.lora
        layer_class = with_base(type(self), base)
        return layer_class(
            self.in_features,
            self.out_features,
            lora.r,
            lora.alpha,
            lora.dropout.p,
            lora.rslora,
            lora.magnitude is not None,
            self.bias is not None,
            **base_settings,
        )

    @torch.no_grad()
    def weight_norm(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖W + ΔW‖ of each output row (out,), DoRA's denominator; no gradient flows through it. `weight`: W, if the
        caller has it already (`base_weight`)."""
        weight = base_weight(self) if weight is None else weight
        return dora_norm(weight, self.lora.A.to(weight.dtype), self.lora.B.to(weight.dtype), self.lora.scaling)

    def base_loaded(self) -> None:
        """Called by utils.load_weights once the base weight is in, when this layer's LoRA was created fresh: DoRA's
        magnitude starts as the norm of each row of the loaded weight (`reset_magnitude`)."""
        if self.lora.magnitude is not None:
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA starts from the base model: magnitude = ‖W + ΔW‖ (= ‖W‖ with B = 0), once W is loaded."""
        self.lora.magnitude.copy_(self.weight_norm())

    def dora_factor(self) -> Optional[torch.Tensor]:
        """m / ‖W + ΔW‖ per output row (out,), by which DoRA scales (W + ΔW)·x; None for plain LoRA."""
        return None if self.lora.magnitude is None else self.lora.magnitude / self.weight_norm()

    @torch.no_grad()
    def merge(self) -> None:
        """W += ΔW in place (DoRA: W = m/‖W+ΔW‖ · (W + ΔW)); the forward pass is then a plain linear layer."""
        if not self.weight.is_floating_point():
            raise ValueError(
                "cannot merge LoRA into a quantized base (--quantize): its 4- or 8-bit weights would round the "
                "small update away; keep LoRA separate (--merge false), or merge into the full-precision checkpoint "
                "with scripts/merge_lora.py and quantize that"
            )
        if not self.merged:
            self.factor = self.dora_factor()  # kept for unmerge: W + ΔW alone no longer tells the norm
            self.weight.copy_(self.merged_weight())
            self.merged, self.packed = True, None

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + ΔW, for DoRA scaled by m / ‖W + ΔW‖ row by row: the weight of the one product this layer computes."""
        A, B = self.lora.A.to(self.weight.dtype), self.lora.B.to(self.weight.dtype)
        weight = torch.addmm(self.weight, B, A, alpha=self.lora.scaling)  # W + ΔW in one pass
        factor = self.dora_factor()
        return weight if factor is None else weight * factor.to(weight.dtype).unsqueeze(1)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= ΔW in place (DoRA: first undoes its scaling), e.g. to train on after merging for a quick evaluation."""
        if self.merged:
            if self.factor is not None:
                self.weight /= self.factor.to(self.weight.dtype).unsqueeze(1)
            self.weight -= self.lora.delta_weight().to(self.weight.dtype)
            self.merged = False


@cache
def with_base(layer_class: type, base: type) -> type:
    """`layer_class` (LoRALinear) with `base` (a bitsandbytes layer) between it and nn.Linear."""
    return type(f"{layer_class.__name__}_{base.__name__}", (layer_class, base), {})


@contextmanager
def lora(
    r: int,
    alpha: float,
    dropout: float,
    targets: Sequence[str] = ("query", "value"),
    rslora: bool = False,
    dora: bool = False,
    ranks: Optional[dict[str, int]] = None,
    alphas: Optional[dict[str, float]] = None,
) -> Iterator[LoRAConfig]:
    """A `LLaMA(config)` built inside this context has LoRA layers on the `targets` (keys of TARGETS or SHORTHANDS;
    "all_linear", every projection of attention and MLP, is today's common practice), each with the rank and alpha
    of `ranks` and `alphas` for its path, else `r` and `alpha`."""
    config = LoRAConfig(r, alpha, dropout, tuple(targets), rslora, dora, ranks or {}, alphas or {})
    plain_linear = llama.linear

    def linear(in_features: int, out_features: int, name: str, bias: bool = False) -> nn.Linear:
        if config.adapts(name):
            r, alpha = config.rank_and_alpha(name)
            return LoRALinear(in_features, out_features, r, alpha, dropout, rslora, dora, bias)
        return plain_linear(in_features, out_features, name, bias)

    llama.linear = linear
    try:
        yield config
    finally:
        llama.linear = plain_linear


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Within it, every LoRA layer of `model` (also through a wrapper such as Fabric's: `model.modules()` reaches
    them) computes its base projection alone, DoRA's too: the model is its base model, without a copy of it.
    finetune_dpo.py's reference model is the model under training inside this context. Restored in `finally`."""
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    if any(layer.merged for layer in layers):
        raise ValueError("cannot switch off LoRA layers merged into their weights; unmerge them first")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, disabled in zip(layers, before):
            layer.disabled = disabled


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers of a model by their path in model.py ("blocks.0.attn.q_proj", "lm_head"), also through
    wrappers (Fabric's `_forward_module`, FSDP's `_fsdp_wrapped_module`, torch.compile's `_orig_mod`, DDP's
    `module`)."""
    return {
        ".".join(part for part in name.split(".") if not part.startswith("_")).removeprefix("module."): module
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }


def get_lora_config(model: LLaMA) -> Optional[LoRAConfig]:
    """The LoRA settings a model was built with, read off its layers; None for a model without LoRA. The most common
    rank and alpha are `r` and `alpha`, any other in `ranks` and `alphas`, so the same layers always read the same."""
    layers = lora_layers(model)
    if not layers:
        return None
    r = Counter(layer.lora.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.lora.alpha for layer in layers.values()).most_common(1)[0][0]
    first = next(iter(layers.values())).lora
    return LoRAConfig(
        r,
        alpha,
        first.dropout.p,
        targets=tuple(
            target for target, name in TARGETS.items() if any(path.rpartition(".")[2] == name for path in layers)
        ),
        rslora=first.rslora,
        dora=first.magnitude is not None,
        ranks={path: layer.lora.r for path, layer in layers.items() if layer.lora.r != r},
        alphas={path: layer.lora.alpha for path, layer in layers.items() if layer.lora.alpha != alpha},
    )


def mark_only_lora_as_trainable(model: LLaMA) -> None:
    """Freezes the base model: only LoRA's A and B (and DoRA's magnitude) learn."""
    for name, param in model.named_parameters():
        param.requires_grad = is_lora_tensor(name)


def lora_state_dict(model: LLaMA) -> dict[str, torch.Tensor]:
    """What an adapter consists of: every LoRA A and B (and DoRA magnitude), by its name in the checkpoint (also
    through a wrapper such as Fabric's); the parameters themselves (keep_vars)."""
    return {name: param for name, param in model.state_dict(keep_vars=True).items() if is_lora_tensor(name)}


def is_lora_tensor(name: str) -> bool:
    """Whether the parameter `name` belongs to LoRA (A, B, DoRA's magnitude): they live in each LoRALinear's `lora`."""
    return ".lora." in name


def merge_lora_weights(model: LLaMA) -> None:
    """Folds every LoRA update into its layer's weight, so inference runs at the base model's speed."""
    if isinstance(model.lm_head, LoRALinear) and model.config.tie_embeddings:
        # merging into a head that shares the embedding's weight would change the embedding too
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        model.config = replace(model.config, tie_embeddings=False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()


def merged_state_dict(model: LLaMA) -> dict[str, torch.Tensor]:
    """The weights of a model after `merge_lora_weights`, under a base checkpoint's names (what scripts/merge_lora.py
    and scripts/export_gguf.py write): no LoRA tensors, and a head tied to the embedding stored once, as the
    embedding."""
    state_dict = {name: t for name, t in model.state_dict().items() if ".lora." not in name}
    if model.config.tie_embeddings:
        del state_dict["lm_head.weight"]
    return state_dict


def save_lora_checkpoint(
    model: LLaMA, path: Path, chat_template: Optional[str] = None, training: Optional[dict] = None
) -> None:
    """Writes the adapter (`lora_state_dict`) to a safetensors file whose metadata holds the LoRA settings
    and the base model's config, so that loading it never asks for r, alpha or the targets again, the chat
    template of the conversations it was trained on, if any (`read_lora_chat_template`), and `training`, how it was
    trained, if given (finetune_dpo.py's method and settings; no reader needs it)."""
    lora_config = get_lora_config(model)
    if lora_config is None:
        raise ValueError("the model has no LoRA layers to save; build it inside lora()")
    save_adapter_file(path, lora_state_dict(model), "lora", asdict(lora_config), model.config, chat_template, training)


def save_lora_tensors(
    tensors: dict[str, torch.Tensor],
    lora_config: LoRAConfig,
    config: Config,
    path: Path,
    chat_template: Optional[str] = None,
    training: Optional[dict] = None,
) -> None:
    """`save_lora_checkpoint` for LoRA tensors without their model (those a train state holds, whole even when the
    model is sharded: train_state.save_train_state), checked against a model of `config` with `lora_config` built on
    the meta device (no memory: only the adapter's tensors are real)."""
    with torch.device("meta"), lora(**asdict(lora_config)):
        skeleton = LLaMA(config)
    load_lora_state_dict(skeleton, tensors, path)
    save_lora_checkpoint(skeleton, path, chat_template, training)


def read_lora_config(path: Path) -> tuple[LoRAConfig, Config]:
    """The LoRA settings and the base model's config recorded in a LoRA checkpoint, read without its tensors."""
    metadata = read_lora_metadata(path)
    return LoRAConfig.from_dict(json.loads(metadata["lora"])), Config(**json.loads(metadata["model_config"]))


def read_lora_chat_template(path: Path) -> Optional[str]:
    """The chat template of the conversations the adapter was trained on (prepare_chat.py), None for Alpaca data."""
    return read_lora_metadata(path).get("chat_template")


def read_lora_metadata(path: Path) -> dict[str, str]:
    metadata = read_safetensors_metadata(path, "LoRA checkpoint")
    if "adapter" in metadata and "model_config" in metadata:
        raise ValueError(
            f"{path} is a LLaMA-Adapter checkpoint (adapter.py), not a LoRA one; LLaMA-Adapter files go to "
            "--adapter_path (generate with generate_adapter.py)"
        )
    if "lora" not in metadata or "model_config" not in metadata:
        raise ValueError(
            f"{path} has no LoRA settings in its metadata; it was not written by lora.save_lora_checkpoint "
            "(for an adapter trained with Hugging Face PEFT, run scripts/import_peft.py first)"
        )
    return metadata


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
    base in 4 or 8 bits (quantize.QUANTIZE_MODES), LoRA on top; an adapter trained with or without it fits either
    way."""
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
    same settings on the same base; a mismatch raises a ValueError that names it."""
    lora_config, base_config = read_lora_config(path)
    check_same_base(base_config, model.config, path)
    ours = get_lora_config(model)
    if ours is None:
        raise ValueError(f"the model has no LoRA layers for {path}; build it with lora.load_lora_model")
    differences = [
        f"{field}={getattr(lora_config, field)} (model: {getattr(ours, field)})"
        for field in ("r", "alpha", "targets", "rslora", "dora", "ranks", "alphas")
        if getattr(lora_config, field) != getattr(ours, field)
    ]
    if differences:
        raise ValueError(
            f"{path} holds LoRA with other settings than the model's: {', '.join(differences)}; "
            "build the model with lora.load_lora_model, which reads them from the checkpoint"
        )
    try:
        state_dict = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a complete safetensors file ({e})") from None
    load_lora_state_dict(model, state_dict, path)


def lora_config_for(flags: dict, lora_path: Optional[Path], base_config: Config) -> LoRAConfig:
    """The LoRA settings of a fine-tuning run from its --lora_* `flags` (r, alpha, targets, ...: None where left out,
    LoRAConfig's default then), or, with `lora_path` (an adapter to start from), the adapter's own, after checking that
    it was trained on `base_config`'s model; a flag given with another value than the adapter's is a mistake."""
    given = LoRAConfig(**{key: value for key, value in flags.items() if value is not None})
    if lora_path is None:
        return given
    lora_config, adapter_base = read_lora_config(lora_path)
    check_same_base(adapter_base, base_config, lora_path)
    differences = [
        f"--lora_{key} {getattr(given, key)} (the adapter's: {getattr(lora_config, key)})"
        for key, value in flags.items()
        if value is not None and getattr(given, key) != getattr(lora_config, key)
    ]
    if differences:
        raise ValueError(
            f"--lora_path {lora_path} was trained with other LoRA settings than {', '.join(differences)}; leave "
            "those flags out: the adapter's are used"
        )
    return lora_config


def check_same_base(adapter_base: Config, model_config: Config, path: Path) -> None:
    # block_size only limits the sequence length; every other field changes the weights or their meaning
    differences = [
        f"{field}={value} (model: {getattr(model_config, field)})"
        for field, value in asdict(adapter_base).items()
        if field != "block_size" and value != getattr(model_config, field)
    ]
    if differences:
        raise ValueError(
            f"{path} was trained on another base model: {', '.join(differences)}; "
            "use the checkpoint directory it was trained on"
        )


def load_lora_state_dict(model: LLaMA, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Assigns adapter tensors to the model's LoRA parameters, after checking every name and shape; also works for
    a base left on the meta device."""
    assign_adapter_tensors(model, state_dict, lora_state_dict(model), source)
