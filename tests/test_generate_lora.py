"""generate_lora.py, end to end: prepare_alpaca.py -> finetune_lora.py -> generate_lora.py, whose greedy answer must
equal generate.py's on the checkpoint scripts/merge_lora.py writes from the same adapter (and, trained to
memorise, the record's own answer); merged or not, the same text; bad input in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, finetune, make_checkpoint
from data import generate_prompt
from finetune_lora import setup
from generate_lora import main as generate_lora

RECORD = {"instruction": "Sum up the numbers.", "input": "3, 2, 5", "output": "The sum of the numbers is 10."}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, checkpoint_dir, eight_records) -> Path:
    """LoRA trained until it has memorised 8 short records of the shared data, RECORD among them."""
    directory = tmp_path_factory.mktemp("pipeline")
    assert RECORD in json.loads((eight_records / "records.json").read_text())
    finetune(
        setup,
        data_dir=eight_records,
        checkpoint_dir=checkpoint_dir,
        out_dir=directory / "out",
        batch_size=8,
        micro_batch_size=4,
        max_steps=80,
        warmup_steps=5,
        learning_rate=3e-2,
        lora_dropout=0.0,
        lora_targets=["query", "value", "head"],
        eval_interval=1000,
        eval_batches=1,
        save_interval=1000,
        max_seq_length=128,
    )
    return directory / "out" / "lit_model_lora_finetuned.safetensors"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_greedy_answer_equals_generate_py_on_the_merged_checkpoint(checkpoint_dir, adapter, tmp_path):
    merged = run(
        "scripts/merge_lora.py",
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--lora_path",
        str(adapter),
        "--out_dir",
        str(tmp_path / "merged"),
    )
    assert merged.returncode == 0, merged.stderr
    ours = run(
        "generate_lora.py",
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--lora_path",
        str(adapter),
        "--prompt",
        RECORD["instruction"],
        "--input",
        RECORD["input"],
        "--temperature",
        "0",
        "--max_new_tokens",
        "40",
    )
    prompt = generate_prompt(RECORD)
    reference = run(
        "generate.py",
        "--checkpoint_dir",
        str(tmp_path / "merged"),
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max_new_tokens",
        "40",
    )
    assert ours.returncode == 0 and reference.returncode == 0, ours.stderr + reference.stderr

    assert ours.stdout == RECORD["output"] + "\n"  # stdout is the response alone, here the memorised one
    assert reference.stdout == f"{prompt} {RECORD['output']}\n"  # generate.py prints the prompt too
    assert "tokens/sec" in ours.stderr and "Peak memory" in ours.stderr and "(merged)" in ours.stderr


def test_merged_and_separate_adapter_give_the_same_text(checkpoint_dir, adapter, capsys):
    answers = []
    for merge in (True, False):
        generate_lora(
            checkpoint_dir=checkpoint_dir,
            lora_path=adapter,
            prompt="Name three natural elements.",
            merge=merge,
            temperature=0.0,
            max_new_tokens=30,
        )
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] == "1. Oxygen\n2. Hydrogen\n3. Nitrogen\n"
    # sampling: reproducible by seed
    samples = []
    for seed in (1, 1, 2):
        generate_lora(
            checkpoint_dir=checkpoint_dir,
            lora_path=adapter,
            prompt="Tell me a story.",
            temperature=1.0,
            top_k=None,
            seed=seed,
            max_new_tokens=20,
        )
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] != samples[2]


def test_bad_input_is_one_line_with_nonzero_exit(checkpoint_dir, adapter, tmp_path):
    missing = run(
        "generate_lora.py", "--checkpoint_dir", str(checkpoint_dir), "--lora_path", str(tmp_path / "nope.safetensors")
    )
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == f"error: LoRA checkpoint {tmp_path / 'nope.safetensors'} not found\n"

    with pytest.raises(
        ValueError,
        match=r"^the prompt \(\d+ tokens with the template\) plus --max_new_tokens 250 "
        r"exceeds the model's block_size 256; shorten the prompt or lower --max_new_tokens$",
    ):
        generate_lora(checkpoint_dir=checkpoint_dir, lora_path=adapter, max_new_tokens=250)
    with pytest.raises(ValueError, match=f"^checkpoint directory {tmp_path / 'nothing'} does not exist"):
        generate_lora(checkpoint_dir=tmp_path / "nothing", lora_path=adapter)
    other = tmp_path / "other"
    make_checkpoint(other, hidden_size=32)
    with pytest.raises(ValueError, match=f"^{adapter} was trained on another base model: n_embd=64 \\(model: 32\\)"):
        generate_lora(checkpoint_dir=other, lora_path=adapter)


def test_a_tokenizer_json_checkpoint_end_to_end(llama3_checkpoint_dir, tmp_path, capsys):
    """Llama 3.1's tokenizer.json, no tokenizer.model: convert (the fixture) -> prepare_alpaca.py, whose ids are
    transformers' -> finetune_lora.py -> generate_lora.py, and generate.py on scripts/merge_lora.py's directory, whose
    greedy text is what transformers + PEFT generate from scripts/export_peft.py's adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from export_peft import export_peft
    from generate import main as generate_main
    from merge_lora import merge_lora
    from prepare_alpaca import setup as prepare
    from tokenizer import Tokenizer

    checkpoint_dir = llama3_checkpoint_dir
    assert not (checkpoint_dir / "tokenizer.model").exists()
    reference = AutoTokenizer.from_pretrained(checkpoint_dir)
    records = json.loads((ROOT.parent / "shared" / "data" / "alpaca_en_demo.json").read_text())
    records = sorted(records, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:9]
    (tmp_path / "records.json").write_text(json.dumps(records))
    prepare(
        destination_path=tmp_path / "data",
        checkpoint_dir=checkpoint_dir,
        data_file_path=tmp_path / "records.json",
        test_split_fraction=0.12,
        max_seq_length=128,
    )
    prepared = torch.load(tmp_path / "data" / "train.pt") + torch.load(tmp_path / "data" / "test.pt")
    expected = [
        reference(generate_prompt(r))["input_ids"]
        + reference(r["output"], add_special_tokens=False)["input_ids"]
        + [128009]
        for r in records
    ]  # <|begin_of_text|> prompt response <|eot_id|>
    assert sorted(s["input_ids"].tolist() for s in prepared) == sorted(expected)

    finetune(
        setup,
        data_dir=tmp_path / "data",
        checkpoint_dir=checkpoint_dir,
        out_dir=tmp_path / "out",
        batch_size=4,
        micro_batch_size=4,
        max_steps=3,
        warmup_steps=1,
        learning_rate=1e-2,
        lora_targets=["query", "value"],
        eval_interval=3,
        eval_batches=1,
        save_interval=1000,
        max_seq_length=128,
    )
    adapter = tmp_path / "out" / "lit_model_lora_finetuned.safetensors"
    capsys.readouterr()
    generate_lora(
        checkpoint_dir=checkpoint_dir,
        lora_path=adapter,
        prompt=RECORD["instruction"],
        input=RECORD["input"],
        temperature=0.0,
        max_new_tokens=12,
    )
    ours = capsys.readouterr().out
    merge_lora(checkpoint_dir, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged" / "tokenizer.model").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (checkpoint_dir / name).read_bytes()
    generate_main(
        checkpoint_dir=tmp_path / "merged", prompt=generate_prompt(RECORD), temperature=0.0, max_new_tokens=12
    )
    merged = capsys.readouterr().out

    export_peft(lora_path=adapter, out_dir=tmp_path / "peft")
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(checkpoint_dir), tmp_path / "peft").eval()
    prompt = reference(generate_prompt(RECORD), return_tensors="pt")["input_ids"]
    stop_ids = Tokenizer(checkpoint_dir).stop_ids
    new = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=list(stop_ids), pad_token_id=128009)
    new = new[0, prompt.shape[1] :].tolist()
    new = new[:-1] if new[-1] in stop_ids else new
    assert new  # some text to compare
    assert ours == reference.decode(new, clean_up_tokenization_spaces=False) + "\n"
    assert merged == reference.decode(prompt[0, 1:].tolist() + new, clean_up_tokenization_spaces=False) + "\n"
