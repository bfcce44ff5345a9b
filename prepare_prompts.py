"""Turns prompts (questions with what a reward needs to score an answer: a reference answer, ...) into token ids for
learning from rewards (GRPO).

    python prepare_prompts.py --data_file_path gsm8k.jsonl --prompt_field question --destination_path data/gsm8k \
        --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Reads a JSON array or JSONL file of records (or a Hub dataset's: --data_repo_id and --data_file_name), each with a
prompt under --prompt_field ("prompt" by default), either of two kinds, which may be mixed in one file:

    text:      {"prompt": "What is 3 + 4?", "answer": "... #### 7"}
    messages:  {"prompt": [{"role": "system" | "user" | "assistant", "content": "..."}, ...], "answer": "..."}
               (OpenAI's format; {"messages": [...]} without a "prompt" reads the same)

A text prompt is the one user turn of a conversation rendered in the checkpoint's chat template (or --template) with
the assistant header that asks for the answer, when there is a template; without one it is the Alpaca prompt
(`data.generate_prompt`) after BOS (when the tokenizer adds one), as prepare_alpaca.py prompts. Messages are rendered
in the chat template the same way, and need one. The ids are what `data.encode_prompt` gives, transformers'
`apply_chat_template(..., add_generation_prompt=True)` for a chat template.

Each record becomes {"prompt_ids": LongTensor, "prompt": the rendered text, "answer": the record's --answer_field (when
it has one), and every other field of the record as it is}: the rewards (rewards.py) get the prompts, the completions
and those fields, one list each, as TRL's GRPOTrainer gives its reward functions the dataset's columns. A prompt longer
than --max_prompt_length tokens is left out and reported (cut, it could lose its question). Reading, splitting, the
tokenizer's metadata and writing are data.py's parts; everything is read and checked before a file is written.
"""

from pathlib import Path
from statistics import median
from typing import Any, Optional

import torch

from data import (
    METADATA_FORMAT,
    find_data_file,
    generate_prompt,
    load_records,
    split_order,
    split_samples,
    tokenizer_metadata,
    write_prepared,
)
from tokenizer import CHAT_TEMPLATES, Tokenizer, check_template_name, tokenizer_file
from utils import cli

ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100  # metadata.json's ignore_index, which data.load_prepared_data reads; no prompt token is a target


def setup(
    destination_path: Path = Path("data/prompts"),
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_file_path: Optional[Path] = None,
    data_repo_id: Optional[str] = None,
    data_file_name: Optional[str] = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    template: Optional[str] = None,
    test_split_fraction: float = 0.05,
    max_prompt_length: int = 512,
    seed: int = 42,
) -> None:
    """Tokenize prompts, with the fields their rewards need, into train.pt and test.pt.

    Args:
        destination_path: directory that receives train.pt, test.pt and metadata.json.
        checkpoint_dir: checkpoint whose tokenizer and chat template are used.
        data_file_path: a local JSON array or JSONL file of records with a prompt (text or OpenAI messages) and
            any other fields; when left out, `data_file_name` is downloaded from the Hub dataset `data_repo_id`.
        data_repo_id: Hugging Face Hub dataset repository to download from.
        data_file_name: file to download from `data_repo_id` (JSON or JSONL).
        prompt_field: the records' key of the prompt (GSM8K: "question").
        answer_field: the records' key of the reference answer, kept as "answer" for the rewards; records without
            it have none (a reward that needs one returns None for them).
        template: a built-in chat template (llama-3, llama-2, chatml, alpaca) for checkpoints without one, or to use
            instead of theirs; by default the checkpoint's own, and without one the Alpaca prompt for text prompts.
        test_split_fraction: fraction of the prompts held out as test.pt (rounded down), on which the mean reward
            is measured.
        max_prompt_length: prompts of more tokens are left out (and counted).
        seed: seed of the train/test split.
    """
    destination_path, checkpoint_dir = Path(destination_path), Path(checkpoint_dir)
    tokenizer_path = tokenizer_file(checkpoint_dir)  # a missing tokenizer is the first thing to say
    validate_args(template, test_split_fraction, max_prompt_length, prompt_field, answer_field)
    tokenizer = Tokenizer(checkpoint_dir)
    chat_template = CHAT_TEMPLATES[template] if template else tokenizer.chat_template
    if chat_template is not None and tokenizer_path.name != "tokenizer.json":
        raise ValueError(
            f"{checkpoint_dir} has only tokenizer.model; chat templates write special tokens as text, which needs the "
            "checkpoint's tokenizer.json (download it from the model's Hub repository)"
        )

    data_file_path, source = find_data_file(data_file_path, data_repo_id, data_file_name)
    records = load_records(data_file_path)
    wheres = [where for where, _ in records]
    examples = to_examples(records, data_file_path, prompt_field, answer_field, chat_template is not None)
    print(f"Read {len(examples)} prompts from {data_file_path}")
    order = split_order(len(examples), test_split_fraction, seed)  # before tokenizing: the same for any length

    samples, lengths, too_long = tokenize(tokenizer, examples, wheres, chat_template, max_prompt_length)
    print(
        f"Token lengths of {len(lengths)} prompts: min {min(lengths)}, median {median(lengths):g}, max {max(lengths)}"
    )
    if too_long:
        print(
            f"Left out {len(too_long)} prompts longer than --max_prompt_length {max_prompt_length} "
            f"(e.g. {', '.join(too_long[:3])}); raise it to keep them"
        )
    n_test = int(len(examples) * test_split_fraction)
    train_set, test_set = split_samples(samples, order, n_test)
    if not train_set or not test_set:
        raise ValueError(f"no prompt of a split fits in --max_prompt_length {max_prompt_length}; raise it")
    longest = max(len(record["prompt_ids"]) for record in train_set + test_set)
    metadata = {
        "format": METADATA_FORMAT,
        "prompts": True,
        **prompt_metadata(chat_template, template),
        **tokenizer_metadata(tokenizer),
        "prompt_field": prompt_field,
        "answer_field": answer_field,
        "max_prompt_length": max_prompt_length,
        "longest_sequence": longest,  # the longest prompt; the completions come on top
        "ignore_index": IGNORE_INDEX,
        "test_split_fraction": test_split_fraction,
        "seed": seed,
        "source": source,
        "train_records": len(train_set),
        "test_records": len(test_set),
        "left_out_prompt_too_long": len(too_long),
    }
    write_prepared(destination_path, train_set, test_set, metadata)


def validate_args(
    template: Optional[str], test_split_fraction: float, max_prompt_length: int, prompt_field: str, answer_field: str
) -> None:
    """The checks of setup's flags that need no file."""
    check_template_name(template)
    if not 0 < test_split_fraction < 1:
        raise ValueError(f"--test_split_fraction must be between 0 and 1, not {test_split_fraction}")
    if max_prompt_length < 1:
        raise ValueError(f"--max_prompt_length must be at least 1, not {max_prompt_length}")
    if prompt_field == answer_field:
        raise ValueError(f"--prompt_field and --answer_field are both {prompt_field!r}; the answer is another field")


def tokenize(
    tokenizer: Tokenizer, examples: list, wheres: list[str], chat_template: Optional[str], max_prompt_length: int
) -> tuple[list[Optional[dict]], list[int], list[str]]:
    """Each example's record (its prompt's ids, its rendered text and its other fields), None for a prompt longer than
    max_prompt_length; every prompt's length; and where the ones left out came from."""
    texts = [render(tokenizer, prompt, chat_template, where) for (prompt, _), where in zip(examples, wheres)]
    bos = [tokenizer.bos_id] if chat_template is None and tokenizer.add_bos else []  # a chat template writes its own
    samples, lengths, too_long = [], [], []
    for text, ids, (_, fields), where in zip(texts, tokenizer.encode_batch(texts), examples, wheres):
        ids = bos + ids
        lengths.append(len(ids))
        if len(ids) > max_prompt_length:
            samples.append(None)
            too_long.append(where)
        else:
            samples.append({"prompt_ids": torch.tensor(ids, dtype=torch.long), "prompt": text, **fields})
    return samples, lengths, too_long


def prompt_metadata(chat_template: Optional[str], template: Optional[str]) -> dict:
    """How the prompts were written, for metadata.json: in a chat template, or in the Alpaca prompt."""
    if chat_template is not None:
        return {
            "template": "chat",
            "chat_template_name": template or "checkpoint",
            "chat_template": chat_template,
            "tokenization": "encode(apply_chat_template(messages or [user: prompt], add_generation_prompt=True))",
        }
    return {
        "template": "alpaca",
        "prompt_with_input": generate_prompt({"instruction": "{instruction}", "input": "{input}"}),
        "prompt_without_input": generate_prompt({"instruction": "{instruction}", "input": ""}),
        "tokenization": "BOS (if add_bos) + encode(generate_prompt({'instruction': prompt}))",
    }


def to_examples(
    records: list[tuple[str, Any]], path: Path, prompt_field: str, answer_field: str, has_template: bool
) -> list[tuple[Any, dict]]:
    """(prompt, fields) of every record after checking it: the prompt (text or a list of messages) and the record's
    other fields, its --answer_field as "answer". Anything wrong stops with the record's place."""
    examples = []
    for where, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path} {where} is a JSON {type(record).__name__}, not an object")
        key = prompt_field if prompt_field in record or "messages" not in record else "messages"
        problem = prompt_problem(record.get(key), key, has_template)
        if problem is not None:
            raise ValueError(f"{path} {where} {problem}")
        if "prompt_ids" in record or (answer_field != "answer" and "answer" in record):
            taken = "prompt_ids" if "prompt_ids" in record else "answer"
            raise ValueError(f"{path} {where} has a field {taken!r}, a name the prepared records use for their own")
        fields = {name: value for name, value in record.items() if name not in (key, answer_field)}
        if "prompt" in fields:  # the prepared "prompt" is the rendered text; the record's own goes under its key
            raise ValueError(f"{path} {where} has both a 'prompt' and a {key!r}; pass --prompt_field to choose")
        if answer_field in record:
            fields["answer"] = record[answer_field]
        examples.append((record[key], fields))
    return examples


def prompt_problem(prompt: Any, key: str, has_template: bool) -> Optional[str]:
    """What is wrong with a record's prompt, said after where it is, or None: non-empty text, or a non-empty list of
    OpenAI messages ({"role", "content": text}) whose last is not the assistant's, rendered in a chat template."""
    if prompt is None:
        return f"has no {key!r} (pass --prompt_field to name the prompt's field)"
    if isinstance(prompt, str):
        return None if prompt.strip() else f"has an empty {key!r}"
    if not isinstance(prompt, list) or not prompt:
        return f"has a {key!r} that is neither text nor a non-empty list of messages ({{'role': ..., 'content': ...}})"
    for number, message in enumerate(prompt, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"has a {key!r} whose message {number} is not an object with a text 'content'"
        if message.get("role") not in ROLES:
            return f"has a {key!r} whose message {number} has the unknown role {message.get('role')!r}"
    if prompt[-1]["role"] == "assistant":
        return f"has a {key!r} that ends with the assistant's message; a prompt ends where the model answers"
    if not has_template:
        return (
            f"has messages, but the checkpoint has no chat template to render them in; choose one with --template "
            f"({', '.join(CHAT_TEMPLATES)})"
        )
    return None


def render(tokenizer: Tokenizer, prompt: Any, chat_template: Optional[str], where: str) -> str:
    """The text of a prompt as the model is to continue it: in the chat template with the generation prompt (text as
    one user turn), or, without a template, the Alpaca prompt (`data.encode_prompt`'s two cases)."""
    if chat_template is None:
        return generate_prompt({"instruction": prompt, "input": ""})
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, template=chat_template)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


if __name__ == "__main__":
    cli(setup)
