"""prepare_chat.py: ids equal to transformers' apply_chat_template, labels exactly over the assistant turns and their
end-of-turn tokens, truncation by whole turns, the two input formats, and one-line errors on bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import shared_file
from data import check_prepared_data
from prepare_chat import setup
from tokenizer import CHAT_TEMPLATES, Tokenizer

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "  Blue.  "},
        {"role": "user", "content": "And a naïve fruit? 🍎"},
        {"role": "assistant", "content": "An apple, 🍎.\nCrisp."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Thanks"},  # a last user turn: nothing of it is learned
    ],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
]


def tokenizer_dir(tmp_path: Path, name: str = "llama-3.1") -> Path:
    """A checkpoint directory as data preparation meets it: only the tokenizer's files."""
    directory = tmp_path / name
    directory.mkdir()
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_file(f"{name}/{file}"), directory / file)
    return directory


def prepare(tmp_path: Path, checkpoint_dir: Path, conversations: list, **flags) -> tuple[list, dict]:
    """Prepares `conversations` (written as JSONL) with a split that puts the first in test.pt; returns all the
    samples in file order and the metadata."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    out = tmp_path / "out"
    setup(destination_path=out, checkpoint_dir=checkpoint_dir, data_file_path=data, test_split_fraction=0.34, **flags)
    samples = torch.load(out / "train.pt") + torch.load(out / "test.pt")
    return samples, json.loads((out / "metadata.json").read_text())


def target_runs(tokenizer: Tokenizer, sample: dict, ignore_index: int = -100) -> list[str]:
    """The text of each maximal run of target tokens."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
        if label == ignore_index:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


@pytest.mark.parametrize("case", ["llama-3.1", "llama-3", "llama-3.1 + llama-2", "smollm2"])
def test_ids_equal_transformers_and_targets_are_exactly_the_assistant_turns_with_end_of_turn(request, tmp_path, case):
    from transformers import AutoTokenizer

    name, _, template = case.partition(" + ")
    directory = request.getfixturevalue("smollm2_dir") if name == "smollm2" else tokenizer_dir(tmp_path, name)
    samples, metadata = prepare(tmp_path, directory, CONVERSATIONS, template=template or None)
    reference = AutoTokenizer.from_pretrained(directory)
    tokenizer = Tokenizer(directory)

    def assistant(conversation):
        return [m["content"] for m in conversation if m["role"] == "assistant"]

    expected_runs = {  # what each template writes of an assistant turn, and its end-of-turn token
        "llama-3.1": lambda content: content.strip() + "<|eot_id|>",
        "llama-3": lambda content: content.strip() + "<|eot_id|>",
        "llama-3.1 + llama-2": lambda content: content.strip() + " <|eot_id|>",
        "smollm2": lambda content: content + "<|im_end|>",
    }[case]
    by_length = {len(s["input_ids"]): s for s in samples}
    for conversation in CONVERSATIONS:
        ids = reference.apply_chat_template(
            conversation, chat_template=CHAT_TEMPLATES.get(template), tokenize=True, return_dict=False
        )
        sample = by_length[len(ids)]
        assert sample["input_ids"].tolist() == list(ids)
        # the template's whitespace before the content is part of the first target token where the tokenizer merges
        # them into one (Llama 2's " Blue", ChatML's "\n  " before "  Blue."), not where it splits them (" ", "4")
        runs = target_runs(tokenizer, sample)
        expected = [expected_runs(content) for content in assistant(conversation)]
        assert len(runs) == len(expected)
        for run, text in zip(runs, expected):
            assert run.endswith(text) and not run.removesuffix(text).strip(), (run, text)
        if name.startswith("llama-3") and not template:
            assert runs == expected  # Llama 3's headers end in their own "\n\n" token: exact
    assert metadata["template"] == "chat" and metadata["chat_template_name"] == (template or "checkpoint")
    assert metadata["chat_template"] == (CHAT_TEMPLATES[template] if template else tokenizer.chat_template)
    assert check_prepared_data(tmp_path / "out", directory) == metadata


def test_sharegpt_and_openai_formats_give_the_same_data(tmp_path):
    directory = tokenizer_dir(tmp_path)
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [
        {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]} for c in CONVERSATIONS
    ]
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt))
    setup(
        destination_path=tmp_path / "sharegpt",
        checkpoint_dir=directory,
        data_file_path=tmp_path / "sharegpt.json",
        test_split_fraction=0.34,
    )
    prepare(tmp_path, directory, CONVERSATIONS)
    for split in ("train.pt", "test.pt"):
        for ours, theirs in zip(torch.load(tmp_path / "sharegpt" / split), torch.load(tmp_path / "out" / split)):
            assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours["labels"], theirs["labels"])


def test_truncation_keeps_whole_leading_turns_and_leaves_out_what_has_no_whole_first_turn(tmp_path, capsys):
    directory = tokenizer_dir(tmp_path)
    tokenizer = Tokenizer(directory)
    long_first = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    conversations = [CONVERSATIONS[0], CONVERSATIONS[2], long_first, *[CONVERSATIONS[2]] * 3]
    first_turn = tokenizer.encode(tokenizer.apply_chat_template(CONVERSATIONS[0][:3]), bos=False)
    samples, metadata = prepare(tmp_path, directory, conversations, max_seq_length=len(first_turn) + 5)
    assert len(samples) == 5  # long_first is left out
    cut = max(samples, key=lambda s: len(s["input_ids"]))
    assert cut["input_ids"].tolist() == first_turn.tolist()  # the conversation up to its first turn's <|eot_id|>
    assert target_runs(tokenizer, cut) == ["Blue.<|eot_id|>"]
    assert (metadata["truncated"], metadata["left_out_first_turn_too_long"]) == (1, 1)
    out = capsys.readouterr().out
    assert "Truncated to --max_seq_length" in out and "1 records" in out
    assert "Left out 1 conversations whose first assistant turn does not fit" in out and "line 3" in out


BAD = [
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', "line 1: message 1 has the unknown 'role' 'bot'"),
    ('{"messages": []}\n', "line 1: 'messages' must be a non-empty list"),
    ('{"messages": "hello"}\n', "line 1: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "line 1 has no assistant turn"),
    ('{"messages": [{"role": "user", "content": 3}]}\n', "message 1 is not an object with a text 'content'"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
        '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n',
        "line 2 is in the ShareGPT format but the file starts in the OpenAI format",
    ),
    ('{"text": "x"}\n', "line 1 has neither a 'messages' \\(OpenAI\\) nor a 'conversations' \\(ShareGPT\\) list"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [\n', "malformed JSON on line 2"),
    (
        '[{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, '
        '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
        '{"role": "assistant", "content": "c"}]}]',
        "record index 1: the chat template failed: Conversation roles must alternate",
    ),
]


@pytest.mark.parametrize("content, message", BAD)
def test_bad_input_stops_with_one_line_and_writes_nothing(tmp_path, content, message):
    directory = tokenizer_dir(tmp_path)
    (tmp_path / "chats.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        setup(
            destination_path=tmp_path / "out",
            checkpoint_dir=directory,
            data_file_path=tmp_path / "chats.jsonl",
            template="llama-2",
            test_split_fraction=0.5,
        )
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_template_without_an_end_of_turn_token_is_refused(tmp_path):
    directory = tokenizer_dir(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="line 1: the chat template puts no end-of-turn token after an assistant turn"):
        prepare(tmp_path, directory, CONVERSATIONS)
