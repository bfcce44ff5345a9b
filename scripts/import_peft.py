"""Imports a LoRA adapter trained with Hugging Face PEFT as a LoRA checkpoint of this repository.

    python scripts/import_peft.py --adapter_dir out/peft-adapter --out_path out/lora/imported.safetensors

Reads `adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`); the base model's
config comes from `--checkpoint_dir`, by default `checkpoints/<base_model_name_or_path>` as
scripts/download.py lays it out. Adapters that lora.py cannot represent are refused with the reason.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent))
from export_peft import peft_to_lit_name
from lora import TARGETS, LoRAConfig, load_lora_state_dict, lora, save_lora_checkpoint
from model import LLaMA
from utils import cli, load_config, load_tensor_file

# adapter_config.json settings that lora.py has no equivalent for (unset, empty, false or "none" means unused)
UNSUPPORTED = {
    "use_dora": "DoRA",
    "use_rslora": "rank-stabilised scaling (rslora)",
    "rank_pattern": "a per-module rank (rank_pattern)",
    "alpha_pattern": "a per-module alpha (alpha_pattern)",
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
    """Converts the PEFT LoRA adapter in `adapter_dir` into a LoRA checkpoint at `out_path`.

    Args:
        adapter_dir: a directory written by PEFT's `save_pretrained` (adapter_config.json + adapter weights).
        out_path: the LoRA checkpoint to write (.safetensors), for generate_lora.py or scripts/merge_lora.py.
        checkpoint_dir: the converted base checkpoint the adapter belongs to; by default
            checkpoints/<base_model_name_or_path from adapter_config.json>.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} has no adapter_config.json; pass the directory PEFT's save_pretrained wrote")
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir} holds a {peft_config.get('peft_type')} adapter; only LoRA can be imported")
    for key, what in UNSUPPORTED.items():
        if peft_config.get(key) and peft_config[key] != "none":
            raise ValueError(f"{adapter_dir} uses {what} ({key}={peft_config[key]!r}), which lora.py cannot represent")
    if str(peft_config.get("init_lora_weights")).lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"{adapter_dir} was initialised with {peft_config['init_lora_weights']!r}, which also changes the base "
            "weights; convert it to a plain LoRA adapter with PEFT (path_initial_model_for_weight_conversion) first"
        )

    if checkpoint_dir is None:
        if not peft_config.get("base_model_name_or_path"):
            raise ValueError("adapter_config.json names no base model; pass --checkpoint_dir")
        checkpoint_dir = Path("checkpoints") / peft_config["base_model_name_or_path"]
    base_config = load_config(checkpoint_dir)

    weights = read_adapter_weights(adapter_dir)
    state_dict = {}
    for name, tensor in weights.items():
        ours = peft_to_lit_name(name)
        if ours is None:
            raise ValueError(f"{adapter_dir} holds {name!r}, which is not the LoRA A or B of a LLaMA projection")
        state_dict[ours] = tensor
    adapted = {name.rpartition(".lora.")[0].rpartition(".")[2] for name in state_dict}  # q_proj, v_proj, ...
    for target, modules in TARGETS.items():  # our module names are the Hub's
        if 0 < len(adapted & set(modules)) < len(modules):
            raise ValueError(
                f"{adapter_dir} adapts {', '.join(sorted(adapted & set(modules)))} but not all of "
                f"{', '.join(modules)}; lora.py adapts these together"
            )

    targets = tuple(target for target, modules in TARGETS.items() if adapted & set(modules))
    lora_config = LoRAConfig(peft_config["r"], peft_config["lora_alpha"], peft_config.get("lora_dropout", 0.0), targets)
    with lora(**asdict(lora_config)), torch.device("meta"):
        model = LLaMA(base_config)  # the base stays on the meta device: only its LoRA tensors are real
    load_lora_state_dict(model, state_dict, adapter_dir)
    save_lora_checkpoint(model, out_path)
    print(f"Wrote {out_path} (r={lora_config.r}, alpha={lora_config.alpha}, targets: {', '.join(lora_config.targets)})", file=sys.stderr)


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return load_tensor_file(adapter_dir / name)
    raise ValueError(f"{adapter_dir} has no adapter_model.safetensors or adapter_model.bin")


if __name__ == "__main__":
    cli(import_peft)
