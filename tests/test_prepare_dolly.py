"""scripts/prepare_dolly.py: Dolly's keys map onto the Alpaca template (context -> input, response -> output),
the Hub download asks for Dolly's file, and the script runs from any directory."""

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from conftest import ROOT, shared_file
from prepare_dolly import setup

RECORDS = [
    {
        "instruction": "When did Virgin Australia start operating?",
        "context": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.",
        "response": "Virgin Australia commenced services on 31 August 2000.",
        "category": "closed_qa",
    },
    {
        "instruction": "Which is a species of fish? Tope or Rope",
        "context": "",
        "response": "Tope",
        "category": "classification",
    },
    {
        "instruction": "Why can camels survive for long without water?",
        "context": "",
        "response": "Camels use the fat in their humps to keep them filled with energy.",
        "category": "open_qa",
    },
    {"instruction": "Name the capital.", "context": "France", "response": "Paris.", "category": "open_qa"},
]
# the prompts written out by hand from the Alpaca template
PROMPTS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nWhen did Virgin Australia start "
    "operating?\n\n### Input:\nVirgin Australia commenced services on 31 August 2000 as Virgin Blue.\n\n### Response:",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWhich is a species of fish? Tope or Rope\n\n### Response:",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWhy can camels survive for long without water?\n\n### Response:",
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nName the capital.\n\n"
    "### Input:\nFrance\n\n### Response:",
]


@pytest.fixture
def checkpoint_dir(tmp_path) -> Path:
    (tmp_path / "checkpoint").mkdir()
    shutil.copy(shared_file("tokenizer.model"), tmp_path / "checkpoint" / "tokenizer.model")
    return tmp_path / "checkpoint"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_context_becomes_the_input_and_response_the_output(checkpoint_dir, tmp_path):
    setup(
        destination_path=tmp_path / "out",
        checkpoint_dir=checkpoint_dir,
        data_file_path=write_jsonl(tmp_path / "dolly.jsonl", RECORDS),
        test_split_fraction=0.25,
    )
    sp = spm.SentencePieceProcessor()
    sp.Load(str(checkpoint_dir / "tokenizer.model"))
    expected = Counter()
    for prompt, record in zip(PROMPTS, RECORDS):
        prompt_ids = [1] + sp.encode(prompt)
        response_ids = sp.encode(record["response"]) + [2]
        expected[(tuple(prompt_ids + response_ids), tuple([-100] * len(prompt_ids) + response_ids))] += 1
    train = torch.load(tmp_path / "out" / "train.pt", weights_only=True)
    test = torch.load(tmp_path / "out" / "test.pt", weights_only=True)
    assert (len(train), len(test)) == (3, 1)
    assert Counter((tuple(s["input_ids"].tolist()), tuple(s["labels"].tolist())) for s in train + test) == expected


def test_without_a_data_file_dolly_is_downloaded_from_the_hub(checkpoint_dir, tmp_path, monkeypatch):
    import huggingface_hub

    requests = []

    def fake_download(**kwargs):  # stands in for the network call only
        requests.append(kwargs)
        return str(write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", RECORDS))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    setup(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir, test_split_fraction=0.25)
    assert requests == [
        {"repo_id": "databricks/databricks-dolly-15k", "filename": "databricks-dolly-15k.jsonl", "repo_type": "dataset"}
    ]
    assert (tmp_path / "out" / "train.pt").is_file() and (tmp_path / "out" / "test.pt").is_file()


def test_a_record_without_response_is_named_by_its_line_and_dolly_key(checkpoint_dir, tmp_path):
    records = RECORDS[:2] + [{"instruction": "Tell me a joke.", "context": "", "category": "brainstorming"}]
    with pytest.raises(ValueError, match=r"line 3 has no 'response'; fix it or pass --skip_invalid"):
        setup(
            destination_path=tmp_path / "out",
            checkpoint_dir=checkpoint_dir,
            data_file_path=write_jsonl(tmp_path / "dolly.jsonl", records),
        )
    assert not (tmp_path / "out").exists()


def test_script_runs_from_another_directory_and_prints_the_summary(checkpoint_dir, tmp_path):
    data = write_jsonl(tmp_path / "dolly.jsonl", RECORDS * 5)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "prepare_dolly.py"),
            "--destination_path",
            "out",
            "--checkpoint_dir",
            str(checkpoint_dir),
            "--data_file_path",
            str(data),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for line in ("Read 20 records", "Train: 18 records", "Test: 2 records"):
        assert line in result.stdout
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert (metadata["train_records"], metadata["test_records"], metadata["source"]) == (18, 2, str(data))
