"""Converts a Hugging Face Hub LLaMA checkpoint into this repository's format.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Reads `config.json` and the weights (safetensors or PyTorch `.bin`, one file or sharded with an index),
one shard at a time, and writes `lit_model.safetensors` and `model_config.json` beside them.
"""

import json
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
from model import ROPE_SCALING_KEYS, Config, LLaMA
from utils import atomic_path, cli, load_tensor_file

# Hub tensor names -> ours; per-layer names follow `model.layers.{i}.` -> `blocks.{i}.`
TOP_LEVEL_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    # the projections' biases, in a checkpoint whose config has attention_bias or mlp_bias (a merged LLaMA-Adapter v2)
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "self_attn.o_proj.bias": "attn.o_proj.bias",
    "mlp.gate_proj.bias": "mlp.gate_proj.bias",
    "mlp.up_proj.bias": "mlp.up_proj.bias",
    "mlp.down_proj.bias": "mlp.down_proj.bias",
}


def convert_hf_checkpoint(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"), dtype: Optional[str] = None
) -> None:
    """Converts the Hub weights in `checkpoint_dir` into lit_model.safetensors and model_config.json.

    Args:
        checkpoint_dir: directory holding the Hub files (`config.json` and the weights), as written by
            scripts/download.py. The converted files are written into it.
        dtype: store the weights as "bfloat16", "float16" or "float32"; by default as they are in the files.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise ValueError(f"{checkpoint_dir} has no config.json; download the checkpoint with scripts/download.py first")
    target_dtype = None
    if dtype is not None:
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"--dtype must be bfloat16, float16 or float32, not {dtype!r}")
        target_dtype = getattr(torch, dtype)
    try:
        config = config_from_hf(checkpoint_dir / "config.json")
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot use {checkpoint_dir / 'config.json'}: {e}") from None

    with torch.device("meta"):
        expected = set(LLaMA(config).state_dict())
    if config.tie_embeddings:
        expected.discard("lm_head.weight")  # stored once, as the embedding

    converted = {}
    for shard in tqdm(weight_files(checkpoint_dir), desc="Converting shards", disable=None):
        for hf_name, tensor in load_tensor_file(shard).items():
            name = hf_to_lit_name(hf_name)
            if name is None or (config.tie_embeddings and name == "lm_head.weight"):
                continue
            if name not in expected:
                raise ValueError(f"{shard.name} holds {hf_name!r}, which model.py has no place for")
            converted[name] = (tensor.to(target_dtype) if target_dtype else tensor).contiguous()
    missing = expected - set(converted)
    if missing:
        raise ValueError(f"the weights in {checkpoint_dir} lack {len(missing)} tensors, e.g. {sorted(missing)[:3]}")

    with atomic_path(checkpoint_dir / "lit_model.safetensors") as tmp:
        save_file(converted, tmp, metadata={"format": "pt"})
    with atomic_path(checkpoint_dir / "model_config.json") as tmp:
        config.to_file(tmp)
    size = sum(t.numel() * t.element_size() for t in converted.values())
    print(
        f"Wrote {checkpoint_dir / 'lit_model.safetensors'} ({size / 1e9:.2f} GB) and model_config.json", file=sys.stderr
    )


def config_from_hf(path: Path) -> Config:
    """Reads a Hub `config.json` of a LlamaForCausalLM or MistralForCausalLM, old or new style."""
    hf = json.loads(Path(path).read_text())
    where = f"{path}:"
    if hf.get("model_type") not in ("llama", "mistral"):
        raise ValueError(f"{where} model_type {hf.get('model_type')!r} is not supported (llama or mistral only)")
    # transformers < 5 writes `rope_theta` and `rope_scaling`; transformers 5 nests both in `rope_parameters`
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"{where} rope scaling {rope_type!r} is not implemented; only plain rotary embeddings and "
            f"Llama 3.1's 'llama3' scaling are"
        )
    rope_scaling = None
    if rope_type == "llama3":
        missing = [key for key in ROPE_SCALING_KEYS if key not in rope]
        if missing:
            raise ValueError(f"{where} 'llama3' rope scaling lacks {', '.join(missing)}")
        rope_scaling = {key: rope[key] for key in ROPE_SCALING_KEYS}
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where} hidden_act={hf['hidden_act']!r} is not supported by model.py")
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    if head_dim * n_head != hf["hidden_size"]:
        raise ValueError(
            f"{where} head_dim {head_dim} x {n_head} heads != hidden_size {hf['hidden_size']}; not supported"
        )
    block_size = hf.get("max_position_embeddings", 4096)
    # Mistral v0.1 attends over a sliding window; within one window that is plain causal attention (v0.3 has
    # none: null)
    if hf.get("sliding_window"):
        block_size = min(block_size, hf["sliding_window"])
    return Config(
        block_size=block_size,
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        rope_base=float(rope.get("rope_theta") or hf.get("rope_theta", 10000.0)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        rope_scaling=rope_scaling,
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
    )


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """Prefers safetensors over `.bin`; a sharded checkpoint lists its shards in an index file."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = checkpoint_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [name for name in shards if not (checkpoint_dir / name).is_file()]
            if missing:
                raise ValueError(f"{index} lists {missing[0]}, which is not in {checkpoint_dir}; download it again")
            return [checkpoint_dir / name for name in shards]
        if (checkpoint_dir / single_name).is_file():
            return [checkpoint_dir / single_name]
    raise ValueError(f"{checkpoint_dir} has no model*.safetensors or pytorch_model*.bin weights")


def hf_to_lit_name(name: str) -> Optional[str]:
    """Our name for a Hub tensor name; None for buffers older checkpoints stored (rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return rename(name, TOP_LEVEL_NAMES, LAYER_NAMES, "model.layers.", "blocks.")


def lit_to_hf_name(name: str) -> str:
    top_level = {lit: hf for hf, lit in TOP_LEVEL_NAMES.items()}
    layer = {lit: hf for hf, lit in LAYER_NAMES.items()}
    return rename(name, top_level, layer, "blocks.", "model.layers.")


def rename(name: str, top_level: dict[str, str], layer: dict[str, str], prefix: str, new_prefix: str) -> str:
    if name in top_level:
        return top_level[name]
    index, _, rest = name.removeprefix(prefix).partition(".")
    if name.startswith(prefix) and rest in layer:
        return f"{new_prefix}{index}.{layer[rest]}"
    return name  # not ours to map: the caller reports it


if __name__ == "__main__":
    cli(convert_hf_checkpoint)
