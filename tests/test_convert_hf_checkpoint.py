"""scripts/convert_hf_checkpoint.py on the layouts the Hub uses: one file, shards, .bin, tied embeddings."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_hf_checkpoint
from convert_hf_checkpoint import config_from_hf, convert_hf_checkpoint, lit_to_hf_name
from model import Config
from utils import load_model


def assert_converted_equals(checkpoint_dir, hf_state_dict):
    """Every converted tensor equals the Hub tensor it came from, and nothing is left out."""
    converted = load_file(checkpoint_dir / "lit_model.safetensors")
    assert {lit_to_hf_name(name) for name in converted} == set(hf_state_dict)
    for name, tensor in converted.items():
        assert torch.equal(tensor, hf_state_dict[lit_to_hf_name(name)]), name


def test_single_safetensors_file(tmp_path):
    hf = make_hf_checkpoint(tmp_path)
    convert_hf_checkpoint(tmp_path)
    assert_converted_equals(tmp_path, hf.state_dict())
    assert Config.from_file(tmp_path / "model_config.json") == config_from_hf(tmp_path / "config.json")


def test_sharded_safetensors(tmp_path):
    hf = make_hf_checkpoint(tmp_path, vocab_size=1000)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    (tmp_path / "model.safetensors").unlink()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 3
    convert_hf_checkpoint(tmp_path)
    assert_converted_equals(tmp_path, hf.state_dict())


def test_sharded_bin_with_index(tmp_path):
    # transformers 5 always writes safetensors, so the .bin layout of older repositories is written by hand,
    # with the rotary inv_freq buffers that checkpoints saved before transformers 4.31 hold
    hf = make_hf_checkpoint(tmp_path, vocab_size=1000)
    (tmp_path / "model.safetensors").unlink()
    state_dict = hf.state_dict()
    names = sorted(state_dict)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for shard, shard_names in shards.items():
        tensors = {name: state_dict[name] for name in shard_names}
        if shard.startswith("pytorch_model-00001"):
            tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        torch.save(tensors, tmp_path / shard)
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    convert_hf_checkpoint(tmp_path)
    assert_converted_equals(tmp_path, state_dict)


def test_prefers_safetensors_over_bin(tmp_path):
    hf = make_hf_checkpoint(tmp_path)
    torch.save({name: torch.zeros_like(t) for name, t in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    convert_hf_checkpoint(tmp_path)
    assert_converted_equals(tmp_path, hf.state_dict())


def test_tied_embeddings(tmp_path):
    hf = make_hf_checkpoint(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # the Hub stores it once
    convert_hf_checkpoint(tmp_path)
    state_dict = {name: t for name, t in hf.state_dict().items() if name != "lm_head.weight"}
    assert_converted_equals(tmp_path, state_dict)
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.embed.weight


def test_dtype_option(tmp_path):
    hf = make_hf_checkpoint(tmp_path)
    convert_hf_checkpoint(tmp_path, dtype="bfloat16")
    assert_converted_equals(tmp_path, {name: t.to(torch.bfloat16) for name, t in hf.state_dict().items()})


def write_config(directory, **change):
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 1000,
        **change,
    }
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "error: {d} has no config.json; download the checkpoint with scripts/download.py first"),
        (lambda d: write_config(d), "error: {d} has no model*.safetensors or pytorch_model*.bin weights"),
        (
            lambda d: write_config(d, rope_scaling={"rope_type": "yarn", "factor": 8.0}),
            "error: cannot use {d}/config.json: {d}/config.json: rope scaling 'yarn' is not implemented; "
            "only plain rotary embeddings and Llama 3.1's 'llama3' scaling are",
        ),
    ],
    ids=["no config.json", "no weights", "rope scaling"],
)
def test_cli_errors_are_one_line(tmp_path, setup, message):
    setup(tmp_path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/convert_hf_checkpoint.py"), "--checkpoint_dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [message.format(d=tmp_path)]
    assert not (tmp_path / "lit_model.safetensors").exists()


def test_index_listing_a_missing_shard(tmp_path):
    hf = make_hf_checkpoint(tmp_path, vocab_size=1000)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"lists {shard.name}, which is not in .*; download it again"):
        convert_hf_checkpoint(tmp_path)


def test_a_truncated_download_is_one_line(tmp_path):
    make_hf_checkpoint(tmp_path, vocab_size=1000)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/convert_hf_checkpoint.py"), "--checkpoint_dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {weights} is not a complete weight file (")
    assert result.stderr.strip().endswith("; download it again")
    assert not (tmp_path / "lit_model.safetensors").exists()


def test_weights_that_do_not_fit_the_config(tmp_path):
    make_hf_checkpoint(tmp_path, vocab_size=1000)
    write_config(tmp_path, num_hidden_layers=3)  # the weights only have two layers
    with pytest.raises(ValueError, match=r"lack 9 tensors, e.g. \['blocks.2.attn.k_proj.weight'"):
        convert_hf_checkpoint(tmp_path)
    write_config(tmp_path, num_hidden_layers=1)
    with pytest.raises(
        ValueError, match="holds 'model.layers.1.input_layernorm.weight', which model.py has no place for"
    ):
        convert_hf_checkpoint(tmp_path)


def test_config_from_hf_old_style(tmp_path):
    # as in most Llama-2 repositories: top-level rope_theta and torch_dtype, no head_dim
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vocab_size": 32000,
        "hidden_act": "silu",
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert config_from_hf(tmp_path / "config.json") == Config.from_name("Llama-2-7b-hf")


def test_config_from_hf_transformers_5_style(tmp_path):
    # as transformers 5 writes it: rope_parameters, dtype and head_dim
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_attention_heads": 32,
        "num_hidden_layers": 22,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-05,
        "dtype": "bfloat16",
        "vocab_size": 32000,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    expected = Config(
        block_size=2048,
        vocab_size=32000,
        n_layer=22,
        n_head=32,
        n_query_groups=4,
        n_embd=2048,
        intermediate_size=5632,
        rope_base=500000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    )
    assert config_from_hf(tmp_path / "config.json") == expected


def test_config_from_hf_llama_3_2_and_mistral_v0_3(tmp_path):
    # the Hub's config.json of Llama-3.2-1B (rope_scaling, as transformers 4 writes it) and Mistral-7B-v0.3 (no
    # sliding window)
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "torch_dtype": "bfloat16",
        "vocab_size": 128256,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    mistral = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 32768,
        "hidden_act": "silu",
    }
    for hf, name in ((llama, "Llama-3.2-1B"), (mistral, "Mistral-7B-v0.3")):
        (tmp_path / "config.json").write_text(json.dumps(hf))
        config = config_from_hf(tmp_path / "config.json")
        assert config == Config.from_name(name)
        config.to_file(tmp_path / "model_config.json")  # and the JSON round trip convert_hf_checkpoint.py makes
        assert Config.from_file(tmp_path / "model_config.json") == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}},
            "rope scaling 'yarn' is not implemented",
        ),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},
            "'llama3' rope scaling lacks low_freq_factor",
        ),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ],
)
def test_config_from_hf_refuses_unsupported_features(tmp_path, change, message):
    hf = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 100,
        "rope_theta": 10000.0,
        **change,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=message):
        config_from_hf(tmp_path / "config.json")
