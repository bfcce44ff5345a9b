"""prepare_alpaca.py (data.prepare_instructions): every prepared record against sentencepiece called directly, the
split, truncation, the checks on bad input, the metadata and the Hub download, against hand-written references. The
template and the tokenization of one record are tests/test_data.py's."""

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import ROOT, shared_file
from data import check_prepared_data, generate_prompt
from prepare_alpaca import setup


@pytest.fixture(scope="module")
def checkpoint_dir(sentencepiece_dir) -> Path:
    """A checkpoint directory as data preparation may meet it: not converted yet, only tokenizer.model."""
    return sentencepiece_dir


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, checkpoint_dir) -> Path:
    """The 999 shared records prepared with the defaults."""
    destination = tmp_path_factory.mktemp("alpaca")
    data = shared_file("alpaca_en_demo.json")
    setup(destination_path=destination, checkpoint_dir=checkpoint_dir, data_file_path=data)
    return destination


def load(directory: Path) -> tuple[list, list]:
    return (torch.load(directory / "train.pt", weights_only=True), torch.load(directory / "test.pt", weights_only=True))


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_every_prepared_record_matches_sentencepiece_and_the_split_covers_all(prepared, sp):
    records = json.loads(shared_file("alpaca_en_demo.json").read_text())
    expected, n_prompt = Counter(), {}
    truncated = 0
    for record in records:
        prompt_ids = [1] + sp.encode(generate_prompt(record))
        ids = prompt_ids + sp.encode(record["output"]) + [2]
        truncated += len(ids) > 256
        expected[tuple(ids[:256])] += 1
        n_prompt[tuple(ids[:256])] = len(prompt_ids)
    train, test = load(prepared)
    assert (len(train), len(test)) == (961, 38)  # 38 = int(999 * 0.03865)
    assert Counter(tuple(s["input_ids"].tolist()) for s in train + test) == expected
    for sample in train + test:
        ids = sample["input_ids"].tolist()
        k = n_prompt[tuple(ids)]
        assert sample["labels"].tolist() == [-100] * k + ids[k:]
    metadata = json.loads((prepared / "metadata.json").read_text())
    assert metadata["truncated"] == truncated == 368
    assert metadata["left_out_prompt_too_long"] == 0


def test_split_is_deterministic_by_seed(prepared, checkpoint_dir, tmp_path):
    data = shared_file("alpaca_en_demo.json")
    setup(destination_path=tmp_path / "same", checkpoint_dir=checkpoint_dir, data_file_path=data, seed=42)
    setup(destination_path=tmp_path / "other", checkpoint_dir=checkpoint_dir, data_file_path=data, seed=7)
    train, test = load(prepared)
    same_train, same_test = load(tmp_path / "same")
    _, other_test = load(tmp_path / "other")
    assert ids_of(same_train) == ids_of(train) and ids_of(same_test) == ids_of(test)
    assert len(other_test) == 38 and sorted(ids_of(other_test)) != sorted(ids_of(test))


def ids_of(samples: list) -> list[list[int]]:
    return [sample["input_ids"].tolist() for sample in samples]


def test_summary_prints_length_statistics_and_splits(checkpoint_dir, tmp_path, capsys):
    setup(destination_path=tmp_path, checkpoint_dir=checkpoint_dir, data_file_path=shared_file("alpaca_en_demo.json"))
    out = capsys.readouterr().out
    # measured once with sentencepiece on the shared records; howto/prepare_dataset.md quotes them
    assert "Token lengths of 999 records: min 52, median 188, p95 517, max 798" in out
    assert "Truncated to --max_seq_length 256: 368 records (36.8%)" in out
    assert "Train: 961 records" in out and "Test: 38 records" in out


def test_truncation_cuts_the_response_and_records_whose_prompt_fills_the_limit_are_left_out(
    checkpoint_dir, sp, tmp_path, capsys
):
    short = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    long_output = {"instruction": "Count.", "input": "", "output": " ".join(["one two three"] * 30)}
    long_input = {"instruction": "Summarize.", "input": " ".join(["word"] * 80), "output": "Words."}
    records = [short, long_output, long_input, short, short, short]
    data = write_json(tmp_path / "d.json", records)
    setup(
        destination_path=tmp_path / "out",
        checkpoint_dir=checkpoint_dir,
        data_file_path=data,
        max_seq_length=60,
        test_split_fraction=0.5,
    )
    assert len([1] + sp.encode(generate_prompt(long_output))) < 60 <= len([1] + sp.encode(generate_prompt(long_input)))
    out = capsys.readouterr().out
    assert "Truncated to --max_seq_length 60: 1 records" in out
    assert "Left out 1 records whose prompt alone fills --max_seq_length 60 (e.g. record index 2)" in out
    train, test = load(tmp_path / "out")
    assert len(train) + len(test) == 5
    (cut,) = [s for s in train + test if len(s["input_ids"]) == 60]
    prompt_ids = [1] + sp.encode(generate_prompt(long_output))
    expected = (prompt_ids + sp.encode(long_output["output"]))[:60]  # no room left for EOS
    assert cut["input_ids"].tolist() == expected
    assert cut["labels"].tolist() == [-100] * len(prompt_ids) + expected[len(prompt_ids) :]
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert (metadata["truncated"], metadata["left_out_prompt_too_long"], metadata["longest_sequence"]) == (1, 1, 60)


GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


@pytest.mark.parametrize(
    "content, message",
    [
        (b'[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]', "JSON at line 2 column 22"),
        (b'{"instruction": "a", "output": "b"}\n\n{"instruction": "a", \n', "malformed JSON on line 3"),
        (json.dumps([GOOD, {"instruction": "a"}]).encode(), "record index 1 has no 'output'"),
        (json.dumps([GOOD, GOOD, {"output": "b"}]).encode(), "record index 2 has no 'instruction'"),
        (json.dumps([GOOD, {"instruction": "a", "output": " "}]).encode(), "record index 1 has an empty 'output'"),
        (json.dumps([GOOD, {"instruction": "a", "output": 3}]).encode(), "record index 1 has a non-text 'output'"),
        (json.dumps([GOOD, {"instruction": "a", "input": 0, "output": "b"}]).encode(), "1 has a non-text 'input'"),
        (json.dumps([GOOD, "text"]).encode(), "record index 1 is a JSON str, not an object"),
        (b'{"instruction": "a", "output": "b"}\n{"output": "b"}\n', "line 2 has no 'instruction'"),
        (b"", "is empty"),
        (b" \n\n", "is empty"),
        (b"[]", "holds an empty JSON array"),
        (
            b'[{"instruction": "caf\xc3\xa9", "output": "b"},\n {"instruction": "caf\xe9", "output": "b"}]',
            "is not UTF-8 text (byte 0xe9 on line 2)",
        ),
    ],
)
def test_bad_input_stops_with_one_line_and_writes_nothing(checkpoint_dir, tmp_path, content, message):
    (tmp_path / "data.json").write_bytes(content)
    with pytest.raises(ValueError) as error:
        setup(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir, data_file_path=tmp_path / "data.json")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_settings_and_missing_tokenizer_stop_before_reading_anything(checkpoint_dir, tmp_path):
    data = write_json(tmp_path / "d.json", [GOOD] * 10)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"^{tmp_path} has no tokenizer.model"):
        setup(destination_path=out, checkpoint_dir=tmp_path, data_file_path=data)
    with pytest.raises(ValueError, match="--ignore_index 5 is a token id"):
        setup(destination_path=out, checkpoint_dir=checkpoint_dir, data_file_path=data, ignore_index=5)
    with pytest.raises(ValueError, match="--test_split_fraction must be between 0 and 1"):
        setup(destination_path=out, checkpoint_dir=checkpoint_dir, data_file_path=data, test_split_fraction=0.0)
    with pytest.raises(ValueError, match="10 records with --test_split_fraction 0.05 leave a split empty"):
        setup(destination_path=out, checkpoint_dir=checkpoint_dir, data_file_path=data, test_split_fraction=0.05)
    assert not out.exists()


def test_bad_input_leaves_an_earlier_preparation_untouched(checkpoint_dir, tmp_path):
    out = tmp_path / "out"
    data = write_json(tmp_path / "d.json", [GOOD] * 10)
    setup(destination_path=out, checkpoint_dir=checkpoint_dir, data_file_path=data, test_split_fraction=0.2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "bad.json").write_text('[{"instruction": "a"}]')
    with pytest.raises(ValueError):
        setup(destination_path=out, checkpoint_dir=checkpoint_dir, data_file_path=tmp_path / "bad.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_skip_invalid_drops_bad_records_and_reports_how_many(checkpoint_dir, tmp_path, capsys):
    records = [GOOD, {"instruction": "a"}, GOOD, {"input": "x", "output": "b"}, GOOD, GOOD]
    setup(
        destination_path=tmp_path / "out",
        checkpoint_dir=checkpoint_dir,
        data_file_path=write_json(tmp_path / "d.json", records),
        skip_invalid=True,
        test_split_fraction=0.25,
    )
    assert "Left out 2 invalid records (--skip_invalid), e.g. record index 1 has no 'output'" in capsys.readouterr().out
    train, test = load(tmp_path / "out")
    assert (len(train), len(test)) == (3, 1)
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["left_out_invalid"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data_file_path", "BAD"], "malformed JSON on line 2"),
        (["--data_file_path", "BAD", "--checkpoint_dir", "NOWHERE"], "NOWHERE has no tokenizer.model"),
    ],
)
def test_command_line_errors_are_one_line_on_stderr_with_nonzero_exit(checkpoint_dir, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    args = [str(tmp_path / "bad.jsonl") if a == "BAD" else str(tmp_path / a) if a == "NOWHERE" else a for a in args]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "prepare_alpaca.py"),
            "--destination_path",
            str(tmp_path / "out"),
            "--checkpoint_dir",
            str(checkpoint_dir),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_without_a_data_file_the_alpaca_data_is_downloaded_from_the_hub(checkpoint_dir, tmp_path, monkeypatch):
    import huggingface_hub

    requests = []

    def fake_download(**kwargs):  # stands in for the network call only
        requests.append(kwargs)
        return str(write_json(tmp_path / "alpaca_data_cleaned.json", [GOOD] * 10))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    setup(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir, test_split_fraction=0.2)
    assert requests == [
        {"repo_id": "yahma/alpaca-cleaned", "filename": "alpaca_data_cleaned.json", "repo_type": "dataset"}
    ]
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["source"] == "hf://datasets/yahma/alpaca-cleaned/alpaca_data_cleaned.json"

    setup(
        destination_path=tmp_path / "out",
        checkpoint_dir=checkpoint_dir,
        test_split_fraction=0.2,
        data_repo_id="me/my-data",
        data_file_name="train.jsonl",
    )
    assert requests[-1] == {"repo_id": "me/my-data", "filename": "train.jsonl", "repo_type": "dataset"}


@pytest.mark.parametrize(
    "error, reason",
    [
        ("offline", "the Hub cannot be reached and the file is not in the local cache"),
        (ConnectionError("Connection reset by peer\nmore detail"), "Connection reset by peer"),
    ],
)
def test_a_failed_download_is_one_clear_line(checkpoint_dir, tmp_path, monkeypatch, error, reason):
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    def failing_download(**kwargs):
        raise LocalEntryNotFoundError("An error happened...\nMore text.") if error == "offline" else error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(ValueError) as raised:
        setup(destination_path=tmp_path / "out", checkpoint_dir=checkpoint_dir)
    assert str(raised.value) == (
        f"cannot download alpaca_data_cleaned.json from the Hub dataset yahma/alpaca-cleaned: {reason}; "
        "pass a local copy with --data_file_path"
    )
    assert not (tmp_path / "out").exists()


def test_metadata_lets_fine_tuning_refuse_data_from_another_tokenizer(prepared, checkpoint_dir, tmp_path):
    metadata = check_prepared_data(prepared, checkpoint_dir)
    tokenizer_bytes = (checkpoint_dir / "tokenizer.model").read_bytes()
    assert metadata["tokenizer_sha256"] == hashlib.sha256(tokenizer_bytes).hexdigest()
    expected = {
        "vocab_size": 32000,
        "bos_id": 1,
        "add_bos": True,
        "eos_id": 2,
        "tokenizer_file": "tokenizer.model",
        "max_seq_length": 256,
        "mask_inputs": True,
        "ignore_index": -100,
        "template": "alpaca",
        "test_split_fraction": 0.03865,
        "seed": 42,
    }
    assert {key: metadata[key] for key in expected} == expected
    assert metadata["prompt_without_input"].endswith("### Instruction:\n{instruction}\n\n### Response:")

    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.model").write_bytes(tokenizer_bytes + b"\0")
    with pytest.raises(ValueError, match="was tokenized with another tokenizer"):
        check_prepared_data(prepared, other)
    with pytest.raises(ValueError, match="has no metadata.json"):
        check_prepared_data(tmp_path, checkpoint_dir)
