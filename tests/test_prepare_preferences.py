"""prepare_preferences.py: plain pairs equal to sentencepiece's ids in the Alpaca prompt, conversational pairs equal to
the ids TRL's DPOTrainer prepares from the same records (Llama 3.1's and SmolLM2's chat templates), truncation (the
prompt from the left first, then the answers), the Hub download, and one-line errors on bad input."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, shared_file
from data import generate_prompt, load_prepared_data
from prepare_preferences import PAIR_KEYS, setup

PLAIN = [
    {"prompt": f"Name a colour like {colour}.", "chosen": f"{colour.title()}, a fine one.", "rejected": "No."}
    for colour in ("red", "blue", "green", "amber", "teal", "plum", "rose", "jade")
]
CONVERSATIONS = [
    {
        "prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "  Blue.  "}],
        "rejected": [{"role": "assistant", "content": "I would rather not."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "And a naïve fruit? 🍎"},
        ],
        "chosen": [{"role": "assistant", "content": "An apple, 🍎.\nCrisp."}],
        "rejected": [{"role": "assistant", "content": "A rock."}],
    },
    {
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    },
    {
        "prompt": [{"role": "user", "content": "Count to three."}],
        "chosen": [{"role": "assistant", "content": "One, two, three."}],
        "rejected": [{"role": "assistant", "content": "Three, two, one."}],
    },
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def prepare(tmp_path: Path, checkpoint_dir: Path, records: list, **flags) -> tuple[list[dict], dict]:
    """Prepares `records`; returns every pair, test.pt's first, and the metadata."""
    out = tmp_path / "out"
    flags = {"test_split_fraction": 0.25, **flags}
    setup(
        destination_path=out,
        checkpoint_dir=checkpoint_dir,
        data_file_path=write_jsonl(tmp_path / "pairs.jsonl", records),
        **flags,
    )
    pairs = torch.load(out / "test.pt", weights_only=True) + torch.load(out / "train.pt", weights_only=True)
    return pairs, json.loads((out / "metadata.json").read_text())


def tokenizer_dir(tmp_path: Path, source: Path) -> Path:
    """A checkpoint directory as data preparation meets it: only the tokenizer's files."""
    directory = tmp_path / source.name
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    return directory


def test_plain_pairs_are_the_alpaca_prompt_and_each_answer_with_eos_in_sentencepiece_ids(
    sentencepiece_dir, sp, tmp_path
):
    pairs, metadata = prepare(tmp_path, sentencepiece_dir, PLAIN)
    assert len(pairs) == len(PLAIN) and all(set(pair) == set(PAIR_KEYS) for pair in pairs)
    expected = {
        tuple([1] + sp.encode(generate_prompt({"instruction": r["prompt"], "input": ""}))): (
            [*sp.encode(r["chosen"]), 2],
            [*sp.encode(r["rejected"]), 2],
        )
        for r in PLAIN
    }
    for pair in pairs:
        assert (pair["chosen_ids"].tolist(), pair["rejected_ids"].tolist()) == expected[
            tuple(pair["prompt_ids"].tolist())
        ]
        assert pair["prompt_ids"].dtype == torch.long
    assert metadata["pairs"] and metadata["template"] == "alpaca" and metadata["train_records"] == 6
    assert metadata["longest_sequence"] == max(
        len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs
    )
    assert (metadata["prompt_cut"], metadata["answers_cut"], metadata["left_out_same_answers"]) == (0, 0, 0)


@pytest.mark.parametrize("tokenizer", ["llama-3.1", "SmolLM2"])
def test_conversational_pairs_are_the_ids_trl_prepares(tokenizer, tmp_path, request):
    """The same records through TRL's DPOTrainer (its own tokenization: the chat template over the prompt with the
    generation prompt, and over prompt + answer) give the same prompt, chosen and rejected ids."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    source = (
        shared_file("llama-3.1/tokenizer.json").parent
        if tokenizer == "llama-3.1"
        else request.getfixturevalue("smollm2_dir")
    )
    directory = tokenizer_dir(tmp_path, source)
    pairs, metadata = prepare(tmp_path, directory, CONVERSATIONS)
    assert metadata["template"] == "chat" and metadata["chat_template"] is not None

    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(hf_tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
    )
    trainer = DPOTrainer(  # the models only stand by: the tokenization is what is compared
        model=LlamaForCausalLM(config),
        ref_model=LlamaForCausalLM(config),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=None),
        train_dataset=Dataset.from_list(CONVERSATIONS),
        processing_class=hf_tokenizer,
    )
    expected = {tuple(r["prompt_ids"]): (r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset}
    assert len(expected) == len(pairs)
    for pair in pairs:
        assert (pair["chosen_ids"].tolist(), pair["rejected_ids"].tolist()) == expected[
            tuple(pair["prompt_ids"].tolist())
        ]
    # the answer is the assistant's text and what the template ends its turn with (but in SmolLM2's, the first pair,
    # whose chosen answer starts with spaces, which merge with the newline before them: both answers start there)
    end = "<|eot_id|>" if tokenizer == "llama-3.1" else "<|im_end|>\n"
    answers = {hf_tokenizer.decode(pair["rejected_ids"]) for pair in pairs}
    assert {record["rejected"][0]["content"] + end for record in CONVERSATIONS[1:]} < answers


def test_a_long_pair_loses_the_start_of_its_prompt_first_then_the_ends_of_its_answers(
    sentencepiece_dir, sp, tmp_path, capsys
):
    long_prompt = {"prompt": "word " * 60, "chosen": "Yes indeed.", "rejected": "Not at all."}
    long_answers = {"prompt": "Short?", "chosen": "a b c " * 30 + "one", "rejected": "a b c " * 30 + "two"}
    both = {"prompt": "word " * 60, "chosen": "x " * 40 + "yes", "rejected": "y " * 40}
    records = [long_prompt, long_answers, both, *PLAIN[:6]]
    pairs, metadata = prepare(tmp_path, sentencepiece_dir, records, max_seq_length=64, max_prompt_length=40)
    output = capsys.readouterr().out

    def ids(record: dict) -> tuple[list[int], list[int], list[int]]:
        prompt = [1] + sp.encode(generate_prompt({"instruction": record["prompt"], "input": ""}))
        return prompt, sp.encode(record["chosen"]) + [2], sp.encode(record["rejected"]) + [2]

    by_rejected = {tuple(pair["rejected_ids"].tolist()): pair for pair in pairs}
    # the start of the prompt goes (BOS stays), as far as leaves room for the longer answer; the answers stay whole
    prompt, chosen, rejected = ids(long_prompt)
    pair = by_rejected[tuple(rejected)]
    assert pair["prompt_ids"].tolist() == [1] + prompt[len(prompt) - (64 - max(len(chosen), len(rejected))) + 1 :]
    assert pair["chosen_ids"].tolist() == chosen
    # a prompt goes no further than --max_prompt_length: then the answers lose their ends
    prompt, chosen, rejected = ids(both)
    pair = by_rejected[tuple(rejected[:24])]
    assert (
        pair["prompt_ids"].tolist() == [1] + prompt[len(prompt) - 39 :] and pair["chosen_ids"].tolist() == chosen[:24]
    )
    # answers that differed only in what was cut are left out
    assert len(pairs) == len(records) - 1 and not any(len(pair["chosen_ids"]) == 26 for pair in pairs)
    assert (metadata["prompt_cut"], metadata["answers_cut"], metadata["left_out_same_answers"]) == (2, 2, 1)
    assert max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs) == 64
    assert "Cut: the prompt of 2 pairs" in output and "the answers of 2 pairs" in output
    assert "Left out 1 pairs whose answers are the same within --max_seq_length 64 (e.g. line 2)" in output


def test_without_a_data_file_a_hub_dataset_is_downloaded(sentencepiece_dir, tmp_path, monkeypatch):
    import huggingface_hub

    requests = []

    def fake_download(**kwargs):  # stands in for the network call only
        requests.append(kwargs)
        return str(write_jsonl(tmp_path / "pairs.jsonl", PLAIN))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    setup(
        destination_path=tmp_path / "out",
        checkpoint_dir=sentencepiece_dir,
        data_repo_id="me/prefs",
        data_file_name="pairs.jsonl",
        test_split_fraction=0.25,
    )
    assert requests == [{"repo_id": "me/prefs", "filename": "pairs.jsonl", "repo_type": "dataset"}]
    assert (
        json.loads((tmp_path / "out" / "metadata.json").read_text())["source"] == "hf://datasets/me/prefs/pairs.jsonl"
    )


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"prompt": "Hi", "rejected": "No."},
            "line 2 has no 'chosen'; a pair has a 'prompt', a 'chosen' and a 'rejected' answer",
        ),
        (
            {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
            "line 2 has the same 'chosen' and 'rejected' answer",
        ),
        ({"prompt": "Hi", "chosen": "  ", "rejected": "No."}, "line 2 has an empty 'chosen'"),
        ({"prompt": "Hi", "chosen": 3, "rejected": "No."}, "line 2 has a non-text 'chosen' (int)"),
        (["Hi", "Yes", "No"], "line 2 is a JSON list, not an object"),
        (
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Yes"}],
                "rejected": [{"role": "assistant", "content": "No"}],
            },
            "line 2 is conversational but the file starts with plain text records",
        ),
    ],
    ids=["no chosen", "chosen equals rejected", "empty answer", "not text", "not an object", "mixed formats"],
)
def test_a_bad_plain_record_stops_with_one_line_and_writes_nothing(sentencepiece_dir, tmp_path, record, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PLAIN[0], record, *PLAIN[1:]])
    with pytest.raises(ValueError, match=re.escape(f"{data} {message}")):
        setup(destination_path=tmp_path / "out", checkpoint_dir=sentencepiece_dir, data_file_path=data)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"chosen": [{"role": "user", "content": "Yes"}]},
            "has a 'chosen' whose message 1 is a 'user' message, not the assistant's",
        ),
        (
            {"chosen": {"role": "assistant", "content": "Yes"}},
            "has a 'chosen' that is not a non-empty list of messages",
        ),
        ({"rejected": [{"role": "assistant", "content": ""}]}, "has an empty 'rejected' answer"),
        (
            {"prompt": [{"role": "wizard", "content": "Hi"}]},
            "has a 'prompt' whose message 1 has the unknown role 'wizard'",
        ),
        ({"rejected": CONVERSATIONS[0]["chosen"]}, "has the same 'chosen' and 'rejected' answer"),
    ],
    ids=["chosen not the assistant's", "chosen not a list", "empty answer", "unknown role", "chosen equals rejected"],
)
def test_a_bad_conversational_record_stops_with_one_line_and_writes_nothing(tmp_path, change, message):
    directory = tokenizer_dir(tmp_path, shared_file("llama-3.1/tokenizer.json").parent)
    data = write_jsonl(tmp_path / "pairs.jsonl", [CONVERSATIONS[1], {**CONVERSATIONS[0], **change}])
    with pytest.raises(ValueError, match=re.escape(f"{data} line 2 {message}")):
        setup(destination_path=tmp_path / "out", checkpoint_dir=directory, data_file_path=data)
    assert not (tmp_path / "out").exists()


def test_command_line_errors_are_one_line_with_exit_status_1_and_nothing_written(sentencepiece_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PLAIN[0], {"prompt": "Hi", "rejected": "No."}])
    result = subprocess.run(
        [
            sys.executable,
            "prepare_preferences.py",
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
    assert (
        result.returncode == 1
        and result.stderr
        == f"error: {data} line 2 has no 'chosen'; a pair has a 'prompt', a 'chosen' and a 'rejected' answer\n"
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="^--max_prompt_length 64 must be at least 1 and below --max_seq_length 64"):
        setup(
            destination_path=tmp_path / "out",
            checkpoint_dir=sentencepiece_dir,
            data_file_path=data,
            max_seq_length=64,
            max_prompt_length=64,
        )
    conversational = write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)
    with pytest.raises(ValueError, match="has only tokenizer.model; chat templates write special tokens as text"):
        setup(destination_path=tmp_path / "out", checkpoint_dir=sentencepiece_dir, data_file_path=conversational)
    assert not (tmp_path / "out").exists()


def test_finetune_scripts_read_the_pairs_and_refuse_the_other_kind(
    sentencepiece_dir, checkpoint_dir, eight_records, tmp_path
):
    """load_prepared_data with the pair keys reads them back; instruction data in their place (or pairs in the place of
    instructions) is named in one line."""
    prepare(tmp_path, checkpoint_dir, PLAIN)
    data = load_prepared_data(tmp_path / "out", checkpoint_dir, keys=PAIR_KEYS)
    assert len(data.train) == 6 and data.ignore_index == -100 and data.chat_template is None and data.metadata["pairs"]
    with pytest.raises(ValueError, match="preference pairs from prepare_preferences.py, for finetune_dpo.py"):
        load_prepared_data(eight_records, checkpoint_dir, keys=PAIR_KEYS)
    with pytest.raises(ValueError, match="does not hold a list of input_ids/labels records"):
        load_prepared_data(tmp_path / "out", checkpoint_dir)
