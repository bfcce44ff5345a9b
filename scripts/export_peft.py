"""Exports an adapter of this repository as a Hugging Face PEFT adapter: a LoRA checkpoint, or a LLaMA-Adapter v1 one
as PEFT's adaption prompt.

    python scripts/export_peft.py --lora_path out/lora/adapter.safetensors --out_dir out/peft \
        --base_model_name_or_path meta-llama/Llama-2-7b-hf
    python scripts/export_peft.py --adapter_path out/adapter/adapter.safetensors --out_dir out/peft-adapter

Writes `adapter_model.safetensors` and `adapter_config.json`, which `peft.PeftModel.from_pretrained`
loads onto the transformers `LlamaForCausalLM` of the same base. LoRA: the targets as PEFT's target_modules, rsLoRA as
use_rslora, DoRA as use_dora (its magnitudes as lora_magnitude_vector), per-module ranks and alphas as rank_pattern and
alpha_pattern keyed by the module's full Hub path. Our q/k rows are already in the Hub's rotary layout
(scripts/convert_hf_checkpoint.py copies them unchanged), so the tensors map one to one. LLaMA-Adapter v1: peft_type
ADAPTION_PROMPT with its adapter_len and adapter_layers, each layer's prompt and gate as adaption_prompt and
adaption_gate (adapter.py says how the two formulations agree). v2 has no PEFT counterpart (PEFT has no learned bias
and scale), and is refused.
"""

import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent))
from adapter import read_adapter_config
from convert_hf_checkpoint import hf_to_lit_name, lit_to_hf_name
from lora import TARGETS, read_lora_config
from utils import atomic_path, cli

PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel (or AdaptionPromptModel) -> LlamaForCausalLM


def export_peft(
    *,
    out_dir: Path,
    lora_path: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    base_model_name_or_path: Optional[str] = None,
) -> None:
    """Writes the adapter `lora_path` or `adapter_path` as a PEFT adapter directory.

    Args:
        out_dir: where adapter_model.safetensors and adapter_config.json go; created if needed.
        lora_path: a LoRA checkpoint written by finetune_lora.py (lora.save_lora_checkpoint).
        adapter_path: a LLaMA-Adapter v1 checkpoint (adapter.save_adapter_checkpoint), instead of --lora_path.
        base_model_name_or_path: the Hub id of the base model (e.g. meta-llama/Llama-2-7b-hf), recorded in
            adapter_config.json so that PEFT can find the base on its own.
    """
    if (lora_path is None) == (adapter_path is None):
        raise ValueError("pass either --lora_path (a LoRA checkpoint) or --adapter_path (a LLaMA-Adapter one)")
    if lora_path is not None:
        adapter_config, tensors = lora_to_peft(lora_path)
    else:
        adapter_config, tensors = adaption_prompt_to_peft(adapter_path)
    adapter_config = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        **adapter_config,
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "adapter_model.safetensors") as tmp:
        save_file({lit_to_peft_name(name): t for name, t in tensors.items()}, tmp, metadata={"format": "pt"})
    with atomic_path(out_dir / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(adapter_config, indent=2) + "\n")
    print(f"Wrote {out_dir}/adapter_model.safetensors and adapter_config.json", file=sys.stderr)


def lora_to_peft(lora_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's adapter_config.json entries for a LoRA checkpoint, and its tensors."""
    lora_config, _ = read_lora_config(lora_path)
    adapter_config = {
        "peft_type": "LORA",
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
    }
    return adapter_config, load_file(lora_path)


def adaption_prompt_to_peft(adapter_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's adapter_config.json entries for a LLaMA-Adapter v1 checkpoint, and its tensors in PEFT's shapes."""
    adapter_config, base_config = read_adapter_config(adapter_path)
    if adapter_config.version != 1:
        raise ValueError(
            f"{adapter_path} is a LLaMA-Adapter v2, whose learned biases, scales and norms PEFT has no place for; "
            "only v1 (the prompts alone) exports to PEFT"
        )
    if base_config.attention_bias:
        raise ValueError(
            f"{adapter_path} adapts a base whose o_proj has a bias, which PEFT's adaption prompt adds a second time "
            "(it applies o_proj to the prompt's output on its own); it cannot export with the same outputs"
        )
    tensors = load_file(adapter_path)
    # ours: prompt (adapter_len, n_embd); PEFT's: (1, adapter_len, n_embd)
    tensors = {name: t[None] if name.endswith(".prompt") else t for name, t in tensors.items()}
    peft_config = {
        "peft_type": "ADAPTION_PROMPT",
        "adapter_len": adapter_config.adapter_len,
        "adapter_layers": adapter_config.adapter_layers,
        "target_modules": "self_attn",
    }
    return peft_config, tensors


def lit_to_hf_module(path: str) -> str:
    """blocks.0.attn.q_proj -> model.layers.0.self_attn.q_proj: the module's path in transformers' LlamaForCausalLM,
    which PEFT's rank_pattern and alpha_pattern match (a regular expression on the end of the path: the whole path
    picks exactly this module)."""
    return lit_to_hf_name(f"{path}.weight").removesuffix(".weight")


# our adapter tensors' last part and PEFT's
PEFT_SUFFIXES = {"A": ".lora_A.weight", "B": ".lora_B.weight", "magnitude": ".lora_magnitude_vector"}
# a LLaMA-Adapter prompt and gate, ours (blocks.3.attn.adaption_prompt.gate) and PEFT's (...self_attn.adaption_gate)
OUR_PROMPT_NAME = re.compile(r"blocks\.(\d+)\.attn\.adaption_prompt\.(prompt|gate)")
PEFT_PROMPT_NAME = re.compile(re.escape(PEFT_PREFIX) + r"model\.layers\.(\d+)\.self_attn\.adaption_(prompt|gate)")


def lit_to_peft_name(name: str) -> str:
    """blocks.0.attn.q_proj.lora.A -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight;
    blocks.3.attn.adaption_prompt.gate -> base_model.model.model.layers.3.self_attn.adaption_gate"""
    prompt = OUR_PROMPT_NAME.fullmatch(name)
    if prompt:
        return f"{PEFT_PREFIX}model.layers.{prompt[1]}.self_attn.adaption_{prompt[2]}"
    module, _, tensor = name.rpartition(".lora.")
    return PEFT_PREFIX + lit_to_hf_module(module) + PEFT_SUFFIXES[tensor]


def peft_to_lit_name(name: str) -> Optional[str]:
    """The reverse of `lit_to_peft_name`; None for a name that is not a LoRA A, B or DoRA magnitude of a module we
    have, nor an adaption prompt or gate."""
    prompt = PEFT_PROMPT_NAME.fullmatch(name)
    if prompt:
        return f"blocks.{prompt[1]}.attn.adaption_prompt.{prompt[2]}"
    for tensor, suffix in PEFT_SUFFIXES.items():
        if name.startswith(PEFT_PREFIX) and name.endswith(suffix):
            ours = hf_to_lit_name(name.removeprefix(PEFT_PREFIX).removesuffix(suffix) + ".weight")
            if ours is not None and not ours.startswith("model."):  # names it does not know come back unchanged
                return ours.removesuffix("weight") + f"lora.{tensor}"
    return None


if __name__ == "__main__":
    cli(export_peft)
