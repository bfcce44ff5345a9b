"""The data pieces the prepare scripts and fine-tuning share, in the order a preparation uses them, then what
fine-tuning reads back:

- `prepare_instructions`: instruction records (Alpaca's keys, or a dataset's own mapped onto them) into train.pt,
  test.pt and metadata.json, the pipeline of prepare_alpaca.py and scripts/prepare_dolly.py: reading
  (`find_data_file`: a local JSON/JSONL file or a Hub dataset's, `download`, `load_records`), checking
  (`to_examples`, `find_problem`), splitting (`split_order`, `split_samples`), tokenizing (`tokenize_instructions`,
  `print_summary`), describing (`tokenizer_metadata`, `split_metadata`, `file_sha256`) and writing
  (`write_prepared`); prepare_chat.py and prepare_preferences.py tell their own stories with the same parts;
- the prompt template: `generate_prompt` (Alpaca's), `encode_prompt` (it, or a chat template's one user turn), which
  the sample answers of fine-tuning and generate_lora.py prompt in;
- fine-tuning's side: `check_prepared_data` (tokenized for this checkpoint?), `load_prepared_data` (a
  `PreparedData`: the records of train.pt and test.pt and their labels' ignore_index and chat template).

A prepared record is {"input_ids", "labels"}: LongTensors of the same length, the labels not shifted, `ignore_index`
where nothing is to be learned; a preference pair (prepare_preferences.py) is {"prompt_ids", "chosen_ids",
"rejected_ids"}, each answer learned from after the prompt. Importing this module does no work and loads neither the
CLI nor the Hub's code.
"""

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Iterable, Optional

import torch
from tqdm import tqdm

from tokenizer import CHAT_TEMPLATES, Tokenizer, tokenizer_file
from utils import atomic_path, load_config, one_line

METADATA_FORMAT = 1  # metadata.json's version: data prepared by another is refused (`check_prepared_data`)


def prepare_instructions(
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
    """Instruction records into `destination_path`'s train.pt, test.pt and metadata.json: each record becomes
    BOS + `generate_prompt(record)` + response + EOS, its labels `ignore_index` over BOS and the prompt when
    `mask_inputs`. `fields` maps our keys ("instruction", "input", "output") to the file's. Everything is read,
    checked and tokenized before the first file is written, so a bad input leaves `destination_path` as it was."""
    destination_path, checkpoint_dir = Path(destination_path), Path(checkpoint_dir)
    tokenizer_file(checkpoint_dir)  # a missing tokenizer is the first thing to say
    if not 0 < test_split_fraction < 1:
        raise ValueError(f"--test_split_fraction must be between 0 and 1, not {test_split_fraction}")
    if max_seq_length < 2:
        raise ValueError(f"--max_seq_length must be at least 2, not {max_seq_length}")
    tokenizer = Tokenizer(checkpoint_dir)
    if 0 <= ignore_index < tokenizer.vocab_size:
        raise ValueError(f"--ignore_index {ignore_index} is a token id; use a negative value such as -100")

    data_file_path, source = find_data_file(data_file_path, data_repo_id, data_file_name)
    records = load_records(data_file_path)
    examples, wheres, invalid = to_examples(records, data_file_path, fields, skip_invalid)
    print(f"Read {len(records)} records from {data_file_path}")
    if invalid:
        print(f"Left out {len(invalid)} invalid records (--skip_invalid), e.g. {invalid[0]}")
    if not examples:
        raise ValueError(f"{data_file_path} has no valid records")

    # split before tokenizing, so the test set stays the same whatever max_seq_length is chosen
    order = split_order(len(examples), test_split_fraction, seed)
    n_test = int(len(examples) * test_split_fraction)

    samples, lengths, truncated, too_long = tokenize_instructions(
        examples, tokenizer, max_seq_length, mask_inputs, ignore_index
    )
    print_summary(lengths, truncated, max_seq_length)
    if too_long:
        print(
            f"Left out {len(too_long)} records whose prompt alone fills --max_seq_length {max_seq_length} "
            f"(e.g. {', '.join(wheres[i] for i in too_long[:3])}); raise it to keep them"
        )
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
    write_prepared(destination_path, train_set, test_set, metadata)


def find_data_file(
    data_file_path: Optional[Path], repo_id: Optional[str], file_name: Optional[str]
) -> tuple[Path, str]:
    """The data file to read: `data_file_path` when given, else `file_name` of the Hub dataset `repo_id` (`download`);
    and where it came from, for metadata.json."""
    if data_file_path is not None:
        return Path(data_file_path), str(data_file_path)
    if not (repo_id and file_name):
        raise ValueError("pass --data_file_path, or --data_repo_id and --data_file_name to download from the Hub")
    return download(repo_id, file_name), f"hf://datasets/{repo_id}/{file_name}"


def download(repo_id: str, file_name: str) -> Path:
    """The file from the Hub's local cache, downloaded first when missing. Any failure ends in one line:
    the Hub's own retry warnings (about 25 s of them when offline) are silenced while it runs."""
    # imported here, not at the top: fine-tuning and generation import this file and never download
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
        reason = one_line(e)
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
    """The valid records as {"instruction", "input", "output"} dicts (`fields`: our keys -> the file's), where each
    was in the file, and descriptions of the records left out as invalid."""
    examples, wheres, invalid = [], [], []
    for where, record in records:
        problem = find_problem(record, required=(fields["instruction"], fields["output"]), optional=(fields["input"],))
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


def find_problem(record: Any, required: Iterable[str], optional: Iterable[str] = ()) -> Optional[str]:
    """What is wrong with a record of text fields, said after where it is ("has no 'output'"), or None: it must be a
    JSON object whose `required` keys hold non-empty text and whose `optional` keys, where present, text."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    for key in required:
        if key not in record or record[key] is None:
            return f"has no {key!r}"
        if not isinstance(record[key], str):
            return f"has a non-text {key!r} ({type(record[key]).__name__})"
        if not record[key].strip():
            return f"has an empty {key!r}"
    for key in optional:
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            return f"has a non-text {key!r} ({type(value).__name__})"
    return None


def split_order(n_records: int, test_split_fraction: float, seed: int) -> list[int]:
    """The records in a random order drawn from `seed`: the first int(n_records * test_split_fraction) are the test
    split, the rest the training split. Drawn before tokenizing, so a split is the same for any max_seq_length."""
    n_test = int(n_records * test_split_fraction)
    if n_test == 0 or n_test == n_records:
        raise ValueError(f"{n_records} records with --test_split_fraction {test_split_fraction} leave a split empty")
    return torch.randperm(n_records, generator=torch.Generator().manual_seed(seed)).tolist()


def split_samples(samples: list[Optional[dict]], order: list[int], n_test: int) -> tuple[list[dict], list[dict]]:
    """(train, test): the samples in `split_order`'s order, the first `n_test` for testing, those left out (None,
    too long) skipped, so that a split holds the same records whatever --max_seq_length is."""
    test_set = [samples[i] for i in order[:n_test] if samples[i] is not None]
    train_set = [samples[i] for i in order[n_test:] if samples[i] is not None]
    return train_set, test_set


def tokenize_instructions(
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


def print_summary(lengths: list[int], truncated: int, max_seq_length: int) -> None:
    """The numbers to choose max_seq_length from: lengths are before truncation, BOS and EOS included."""
    ordered = sorted(lengths)
    n = len(ordered)
    p95 = ordered[math.ceil(0.95 * n) - 1]  # nearest rank: 95% of the records are this long or shorter
    print(f"Token lengths of {n} records: min {ordered[0]}, median {median(ordered):g}, p95 {p95}, max {ordered[-1]}")
    print(f"Truncated to --max_seq_length {max_seq_length}: {truncated} records ({100 * truncated / n:.1f}%)")


def chat_template_for(tokenizer: Tokenizer, template: Optional[str]) -> str:
    """The chat template conversations are rendered in (prepare_chat.py, prepare_preferences.py): the built-in
    `template` (tokenizer.CHAT_TEMPLATES) when given, else the checkpoint's own. Refused for a checkpoint with only
    tokenizer.model, since chat templates write special tokens as text, or without a template."""
    if tokenizer.path.name != "tokenizer.json":
        raise ValueError(
            f"{tokenizer.path.parent} has only tokenizer.model; chat templates write special tokens as text, which "
            "needs the checkpoint's tokenizer.json (download it from the model's Hub repository)"
        )
    chat_template = CHAT_TEMPLATES[template] if template else tokenizer.chat_template
    if chat_template is None:
        tokenizer.apply_chat_template([])  # says that there is none and which to choose
    return chat_template


def tokenizer_metadata(tokenizer: Tokenizer) -> dict:
    """What prepared ids depend on in the tokenizer, for metadata.json (`check_prepared_data` compares the hash)."""
    return {
        "tokenizer_file": tokenizer.path.name,
        "tokenizer_sha256": file_sha256(tokenizer.path),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "add_bos": tokenizer.add_bos,
        "eos_id": tokenizer.eos_id,
    }


def split_metadata(
    train_set: list[dict],
    test_set: list[dict],
    max_seq_length: int,
    ignore_index: int,
    test_split_fraction: float,
    seed: int,
    source: str,
) -> dict:
    """The settings and sizes of the splits, for metadata.json."""
    return {
        "max_seq_length": max_seq_length,
        "longest_sequence": max(sequence_length(s) for s in train_set + test_set),
        "ignore_index": ignore_index,
        "test_split_fraction": test_split_fraction,
        "seed": seed,
        "source": source,
        "train_records": len(train_set),
        "test_records": len(test_set),
    }


def sequence_length(record: dict[str, torch.Tensor]) -> int:
    """The tokens a prepared record puts through the model at once: its input_ids, or a pair's prompt with its longer
    answer."""
    if "input_ids" in record:
        return len(record["input_ids"])
    return len(record["prompt_ids"]) + max(len(record["chosen_ids"]), len(record["rejected_ids"]))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_prepared(destination_path: Path, train_set: list, test_set: list, metadata: dict) -> None:
    """train.pt, test.pt and metadata.json, each written atomically. metadata.json goes last and the old one first,
    so an interrupted run leaves no metadata that vouches for files it did not write."""
    destination_path.mkdir(parents=True, exist_ok=True)
    (destination_path / "metadata.json").unlink(missing_ok=True)
    for name, dataset in (("train", train_set), ("test", test_set)):
        with atomic_path(destination_path / f"{name}.pt") as tmp:
            torch.save(dataset, tmp)
        print(f"{name.capitalize()}: {len(dataset)} records -> {destination_path / f'{name}.pt'}")
    with atomic_path(destination_path / "metadata.json") as tmp:
        tmp.write_text(json.dumps(metadata, indent=2) + "\n")


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


def check_prepared_data(data_dir: Path, checkpoint_dir: Path) -> dict:
    """The metadata of a prepared data directory, after checking that it was tokenized with this checkpoint's
    tokenizer (tokenizer.model or tokenizer.json) and, for Alpaca data, the current prompt template: ids from another
    vocabulary would train silently wrong. Conversation data (prepare_chat.py) has "template": "chat" and its chat
    template's source in "chat_template"."""
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


@dataclass
class PreparedData:
    """A prepared data directory as fine-tuning uses it."""

    train: list[dict[str, torch.Tensor]]  # train.pt's records
    val: list[dict[str, torch.Tensor]]  # test.pt's: the validation loss
    ignore_index: int  # the label of tokens that are no target
    chat_template: Optional[str]  # conversations (prepare_chat.py): the template the sample answers are prompted in
    metadata: dict  # all of metadata.json


def load_prepared_data(
    data_dir: Path, checkpoint_dir: Path, keys: tuple[str, ...] = ("input_ids", "labels")
) -> PreparedData:
    """train.pt and test.pt (lists of records: dicts of tensors under `keys`) and their metadata.json, after checking
    that they were tokenized for this checkpoint (`check_prepared_data`, and ids within its vocabulary). Read with
    weights_only=True: plain tensors and containers only, never arbitrary pickled objects. ~25 s for 50k records:
    read once."""
    config = load_config(checkpoint_dir)  # the checkpoint directory first: a missing one is the first thing to say
    metadata = check_prepared_data(data_dir, checkpoint_dir)
    if metadata["vocab_size"] > config.vocab_size:
        raise ValueError(
            f"{data_dir} holds token ids up to {metadata['vocab_size'] - 1}, but the model's vocabulary has "
            f"{config.vocab_size}; prepare the data with this checkpoint's tokenizer"
        )
    splits = []
    for name in ("train.pt", "test.pt"):
        path = Path(data_dir) / name
        try:
            records = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found; prepare the data with prepare_alpaca.py") from None
        except Exception as e:  # not a file torch.save wrote, or one holding objects that are not plain tensors
            raise ValueError(
                f"{path} is not data prepared by prepare_alpaca.py ({one_line(e)}); prepare it again"
            ) from None
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and all(isinstance(r.get(key), torch.Tensor) for key in keys) for r in records
        ):
            raise ValueError(
                f"{path} does not hold a list of {'/'.join(keys)} records (instructions and conversations come from "
                "prepare_alpaca.py and prepare_chat.py, for finetune_lora.py and finetune_full.py; preference pairs "
                "from prepare_preferences.py, for finetune_dpo.py); prepare the data for this script"
            )
        splits.append(records)
    return PreparedData(splits[0], splits[1], metadata["ignore_index"], metadata.get("chat_template"), metadata)
