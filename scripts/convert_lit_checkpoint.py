"""Converts a checkpoint directory of this repository into a Hugging Face directory (the reverse of
scripts/convert_hf_checkpoint.py).

    python scripts/convert_lit_checkpoint.py --checkpoint_dir checkpoints/Llama-2-7b-alpaca --out_dir out/hf/Llama-2-7b-alpaca

Writes `config.json` (a LlamaForCausalLM), the weights as `model.safetensors` (or shards of at most
`--max_shard_size_gb` with `model.safetensors.index.json`), the tokenizer's files and `generation_config.json`:
what `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` read, and vLLM too. Works on any
checkpoint directory: a converted one (the round trip Hub -> ours -> Hub gives back the same tensors), the output of
scripts/merge_lora.py (which can also write this format itself: `--format hf`) or of finetune_full.py.
Memory: one tensor at a time is read and converted; a shard is held until it is written.
"""

import json
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent))
from convert_hf_checkpoint import lit_to_hf_name
from model import LLaMA, Config
from tokenizer import Tokenizer
from utils import atomic_path, check_checkpoint_dir, cli, copy_tokenizer, load_config, read_tensors

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def convert_lit_checkpoint(
    checkpoint_dir: Path = Path("checkpoints/Llama-2-7b-alpaca"),
    out_dir: Path = Path("out/hf/Llama-2-7b-alpaca"),
    dtype: Optional[str] = None,
    max_shard_size_gb: float = 5.0,
) -> None:
    """Writes the checkpoint of `checkpoint_dir` as a Hugging Face model directory.

    Args:
        checkpoint_dir: a checkpoint directory of this repository (lit_model.safetensors, model_config.json, the
            tokenizer's files).
        out_dir: the Hugging Face directory to write; created if needed, and it must not be `checkpoint_dir`
            (a converted checkpoint directory still holds the Hub files it came from).
        dtype: store the weights as "bfloat16", "float16" or "float32"; by default as they are in lit_model.safetensors.
        max_shard_size_gb: weights above this size are split into several safetensors files with an index, as on the Hub.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_checkpoint_dir(checkpoint_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--out_dir {out_dir} is the checkpoint directory; choose a new directory")
    target = check_dtype(dtype)
    tensors = read_tensors(checkpoint_dir / "lit_model.safetensors", target)
    save_hf_checkpoint(load_config(checkpoint_dir), tensors, checkpoint_dir, out_dir, max_shard_size_gb)


def save_hf_checkpoint(
    config: Config, tensors: Iterable[tuple[str, torch.Tensor]], tokenizer_dir: Path, out_dir: Path, max_shard_size_gb: float = 5.0
) -> None:
    """Writes `tensors` (our names, the base model's only: no LoRA A and B, no lm_head when the config ties it) under
    the Hub's names, config.json for `config`, and the tokenizer files of `tokenizer_dir` into `out_dir`, one shard of
    at most `max_shard_size_gb` at a time. scripts/merge_lora.py --format hf calls it with the merged model's tensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(tokenizer_dir)  # before the slow part: a broken tokenizer stops it here
    with torch.device("meta"):
        expected = set(LLaMA(config).state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    shards, dtypes = [], set()
    for index, shard in enumerate(shard_tensors(tensors, expected, max_shard_size_gb * 1e9)):
        shards.append({name: (t.numel() * t.element_size(), t.dtype) for name, t in shard.items()})
        dtypes.update(t.dtype for t in shard.values())
        with atomic_path(out_dir / f".shard-{index}.safetensors") as tmp:  # renamed once the number of shards is known
            save_file(shard, tmp, metadata={"format": "pt"})
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for index, name in enumerate(names):
        (out_dir / f".shard-{index}.safetensors").replace(out_dir / name)
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        if stale.name not in names and stale.is_file():  # a previous export of another size
            stale.unlink()
    if len(names) > 1:
        index = {
            "metadata": {"total_size": sum(size for shard in shards for size, _ in shard.values())},
            "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard},
        }
        with atomic_path(out_dir / "model.safetensors.index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")

    dtype = next((name for name, d in DTYPES.items() if dtypes == {d}), "float32")
    with atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(hf_config(config, tokenizer, dtype), indent=2) + "\n")
    copied = copy_tokenizer(tokenizer_dir, out_dir)
    if "generation_config.json" not in copied:
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids) if len(tokenizer.stop_ids) > 1 else tokenizer.eos_id}
        with atomic_path(out_dir / "generation_config.json") as tmp:
            tmp.write_text(json.dumps(generation, indent=2) + "\n")
    print(f"Wrote {out_dir} ({', '.join(names)}, config.json, {', '.join(sorted(set(copied) | {'generation_config.json'}))})", file=sys.stderr)


def shard_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], expected: set[str], max_shard_bytes: float
) -> Iterator[dict[str, torch.Tensor]]:
    """Groups the tensors, renamed to the Hub's names, into shards of at most `max_shard_bytes` (a larger tensor gets
    a shard of its own). `expected`: our names of every tensor the model has; each must come, and nothing else."""
    shard, size, seen = {}, 0, set()
    for name, tensor in tqdm(tensors, desc="Writing tensors", total=len(expected), unit="tensor", disable=None):
        if name not in expected:
            raise ValueError(f"tensor {name!r} is not one of the model's; a LoRA adapter must be merged first (scripts/merge_lora.py)")
        hf_name, _ = lit_to_hf_name(name), seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[hf_name], size = tensor.contiguous(), size + nbytes
    if shard:
        yield shard
    if seen != expected:
        raise ValueError(f"the checkpoint lacks {len(expected - seen)} of the model's tensors, e.g. {sorted(expected - seen)[:3]}")


def hf_config(config: Config, tokenizer: Tokenizer, dtype: str) -> dict:
    """The config.json of a LlamaForCausalLM of `config`'s shape, in the keys both transformers 4 and 5 read (5 moves
    rope_theta and rope_scaling into rope_parameters itself). Config.from_hf reads it back to `config`."""
    rope_scaling = None if config.rope_scaling is None else {"rope_type": "llama3", **config.rope_scaling}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def check_dtype(dtype: Optional[str]) -> Optional[torch.dtype]:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return None if dtype is None else DTYPES[dtype]


if __name__ == "__main__":
    cli(convert_lit_checkpoint)
