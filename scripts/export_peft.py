"""Exports a LoRA checkpoint of this repository as a Hugging Face PEFT adapter.

    python scripts/export_peft.py --lora_path out/lora/adapter.safetensors --out_dir out/peft \
        --base_model_name_or_path meta-llama/Llama-2-7b-hf

Writes `adapter_model.safetensors` and `adapter_config.json`, which `peft.PeftModel.from_pretrained`
loads onto the transformers `LlamaForCausalLM` of the same base: the targets as PEFT's target_modules, rsLoRA as
use_rslora, DoRA as use_dora (its magnitudes as lora_magnitude_vector), per-module ranks and alphas as rank_pattern and
alpha_pattern keyed by the module's full Hub path. Our q/k rows are already in the Hub's rotary layout
(scripts/convert_hf_checkpoint.py copies them unchanged), so the tensors map one to one.
"""

import json
import sys
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent))
from convert_hf_checkpoint import hf_to_lit_name, lit_to_hf_name
from lora import TARGETS, read_lora_config
from utils import atomic_path, cli

PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> LlamaForCausalLM


def export_peft(*, lora_path: Path, out_dir: Path, base_model_name_or_path: Optional[str] = None) -> None:
    """Writes the LoRA checkpoint `lora_path` as a PEFT adapter directory.

    Args:
        lora_path: a LoRA checkpoint written by finetune_lora.py (lora.save_lora_checkpoint).
        out_dir: where adapter_model.safetensors and adapter_config.json go; created if needed.
        base_model_name_or_path: the Hub id of the base model (e.g. meta-llama/Llama-2-7b-hf), recorded in
            adapter_config.json so that PEFT can find the base on its own.
    """
    lora_config, _ = read_lora_config(lora_path)
    tensors = load_file(lora_path)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.r,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": sorted(TARGETS[target] for target in lora_config.targets),  # Hub names
        "rank_pattern": {lit_to_hf_module(path): r for path, r in lora_config.ranks.items()},
        "alpha_pattern": {lit_to_hf_module(path): alpha for path, alpha in lora_config.alphas.items()},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": lora_config.rslora,
        "use_dora": lora_config.dora,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "adapter_model.safetensors") as tmp:
        save_file({lit_to_peft_name(name): t for name, t in tensors.items()}, tmp, metadata={"format": "pt"})
    with atomic_path(out_dir / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(adapter_config, indent=2) + "\n")
    print(f"Wrote {out_dir}/adapter_model.safetensors and adapter_config.json", file=sys.stderr)


def lit_to_hf_module(path: str) -> str:
    """blocks.0.attn.q_proj -> model.layers.0.self_attn.q_proj: the module's path in transformers' LlamaForCausalLM,
    which PEFT's rank_pattern and alpha_pattern match (a regular expression on the end of the path: the whole path
    picks exactly this module)."""
    return lit_to_hf_name(f"{path}.weight").removesuffix(".weight")


# our adapter tensors' last part and PEFT's
PEFT_SUFFIXES = {"A": ".lora_A.weight", "B": ".lora_B.weight", "magnitude": ".lora_magnitude_vector"}


def lit_to_peft_name(name: str) -> str:
    """blocks.0.attn.q_proj.lora.A -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    module, _, tensor = name.rpartition(".lora.")
    return PEFT_PREFIX + lit_to_hf_module(module) + PEFT_SUFFIXES[tensor]


def peft_to_lit_name(name: str) -> Optional[str]:
    """The reverse of `lit_to_peft_name`; None for a name that is not a LoRA A, B or DoRA magnitude of a module we
    have."""
    for tensor, suffix in PEFT_SUFFIXES.items():
        if name.startswith(PEFT_PREFIX) and name.endswith(suffix):
            ours = hf_to_lit_name(name.removeprefix(PEFT_PREFIX).removesuffix(suffix) + ".weight")
            if ours is not None and not ours.startswith("model."):  # names it does not know come back unchanged
                return ours.removesuffix("weight") + f"lora.{tensor}"
    return None


if __name__ == "__main__":
    cli(export_peft)
