"""generate_adapter.py: a v1 adapter's greedy answer equals transformers + PEFT's adaption prompt (the adapter exported
by scripts/export_peft.py), a v2 adapter's equals generate.py on the checkpoint scripts/merge_lora.py merges it into;
bad input in one line."""

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_adapter, make_checkpoint, make_llama_adapter
from data import generate_prompt
from decode import printable
from generate_adapter import main as generate_adapter
from tokenizer import Tokenizer

RECORD = {"instruction": "Sum up the numbers.", "input": "3, 2, 5"}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_v1_answer_equals_transformers_with_peft_adaption_prompt(checkpoint_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from export_peft import export_peft

    path = tmp_path / "v1.safetensors"
    make_llama_adapter(checkpoint_dir, path, version=1, adapter_len=7, adapter_layers=2)
    generate_adapter(
        checkpoint_dir=checkpoint_dir,
        adapter_path=path,
        prompt=RECORD["instruction"],
        input=RECORD["input"],
        temperature=0.0,
        max_new_tokens=20,
    )
    ours = capsys.readouterr().out

    export_peft(adapter_path=path, out_dir=tmp_path / "peft")
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(checkpoint_dir), tmp_path / "peft").eval()
    tokenizer = Tokenizer(checkpoint_dir)
    prompt = tokenizer.encode(generate_prompt(RECORD))
    new = hf.generate(
        prompt[None], max_new_tokens=20, do_sample=False, eos_token_id=list(tokenizer.stop_ids), pad_token_id=0
    )[0, len(prompt) :]
    with hf.disable_adapter():
        base = hf.generate(prompt[None], max_new_tokens=20, do_sample=False, pad_token_id=0)[0, len(prompt) :]
    assert not torch.equal(new, base)  # the prompts change the answer
    assert ours == tokenizer.decode(printable(new, tokenizer)) + "\n"


def test_v2_answer_equals_generate_py_on_the_merged_checkpoint(checkpoint_dir, tmp_path):
    path = tmp_path / "v2.safetensors"
    make_llama_adapter(checkpoint_dir, path, version=2, adapter_layers=0)
    merged = run(
        "scripts/merge_lora.py",
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--adapter_path",
        str(path),
        "--out_dir",
        str(tmp_path / "merged"),
    )
    assert merged.returncode == 0, merged.stderr
    greedy = ("--temperature", "0", "--max_new_tokens", "20")
    ours = run("generate_adapter.py", "--checkpoint_dir", str(checkpoint_dir), "--adapter_path", str(path), *greedy)
    prompt = generate_prompt({"instruction": "What food do llamas eat?", "input": ""})  # the default --prompt
    reference = run("generate.py", "--checkpoint_dir", str(tmp_path / "merged"), "--prompt", prompt, *greedy)
    base = run("generate.py", "--checkpoint_dir", str(checkpoint_dir), "--prompt", prompt, *greedy)
    assert ours.returncode == reference.returncode == base.returncode == 0, ours.stderr + reference.stderr
    assert reference.stdout == f"{prompt} {ours.stdout}"  # generate.py prints the prompt too
    assert base.stdout != reference.stdout  # the adapter changes the answer
    assert "LLaMA-Adapter v2, 0 prompt vectors in the top 0 layers" in ours.stderr
    assert "tokens/sec" in ours.stderr and "Peak memory" in ours.stderr


def test_bad_input_is_one_line_with_nonzero_exit(checkpoint_dir, tmp_path):
    make_adapter(checkpoint_dir, tmp_path / "lora.safetensors", r=2, alpha=4, targets=("query",), seed=0)
    make_checkpoint(tmp_path / "other", hidden_size=32)
    make_llama_adapter(tmp_path / "other", tmp_path / "other.safetensors", version=1, adapter_len=3, adapter_layers=1)
    cases = [
        (
            tmp_path / "lora.safetensors",
            f"{tmp_path / 'lora.safetensors'} is a LoRA checkpoint (lora.py), not a LLaMA-Adapter one; LoRA files go "
            "to --lora_path (generate with generate_lora.py)",
        ),
        (tmp_path / "nope.safetensors", f"LLaMA-Adapter checkpoint {tmp_path / 'nope.safetensors'} not found"),
        (
            tmp_path / "other.safetensors",
            f"{tmp_path / 'other.safetensors'} was trained on another base model: n_embd=32 (model: 64); use the "
            "checkpoint directory it was trained on",
        ),
    ]
    (path, message), *others = cases
    result = run("generate_adapter.py", "--checkpoint_dir", str(checkpoint_dir), "--adapter_path", str(path))
    assert result.returncode == 1 and result.stdout == "" and result.stderr == f"error: {message}\n"
    for path, message in others:  # in-process: the command line turns each into its one line, as above
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            generate_adapter(checkpoint_dir=checkpoint_dir, adapter_path=path)
        assert str(e.value) == message
    with pytest.raises(ValueError, match=r"plus --max_new_tokens 250 exceeds the model's block_size 256"):
        generate_adapter(checkpoint_dir=checkpoint_dir, adapter_path=tmp_path / "other.safetensors", max_new_tokens=250)
