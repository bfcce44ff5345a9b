"""Exports a checkpoint directory (or a base checkpoint and a LoRA adapter, merged on the way) as one GGUF file, the
format llama.cpp, Ollama and LM Studio read.

    python scripts/export_gguf.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --lora_path out/lora/alpaca/lit_model_lora_finetuned.safetensors --out_path out/smollm2-alpaca.q8_0.gguf \
        --dtype q8_0

The file is written with `gguf`, llama.cpp's own Python package: its writer, its tensor names (gguf.TensorNameMap,
from the Hub's names of scripts/convert_hf_checkpoint.py), its quantizers and its reader of special tokens and merges,
so that the layout is llama.cpp's by construction. What this script adds:

- the "llama" architecture's metadata from model_config.json (context length, heads and key/value heads, rope base,
  norm eps), and Llama 3.1's rope scaling as llama.cpp takes it, a `rope_freqs` tensor of per-frequency divisors;
- the q and k rows in llama.cpp's order: its rotary embedding turns adjacent pairs (0, 1), (2, 3), ... of each head,
  the Hub's (and ours) turns the halves (i, i + head_size / 2), so each head's rows are interleaved (and so are
  their biases, which a merged LLaMA-Adapter v2 has);
- the tokenizer: a sentencepiece tokenizer.model as llama.cpp's "llama" vocabulary, or a byte-level BPE tokenizer.json
  as its "gpt2" vocabulary with the merges and the name of its pre-tokenizer (PRE_TOKENIZERS); BOS, EOS, whether
  prompts start with BOS, and the chat template, all as tokenizer.py reads them, so that llama.cpp tokenizes the
  way we do (tests/test_export_gguf.py checks it with llama.cpp itself).

Memory: without --lora_path, one tensor at a time is read, converted and written; with it, the merged model is held
once (as scripts/merge_lora.py does).
"""

import json
import logging
import sys
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent))
from convert_hf_checkpoint import lit_to_hf_name
from model import Config, llama3_scaled
from tokenizer import Tokenizer
from utils import atomic_path, check_checkpoint_dir, cli, load_config, read_tensors

# llama.cpp implements each pre-tokenizer (how text is split before BPE) in C++ and picks it by name
# (tokenizer.ggml.pre). These are the tokenizer.json `pre_tokenizer` sections whose splitting is the one of a name
# (llama.cpp's src/llama-vocab.cpp), as `pre_tokenizer_steps` summarises them, with model.ignore_merges, which
# llama.cpp sets for "llama-bpe" alone. Another pre-tokenizer is refused with one line: llama.cpp would split its
# text differently, and the model would read token ids it was never trained on.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    # Llama 3, 3.1, 3.2: Meta's regex, then bytes
    "llama-bpe": ((("Split", LLAMA3_REGEX, "Isolated", False), ("ByteLevel", False, False)), True),
    # SmolLM2 (StarCoder's): every digit on its own, then GPT-2's regex
    "smollm": ((("Digits", True), ("ByteLevel", False, True)), False),
    # GPT-2's regex alone
    "gpt-2": ((("ByteLevel", False, True),), False),
}
# --dtype: the type of the matrices (1-D tensors, the norms, stay float32, as in llama.cpp's own files)
DTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}


def export_gguf(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    out_path: Path = Path("out/model.gguf"),
    dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16",
    lora_path: Optional[Path] = None,
) -> None:
    """Writes the model of `checkpoint_dir` (with the adapter at `lora_path` merged in, if given) to `out_path`.

    Args:
        checkpoint_dir: a checkpoint directory (lit_model.safetensors, model_config.json, the tokenizer's files).
        out_path: the GGUF file to write; its directory is created if needed.
        dtype: the weights' type in the file: "f32", "f16", "bf16" or "q8_0" (8-bit blocks of 32 weights with one
            scale, about half the size of f16; a matrix whose rows are not a multiple of 32 is stored in f16 instead).
        lora_path: a LoRA checkpoint written by finetune_lora.py for this base, merged into the weights on the way out.
    """
    import gguf  # imported here: only this script needs it

    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    check_checkpoint_dir(checkpoint_dir)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    matrix_type, file_type = (
        getattr(gguf.GGMLQuantizationType, DTYPES[dtype][0]),
        getattr(gguf.LlamaFileType, DTYPES[dtype][1]),
    )
    tokenizer = Tokenizer(checkpoint_dir)
    config, shapes, tensors = source_tensors(checkpoint_dir, lora_path)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.n_layer)
    gguf_names = {}
    for name in shapes:
        gguf_names[name] = names.get_name(lit_to_hf_name(name), try_suffixes=(".weight", ".bias"))
        if gguf_names[name] is None:
            raise ValueError(
                f"tensor {name!r} has no place in llama.cpp's llama architecture; "
                f"a LoRA adapter must be merged (--lora_path)"
            )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        add_model_metadata(writer, config, file_type, name=checkpoint_dir.name + ("" if lora_path is None else "-lora"))
        add_tokenizer(writer, checkpoint_dir, tokenizer, config.vocab_size)
        # the header lists every tensor's name, shape and type before any data: planned from the shapes alone
        rope_freqs = rope_frequency_factors(config)
        if rope_freqs is not None:
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            writer.add_tensor_info(name, rope_freqs.shape, np.float32, rope_freqs.nbytes)
        types = {name: tensor_type(shape, matrix_type) for name, shape in shapes.items()}
        for name, shape in shapes.items():
            # quantized tensors are written as bytes, (rows, bytes per row), which the writer turns back into the shape
            stored_shape = (
                gguf.quant_shape_to_byte_shape(shape, types[name]) if types[name] not in float_types() else shape
            )
            numpy_dtype = float_types().get(types[name], np.uint8)
            nbytes = int(np.prod(stored_shape)) * np.dtype(numpy_dtype).itemsize
            writer.add_tensor_info(gguf_names[name], stored_shape, np.dtype(numpy_dtype), nbytes, raw_dtype=types[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if rope_freqs is not None:
            writer.write_tensor_data(rope_freqs)
        for name, tensor in tqdm(
            tensors, desc=f"Writing {out_path.name}", total=len(shapes), unit="tensor", disable=None
        ):
            writer.write_tensor_data(gguf_tensor(name, tensor, config, types[name]))
        writer.close()
    print(f"Wrote {out_path} ({out_path.stat().st_size / 1e9:.2f} GB, {dtype})", file=sys.stderr)


def source_tensors(
    checkpoint_dir: Path, lora_path: Optional[Path]
) -> tuple[Config, dict[str, tuple[int, ...]], Iterator[tuple[str, torch.Tensor]]]:
    """The model's config, the shape of each of its tensors, and the tensors themselves, read one at a time from the
    checkpoint; with `lora_path`, those of the base with the adapter merged in, in memory."""
    if lora_path is None:
        path = checkpoint_dir / "lit_model.safetensors"
        with safe_open(path, framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        return load_config(checkpoint_dir), shapes, read_tensors(path)
    from lora import load_lora_model, merged_state_dict

    model = load_lora_model(checkpoint_dir, lora_path, merge=True)
    state_dict = merged_state_dict(model)
    shapes = {name: tuple(t.shape) for name, t in state_dict.items()}
    return model.config, shapes, iter(state_dict.items())  # model.config: an adapted head is no longer tied


def add_model_metadata(writer, config: Config, file_type, name: str) -> None:
    """The "llama" architecture's hyperparameters, under the keys llama.cpp reads."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer(writer, checkpoint_dir: Path, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The vocabulary (tokens, their types, scores or merges), the special ids and the chat template; the ids and
    whether a prompt starts with BOS are tokenizer.py's, so that llama.cpp and our scripts agree."""
    import gguf

    # gguf's reader of merges and of the unk and pad tokens; its warnings concern the BOS/EOS handling taken from
    # tokenizer.py instead
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = gguf.SpecialVocab(
        checkpoint_dir, load_merges=True, special_token_types=("unk", "pad"), n_vocab=vocab_size
    )
    tokenizer_json = json.loads(tokenizer.path.read_text()) if tokenizer.path.name == "tokenizer.json" else {}
    decoder = (tokenizer_json.get("decoder") or {}).get("type")
    byte_level = tokenizer_json.get("model", {}).get("type") == "BPE" and decoder == "ByteLevel"
    if not byte_level and (checkpoint_dir / "tokenizer.model").is_file():
        # sentencepiece, or a tokenizer.json converted from it beside the original (Mistral v0.3), which llama.cpp's
        # own converter also prefers
        tokens, scores, types = map(list, zip(*gguf.vocab.SentencePieceVocab(checkpoint_dir).all_tokens()))
        model, pre, merges = "llama", "default", []
    elif not byte_level:
        raise ValueError(
            f"{tokenizer.path} is not a byte-level BPE tokenizer and there is no tokenizer.model beside it; "
            f"only those two kinds can be exported to GGUF"
        )
    else:
        model, pre, merges, scores = (
            "gpt2",
            llama_cpp_pre_tokenizer(tokenizer_json, tokenizer.path),
            special.merges,
            None,
        )
        added = {token["id"]: token for token in tokenizer_json.get("added_tokens", [])}
        by_id = {i: token for token, i in tokenizer.processor.get_vocab(with_added_tokens=True).items()}
        tokens = [by_id[i].encode() for i in range(len(by_id))]
        types = [gguf.TokenType.NORMAL] * len(tokens)
        for i, token in added.items():
            types[i] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
    padding = vocab_size - len(tokens)  # rows of the embedding no token uses (e.g. a vocabulary rounded up to 64)
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.UNUSED] * padding
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    if model == "gpt2":
        writer.add_add_space_prefix(
            False
        )  # byte-level BPE never adds one (for sentencepiece, llama.cpp's default: True)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores + [-1000.0] * padding)
    if merges:
        writer.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    for kind, token_id in special.special_token_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)  # add_unk_token_id, add_pad_token_id
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def llama_cpp_pre_tokenizer(tokenizer_json: dict, path: Path) -> str:
    """The name llama.cpp knows the pre-tokenizer of `tokenizer_json` by (PRE_TOKENIZERS), or a ValueError."""
    steps = pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer") or {})
    for name, known in PRE_TOKENIZERS.items():
        if (
            tokenizer_json.get("normalizer") is None
            and (steps, bool(tokenizer_json["model"].get("ignore_merges"))) == known
        ):
            return name
    raise ValueError(
        f"{path}'s pre-tokenizer is not one llama.cpp is known to split text the same way as "
        f"({', '.join(PRE_TOKENIZERS)}); its GGUF file would tokenize differently"
    )


def pre_tokenizer_steps(pre_tokenizer: dict) -> tuple:
    """The settings that decide how a tokenizer.json pre-tokenizer splits text, one tuple per step."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    summary = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            summary.append((kind, step["pattern"].get("Regex"), step.get("behavior"), step.get("invert", False)))
        elif kind == "ByteLevel":
            summary.append((kind, step.get("add_prefix_space", True), step.get("use_regex", True)))
        elif kind == "Digits":
            summary.append((kind, step.get("individual_digits", False)))
        else:
            summary.append((kind, json.dumps(step, sort_keys=True)))
    return tuple(summary)


def rope_frequency_factors(config: Config) -> Optional[np.ndarray]:
    """Llama 3.1's rope scaling as llama.cpp applies it: each rotary frequency divided by a factor (rope_freqs)."""
    if config.rope_scaling is None:
        return None
    inv_freq = 1.0 / (
        config.rope_base ** (torch.arange(0, config.head_size, 2, dtype=torch.float32) / config.head_size)
    )
    return (inv_freq / llama3_scaled(inv_freq, config.rope_scaling)).numpy()


def float_types() -> dict:
    """The GGML types numpy holds as floats; the others (bf16, q8_0) are blocks of bytes."""
    import gguf

    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


TORCH_FLOATS = {0: torch.float32, 1: torch.float16}  # GGMLQuantizationType.F32 and .F16 (an IntEnum)


def tensor_type(shape: tuple[int, ...], matrix_type):
    """float32 for vectors (the norms); `matrix_type` for matrices, f16 where a row does not split into its blocks."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[matrix_type]
    return matrix_type if shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def gguf_tensor(name: str, tensor: torch.Tensor, config: Config, ggml_type) -> np.ndarray:
    """One tensor as llama.cpp lays it out: q and k rows interleaved per head, in `ggml_type`. gguf's quantizers take
    float32: they get 4096 rows at a time, so that a large embedding never exists whole in float32 beside its blocks."""
    import gguf

    if name.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
        tensor = interleave_rotary_rows(tensor, config.n_head)
    elif name.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
        tensor = interleave_rotary_rows(tensor, config.n_query_groups)
    if ggml_type in float_types():
        return tensor.to(TORCH_FLOATS[ggml_type]).numpy()
    return np.concatenate(
        [gguf.quants.quantize(rows.to(torch.float32).numpy(), ggml_type) for rows in tensor.split(4096)]
    )


def interleave_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads * head_size, in) rows in the Hub's rotary order, each head's first half then its second, to
    llama.cpp's, where the pairs that rotate together are adjacent: rows i and i + head_size / 2 become 2i and
    2i + 1. A bias, (n_heads * head_size,), moves the same way."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(weight.shape)


if __name__ == "__main__":
    cli(export_gguf)
