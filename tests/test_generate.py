"""generate.py: the decoding loop, sampling and the command line (the CPU weight layout: tests/test_utils.py).

Parity of greedy decoding with transformers' generate is in tests/test_model.py, per model config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_checkpoint
from generate import generate, sample
from model import Config, LLaMA
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Config(
        block_size=64, vocab_size=100, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=86
    )
    return LLaMA(config).eval()


def decode_without_cache(model, idx, max_new_tokens, temperature, top_k):
    """The reference: recompute the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx.view(1, -1))[0, -1]
            idx = torch.cat([idx, sample(logits, temperature, top_k)])
    return idx


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (0.8, 20), (1.0, None)])
def test_cached_decoding_equals_full_recomputation(model, temperature, top_k):
    prompt = torch.tensor([1, 5, 7, 11, 13])
    torch.manual_seed(42)
    expected = decode_without_cache(model, prompt, 24, temperature, top_k)
    torch.manual_seed(42)
    assert generate(model, prompt, 24, temperature=temperature, top_k=top_k).tolist() == expected.tolist()
    assert all(block.attn.kv_cache is None for block in model.blocks)  # freed for the caller


def test_decoding_under_autocast_with_fp32_weights(model):
    """As finetune_full.py's bf16-mixed samples an answer: fp32 weights and caches, bf16 activations."""
    prompt = torch.tensor([1, 5, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = generate(model, prompt, max_new_tokens=4, temperature=0.0)
        expected = decode_without_cache(model, prompt, max_new_tokens=4, temperature=0.0, top_k=None)
    assert tokens.tolist() == expected.tolist()


def test_stops_after_any_stop_id(model):
    prompt = torch.tensor([1, 5, 7])
    greedy = generate(model, prompt, 20, temperature=0.0).tolist()
    stop_ids = (greedy[3 + 9], greedy[3 + 5])  # pretend the 10th and the 6th new tokens are EOS and end of turn
    stop = min(greedy.index(i, 3) for i in stop_ids)
    assert generate(model, prompt, 20, temperature=0.0, stop_ids=stop_ids).tolist() == greedy[: stop + 1]


def test_zero_new_tokens_returns_the_prompt(model):
    assert generate(model, torch.tensor([1, 2, 3]), 0).tolist() == [1, 2, 3]


def test_prompt_must_be_1d(model):
    with pytest.raises(ValueError, match=r"1-D tensor, not of shape \(1, 3\)"):
        generate(model, torch.tensor([[1, 2, 3]]), 5)


def test_too_long_is_refused(model):
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(5\) exceeds block_size 64"):
        generate(model, torch.ones(60, dtype=torch.long), 5)


def test_sample_follows_softmax_of_the_top_k():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])
    assert sample(logits, 0.0, None).tolist() == [4]
    torch.manual_seed(0)
    draws = torch.cat([sample(logits, 0.5, 2) for _ in range(4000)])
    # only ids 4 and 0 are among the top 2; p(4) = e^(3/0.5) / (e^(3/0.5) + e^(2/0.5)) = 1 / (1 + e^-2)
    assert set(draws.tolist()) == {0, 4}
    assert abs((draws == 4).float().mean().item() - 1 / (1 + torch.e**-2)) < 0.02
    draws = torch.cat([sample(logits, 1.0, None) for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=5).float() / 4000
    assert (frequencies - torch.softmax(logits, -1)).abs().max() < 0.02


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_prints_the_greedy_continuation_of_transformers(tmp_path):
    hf = make_checkpoint(tmp_path)
    prompt = "Hello, my name is"
    tokenizer = Tokenizer(tmp_path)
    idx = tokenizer.encode(prompt).view(1, -1)
    hf.generation_config.pad_token_id = 0
    expected = hf.generate(
        idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, do_sample=False, eos_token_id=2
    )[0]
    result = run_cli(
        "--checkpoint_dir", tmp_path, "--prompt", prompt, "--max_new_tokens", 12, "--temperature", 0, "--num_samples", 2
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == 2 * (tokenizer.decode(expected) + "\n")
    assert f"Loaded {tmp_path} in " in result.stderr
    assert result.stderr.count("tokens/sec") == 2
    assert "Peak memory: " in result.stderr


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (
            lambda d: None,
            ["--max_new_tokens", 300],
            "error: the prompt (6 tokens) plus --max_new_tokens 300 exceeds the model's block_size 256; "
            "shorten the prompt or lower --max_new_tokens",
        ),
        (
            lambda d: (d / "lit_model.safetensors").unlink(),
            [],
            "error: {d} has no lit_model.safetensors; run scripts/convert_hf_checkpoint.py --checkpoint_dir {d} first",
        ),
        (
            lambda d: d.rename(d.with_name("elsewhere")),
            [],
            "error: checkpoint directory {d} does not exist; see howto/download_weights.md",
        ),
        (
            lambda d: None,
            ["--precision", "bf16-mixed"],
            "error: precision 'bf16-mixed' is not one of bf16-true, 16-true, 32-true",
        ),
        (lambda d: None, ["--top_k", 0], "error: --temperature must be >= 0 and --top_k >= 1 (or null), not 0.8 and 0"),
    ],
    ids=["too long", "not converted", "no directory", "bad precision", "bad top_k"],
)
def test_cli_errors_are_one_line(tmp_path, setup, args, message):
    make_checkpoint(tmp_path)  # block_size 256
    setup(tmp_path)
    result = run_cli("--checkpoint_dir", tmp_path, "--prompt", "Hello, my name is", *args)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [message.format(d=tmp_path)]


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def add_config_key(directory: Path) -> None:
    config = json.loads((directory / "model_config.json").read_text())
    (directory / "model_config.json").write_text(json.dumps({**config, "sliding_window": None}))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: truncate(d / "lit_model.safetensors", 4),
            "{d}/lit_model.safetensors is not a complete safetensors file (",
        ),
        (
            lambda d: truncate(d / "lit_model.safetensors", 100_000),
            "{d}/lit_model.safetensors is not a complete safetensors file (",
        ),
        (lambda d: (d / "model_config.json").write_text('{"n_layer": 2,'), "{d}/model_config.json is not valid JSON ("),
        (
            lambda d: (d / "model_config.json").write_text("[2]"),
            "{d}/model_config.json must hold a JSON object of Config fields",
        ),
        (
            add_config_key,
            "{d}/model_config.json has keys model.Config does not know: sliding_window; convert the checkpoint again",
        ),
    ],
    ids=["truncated header", "truncated tensors", "config not JSON", "config not an object", "config with unknown key"],
)
def test_damaged_checkpoint_files_are_one_line(tmp_path, damage, message):
    make_checkpoint(tmp_path)
    damage(tmp_path)
    result = run_cli("--checkpoint_dir", tmp_path, "--prompt", "Hello")
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(d=tmp_path)), result.stderr
