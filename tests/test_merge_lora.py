import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, make_adapter, make_checkpoint, make_llama_adapter
from lora import LoRALinear, load_lora_model, lora, merge_lora_weights, save_lora_checkpoint
from merge_lora import merge_lora
from model import Config, LLaMA
from utils import load_model

TINY = dict(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48)


def base_and_adapter(directory, lora_kwargs, **config):
    """A base checkpoint directory (as convert_hf_checkpoint.py writes it) and a trained-looking adapter."""
    torch.manual_seed(0)
    config = Config(**{**TINY, **config})
    state_dict = LLaMA(config).state_dict()
    if config.tie_embeddings:
        del state_dict["lm_head.weight"]
    directory.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, directory / "lit_model.safetensors")
    config.to_file(directory / "model_config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (directory / name).write_text(f"the {name} bytes")
    with lora(**lora_kwargs):
        model = load_model(directory)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora.B.normal_(std=0.1)
    save_lora_checkpoint(model, directory / "adapter.safetensors")
    return model.eval()


def test_merged_checkpoint_is_complete_and_equals_the_lora_model(tmp_path):
    adapted = base_and_adapter(tmp_path / "base", dict(r=4, alpha=8, dropout=0.05, targets=("all_linear",)))
    merge_lora(tmp_path / "base", tmp_path / "base" / "adapter.safetensors", tmp_path / "merged")

    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "generation_config.json",
        "lit_model.safetensors",
        "model_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):  # every tokenizer file, unchanged
        assert (tmp_path / "merged" / name).read_text() == f"the {name} bytes"
    assert Config.from_file(tmp_path / "merged" / "model_config.json") == adapted.config
    assert (
        load_file(tmp_path / "merged" / "lit_model.safetensors").keys()
        == load_file(tmp_path / "base" / "lit_model.safetensors").keys()
    )

    merged = load_model(tmp_path / "merged").eval()  # a plain model, as generate.py loads it
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    base = load_model(tmp_path / "base").eval()
    assert (adapted(idx) - base(idx)).abs().max() > 1e-2  # the adapter changes the output...
    torch.testing.assert_close(merged(idx), adapted(idx), rtol=0, atol=1e-5)  # ...and merging keeps that change


def test_adapted_head_of_tied_embeddings_is_stored_untied(tmp_path):
    adapted = base_and_adapter(
        tmp_path / "base", dict(r=2, alpha=4, dropout=0.0, targets=("query", "value", "head")), tie_embeddings=True
    )
    merge_lora(tmp_path / "base", tmp_path / "base" / "adapter.safetensors", tmp_path / "merged")
    assert Config.from_file(tmp_path / "merged" / "model_config.json").tie_embeddings is False
    assert "lm_head.weight" in load_file(tmp_path / "merged" / "lit_model.safetensors")
    idx = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(load_model(tmp_path / "merged").eval()(idx), adapted(idx), rtol=0, atol=1e-5)


def test_tied_embeddings_stay_tied_when_the_head_is_not_adapted(tmp_path):
    adapted = base_and_adapter(tmp_path / "base", dict(r=2, alpha=4, dropout=0.0), tie_embeddings=True)
    merge_lora(tmp_path / "base", tmp_path / "base" / "adapter.safetensors", tmp_path / "merged")
    assert Config.from_file(tmp_path / "merged" / "model_config.json").tie_embeddings is True
    assert "lm_head.weight" not in load_file(tmp_path / "merged" / "lit_model.safetensors")
    idx = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(load_model(tmp_path / "merged").eval()(idx), adapted(idx), rtol=0, atol=1e-5)


def test_merging_happens_in_place(tmp_path):
    """Bounded memory: ΔW is added into each weight's own storage, never into a second copy of the model."""
    base_and_adapter(tmp_path, dict(r=4, alpha=8, dropout=0.0, targets=("all_linear", "head")))
    model = load_lora_model(tmp_path, tmp_path / "adapter.safetensors")
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    merge_lora_weights(model)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == storage


def test_cli_refuses_to_overwrite_the_base(tmp_path):
    base_and_adapter(tmp_path, dict(r=2, alpha=4, dropout=0.0))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "merge_lora.py"),
            "--checkpoint_dir",
            str(tmp_path),
            "--lora_path",
            str(tmp_path / "adapter.safetensors"),
            "--out_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: --out_dir {tmp_path} is the base checkpoint directory; choose a new directory"
    ]


def merge_cli(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "merge_lora.py"), *flags], capture_output=True, text=True
    )


def test_a_llama_adapter_v2_merges_into_a_checkpoint_with_biases_that_transformers_runs(tmp_path):
    """v2 without prompts: scales and biases fold into weights and biases, its norms replace the base's. The merged
    checkpoint gives the adapter's logits through generate.py's loader and, exported with --format hf, through
    transformers' LlamaForCausalLM (attention_bias, mlp_bias), with the same greedy tokens."""
    from transformers import LlamaForCausalLM

    from decode import generate

    make_checkpoint(tmp_path / "base", vocab_size=1000, tie_word_embeddings=True)
    adapted = make_llama_adapter(tmp_path / "base", tmp_path / "v2.safetensors", version=2, adapter_layers=0)
    merge_lora(tmp_path / "base", out_dir=tmp_path / "merged", adapter_path=tmp_path / "v2.safetensors")
    merge_lora(tmp_path / "base", out_dir=tmp_path / "hf", adapter_path=tmp_path / "v2.safetensors", format="hf")

    config = Config.from_file(tmp_path / "merged" / "model_config.json")
    assert config.attention_bias and config.mlp_bias and config.tie_embeddings
    merged = load_model(tmp_path / "merged").eval()
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.attention_bias and hf.config.mlp_bias
    idx = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted(idx)
        assert (expected - load_model(tmp_path / "base").eval()(idx)).abs().max() > 1e-2  # the adapter changes it
        torch.testing.assert_close(merged(idx), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(idx).logits, expected, rtol=0, atol=1e-4)
    tokens = generate(adapted, idx[0], max_new_tokens=12, temperature=0.0)
    assert torch.equal(generate(merged, idx[0], max_new_tokens=12, temperature=0.0), tokens)
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    assert torch.equal(hf.generate(idx[:1], max_new_tokens=12, do_sample=False)[0], tokens)


def test_cli_refuses_prompts_and_files_of_the_other_kind_in_one_line(tmp_path):
    make_checkpoint(tmp_path / "base", vocab_size=1000)
    make_llama_adapter(tmp_path / "base", tmp_path / "v1.safetensors", version=1, adapter_len=3, adapter_layers=1)
    make_adapter(tmp_path / "base", tmp_path / "lora.safetensors", r=2, alpha=4, targets=("query",), seed=0)
    base = ("--checkpoint_dir", str(tmp_path / "base"), "--out_dir", str(tmp_path / "merged"))
    cases = [
        (
            ("adapter_path", tmp_path / "v1.safetensors"),
            f"{tmp_path / 'v1.safetensors'} holds LLaMA-Adapter prompts (v1, in 1 layers), which are attention over "
            "learned keys and values, not a change of any weight, and cannot merge; generate with it unmerged "
            "(generate_adapter.py)",
        ),
        (
            ("adapter_path", tmp_path / "lora.safetensors"),
            f"{tmp_path / 'lora.safetensors'} is a LoRA checkpoint (lora.py), not a LLaMA-Adapter one; LoRA files go "
            "to --lora_path (generate with generate_lora.py)",
        ),
        (
            ("lora_path", tmp_path / "v1.safetensors"),
            f"{tmp_path / 'v1.safetensors'} is a LLaMA-Adapter checkpoint (adapter.py), not a LoRA one; "
            "LLaMA-Adapter files go to --adapter_path (generate with generate_adapter.py)",
        ),
        ((), "pass either --lora_path (a LoRA checkpoint) or --adapter_path (a LLaMA-Adapter v2 one)"),
    ]
    (flags, message), *others = cases
    result = merge_cli(*base, f"--{flags[0]}", str(flags[1]))  # the command line: one line, exit status 1
    assert result.returncode == 1 and result.stderr.splitlines() == [f"error: {message}"]
    for flags, message in others:  # the same check in-process: the CLI turns each ValueError into that line
        with pytest.raises(ValueError) as e:
            merge_lora(tmp_path / "base", out_dir=tmp_path / "merged", **dict(zip(flags[::2], flags[1::2])))
        assert str(e.value) == message
    assert not (tmp_path / "merged").exists()
