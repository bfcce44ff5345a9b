"""Turns instruction data (Alpaca, or any JSON/JSONL file with the same keys) into token ids for fine-tuning.

    python prepare_alpaca.py --destination_path data/alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Each record becomes BOS + prompt + response + EOS, where the prompt is `generate_prompt(record)` and BOS is there when
the tokenizer adds one (Llama 2 and 3.1 do, SmolLM2 does not). The
labels repeat the ids, with `ignore_index` over BOS + prompt (when `mask_inputs`), so the loss only teaches
the model to answer. Writes `train.pt` and `test.pt` (lists of {"input_ids", "labels"} LongTensors) and
`metadata.json` (tokenizer hash, template, settings), which fine-tuning checks with `check_prepared_data`.
Finetune and generate scripts import `generate_prompt` from here, so importing this file does no work.
"""

import hashlib
import json
import logging
import math
from pathlib import Path
from statistics import median
from typing import Any, Optional

import torch
from tqdm import tqdm

from tokenizer import Tokenizer, tokenizer_file
from utils import atomic_path

# our keys -> the keys in the data file; scripts/prepare_dolly.py passes its own
ALPACA_FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}
METADATA_FORMAT = 1


def setup(
    destination_path: Path = Path("data/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    data_file_path: Optional[Path] = None,
    data_repo_id: str = "yahma/alpaca-cleaned",
    data_file_name: str = "alpaca_data_cleaned.json",
    test_split_fraction: float = 0.03865,  # 2000 of the 51760 cleaned Alpaca records
    max_seq_length: int = 256,
    mask_inputs: bool = True,
    ignore_index: int = -100,
    seed: int = 42,
    skip_invalid: bool = False,
) -> None:
    """Tokenize Alpaca-style instruction data into train.pt and test.pt for fine-tuning.

    Args:
        destination_path: directory that receives train.pt, test.pt and metadata.json.
        checkpoint_dir: checkpoint whose tokenizer (tokenizer.model or tokenizer.json, with tokenizer_config.json)
            is used (the only files needed from it, so the weights need not be converted yet).
        data_file_path: a local JSON array or JSONL file of {"instruction", "input", "output"} records;
            when left out, `data_file_name` is downloaded from the Hub dataset `data_repo_id`.
        data_repo_id: Hugging Face Hub dataset repository to download from.
        data_file_name: file to download from `data_repo_id`.
        test_split_fraction: fraction of the records held out as test.pt (rounded down).
        max_seq_length: longer sequences are cut to this many tokens; records whose prompt alone fills it
            are left out and reported, since nothing of their response would remain.
        mask_inputs: set the labels of BOS and the prompt to `ignore_index`, so only the response is learned.
        ignore_index: label value the loss skips; must not be a token id.
        seed: seed of the train/test split.
        skip_invalid: leave out records without an instruction or output (and report how many) instead of
            stopping at the first one.
    """
    main(
        destination_path,
        checkpoint_dir,
        data_file_path,
        data_repo_id,
        data_file_name,
        test_split_fraction,
        max_seq_length,
        mask_inputs,
        ignore_index,
        seed,
        skip_invalid,
        fields=ALPACA_FIELDS,
    )


def main(
    destination_path: Path,
    checkpoint_dir: Path,
    data_file_path: Optional[Path],
    data_repo_id: str,
    data_file_name: str,
    test_split_fraction: float,
    max_seq_length: int,
    mask_inputs: bool,
    ignore_index: int,
    seed: int,
    skip_invalid: bool,
    fields: dict[str, str],
) -> None:
    """Everything is read, checked and tokenized before the first file is written, so a bad input
    leaves `destination_path` as it was."""
    destination_path, checkpoint_dir = Path(destination_path), Path(checkpoint_dir)
    tokenizer_file(checkpoint_dir)  # a missing tokenizer is the first thing to say
    if not 0 < test_split_fraction < 1:
        raise ValueError(f"--test_split_fraction must be between 0 and 1, not {test_split_fraction}")
    if max_seq_length < 2:
        raise ValueError(f"--max_seq_length must be at least 2, not {max_seq_length}")
    tokenizer = Tokenizer(checkpoint_dir)
    if 0 <= ignore_index < tokenizer.vocab_size:
        raise ValueError(f"--ignore_index {ignore_index} is a token id; use a negative value such as -100")

    if data_file_path is None:
        data_file_path = download(data_repo_id, data_file_name)
        source = f"hf://datasets/{data_repo_id}/{data_file_name}"
    else:
        source = str(data_file_path)
    records = load_records(Path(data_file_path))
    examples, wheres, invalid = to_examples(records, Path(data_file_path), fields, skip_invalid)
    print(f"Read {len(records)} records from {data_file_path}")
    if invalid:
        print(f"Left out {len(invalid)} invalid records (--skip_invalid), e.g. {invalid[0]}")
    if not examples:
        raise ValueError(f"{data_file_path} has no valid records")

    # split before tokenizing, so the test set stays the same whatever max_seq_length is chosen
    order = split_order(len(examples), test_split_fraction, seed)
    n_test = int(len(examples) * test_split_fraction)

    samples, lengths, truncated, too_long = tokenize(examples, tokenizer, max_seq_length, mask_inputs, ignore_index)
    print_summary(lengths, truncated, [wheres[i] for i in too_long], max_seq_length)
    train_set, test_set = split_samples(samples, order, n_test)
    if not train_set or not test_set:
        raise ValueError(f"every prompt of a split fills --max_seq_length {max_seq_length}; raise it")
    metadata = {
        "format": METADATA_FORMAT,
        "template": "alpaca",
        "prompt_with_input": generate_prompt({"instruction": "{instruction}", "input": "{input}"}),
        "prompt_without_input": generate_prompt({"instruction": "{instruction}", "input": ""}),
        "tokenization": "BOS (if add_bos) + encode(prompt) + encode(response) + EOS",
        **tokenizer_metadata(tokenizer),
        **split_metadata(train_set, test_set, max_seq_length, ignore_index, test_split_fraction, seed, source),
        "mask_inputs": mask_inputs,
        "truncated": truncated,
        "left_out_prompt_too_long": len(too_long),
        "left_out_invalid": len(invalid),
    }
    write(destination_path, train_set, test_set, metadata)


def split_order(n_records: int, test_split_fraction: float, seed: int) -> list[int]:
    """The records in a random order drawn from `seed`: the first int(n_records * test_split_fraction) are the test
    split, the rest the training split."""
    n_test = int(n_records * test_split_fraction)
    if n_test == 0 or n_test == n_records:
        raise ValueError(f"{n_records} records with --test_split_fraction {test_split_fraction} leave a split empty")
    return torch.randperm(n_records, generator=torch.Generator().manual_seed(seed)).tolist()


def download(repo_id: str, file_name: str) -> Path:
    """The file from the Hub's local cache, downloaded first when missing. Any failure ends in one line:
    the Hub's own retry warnings (about 25 s of them when offline) are silenced while it runs."""
    # imported here, not at the top: generate scripts import this file and never download
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    print(f"Downloading {file_name} from the Hugging Face Hub dataset {repo_id}")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=file_name, repo_type="dataset"))
    except LocalEntryNotFoundError:
        reason = "the Hub cannot be reached and the file is not in the local cache"
    except RepositoryNotFoundError:
        reason = "no such dataset, or it is private or gated and you are not logged in"
    except EntryNotFoundError:
        reason = "the dataset has no such file"
    except Exception as e:  # anything else the Hub or the connection raises
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    finally:
        hub_logger.setLevel(level)
    raise ValueError(
        f"cannot download {file_name} from the Hub dataset {repo_id}: {reason}; pass a local copy with --data_file_path"
    )


def load_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) pairs from a JSON array or a JSONL file; `where` ("record index 3" or "line 4")
    is how errors point at a record."""
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")

    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not records:
            raise ValueError(f"{path} holds an empty JSON array")
        return [(f"record index {i}", record) for i, record in enumerate(records)]

    pairs = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            pairs.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: malformed JSON on line {number} column {e.colno}: {e.msg} "
                "(a .jsonl file holds one record per line; a .json file one array)"
            ) from None
    return pairs


def to_examples(
    records: list[tuple[str, Any]], path: Path, fields: dict[str, str], skip_invalid: bool
) -> tuple[list[dict[str, str]], list[str], list[str]]:
    """The valid records as {"instruction", "input", "output"} dicts, where each was in the file, and
    descriptions of the records left out as invalid."""
    examples, wheres, invalid = [], [], []
    for where, record in records:
        problem = find_problem(record, fields)
        if problem is None:
            examples.append(
                {
                    "instruction": record[fields["instruction"]],
                    "input": record.get(fields["input"]) or "",
                    "output": record[fields["output"]],
                }
            )
            wheres.append(where)
        elif skip_invalid:
            invalid.append(f"{where} {problem}")
        else:
            raise ValueError(f"{path} {where} {problem}; fix it or pass --skip_invalid to leave such records out")
    return examples, wheres, invalid


def find_problem(record: Any, fields: dict[str, str]) -> Optional[str]:
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    for key in (fields["instruction"], fields["output"]):
        if key not in record or record[key] is None:
            return f"has no {key!r}"
        if not isinstance(record[key], str):
            return f"has a non-text {key!r} ({type(record[key]).__name__})"
        if not record[key].strip():
            return f"has an empty {key!r}"
    value = record.get(fields["input"])
    if value is not None and not isinstance(value, str):
        return f"has a non-text {fields['input']!r} ({type(value).__name__})"
    return None


def generate_prompt(example: dict[str, str]) -> str:
    """The Alpaca prompt (https://github.com/tatsu-lab/stanford_alpaca); the model's answer follows it."""
    if (example.get("input") or "").strip():
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{example['instruction']}\n\n### Input:\n{example['input']}\n\n### Response:"
        )
    return (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{example['instruction']}\n\n### Response:"
    )


def encode_prompt(tokenizer: Tokenizer, example: dict[str, str], chat_template: Optional[str] = None) -> torch.Tensor:
    """The ids a model fine-tuned on prepared data answers `example` ({"instruction", "input"}) after: BOS (when the
    tokenizer adds one) and the Alpaca prompt, or, for data from prepare_chat.py (its `chat_template`), a one-turn
    conversation (the input, if any, after the instruction) and the assistant header that asks for the answer."""
    if chat_template is None:
        return tokenizer.encode(generate_prompt(example))
    content = (
        f"{example['instruction']}\n\n{example['input']}"
        if (example.get("input") or "").strip()
        else example["instruction"]
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, template=chat_template
    )
    return tokenizer.encode(text, bos=False)  # the template writes BOS itself where it wants one


def tokenize(
    examples: list[dict[str, str]],
    tokenizer: Tokenizer,
    max_seq_length: int,
    mask_inputs: bool,
    ignore_index: int,
    batch_size: int = 1024,
) -> tuple[list[Optional[dict[str, torch.Tensor]]], list[int], int, list[int]]:
    """One {"input_ids", "labels"} per example (None where the prompt alone fills `max_seq_length`), the full
    length of every example, how many were truncated, and the indices of those left out.

    Prompt and response are encoded separately and concatenated: encoding them as one text can merge
    tokens across the boundary, and then neither would the prompt ids be the ones generation feeds the
    model (`tokenizer.encode(generate_prompt(example))`) nor would the label mask fall on a token edge."""
    samples, lengths, truncated, too_long = [], [], 0, []
    with tqdm(total=len(examples), desc="Tokenizing", unit=" records", disable=None) as progress:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            prompts = tokenizer.encode_batch([generate_prompt(example) for example in batch])
            responses = tokenizer.encode_batch([example["output"] for example in batch])
            for offset, (prompt, response) in enumerate(zip(prompts, responses)):
                prompt = ([tokenizer.bos_id] if tokenizer.add_bos else []) + prompt
                ids = prompt + response + [tokenizer.eos_id]
                lengths.append(len(ids))
                if len(prompt) >= max_seq_length:
                    samples.append(None)
                    too_long.append(start + offset)
                    continue
                if len(ids) > max_seq_length:
                    ids = ids[:max_seq_length]
                    truncated += 1
                input_ids = torch.tensor(ids, dtype=torch.long)
                labels = input_ids.clone()
                if mask_inputs:
                    labels[: len(prompt)] = ignore_index
                samples.append({"input_ids": input_ids, "labels": labels})
            progress.update(len(batch))
    return samples, lengths, truncated, too_long


def print_summary(lengths: list[int], truncated: int, too_long: list[str], max_seq_length: int) -> None:
    """The numbers to choose max_seq_length from: lengths are before truncation, BOS and EOS included."""
    ordered = sorted(lengths)
    n = len(ordered)
    p95 = ordered[math.ceil(0.95 * n) - 1]  # nearest rank: 95% of the records are this long or shorter
    print(f"Token lengths of {n} records: min {ordered[0]}, median {median(ordered):g}, p95 {p95}, max {ordered[-1]}")
    print(f"Truncated to --max_seq_length {max_seq_length}: {truncated} records ({100 * truncated / n:.1f}%)")
    if too_long:
        print(
            f"Left out {len(too_long)} records whose prompt alone fills --max_seq_length {max_seq_length} "
            f"(e.g. {', '.join(too_long[:3])}); raise it to keep them"
        )


def write(destination_path: Path, train_set: list, test_set: list, metadata: dict) -> None:
    """metadata.json goes last and the old one first, so an interrupted run leaves no metadata that
    vouches for files it did not write."""
    destination_path.mkdir(parents=True, exist_ok=True)
    (destination_path / "metadata.json").unlink(missing_ok=True)
    for name, dataset in (("train", train_set), ("test", test_set)):
        with atomic_path(destination_path / f"{name}.pt") as tmp:
            torch.save(dataset, tmp)
        print(f"{name.capitalize()}: {len(dataset)} records -> {destination_path / f'{name}.pt'}")
    with atomic_path(destination_path / "metadata.json") as tmp:
        tmp.write_text(json.dumps(metadata, indent=2) + "\n")


def split_samples(samples: list[Optional[dict]], order: list[int], n_test: int) -> tuple[list[dict], list[dict]]:
    """(train, test): the samples in `split_order`'s order, the first `n_test` for testing, those left out (None,
    too long) skipped, so that a split holds the same records whatever --max_seq_length is."""
    test_set = [samples[i] for i in order[:n_test] if samples[i] is not None]
    train_set = [samples[i] for i in order[n_test:] if samples[i] is not None]
    return train_set, test_set


def split_metadata(
    train_set: list[dict],
    test_set: list[dict],
    max_seq_length: int,
    ignore_index: int,
    test_split_fraction: float,
    seed: int,
    source: str,
) -> dict:
    """The settings and sizes of the splits, for metadata.json (prepare_alpaca.py and prepare_chat.py)."""
    return {
        "max_seq_length": max_seq_length,
        "longest_sequence": max(len(s["input_ids"]) for s in train_set + test_set),
        "ignore_index": ignore_index,
        "test_split_fraction": test_split_fraction,
        "seed": seed,
        "source": source,
        "train_records": len(train_set),
        "test_records": len(test_set),
    }


def tokenizer_metadata(tokenizer: Tokenizer) -> dict:
    """What prepared ids depend on in the tokenizer, for metadata.json (prepare_alpaca.py and prepare_chat.py)."""
    return {
        "tokenizer_file": tokenizer.path.name,
        "tokenizer_sha256": file_sha256(tokenizer.path),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "add_bos": tokenizer.add_bos,
        "eos_id": tokenizer.eos_id,
    }


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_prepared_data(data_dir: Path, checkpoint_dir: Path) -> dict:
    """The metadata of a prepared data directory (by this script or prepare_chat.py), after checking that it was
    tokenized with this checkpoint's tokenizer (tokenizer.model or tokenizer.json) and, for Alpaca data, the current
    prompt template: ids from another vocabulary would train silently wrong. Conversation data has "template": "chat"
    and its chat template's source in "chat_template"."""
    data_dir, checkpoint_dir = Path(data_dir), Path(checkpoint_dir)
    path = data_dir / "metadata.json"
    tokenizer_path = tokenizer_file(checkpoint_dir)
    if not path.is_file():
        raise ValueError(f"{data_dir} has no metadata.json; prepare the data with prepare_alpaca.py first")
    metadata = json.loads(path.read_text())
    if metadata.get("format") != METADATA_FORMAT:
        raise ValueError(f"{path} is from another version of prepare_alpaca.py; prepare the data again")
    if metadata["tokenizer_sha256"] != file_sha256(tokenizer_path):
        raise ValueError(
            f"{data_dir} was tokenized with another tokenizer than {tokenizer_path}; "
            f"prepare it again with --checkpoint_dir {checkpoint_dir}"
        )
    if metadata["template"] != "chat" and (
        metadata["prompt_with_input"] != generate_prompt({"instruction": "{instruction}", "input": "{input}"})
        or metadata["prompt_without_input"] != generate_prompt({"instruction": "{instruction}", "input": ""})
    ):
        raise ValueError(f"{data_dir} was prepared with another prompt template; prepare it again")
    return metadata


if __name__ == "__main__":
    from utils import cli

    cli(setup)
