"""scripts/convert_lit_checkpoint.py and scripts/merge_lora.py --format hf: directories transformers loads, with the
tensors they came from and the logits of our model."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_checkpoint
from convert_hf_checkpoint import config_from_hf, convert_hf_checkpoint
from convert_lit_checkpoint import convert_lit_checkpoint
from lora import LoRALinear, load_lora_model, lora, save_lora_checkpoint
from merge_lora import merge_lora
from test_model import LLAMA3_ROPE
from tokenizer import Tokenizer
from utils import load_config, load_model

CONFIGS = {
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
    # stretched from 32 to 256 positions, rope base 500000: all three ranges of the llama3 scaling are in use
    "llama3_rope_tied": dict(rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0), tie_word_embeddings=True),
}


def hub_tensors(directory) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    return {name: t for file in files for name, t in load_file(directory / file).items()}


def assert_transformers_logits_equal_ours(hf_dir, checkpoint_dir, idx):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, actual = hf(idx).logits, load_model(checkpoint_dir).eval()(idx)
    assert (actual - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_gives_the_hub_tensors_back_and_transformers_our_logits(tmp_path, name):
    """Hub -> ours -> Hub: the same tensors under the same names, a config.json that reads back to the same Config,
    and transformers' logits on the new directory equal to ours."""
    original = make_checkpoint(tmp_path / "ours", vocab_size=1000, **CONFIGS[name])
    convert_lit_checkpoint(tmp_path / "ours", tmp_path / "hf")

    expected = {
        k: v
        for k, v in original.state_dict().items()
        if not (original.config.tie_word_embeddings and k == "lm_head.weight")
    }
    actual = hub_tensors(tmp_path / "hf")
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    assert config_from_hf(tmp_path / "hf" / "config.json") == load_config(tmp_path / "ours")
    idx = torch.randint(
        0, 1000, (2, 200), generator=torch.Generator().manual_seed(0)
    )  # beyond the 32 original positions
    assert_transformers_logits_equal_ours(tmp_path / "hf", tmp_path / "ours", idx)


def test_transformers_reads_the_llama3_tokenizer_and_its_stop_ids(llama3_checkpoint_dir, tmp_path):
    """(A sentencepiece tokenizer.model is copied the same way; transformers 5 needs protobuf to read one.)"""
    from transformers import AutoTokenizer, GenerationConfig

    convert_lit_checkpoint(llama3_checkpoint_dir, tmp_path)
    text = "Hello, my name is Ada. 12345 apples\n\n<|eot_id|>"
    assert (
        AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"]
        == Tokenizer(llama3_checkpoint_dir).encode(text).tolist()
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, 128009)  # <|begin_of_text|>, <|eot_id|>
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == 128009


def test_real_smollm2_converts_back_to_the_hub_tensors_tokenizer_and_logits(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    if not (smollm2_dir / "lit_model.safetensors").is_file():  # the session's directory, converted by another test
        convert_hf_checkpoint(smollm2_dir)
    convert_lit_checkpoint(smollm2_dir, tmp_path)
    original = load_file(smollm2_dir / "model.safetensors")
    actual = hub_tensors(tmp_path)
    assert actual.keys() == original.keys() and all(torch.equal(actual[k], original[k]) for k in original)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    ours = Tokenizer(smollm2_dir)
    assert ids == ours.encode(ours.apply_chat_template(messages, add_generation_prompt=True)).tolist()
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    assert_transformers_logits_equal_ours(tmp_path, smollm2_dir, torch.tensor([ids]))


def test_large_checkpoints_are_sharded_with_an_index_transformers_reads(checkpoint_dir, tmp_path):
    convert_lit_checkpoint(checkpoint_dir, tmp_path, max_shard_size_gb=2e-4)  # 200 kB
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(hub_tensors(tmp_path)) and len(index["weight_map"]) == 2 * 9 + 3
    idx = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    assert_transformers_logits_equal_ours(tmp_path, checkpoint_dir, idx)


def test_dtype_converts_the_stored_weights(checkpoint_dir, tmp_path):
    convert_lit_checkpoint(checkpoint_dir, tmp_path, dtype="bfloat16")
    assert {t.dtype for t in hub_tensors(tmp_path).values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_merge_lora_writes_a_hub_directory_with_the_adapted_logits(checkpoint_dir, tmp_path):
    with lora(r=4, alpha=8, dropout=0.0, targets=("all_linear", "head")):
        model = load_model(checkpoint_dir)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora.B.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    save_lora_checkpoint(model, tmp_path / "adapter.safetensors")
    merge_lora(checkpoint_dir, tmp_path / "adapter.safetensors", tmp_path / "hf", format="hf")

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    adapted = load_lora_model(checkpoint_dir, tmp_path / "adapter.safetensors").eval()
    idx = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, base = adapted(idx), load_model(checkpoint_dir).eval()(idx)
        assert (expected - base).abs().max() > 1e-2  # the adapter changes the output...
        assert (hf(idx).logits - expected).abs().max() <= 1e-4  # ...and the exported model has that change


def test_cli_refuses_to_write_into_the_checkpoint_directory(checkpoint_dir):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "convert_lit_checkpoint.py"),
            "--checkpoint_dir",
            str(checkpoint_dir),
            "--out_dir",
            str(checkpoint_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --out_dir {checkpoint_dir} is the checkpoint directory; choose a new directory"
    ]
