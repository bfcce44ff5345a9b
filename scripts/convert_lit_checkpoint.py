"""Converts a checkpoint directory of this repository into a Hugging Face directory (the reverse of
scripts/convert_hf_checkpoint.py).

    python scripts/convert_lit_checkpoint.py --checkpoint_dir checkpoints/Llama-2-7b-alpaca \
        --out_dir out/hf/Llama-2-7b-alpaca

Writes `config.json` (a LlamaForCausalLM), the weights as `model.safetensors` (or shards of at most
`--max_shard_size_gb` with `model.safetensors.index.json`), the tokenizer's files and `generation_config.json`:
what `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` read, and vLLM too. Works on any
checkpoint directory: a converted one (the round trip Hub -> ours -> Hub gives back the same tensors), the output of
scripts/merge_lora.py (which can also write this format itself: `--format hf`) or of finetune_full.py.
Memory: one tensor at a time is read, converted and written.
"""

import json
import math
import struct
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors import safe_open
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent))
from convert_hf_checkpoint import lit_to_hf_name
from model import Config, LLaMA
from tokenizer import Tokenizer
from utils import atomic_path, check_checkpoint_dir, cli, copy_tokenizer, load_config, read_tensors

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


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
        dtype: store the weights as "bfloat16", "float16" or "float32"; by default as they are in
            lit_model.safetensors.
        max_shard_size_gb: weights above this size are split into several safetensors files with an index, as on
            the Hub.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_checkpoint_dir(checkpoint_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--out_dir {out_dir} is the checkpoint directory; choose a new directory")
    target = check_dtype(dtype)
    path = checkpoint_dir / "lit_model.safetensors"
    with safe_open(path, framework="pt") as f:  # the header only: shapes and dtypes
        layout = {
            name: (tuple(f.get_slice(name).get_shape()), target or TORCH_DTYPES[f.get_slice(name).get_dtype()])
            for name in f.keys()
        }
    save_hf_checkpoint(
        load_config(checkpoint_dir), layout, read_tensors(path, target), checkpoint_dir, out_dir, max_shard_size_gb
    )


def save_hf_checkpoint(
    config: Config,
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer_dir: Path,
    out_dir: Path,
    max_shard_size_gb: float = 5.0,
) -> None:
    """Writes `tensors` (our names, the base model's only: no LoRA A and B, no lm_head when the config ties it) under
    the Hub's names, config.json for `config`, and the tokenizer files of `tokenizer_dir` into `out_dir`. `layout`
    gives each tensor's shape and dtype, in the order `tensors` yields them: the shards and their headers are planned
    from it, and each tensor is written as it comes, so that only one is held at a time.
    scripts/merge_lora.py --format hf calls it with the merged model's tensors."""
    out_dir = Path(out_dir)
    tokenizer = Tokenizer(tokenizer_dir)  # before the slow part: a broken tokenizer stops it here
    with torch.device("meta"):
        expected = set(LLaMA(config).state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    if set(layout) != expected:
        raise ValueError(
            f"the checkpoint's tensors are not the model's (missing: {sorted(expected - set(layout))[:3]}, "
            f"unexpected: {sorted(set(layout) - expected)[:3]}); "
            "a LoRA adapter must be merged first (scripts/merge_lora.py)"
        )
    shards, size = [[]], 0
    for name, (shape, dtype) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    names = ["model.safetensors"] if len(shards) == 1 else names

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        if stale.name not in names and stale.is_file():  # a previous export of another size
            stale.unlink()
    tensors = iter(tqdm(tensors, desc="Writing tensors", total=len(layout), unit="tensor", disable=None))
    for file_name, shard in zip(names, shards):
        with atomic_path(out_dir / file_name) as tmp:
            write_safetensors(tmp, {name: layout[name] for name in shard}, tensors)
    if len(names) > 1:
        index = {
            "metadata": {"total_size": sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())},
            "weight_map": {
                lit_to_hf_name(name): file_name for file_name, shard in zip(names, shards) for name in shard
            },
        }
        with atomic_path(out_dir / "model.safetensors.index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")

    dtypes = {dtype for _, dtype in layout.values()}
    dtype = next((name for name, d in DTYPES.items() if dtypes == {d}), "float32")
    with atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(hf_config(config, tokenizer, dtype), indent=2) + "\n")
    copied = copy_tokenizer(tokenizer_dir, out_dir)
    if "generation_config.json" not in copied:
        stop = list(tokenizer.stop_ids) if len(tokenizer.stop_ids) > 1 else tokenizer.eos_id
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop}
        with atomic_path(out_dir / "generation_config.json") as tmp:
            tmp.write_text(json.dumps(generation, indent=2) + "\n")
    written = [*names, "config.json", *sorted(set(copied) | {"generation_config.json"})]
    print(f"Wrote {out_dir} ({', '.join(written)})", file=sys.stderr)


def write_safetensors(
    path: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], tensors: Iterator[tuple[str, torch.Tensor]]
) -> None:
    """Writes the next len(layout) tensors of `tensors` to a safetensors file under their Hub names, one at a time.
    The format is a little-endian u64 header length, the JSON header (each tensor's dtype, shape and byte range) and
    the raw bytes; the safetensors library only writes from a dict of every tensor held at once, hence this."""
    header, offset = {}, 0
    for name, (shape, dtype) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[lit_to_hf_name(name)] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, dtype) in layout.items():
            got, tensor = next(tensors)
            if got != name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"expected {name} {tuple(shape)} {dtype}, got {got} {tuple(tensor.shape)} {tensor.dtype}"
                )
            f.write(tensor.contiguous().view(torch.uint8).numpy().data)


def hf_config(config: Config, tokenizer: Tokenizer, dtype: str) -> dict:
    """The config.json of a LlamaForCausalLM of `config`'s shape, in the keys both transformers 4 and 5 read (5 moves
    rope_theta and rope_scaling into rope_parameters itself). convert_hf_checkpoint.config_from_hf reads it back to
    `config`."""
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
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
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
