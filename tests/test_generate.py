"""generate.py's command line (the decoding loop: tests/test_decode.py; the CPU weight layout: tests/test_utils.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_checkpoint
from decode import generate
from tokenizer import Tokenizer
from utils import load_model


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
        (
            lambda d: None,
            ["--top_k", 0],
            "error: --temperature must be >= 0, --top_k >= 1 (or null), --top_p in (0, 1] and --max_new_tokens >= 1, "
            "not 0.8, 0, 1.0 and 100",
        ),
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


def test_an_answer_that_ends_at_once_is_said_on_stderr(tmp_path):
    """The greedy first token made a stop token (generation_config.json's eos_token_id): no empty line alone, but
    what happened and what to try."""
    make_checkpoint(tmp_path)
    prompt = "Hello, my name is"
    ids = Tokenizer(tmp_path).encode(prompt)
    token = generate(load_model(tmp_path).eval(), ids, 1, temperature=0.0)[-1].item()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, token]}))
    result = run_cli("--checkpoint_dir", tmp_path, "--prompt", prompt, "--max_new_tokens", 5, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == prompt
    assert "the answer is empty: the model's first token was a stop token. Try sampling" in result.stderr
