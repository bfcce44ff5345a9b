"""Imports an adapter trained with Hugging Face PEFT: a LoRA adapter as a LoRA checkpoint of this repository, an
adaption prompt as a LLaMA-Adapter v1 checkpoint (adapter.py).

    python scripts/import_peft.py --adapter_dir out/peft-adapter --out_path out/lora/imported.safetensors

Reads `adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`); the base model's
config comes from `--checkpoint_dir`, by default `checkpoints/<base_model_name_or_path>` as
scripts/download.py lays it out. Any LoRA PEFT makes for a LLaMA model imports: some or all projections and the
head, rsLoRA (use_rslora), DoRA (use_dora), per-module ranks and alphas (rank_pattern, alpha_pattern). What a LoRA
adapter of ours cannot hold (fully trained modules, trained embeddings, LoRA on some layers only, ...) is refused
with the reason. An adaption prompt (peft_type ADAPTION_PROMPT) imports with its adapter_len, adapter_layers, prompts
and gates; generate with it through generate_adapter.py.
"""

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent))
from adapter import adapter, adapter_state_dict, save_adapter_checkpoint
from export_peft import PEFT_PREFIX, lit_to_hf_module, peft_to_lit_name
from lora import TARGETS, LoRAConfig, load_lora_state_dict, lora, save_lora_checkpoint
from model import Config, LLaMA
from utils import assign_adapter_tensors, cli, load_config, load_tensor_file

# adapter_config.json settings that lora.py has no equivalent for (unset, empty, false or "none" means unused)
UNSUPPORTED = {
    "modules_to_save": "fully trained modules (modules_to_save)",
    "bias": "trained biases",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "layers_to_transform": "LoRA on some layers only (layers_to_transform)",
    "fan_in_fan_out": "transposed weights (fan_in_fan_out)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "replicated layers (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "quantization-aware LoRA (use_qalora)",
}
# initialisations that also change the base weights, so that the adapter needs PEFT's modified base
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")


def import_peft(*, adapter_dir: Path, out_path: Path, checkpoint_dir: Optional[Path] = None) -> None:
    """Converts the PEFT adapter in `adapter_dir` (LoRA or an adaption prompt) into a checkpoint at `out_path`.

    Args:
        adapter_dir: a directory written by PEFT's `save_pretrained` (adapter_config.json + adapter weights).
        out_path: the checkpoint to write (.safetensors): LoRA for generate_lora.py or scripts/merge_lora.py, an
            adaption prompt for generate_adapter.py.
        checkpoint_dir: the converted base checkpoint the adapter belongs to; by default
            checkpoints/<base_model_name_or_path from adapter_config.json>.
    """
    adapter_dir = Path(adapter_dir)
    peft_config = read_peft_config(adapter_dir)
    if checkpoint_dir is None:
        if not peft_config.get("base_model_name_or_path"):
            raise ValueError("adapter_config.json names no base model; pass --checkpoint_dir")
        checkpoint_dir = Path("checkpoints") / peft_config["base_model_name_or_path"]
    base_config = load_config(checkpoint_dir)

    weights = read_adapter_weights(adapter_dir)
    if peft_config["peft_type"] == "ADAPTION_PROMPT":
        import_adaption_prompt(adapter_dir, peft_config, weights, base_config, out_path)
        return
    if f"{PEFT_PREFIX}lm_head.base_layer.weight" in weights:  # PEFT saves the head it adapts, as an embedding layer
        check_unchanged_head(weights.pop(f"{PEFT_PREFIX}lm_head.base_layer.weight"), checkpoint_dir, adapter_dir)
    state_dict = lora_tensors(adapter_dir, weights, base_config)
    lora_config = lora_config_from_peft(peft_config, state_dict)
    with lora(**asdict(lora_config)), torch.device("meta"):
        model = LLaMA(base_config)  # the base stays on the meta device: only its LoRA tensors are real
    load_lora_state_dict(model, state_dict, adapter_dir)
    save_lora_checkpoint(model, out_path)
    variants = [
        name
        for name, used in (
            ("rslora", lora_config.rslora),
            ("dora", lora_config.dora),
            ("per-module ranks or alphas", lora_config.ranks or lora_config.alphas),
        )
        if used
    ]
    print(
        f"Wrote {out_path} (r={lora_config.r}, alpha={lora_config.alpha}, targets: {', '.join(lora_config.targets)}"
        f"{''.join(', ' + v for v in variants)})",
        file=sys.stderr,
    )


def read_peft_config(adapter_dir: Path) -> dict:
    """adapter_config.json, after checking that it is an adapter this repository can hold: LoRA without what lora.py
    has no equivalent for (UNSUPPORTED, BASE_CHANGING_INITS), or an adaption prompt."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} has no adapter_config.json; pass the directory PEFT's save_pretrained wrote")
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    peft_type = peft_config.get("peft_type")
    if peft_type not in ("LORA", "ADAPTION_PROMPT"):
        raise ValueError(
            f"{adapter_dir} holds a {peft_type} adapter; only LoRA and adaption prompts (LLaMA-Adapter) can be imported"
        )
    for key, what in UNSUPPORTED.items():
        if peft_type == "LORA" and peft_config.get(key) and peft_config[key] != "none":
            raise ValueError(f"{adapter_dir} uses {what} ({key}={peft_config[key]!r}), which lora.py cannot represent")
    if str(peft_config.get("init_lora_weights")).lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"{adapter_dir} was initialised with {peft_config['init_lora_weights']!r}, which also changes the base "
            "weights; convert it to a plain LoRA adapter with PEFT (path_initial_model_for_weight_conversion) first"
        )
    return peft_config


def lora_tensors(adapter_dir: Path, weights: dict[str, torch.Tensor], base_config: Config) -> dict[str, torch.Tensor]:
    """PEFT's LoRA tensors under our names, after checking that each projection is adapted in every layer, as lora.py
    adapts them."""
    state_dict = {}
    for name, tensor in weights.items():
        ours = peft_to_lit_name(name)
        if ours is None:
            raise ValueError(
                f"{adapter_dir} holds {name!r}, which is not the LoRA A, B or DoRA magnitude of a LLaMA projection"
            )
        state_dict[ours] = tensor
    paths = [name.removesuffix(".lora.A") for name in state_dict if name.endswith(".lora.A")]
    for projection in sorted({path.rpartition(".")[2] for path in paths} - {"lm_head"}):  # q_proj, v_proj, ...
        layers = [
            i
            for i in range(base_config.n_layer)
            if any(path.startswith(f"blocks.{i}.") and path.endswith(projection) for path in paths)
        ]
        if len(layers) < base_config.n_layer:
            raise ValueError(
                f"{adapter_dir} adapts {projection} in layers {layers} of {base_config.n_layer} only; lora.py adapts a "
                "projection in every layer"
            )
    return state_dict


def lora_config_from_peft(peft_config: dict, state_dict: dict[str, torch.Tensor]) -> LoRAConfig:
    """The LoRA settings of a PEFT adapter: per-module ranks read off the tensors, alphas as PEFT picks them (the first
    alpha_pattern key that matches the end of the module's path: peft.utils.other.get_pattern_key)."""
    ranks = {
        name.removesuffix(".lora.A"): tensor.shape[0] for name, tensor in state_dict.items() if name.endswith(".lora.A")
    }
    projections = {path.rpartition(".")[2] for path in ranks}  # q_proj, v_proj, ...
    alpha = peft_config["lora_alpha"]
    alphas = {}
    for path in ranks:
        hf_path = lit_to_hf_module(path)
        key = next(
            (key for key in peft_config.get("alpha_pattern") or {} if re.match(rf"(.*\.)?({key})$", hf_path)), None
        )
        alphas[path] = alpha if key is None else peft_config["alpha_pattern"][key]
    return LoRAConfig(
        peft_config["r"],
        alpha,
        peft_config.get("lora_dropout", 0.0),
        targets=tuple(target for target, projection in TARGETS.items() if projection in projections),
        rslora=bool(peft_config.get("use_rslora")),
        dora=bool(peft_config.get("use_dora")),
        ranks={path: r for path, r in ranks.items() if r != peft_config["r"]},
        alphas={path: a for path, a in alphas.items() if a != alpha},
    )


def import_adaption_prompt(
    adapter_dir: Path, peft_config: dict, weights: dict[str, torch.Tensor], base_config: Config, out_path: Path
) -> None:
    """PEFT's adaption prompt as a LLaMA-Adapter v1 checkpoint: the same prompts and gates in the same top layers."""
    if peft_config.get("target_modules") not in (None, "self_attn"):
        raise ValueError(
            f"{adapter_dir} puts its prompts into {peft_config['target_modules']!r} modules; adapter.py puts them into "
            "LLaMA's self_attn layers only"
        )
    if base_config.attention_bias:
        raise ValueError(
            f"{adapter_dir}: the base's o_proj has a bias, which PEFT's adaption prompt adds a second time (it applies "
            "o_proj to the prompt's output on its own); adapter.py cannot give the same outputs"
        )
    state_dict = {}
    for name, tensor in weights.items():
        ours = peft_to_lit_name(name)
        if ours is None or ".adaption_prompt." not in ours:
            raise ValueError(
                f"{adapter_dir} holds {name!r}, which is not the adaption prompt or gate of a LLaMA attention layer"
            )
        state_dict[ours] = tensor.squeeze(0) if ours.endswith(".prompt") else tensor  # PEFT's (1, adapter_len, n_embd)
    settings = dict(version=1, adapter_len=peft_config["adapter_len"], adapter_layers=peft_config["adapter_layers"])
    with adapter(**settings), torch.device("meta"):
        model = LLaMA(base_config)  # the base stays on the meta device: only the prompts and gates are real
    assign_adapter_tensors(model, state_dict, adapter_state_dict(model), adapter_dir)
    save_adapter_checkpoint(model, out_path)
    print(
        f"Wrote {out_path} (LLaMA-Adapter v1, adapter_len={settings['adapter_len']} in the top "
        f"{settings['adapter_layers']} layers)",
        file=sys.stderr,
    )


def check_unchanged_head(head: torch.Tensor, checkpoint_dir: Path, adapter_dir: Path) -> None:
    """PEFT saves the base weight of an adapted lm_head beside its LoRA (it takes it for a possibly trained embedding);
    fine when it is the base's, refused when it was trained, which a LoRA adapter cannot hold."""
    config = load_config(checkpoint_dir)
    name = "embed.weight" if config.tie_embeddings else "lm_head.weight"
    try:
        with safe_open(Path(checkpoint_dir) / "lit_model.safetensors", framework="pt") as f:
            base = f.get_tensor(name)
    except (OSError, SafetensorError) as e:
        raise ValueError(
            f"{adapter_dir} holds lm_head.base_layer.weight, to compare with {checkpoint_dir}'s head, which "
            f"cannot be read ({e})"
        ) from None
    if not torch.equal(head.to(base.dtype), base):
        raise ValueError(
            f"{adapter_dir} holds a trained lm_head (lm_head.base_layer.weight differs from {checkpoint_dir}'s), "
            "which a LoRA adapter cannot hold"
        )


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return load_tensor_file(adapter_dir / name)
    raise ValueError(f"{adapter_dir} has no adapter_model.safetensors or adapter_model.bin")


if __name__ == "__main__":
    cli(import_peft)
