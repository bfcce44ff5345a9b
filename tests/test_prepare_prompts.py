"""prepare_prompts.py: text prompts and OpenAI messages equal to transformers' apply_chat_template ids (Llama 3.1's and
SmolLM2's chat templates), the Alpaca prompt in sentencepiece's ids without a template, GSM8K's fields mapped and every
other field kept for the rewards, long prompts left out, the data read back by data.load_prepared_data, and one-line
errors on bad input with nothing written."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, shared_file
from data import encode_prompt, generate_prompt, load_prepared_data
from prepare_prompts import setup
from tokenizer import Tokenizer

GSM8K = [  # GSM8K's shape: a question, an answer whose last line is "#### <number>"
    {
        "question": f"Tom has {a} apples and buys {b} more. How many has he?",
        "answer": f"{a} + {b} = {a + b}\n#### {a + b}",
    }
    for a, b in ((3, 4), (10, 7), (2, 2), (31, 11), (5, 0), (6, 9), (12, 1), (8, 8))
]
MESSAGES = [
    {
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
        "answer": "blue",
    },
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "And a naïve fruit? 🍎"},
        ],
        "answer": "apple",
        "difficulty": 2,
    },
    {"prompt": "What is 2 + 2?", "answer": "4", "tags": ["math", None]},
    {"prompt": "Count to three.", "answer": "1 2 3"},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def prepare(tmp_path: Path, checkpoint_dir: Path, records: list, **flags) -> tuple[list[dict], dict]:
    """Prepares `records`; returns every prepared record, test.pt's first, and the metadata."""
    out = tmp_path / "out"
    tmp_path.mkdir(parents=True, exist_ok=True)
    flags = {"test_split_fraction": 0.25, **flags}
    setup(
        destination_path=out,
        checkpoint_dir=checkpoint_dir,
        data_file_path=write_jsonl(tmp_path / "prompts.jsonl", records),
        **flags,
    )
    prepared = torch.load(out / "test.pt", weights_only=True) + torch.load(out / "train.pt", weights_only=True)
    return prepared, json.loads((out / "metadata.json").read_text())


def tokenizer_dir(tmp_path: Path, source: Path) -> Path:
    """A checkpoint directory as data preparation meets it: only the tokenizer's files."""
    directory = tmp_path / source.name
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    return directory


@pytest.mark.parametrize("tokenizer", ["llama-3.1", "SmolLM2"])
def test_text_prompts_and_messages_are_transformers_chat_template_ids_and_the_fields_are_kept(
    tokenizer, tmp_path, request
):
    from transformers import AutoTokenizer

    source = (
        shared_file("llama-3.1/tokenizer.json").parent
        if tokenizer == "llama-3.1"
        else request.getfixturevalue("smollm2_dir")
    )
    directory = tokenizer_dir(tmp_path, source)
    prepared, metadata = prepare(tmp_path, directory, MESSAGES)
    assert metadata["template"] == "chat" and metadata["prompts"] and metadata["chat_template"] is not None
    assert (metadata["train_records"], metadata["test_records"]) == (3, 1)

    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    by_answer = {record["answer"]: record for record in prepared}
    assert len(by_answer) == len(MESSAGES)
    for record in MESSAGES:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        ours = by_answer[record["answer"]]
        assert ours["prompt_ids"].tolist() == expected and ours["prompt_ids"].dtype == torch.long
        assert ours["prompt"] == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # the other fields as they were, for the rewards
        others = {key: value for key, value in record.items() if key not in ("messages", "prompt")}
        assert {key: value for key, value in ours.items() if key not in ("prompt_ids", "prompt")} == others
    assert metadata["longest_sequence"] == max(len(record["prompt_ids"]) for record in prepared)


def test_without_a_chat_template_a_prompt_is_the_alpaca_prompt_after_bos_and_gsm8k_fields_map(
    sentencepiece_dir, sp, tmp_path
):
    """GSM8K's question is the prompt (--prompt_field question); its answer stays "answer"; the ids are sentencepiece's
    of BOS + the Alpaca prompt, which is also what data.encode_prompt (the sample answers' prompt) gives."""
    prepared, metadata = prepare(tmp_path, sentencepiece_dir, GSM8K, prompt_field="question")
    assert metadata["template"] == "alpaca" and (metadata["train_records"], metadata["test_records"]) == (6, 2)
    tokenizer = Tokenizer(sentencepiece_dir)
    by_answer = {record["answer"]: record for record in prepared}
    for record in GSM8K:
        ours = by_answer[record["answer"]]
        text = generate_prompt({"instruction": record["question"], "input": ""})
        assert set(ours) == {"prompt_ids", "prompt", "answer"} and ours["prompt"] == text
        assert ours["prompt_ids"].tolist() == [1] + sp.encode(text)
        assert torch.equal(ours["prompt_ids"], encode_prompt(tokenizer, {"instruction": record["question"]}))
    # another name for the answer: kept as "answer"
    renamed = [{"q": record["question"], "solution": record["answer"]} for record in GSM8K]
    again, _ = prepare(tmp_path / "renamed", sentencepiece_dir, renamed, prompt_field="q", answer_field="solution")
    assert sorted(record["answer"] for record in again) == sorted(record["answer"] for record in GSM8K)


def test_a_prompt_longer_than_max_prompt_length_is_left_out_and_reported(sentencepiece_dir, tmp_path, capsys):
    records = [{"prompt": "word " * 80, "answer": "1"}, *[{"prompt": r["question"]} for r in GSM8K]]
    prepared, metadata = prepare(tmp_path, sentencepiece_dir, records, max_prompt_length=70)
    assert len(prepared) == len(GSM8K) and all("answer" not in record for record in prepared)
    assert metadata["left_out_prompt_too_long"] == 1 and metadata["longest_sequence"] <= 70
    assert "Left out 1 prompts longer than --max_prompt_length 70 (e.g. line 1)" in capsys.readouterr().out


def test_the_data_is_read_back_by_load_prepared_data(checkpoint_dir, tmp_path):
    prepare(tmp_path, checkpoint_dir, GSM8K, prompt_field="question")
    data = load_prepared_data(tmp_path / "out", checkpoint_dir, keys=("prompt_ids",))
    assert len(data.train) == 6 and len(data.val) == 2 and data.metadata["prompts"] and data.chat_template is None
    answers = sorted(record["answer"] for record in data.train + data.val)
    assert answers == sorted(record["answer"] for record in GSM8K)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "Hi"}, "line 2 has no 'prompt' (pass --prompt_field to name the prompt's field)"),
        ({"prompt": "   "}, "line 2 has an empty 'prompt'"),
        ({"prompt": 3}, "line 2 has a 'prompt' that is neither text nor a non-empty list of messages"),
        (["Hi"], "line 2 is a JSON list, not an object"),
        (
            {"prompt": [{"role": "user", "content": "Hi"}]},
            "line 2 has messages, but the checkpoint has no chat template to render them in; choose one with "
            "--template",
        ),
        ({"prompt": "Hi", "prompt_ids": [1]}, "line 2 has a field 'prompt_ids', a name the prepared records use"),
    ],
    ids=["no prompt", "empty", "not text", "not an object", "messages without a template", "reserved field"],
)
def test_a_bad_record_stops_with_one_line_and_writes_nothing(sentencepiece_dir, tmp_path, record, message):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello"}, record, {"prompt": "Bye"}])
    with pytest.raises(ValueError, match=re.escape(f"{data} {message}")):
        setup(destination_path=tmp_path / "out", checkpoint_dir=sentencepiece_dir, data_file_path=data)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "wizard", "content": "Hi"}], "has a 'messages' whose message 1 has the unknown role 'wizard'"),
        ([{"role": "user", "content": 3}], "has a 'messages' whose message 1 is not an object with a text 'content'"),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}],
            "has a 'messages' that ends with the assistant's message; a prompt ends where the model answers",
        ),
    ],
    ids=["unknown role", "not text", "ends with the answer"],
)
def test_bad_messages_stop_with_one_line(tmp_path, messages, message):
    directory = tokenizer_dir(tmp_path, shared_file("llama-3.1/tokenizer.json").parent)
    data = write_jsonl(tmp_path / "prompts.jsonl", [MESSAGES[0], {"messages": messages}])
    with pytest.raises(ValueError, match=re.escape(f"{data} line 2 {message}")):
        setup(destination_path=tmp_path / "out", checkpoint_dir=directory, data_file_path=data)
    assert not (tmp_path / "out").exists()


def test_command_line_errors_are_one_line_with_exit_status_1_and_nothing_written(sentencepiece_dir, tmp_path):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    result = subprocess.run(
        [
            sys.executable,
            "prepare_prompts.py",
            "--checkpoint_dir",
            str(sentencepiece_dir),
            "--data_file_path",
            str(data),
            "--destination_path",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr == f"error: {data} line 1 has no 'prompt' (pass --prompt_field to name the prompt's field)\n"
    for flags, expected in [
        (dict(max_prompt_length=0), "--max_prompt_length must be at least 1, not 0"),
        (dict(prompt_field="answer"), "--prompt_field and --answer_field are both 'answer'"),
        (dict(template="vicuna"), "--template vicuna is not one of llama-3, llama-2, chatml, alpaca"),
        (dict(template="chatml"), "has only tokenizer.model; chat templates write special tokens as text"),
    ]:
        with pytest.raises(ValueError, match=re.escape(expected)):
            setup(destination_path=tmp_path / "out", checkpoint_dir=sentencepiece_dir, data_file_path=data, **flags)
    assert not (tmp_path / "out").exists()
