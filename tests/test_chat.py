"""chat.py on the real SmolLM2-135M-Instruct (tests/conftest.py's smollm2_dir, converted), greedy, against transformers'
greedy generate on the ids of its own apply_chat_template: the one-message answer on stdout, two turns through the KV
cache kept across turns, and the interactive loop driven through a pseudo-terminal."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chat import Chat
from conftest import make_adapter, make_llama_adapter
from convert_hf_checkpoint import convert_hf_checkpoint
from tokenizer import Tokenizer
from utils import load_model

ROOT = Path(__file__).resolve().parent.parent
IM_END = 2  # <|im_end|>, SmolLM2-Instruct's end of turn
FRANCE, GERMANY = "What is the capital of France?", "And of Germany?"


@pytest.fixture(scope="module")
def checkpoint(smollm2_dir):
    convert_hf_checkpoint(smollm2_dir)
    return smollm2_dir


@pytest.fixture(scope="module")
def reference(checkpoint):
    """answer(messages, max_new_tokens) -> (prompt ids, answer ids with the <|im_end|> it stops at, answer text):
    transformers' greedy generate on the ids of transformers' apply_chat_template."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    answers = {}  # several tests ask for the same conversations

    def answer(messages, max_new_tokens=32):
        key = (json.dumps(messages), max_new_tokens)
        if key not in answers:
            answers[key] = generate_answer(messages, max_new_tokens)
        return answers[key]

    def generate_answer(messages, max_new_tokens):
        idx = torch.tensor(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        out = hf.generate(
            idx[None],
            attention_mask=torch.ones_like(idx[None]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=IM_END,
            pad_token_id=IM_END,
        )[0, len(idx) :].tolist()
        text = tokenizer.decode(out[:-1] if out[-1] == IM_END else out)
        return idx.tolist(), out, text

    return answer


def test_prompt_prints_only_the_answer_transformers_gives(checkpoint, reference):
    _, ids, expected = reference([{"role": "user", "content": FRANCE}], max_new_tokens=64)
    assert ids[-1] == IM_END and expected == "The capital of France is Paris."
    result = subprocess.run(
        [sys.executable, "chat.py", "--checkpoint_dir", str(checkpoint), "--prompt", FRANCE, "--temperature", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_two_turns_through_the_cache_equal_recomputing_and_feed_only_the_new_tokens(checkpoint, reference):
    model = load_model(checkpoint).eval()
    fed = []  # the ids of every forward pass
    model.register_forward_pre_hook(lambda module, args: fed.append(args[0][0].tolist()))
    chat = Chat(model, Tokenizer(checkpoint), None, None, max_new_tokens=32, temperature=0.0, top_k=None)

    prompt1, ids1, text1 = reference([{"role": "user", "content": FRANCE}])
    assert "".join(chat.reply(FRANCE)) == text1
    assert fed[0] == prompt1  # the first turn feeds the whole prompt, then one token a step
    assert sum(fed[1:], []) == ids1[:-1]

    fed.clear()
    messages = [
        {"role": "user", "content": FRANCE},
        {"role": "assistant", "content": text1},
        {"role": "user", "content": GERMANY},
    ]
    prompt2, ids2, text2 = reference(messages)
    assert "".join(chat.reply(GERMANY)) == text2 and ids2[-1] == IM_END
    assert chat.messages == messages + [{"role": "assistant", "content": text2}]
    # the cache held the first prompt and answer (all but <|im_end|>, never fed): only the rest of the new prompt is fed
    kept = len(prompt1) + len(ids1) - 1
    assert prompt2[:kept] == prompt1 + ids1[:-1]
    assert fed[0] == prompt2[kept:] and len(fed[0]) == 15 < len(prompt2) // 3  # <|im_end|>\n<|im_start|>user\n...
    assert sum(fed[1:], []) == ids2[:-1]


def test_the_oldest_turn_is_dropped_when_the_conversation_outgrows_the_block_size(checkpoint, reference, capsys):
    model = load_model(checkpoint).eval()
    chat = Chat(model, Tokenizer(checkpoint), "Be brief.", None, max_new_tokens=32, temperature=0.0, top_k=None)
    "".join(chat.reply(FRANCE))
    length = len(chat.cached)
    model.config.block_size = length + 32 + 5  # too short for the second turn beside the first
    try:
        answer = "".join(chat.reply(GERMANY))
    finally:
        model.config.block_size = 8192
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": GERMANY}]
    assert answer == reference(messages)[2]
    assert chat.messages[:2] == messages
    assert "dropped its oldest turn" in capsys.readouterr().err

    before = [dict(message) for message in chat.messages]
    with pytest.raises(
        ValueError, match=r"the message \(\d+ tokens in the template\) plus --max_new_tokens 32 exceeds"
    ):
        "".join(chat.reply("word " * 9000))
    assert chat.messages == before  # refused, and the conversation goes on as it was


def test_a_checkpoint_without_a_chat_template_needs_template(checkpoint, tmp_path):
    from chat import main

    for name in ("lit_model.safetensors", "model_config.json", "tokenizer.json", "generation_config.json"):
        (tmp_path / name).symlink_to(checkpoint / name)
    with pytest.raises(ValueError, match="has no chat template .*; pass --template"):
        main(checkpoint_dir=tmp_path, prompt="Hello")


def test_an_adapter_path_answers_as_transformers_with_peft_adaption_prompt(checkpoint, tmp_path):
    """A LLaMA-Adapter v1 (random prompts, gates away from zero) in the top 4 layers: chat.py --adapter_path answers
    what transformers + PEFT generate with the adapter scripts/export_peft.py exports."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from export_peft import export_peft

    path = tmp_path / "v1.safetensors"
    make_llama_adapter(checkpoint, path, version=1, adapter_len=10, adapter_layers=4)
    export_peft(adapter_path=path, out_dir=tmp_path / "peft")
    base = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    hf = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    idx = torch.tensor(
        tokenizer.apply_chat_template([{"role": "user", "content": FRANCE}], add_generation_prompt=True)["input_ids"]
    )
    greedy = dict(max_new_tokens=16, do_sample=False, eos_token_id=IM_END, pad_token_id=IM_END)
    out = hf.generate(idx[None], attention_mask=torch.ones_like(idx[None]), **greedy)[0, len(idx) :].tolist()
    expected = tokenizer.decode(out[:-1] if out[-1] == IM_END else out)
    assert expected != "The capital of France is Paris."  # the adapter changes the answer

    flags = ["--checkpoint_dir", str(checkpoint), "--prompt", FRANCE, "--temperature", "0", "--max_new_tokens", "16"]
    result = subprocess.run(
        [sys.executable, "chat.py", *flags, "--adapter_path", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_adapter_flags_refuse_the_other_kind_and_combinations_in_one_line(checkpoint, checkpoint_dir, tmp_path):
    from chat import main

    lora, adapter = tmp_path / "lora.safetensors", tmp_path / "v1.safetensors"
    make_adapter(checkpoint_dir, lora, r=2, alpha=4, targets=("query",), seed=0)
    make_llama_adapter(checkpoint_dir, adapter, version=1, adapter_len=3, adapter_layers=1)
    for flags, message in (
        (dict(adapter_path=lora), "is a LoRA checkpoint (lora.py), not a LLaMA-Adapter one; LoRA files go to"),
        (dict(lora_path=adapter), "is a LLaMA-Adapter checkpoint (adapter.py), not a LoRA one; LLaMA-Adapter files"),
        (dict(lora_path=lora, adapter_path=adapter), "pass --lora_path (a LoRA adapter) or --adapter_path"),
        (dict(adapter_path=adapter, quantize="bnb.nf4"), "a LLaMA-Adapter runs on the unquantized base"),
        (dict(adapter_path=adapter), "was trained on another base model"),
    ):
        with pytest.raises(ValueError) as e:
            main(checkpoint_dir=checkpoint, prompt="Hello", **flags)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_template_name_is_refused_in_one_line_not_rendered_as_text(checkpoint):
    from chat import main

    with pytest.raises(ValueError) as e:  # the checkpoint has its own template; the name is not a template's
        main(checkpoint_dir=checkpoint, prompt="Hello", template="vicuna")
    assert str(e.value) == "--template vicuna is not one of llama-3, llama-2, chatml, alpaca"


def read_until(fd: int, marker: str, timeout: float = 60.0) -> str:
    """What the terminal shows until `marker` has appeared (newlines as the terminal writes them, \\r\\n)."""
    out, deadline = b"", time.monotonic() + timeout
    while marker.encode() not in out:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"{marker!r} did not appear in {timeout} s; the terminal showed {out.decode()!r}")
        out += os.read(fd, 4096)
    return out.decode().replace("\r\n", "\n")


def test_interactive_turns_reset_and_exit_through_a_terminal(checkpoint, reference):
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [
            sys.executable,
            "chat.py",
            "--checkpoint_dir",
            str(checkpoint),
            "--temperature",
            "0",
            "--max_new_tokens",
            "32",
        ],
        cwd=ROOT,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        close_fds=True,
    )
    os.close(secondary)
    try:
        _, _, first = reference([{"role": "user", "content": FRANCE}])  # while chat.py loads
        _, _, second = reference(
            [
                {"role": "user", "content": FRANCE},
                {"role": "assistant", "content": first},
                {"role": "user", "content": GERMANY},
            ]
        )
        _, _, alone = reference([{"role": "user", "content": GERMANY}])
        assert second != alone  # the history changes the answer, so that /reset shows
        read_until(primary, ">>> ")
        os.write(primary, f"{FRANCE}\n".encode())
        assert f"{first}\n>>> " in read_until(primary, ">>> ")
        os.write(primary, f"{GERMANY}\n".encode())
        assert f"{second}\n>>> " in read_until(primary, ">>> ")
        os.write(primary, b"/reset\n")
        assert "(conversation cleared)" in read_until(primary, ">>> ")
        os.write(primary, f"{GERMANY}\n".encode())
        assert f"{alone}\n>>> " in read_until(primary, ">>> ")
        os.write(primary, b"/exit\n")
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        os.close(primary)
