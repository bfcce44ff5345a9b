"""LLaMA-Adapter: a learned prompt that the top layers attend to through a gate that starts at zero (v1, Zhang et al.
2023, https://arxiv.org/abs/2303.16199), and v2's bias and scale on every projection with trained norms (Gao et al.
2023, https://arxiv.org/abs/2304.15010).

In each of the top `adapter_layers` blocks, attention also attends to `adapter_len` learned vectors, the prompt: the
layer's own k_proj and v_proj make its keys and values (no rotary embedding: it has no position), the queries score
them in a softmax of their own, and the result, times the layer's gate, is added to the attention's output before
o_proj. The gate starts at zero, so training starts from the base model exactly. v2 also learns, for every projection
of the blocks, y = scale ⊙ (W·x + bias), starting at scale 1 and bias 0, and the weights of every RMSNorm.

    with adapter(version=1, adapter_len=10, adapter_layers=30):
        model = load_model(checkpoint_dir)  # the base weights; the prompts and gates get their initial values
    mark_only_adapter_as_trainable(model)
    ...  # train
    save_adapter_checkpoint(model, "out/adapter/adapter.safetensors")  # self-describing
    model = load_adapter_model(checkpoint_dir, "out/adapter/adapter.safetensors")  # for inference

The prompt attention is PEFT's `adaption_prompt` (scripts/export_peft.py and import_peft.py convert both ways, and
tests/test_adapter.py checks the logits): one gate per layer, a scalar multiplying the prompt's softmax; the prompt
starts as N(0, 1) vectors. LitGPT gates each head with a gate of its own (n_head per layer). PEFT adds o_proj(prompt
output) to the layer's output, we add the prompt output before o_proj: the same for a projection without bias.

v2's bias, scale and norms merge into the weights (`merge_adapter_v2`: a checkpoint whose projections have biases,
Config.attention_bias and mlp_bias); a prompt cannot merge: it is attention over extra keys and values, not a change of
any weight. v2 with adapter_layers=0 learns no prompt, and merges whole.
"""

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

import model as llama
from lora import check_same_base
from model import Config, LLaMA
from utils import assign_adapter_tensors, load_config, load_model, read_safetensors_metadata, save_adapter_file


@dataclass
class AdapterConfig:
    """The LLaMA-Adapter settings, as `adapter()` takes them and adapter checkpoints record them."""

    version: int = 1  # 1: the prompts only; 2: also a bias and scale on every projection of the blocks, and the norms
    adapter_len: int = 10  # prompt vectors per adapted layer
    adapter_layers: int = 30  # the top layers that get a prompt (the paper's: 30 of LLaMA 7B's 32); 0 for v2 alone

    def __post_init__(self):
        if self.version not in (1, 2):
            raise ValueError(f"the LLaMA-Adapter version must be 1 or 2, not {self.version}")
        if not isinstance(self.adapter_layers, int) or self.adapter_layers < (1 if self.version == 1 else 0):
            least = "1 (v1 learns nothing else)" if self.version == 1 else "0"
            raise ValueError(f"adapter_layers must be a whole number of at least {least}, not {self.adapter_layers}")
        if self.adapter_layers == 0:
            self.adapter_len = 0  # no prompt: its length means nothing
        elif not isinstance(self.adapter_len, int) or self.adapter_len < 1:
            raise ValueError(
                f"adapter_len, the prompt's length, must be a whole number of at least 1, not {self.adapter_len}"
            )

    def check_fits(self, config: Config) -> None:
        if self.adapter_layers > config.n_layer:
            raise ValueError(
                f"adapter_layers {self.adapter_layers} is more than the model's {config.n_layer} layers; "
                f"pass {config.n_layer} or fewer"
            )


class AdaptionPrompt(nn.Module):
    """The prompt of one attention layer and its gate: what the layer's queries also attend to."""

    adapter = True  # not part of a base checkpoint: utils.load_weights initialises it instead

    def __init__(self, config: Config, adapter_len: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(adapter_len, config.n_embd))
        self.gate = nn.Parameter(torch.empty(1))
        self.n_query_groups, self.head_size = config.n_query_groups, config.head_size
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.prompt)  # N(0, 1), as PEFT and the paper's code (an nn.Embedding) start it
        nn.init.zeros_(self.gate)  # zero-init attention: a fresh adapter leaves the model as it is

    def forward(self, q: torch.Tensor, k_proj: nn.Module, v_proj: nn.Module) -> torch.Tensor:
        """q: (B, n_head, T, head_size), the layer's queries with their rotary embedding; k_proj, v_proj: the layer's
        projections. Returns gate · softmax(q·kᵀ / √head_size)·v over the prompt's keys k and values v, in the shape of
        q: every position attends to the whole prompt, whatever its own position or cache. The keys and values are
        projected anew at every call, also when decoding token by token: keeping them measured no faster
        (howto/finetune_adapter.md)."""
        B, n_head = q.size(0), q.size(1)
        n = self.prompt.size(0)
        k = k_proj(self.prompt).view(1, n, self.n_query_groups, self.head_size).transpose(1, 2)  # (1, groups, n, hs)
        v = v_proj(self.prompt).view(1, n, self.n_query_groups, self.head_size).transpose(1, 2)
        k, v = k.expand(B, -1, -1, -1).to(q.dtype), v.expand(B, -1, -1, -1).to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_query_groups != n_head)
        return self.gate.to(y.dtype) * y


class BiasScale(nn.Module):
    """v2's learned bias and scale of one projection's outputs."""

    adapter = True  # not part of a base checkpoint: utils.load_weights initialises it instead

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(out_features))
        self.scale = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.scale)  # scale · (W·x + 0) = W·x: the base model


class AdapterV2Linear(nn.Linear):
    """An nn.Linear (its weight frozen, where a checkpoint expects it) whose output is scale ⊙ (W·x + b₀ + bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)  # b₀, the base's own bias, if it has one
        self.bias_scale = BiasScale(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        # in y's dtype: under bf16-mixed the bias and scale are fp32 (finetune_adapter.py) and y is bf16 (autocast),
        # which stays bf16 as every other projection's output, not the whole residual stream promoted to fp32
        return self.bias_scale.scale.to(y.dtype) * (y + self.bias_scale.bias.to(y.dtype))


@contextmanager
def adapter(version: int = 1, adapter_len: int = 10, adapter_layers: int = 30) -> Iterator[AdapterConfig]:
    """A `LLaMA(config)` built inside this context has a prompt and gate in its top `adapter_layers` attention layers
    (AdaptionPrompt), and with version 2 an AdapterV2Linear for every projection of its blocks (the head stays plain:
    a bias there has no place in a Hugging Face LLaMA). A model with fewer layers than `adapter_layers` is refused."""
    config = AdapterConfig(version, adapter_len, adapter_layers)
    plain_linear, plain_prompt = llama.linear, llama.adaption_prompt

    def linear(in_features: int, out_features: int, name: str, bias: bool = False) -> nn.Linear:
        if config.version == 2 and name != "lm_head":
            return AdapterV2Linear(in_features, out_features, bias)
        return plain_linear(in_features, out_features, name, bias)

    def adaption_prompt(model_config: Config, path: str) -> Optional[nn.Module]:
        config.check_fits(model_config)
        layer = int(path.split(".")[1])  # "blocks.3.attn" -> 3
        if layer >= model_config.n_layer - config.adapter_layers:
            return AdaptionPrompt(model_config, config.adapter_len)
        return None

    llama.linear, llama.adaption_prompt = linear, adaption_prompt
    try:
        yield config
    finally:
        llama.linear, llama.adaption_prompt = plain_linear, plain_prompt


def get_adapter_config(model: LLaMA) -> Optional[AdapterConfig]:
    """The LLaMA-Adapter settings a model was built with, read off its modules; None for a model without them."""
    prompts = [module for module in model.modules() if isinstance(module, AdaptionPrompt)]
    v2 = any(isinstance(module, AdapterV2Linear) for module in model.modules())
    if not prompts and not v2:
        return None
    adapter_len = prompts[0].prompt.size(0) if prompts else 0
    return AdapterConfig(version=2 if v2 else 1, adapter_len=adapter_len, adapter_layers=len(prompts))


def adapter_state_dict(model: LLaMA) -> dict[str, torch.Tensor]:
    """What an adapter consists of, by its name in the checkpoint (also through a wrapper such as Fabric's): every
    prompt and gate, and for v2 every bias and scale and the weights of the norms; the parameters themselves
    (keep_vars)."""
    v2 = any(isinstance(module, AdapterV2Linear) for module in model.modules())
    return {name: param for name, param in model.state_dict(keep_vars=True).items() if is_adapter_tensor(name, v2)}


def mark_only_adapter_as_trainable(model: LLaMA) -> None:
    """Freezes the base model: only what `adapter_state_dict` holds learns."""
    v2 = any(isinstance(module, AdapterV2Linear) for module in model.modules())
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_tensor(name, v2)


def is_adapter_tensor(name: str, v2: bool) -> bool:
    """Whether the parameter `name` belongs to the adapter: a prompt or gate, and in a v2 model also a bias, scale or
    norm weight (its names end in "norm.weight": attn_norm, mlp_norm and the final norm)."""
    return ".adaption_prompt." in name or ".bias_scale." in name or (v2 and name.endswith("norm.weight"))


def save_adapter_checkpoint(
    model: LLaMA, path: Path, chat_template: Optional[str] = None, training: Optional[dict] = None
) -> None:
    """Writes the adapter (`adapter_state_dict`) to a safetensors file whose metadata holds the LLaMA-Adapter settings
    and the base model's config, so that loading it never asks for them again, the chat template of the
    conversations it was trained on, if any (`read_adapter_chat_template`), and `training`, how it was trained, if
    given (no reader needs it)."""
    adapter_config = get_adapter_config(model)
    if adapter_config is None:
        raise ValueError("the model has no LLaMA-Adapter prompts or v2 layers to save; build it inside adapter()")
    save_adapter_file(
        path, adapter_state_dict(model), "adapter", asdict(adapter_config), model.config, chat_template, training
    )


def save_adapter_tensors(
    tensors: dict[str, torch.Tensor],
    adapter_config: AdapterConfig,
    config: Config,
    path: Path,
    chat_template: Optional[str] = None,
    training: Optional[dict] = None,
) -> None:
    """`save_adapter_checkpoint` for adapter tensors without their model (those a train state holds, whole even when
    the model is sharded: train_state.save_train_state), checked against a model of `config` with `adapter_config`
    built on the meta device (no memory: only the adapter's tensors are real)."""
    with torch.device("meta"), adapter(**asdict(adapter_config)):
        skeleton = LLaMA(config)
    load_adapter_state_dict(skeleton, tensors, path)
    save_adapter_checkpoint(skeleton, path, chat_template, training)


def read_adapter_config(path: Path) -> tuple[AdapterConfig, Config]:
    """The LLaMA-Adapter settings and the base model's config recorded in an adapter checkpoint, read without its
    tensors."""
    metadata = read_adapter_metadata(path)
    return AdapterConfig(**json.loads(metadata["adapter"])), Config(**json.loads(metadata["model_config"]))


def read_adapter_chat_template(path: Path) -> Optional[str]:
    """The chat template of the conversations the adapter was trained on (prepare_chat.py), None for Alpaca data."""
    return read_adapter_metadata(path).get("chat_template")


def read_adapter_metadata(path: Path) -> dict[str, str]:
    metadata = read_safetensors_metadata(path, "LLaMA-Adapter checkpoint")
    if "lora" in metadata and "model_config" in metadata:
        raise ValueError(
            f"{path} is a LoRA checkpoint (lora.py), not a LLaMA-Adapter one; LoRA files go to --lora_path "
            "(generate with generate_lora.py)"
        )
    if "adapter" not in metadata or "model_config" not in metadata:
        raise ValueError(
            f"{path} has no LLaMA-Adapter settings in its metadata; it was not written by "
            "adapter.save_adapter_checkpoint (for a PEFT adaption_prompt adapter, run scripts/import_peft.py first)"
        )
    return metadata


def load_adapter_model(
    checkpoint_dir: Path, adapter_path: Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None
) -> LLaMA:
    """The base model of `checkpoint_dir` with the LLaMA-Adapter at `adapter_path` (its settings read from the file)."""
    adapter_config, base_config = read_adapter_config(adapter_path)
    check_same_base(base_config, load_config(checkpoint_dir), adapter_path)  # before the slow part
    with adapter(**asdict(adapter_config)):
        model = load_model(checkpoint_dir, device, dtype)
    load_adapter_checkpoint(model, adapter_path)
    return model


def load_adapter_checkpoint(model: LLaMA, path: Path) -> None:
    """Loads an adapter written by `save_adapter_checkpoint` into a model built inside `adapter()` with the same
    settings on the same base; a mismatch raises a ValueError that names it."""
    adapter_config, base_config = read_adapter_config(path)
    check_same_base(base_config, model.config, path)
    ours = get_adapter_config(model)
    if ours != adapter_config:
        raise ValueError(
            f"{path} holds a LLaMA-Adapter with other settings ({adapter_config}) than the model's ({ours}); build "
            "the model with adapter.load_adapter_model, which reads them from the checkpoint"
        )
    try:
        state_dict = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a complete safetensors file ({e})") from None
    load_adapter_state_dict(model, state_dict, path)


def load_adapter_state_dict(model: LLaMA, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Assigns adapter tensors to the model's adapter parameters (`adapter_state_dict`), after checking every name and
    shape; also works for a base left on the meta device."""
    assign_adapter_tensors(model, state_dict, adapter_state_dict(model), source)


@torch.no_grad()
def merge_adapter_v2(model: LLaMA) -> LLaMA:
    """A plain LLaMA (no adapter modules) with a v2 model's bias, scale and norms folded into its weights: each
    projection becomes W' = scale ⊙ W (row by row) with the bias b' = scale ⊙ (b₀ + bias), in a model whose Config has
    attention_bias and mlp_bias. A prompt cannot fold into weights, and is refused. `model`'s weights are scaled in
    place and shared by the model returned (one copy in memory): use that one afterwards."""
    adapter_config = get_adapter_config(model)
    if adapter_config is None or adapter_config.version != 2 or adapter_config.adapter_layers:
        what = "no LLaMA-Adapter" if adapter_config is None else f"a prompt in {adapter_config.adapter_layers} layers"
        raise ValueError(
            f"the model has {what}, which cannot merge into weights: only v2's bias, scale and norms do (a v2 adapter "
            "trained with adapter_layers 0); generate with the adapter unmerged (generate_adapter.py)"
        )
    state_dict = {name: t for name, t in model.state_dict().items() if ".bias_scale." not in name}
    for name, module in model.named_modules():
        if isinstance(module, AdapterV2Linear):
            scale, bias = module.bias_scale.scale, module.bias_scale.bias
            state_dict[f"{name}.weight"] = module.weight.mul_(scale.to(module.weight.dtype)[:, None])
            base_bias = 0 if module.bias is None else module.bias
            state_dict[f"{name}.bias"] = (scale * (base_bias + bias)).to(module.weight.dtype)
    config = replace(model.config, attention_bias=True, mlp_bias=True)
    with torch.device("meta"):
        merged = LLaMA(config)
    merged.load_state_dict(state_dict, assign=True)
    if config.tie_embeddings:
        merged.lm_head.weight = merged.embed.weight
    return merged.train(model.training)
