"""finetune_full.py on the tiny config (real tokenizer, fp32 on CPU): every weight learns, the loss falls, and the
directory it writes is a checkpoint generate.py loads, holding the trained weights, and that exports to a Hugging Face
directory transformers gives its logits for; bad input in one line."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, finetune
from convert_lit_checkpoint import convert_lit_checkpoint
from data import generate_prompt
from decode import generate
from finetune_full import setup
from model import Config, LLaMA
from test_convert_lit_checkpoint import assert_transformers_logits_equal_ours
from tokenizer import Tokenizer

RECORD = {"instruction": "Sum up the numbers.", "input": "3, 2, 5"}


def test_all_weights_learn_and_the_output_is_a_checkpoint_generate_py_loads(checkpoint_dir, eight_records, tmp_path):
    out_dir = tmp_path / "full"
    finetune(
        setup,
        data_dir=eight_records,
        checkpoint_dir=checkpoint_dir,
        out_dir=out_dir,
        batch_size=8,
        micro_batch_size=4,
        max_steps=12,
        warmup_steps=2,
        learning_rate=1e-2,
        eval_interval=6,
        eval_batches=1,
        save_interval=6,
        max_seq_length=128,
    )  # with gradient checkpointing, the default
    state = torch.load(out_dir / "train_state.pt", weights_only=True)
    losses = [loss for _, loss in state["history"]["train"]]
    assert state["step"] == 12 and losses[0] > 10 and losses[-1] < 7

    for directory in (out_dir, out_dir / "step-000006"):
        assert {"lit_model.safetensors", "model_config.json", "tokenizer.model"} <= {
            p.name for p in directory.iterdir()
        }
        assert (directory / "tokenizer.model").read_bytes() == (checkpoint_dir / "tokenizer.model").read_bytes()
        assert Config.from_file(directory / "model_config.json") == Config.from_file(
            checkpoint_dir / "model_config.json"
        )
    saved, base = load_file(out_dir / "lit_model.safetensors"), load_file(checkpoint_dir / "lit_model.safetensors")
    assert saved.keys() == base.keys() and saved.keys() == state["model"].keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, state["model"][name])  # the trained weights, in the base's dtype (fp32)
        if name != "embed.weight":  # rows of tokens that never occur get no gradient
            assert not torch.equal(tensor, base[name]), name
    assert not torch.equal(saved["embed.weight"], base["embed.weight"])

    # generate.py on the new directory answers as the trained weights do
    with torch.device("meta"):
        model = LLaMA(Config.from_file(out_dir / "model_config.json"))
    model.load_state_dict(state["model"], assign=True)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt = generate_prompt(RECORD)
    output = generate(model.eval(), tokenizer.encode(prompt), 20, temperature=0.0, stop_ids=tokenizer.stop_ids)
    expected = tokenizer.decode(output)
    result = subprocess.run(
        [
            sys.executable,
            "generate.py",
            "--checkpoint_dir",
            str(out_dir),
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max_new_tokens",
            "20",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"

    # and it leaves for transformers as it is (scripts/convert_lit_checkpoint.py)
    convert_lit_checkpoint(out_dir, tmp_path / "hf")
    assert_transformers_logits_equal_ours(tmp_path / "hf", out_dir, tokenizer.encode(prompt)[None])


def test_bad_input_stops_with_one_line(checkpoint_dir, eight_records, tmp_path):
    def error(**settings) -> str:
        arguments = {
            "data_dir": eight_records,
            "checkpoint_dir": checkpoint_dir,
            "out_dir": tmp_path / "out",
            "batch_size": 4,
            "micro_batch_size": 2,
            "max_steps": 1,
            **settings,
        }
        with pytest.raises((ValueError, OSError)) as raised:
            finetune(setup, **arguments)
        assert "\n" not in str(raised.value)
        return str(raised.value)

    assert error(micro_batch_size=8) == "--train.micro_batch_size 8 must be between 1 and --train.batch_size 4"
    assert error(max_steps=-1) == "--train.max_steps -1 must be at least 1"  # it trained nothing and saved that
    assert error(max_steps=0) == "--train.max_steps 0 must be at least 1"  # it trained --train.epochs
    assert not (tmp_path / "out").exists()
    assert error(out_dir=checkpoint_dir) == (
        f"--out_dir {checkpoint_dir} is the checkpoint directory; choose a new directory"
    )
    assert error(data_dir=tmp_path / "missing") == (
        f"{tmp_path / 'missing'} has no metadata.json; prepare the data with prepare_alpaca.py first"
    )
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    assert error(resume=str(tmp_path / "state.pt")).startswith(
        f"--resume {tmp_path / 'state.pt'} is not a train_state.pt of a fine-tuning script ("
    )
