"""Turns preference pairs (a prompt, a chosen and a rejected answer) into token ids for finetune_dpo.py.

    python prepare_preferences.py --data_file_path pairs.jsonl --destination_path data/preferences \
        --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Reads a JSON array or JSONL file of pairs (or a Hub dataset's: --data_repo_id and --data_file_name) in either of TRL's
two preference formats, one per file:

    plain:           {"prompt": "...", "chosen": "...", "rejected": "..."}
    conversational:  {"prompt": [{"role": "system" | "user" | "assistant", "content": "..."}, ...],
                      "chosen": [{"role": "assistant", "content": "..."}],
                      "rejected": [{"role": "assistant", "content": "..."}]}

A plain prompt is the instruction of the Alpaca template, prompted as prepare_alpaca.py does: BOS (when the tokenizer
adds one) and the template, then each answer and EOS, prompt and answer encoded apart. A conversation is rendered in
the checkpoint's chat template (or --template), as prepare_chat.py renders it: the prompt is the prompt's messages
with the generation prompt (the assistant header), and an answer is what the template writes after it when the
answer's messages follow the prompt's: the assistant's text, its end-of-turn token and whatever the template puts
after that (ChatML's newline), the tokens TRL's DPOTrainer takes too.

Each pair becomes {"prompt_ids", "chosen_ids", "rejected_ids"} (LongTensors, TRL's columns): finetune_dpo.py puts
prompt + answer through the model and scores the answer's tokens only. A pair whose prompt and longer answer exceed
--max_seq_length is cut: first the prompt, from the left (its start goes, BOS stays), as far as --max_prompt_length
tokens, then both answers, from the right; what was cut is printed and counted in metadata.json. Reading, splitting,
the metadata and writing are data.py's parts. See howto/preference_tuning.md.
"""

from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from data import (
    METADATA_FORMAT,
    chat_template_for,
    find_data_file,
    find_problem,
    generate_prompt,
    load_records,
    print_summary,
    split_metadata,
    split_order,
    split_samples,
    tokenizer_metadata,
    write_prepared,
)
from tokenizer import Tokenizer, check_template_name, tokenizer_file
from utils import cli

PAIR_FIELDS = ("prompt", "chosen", "rejected")  # a record's keys
PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")  # a prepared pair's, as finetune_dpo.py reads it
ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100  # finetune_dpo.py's label of the prompt tokens, which are no target


def setup(
    destination_path: Path = Path("data/preferences"),
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_file_path: Optional[Path] = None,
    data_repo_id: Optional[str] = None,
    data_file_name: Optional[str] = None,
    template: Optional[str] = None,
    test_split_fraction: float = 0.05,
    max_seq_length: int = 1024,
    max_prompt_length: int = 512,
    seed: int = 42,
) -> None:
    """Tokenize preference pairs into train.pt and test.pt for finetune_dpo.py.

    Args:
        destination_path: directory that receives train.pt, test.pt and metadata.json.
        checkpoint_dir: checkpoint whose tokenizer (and, for conversations, chat template) is used.
        data_file_path: a local JSON array or JSONL file of {"prompt", "chosen", "rejected"} records, plain text or
            conversations; when left out, `data_file_name` is downloaded from the Hub dataset `data_repo_id`.
        data_repo_id: Hugging Face Hub dataset repository to download from.
        data_file_name: file to download from `data_repo_id` (JSON or JSONL).
        template: for conversations, a built-in chat template (llama-3, llama-2, chatml, alpaca) for checkpoints
            without one, or to use instead of theirs; by default the checkpoint's own.
        test_split_fraction: fraction of the pairs held out as test.pt (rounded down), on which finetune_dpo.py
            reports its validation figures.
        max_seq_length: the most tokens of prompt + answer; a longer pair is cut, its prompt first.
        max_prompt_length: a prompt is cut from the left down to this many tokens at most, before the answers are cut
            from the right.
        seed: seed of the train/test split.
    """
    destination_path, checkpoint_dir = Path(destination_path), Path(checkpoint_dir)
    tokenizer_file(checkpoint_dir)  # a missing tokenizer is the first thing to say
    validate_args(template, test_split_fraction, max_seq_length, max_prompt_length)
    tokenizer = Tokenizer(checkpoint_dir)

    data_file_path, source = find_data_file(data_file_path, data_repo_id, data_file_name)
    records = load_records(data_file_path)
    pairs, conversational = to_pairs(records, data_file_path)
    wheres = [where for where, _ in records]
    print(f"Read {len(pairs)} {'conversational' if conversational else 'plain'} pairs from {data_file_path}")
    if conversational:
        chat_template = chat_template_for(tokenizer, template)
        tokenized = tokenize_conversations(pairs, wheres, tokenizer, chat_template)
    else:
        chat_template = None
        tokenized = tokenize_plain(pairs, tokenizer)
    order = split_order(len(pairs), test_split_fraction, seed)  # drawn apart from the tokens: the same for any length

    samples, cuts = cut_pairs(tokenized, wheres, max_seq_length, max_prompt_length, tokenizer.bos_id)
    n_test = int(len(pairs) * test_split_fraction)
    train_set, test_set = split_samples(samples, order, n_test)
    if not train_set or not test_set:
        raise ValueError(f"no pair of a split has different answers within --max_seq_length {max_seq_length}")
    metadata = {
        "format": METADATA_FORMAT,
        "pairs": True,
        **prompt_metadata(template, chat_template),
        **tokenizer_metadata(tokenizer),
        **split_metadata(train_set, test_set, max_seq_length, IGNORE_INDEX, test_split_fraction, seed, source),
        "max_prompt_length": max_prompt_length,
        **cuts,
    }
    write_prepared(destination_path, train_set, test_set, metadata)


def validate_args(
    template: Optional[str], test_split_fraction: float, max_seq_length: int, max_prompt_length: int
) -> None:
    """The checks of setup's flags that need no file."""
    check_template_name(template)
    if not 0 < test_split_fraction < 1:
        raise ValueError(f"--test_split_fraction must be between 0 and 1, not {test_split_fraction}")
    if max_seq_length < 2:
        raise ValueError(f"--max_seq_length must be at least 2, not {max_seq_length}")
    if not 1 <= max_prompt_length < max_seq_length:
        raise ValueError(
            f"--max_prompt_length {max_prompt_length} must be at least 1 and below --max_seq_length {max_seq_length}, "
            "to leave room for the answers"
        )


def cut_pairs(
    tokenized: list[tuple[list[int], list[int], list[int]]],
    wheres: list[str],
    max_seq_length: int,
    max_prompt_length: int,
    bos_id: Optional[int],
) -> tuple[list[Optional[dict[str, torch.Tensor]]], dict[str, int]]:
    """Each pair's ids as tensors under PAIR_KEYS, cut to max_seq_length (`cut_pair`), or None for a pair whose
    answers are the same once cut; and how many were cut or left out, for the metadata. Prints what it did."""
    samples, lengths, prompt_cut, answers_cut, same = [], [], 0, 0, []
    for (prompt, chosen, rejected), where in zip(tokenized, wheres):
        lengths.append(len(prompt) + max(len(chosen), len(rejected)))
        cut = cut_pair(prompt, chosen, rejected, max_seq_length, max_prompt_length, bos_id)
        prompt_cut += len(cut[0]) < len(prompt)
        answers_cut += len(cut[1]) < len(chosen) or len(cut[2]) < len(rejected)
        if cut[1] == cut[2]:  # the answers differed only in what was cut
            samples.append(None)
            same.append(where)
        else:
            samples.append({key: torch.tensor(ids) for key, ids in zip(PAIR_KEYS, cut)})
    print_summary(lengths, sum(length > max_seq_length for length in lengths), max_seq_length)
    print(
        f"Cut: the prompt of {prompt_cut} pairs (from the left, to leave room for the answers, at most to "
        f"--max_prompt_length {max_prompt_length}), the answers of {answers_cut} pairs (from the right)"
    )
    if same:
        print(
            f"Left out {len(same)} pairs whose answers are the same within --max_seq_length {max_seq_length} "
            f"(e.g. {', '.join(same[:3])}); raise it to keep them"
        )
    return samples, {"prompt_cut": prompt_cut, "answers_cut": answers_cut, "left_out_same_answers": len(same)}


def prompt_metadata(template: Optional[str], chat_template: Optional[str]) -> dict:
    """How the prompts were written, for metadata.json: in `chat_template` (conversations; `template` the built-in
    one's name, if any), or, without one, in the Alpaca template."""
    if chat_template is not None:
        return {
            "template": "chat",
            "chat_template_name": template or "checkpoint",
            "chat_template": chat_template,
            "tokenization": "encode(apply_chat_template(prompt, add_generation_prompt=True)); an answer: what "
            "encode(apply_chat_template(prompt + answer)) holds after it",
        }
    return {
        "template": "alpaca",
        "prompt_with_input": generate_prompt({"instruction": "{instruction}", "input": "{input}"}),
        "prompt_without_input": generate_prompt({"instruction": "{instruction}", "input": ""}),
        "tokenization": "BOS (if add_bos) + encode(prompt); an answer: encode(answer) + EOS",
    }


def to_pairs(records: list[tuple[str, Any]], path: Path) -> tuple[list[tuple[Any, Any, Any]], bool]:
    """(prompt, chosen, rejected) of every record, after checking it, and whether they are conversations. The first
    record decides the file's format; anything else in it stops with the record's place."""
    pairs, conversational = [], None
    for where, record in records:
        problem = find_problem(record, required=())  # not a JSON object?
        missing = [] if problem else [key for key in PAIR_FIELDS if record.get(key) is None]
        if problem or missing:
            problem = problem or f"has no {missing[0]!r}"
            raise ValueError(f"{path} {where} {problem}; a pair has a 'prompt', a 'chosen' and a 'rejected' answer")
        is_conversation = isinstance(record["prompt"], list)
        conversational = is_conversation if conversational is None else conversational
        if is_conversation != conversational:
            kinds = ("plain text", "conversational")
            raise ValueError(
                f"{path} {where} is {kinds[is_conversation]} but the file starts with {kinds[conversational]} "
                "records; use one format per file"
            )
        problem = conversation_problem(record) if conversational else find_problem(record, PAIR_FIELDS)
        if problem is None and record["chosen"] == record["rejected"]:
            problem = "has the same 'chosen' and 'rejected' answer, which teaches nothing"
        if problem is not None:
            raise ValueError(f"{path} {where} {problem}")
        pairs.append(tuple(record[key] for key in PAIR_FIELDS))
    return pairs, conversational


def conversation_problem(record: dict) -> Optional[str]:
    """What is wrong with a conversational pair, said after where it is, or None: the prompt a non-empty list of
    messages, each answer a non-empty list of assistant messages, every message {"role", "content": text}."""
    for key in PAIR_FIELDS:
        messages = record[key]
        if not isinstance(messages, list) or not messages:
            return f"has a {key!r} that is not a non-empty list of messages ({{'role': ..., 'content': ...}})"
        for number, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                return f"has a {key!r} whose message {number} is not an object with a text 'content'"
            if message.get("role") not in ROLES:
                return f"has a {key!r} whose message {number} has the unknown role {message.get('role')!r}"
            if key != "prompt" and message["role"] != "assistant":
                return f"has a {key!r} whose message {number} is a {message['role']!r} message, not the assistant's"
            if key != "prompt" and not message["content"].strip():
                return f"has an empty {key!r} answer"
    return None


def tokenize_plain(pairs: list[tuple[str, str, str]], tokenizer: Tokenizer) -> list[tuple[list[int], ...]]:
    """(prompt, chosen, rejected) ids of plain pairs: BOS (when the tokenizer adds one) + the Alpaca prompt, and each
    answer + EOS, encoded apart as prepare_alpaca.py does, so the prompt's ids are the ones generation feeds."""
    prompt_head = [tokenizer.bos_id] if tokenizer.add_bos else []
    prompts = tokenizer.encode_batch([generate_prompt({"instruction": prompt, "input": ""}) for prompt, _, _ in pairs])
    chosen = tokenizer.encode_batch([answer for _, answer, _ in pairs])
    rejected = tokenizer.encode_batch([answer for _, _, answer in pairs])
    eos = [tokenizer.eos_id]
    return [(prompt_head + p, c + eos, r + eos) for p, c, r in zip(prompts, chosen, rejected)]


def tokenize_conversations(
    pairs: list[tuple[list, list, list]], wheres: list[str], tokenizer: Tokenizer, chat_template: str
) -> list[tuple[list[int], ...]]:
    """(prompt, chosen, rejected) ids of conversational pairs. The prompt is its messages rendered with the generation
    prompt; an answer is what the rendering of the prompt's messages and the answer's holds after the longest start
    the three have in common (as TRL takes it: a template may render a prompt alone otherwise than before an
    answer, and then the answer starts where they part). Each text is encoded whole, as transformers does."""
    tokenized, parted = [], 0
    for (prompt, chosen, rejected), where in tqdm(
        zip(pairs, wheres), total=len(pairs), desc="Tokenizing", disable=None
    ):
        try:
            texts = [
                tokenizer.apply_chat_template(prompt, add_generation_prompt=True, template=chat_template),
                tokenizer.apply_chat_template(prompt + chosen, template=chat_template),
                tokenizer.apply_chat_template(prompt + rejected, template=chat_template),
            ]
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        prompt_ids, with_chosen, with_rejected = tokenizer.encode_batch(texts)
        start = min(common_prefix_length(prompt_ids, with_chosen), common_prefix_length(prompt_ids, with_rejected))
        parted += start < len(prompt_ids)
        if start == len(with_chosen) or start == len(with_rejected):
            raise ValueError(f"{where}: the chat template writes nothing for an answer; choose another --template")
        tokenized.append((prompt_ids[:start], with_chosen[start:], with_rejected[start:]))
    if parted:
        print(
            f"In {parted} pairs the prompt's last tokens are not those the answers follow (an answer that starts with "
            "a space or newline merges with the prompt's end, or the template renders a prompt alone otherwise): "
            "their answers start where the two part, as in TRL"
        )
    return tokenized


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    n = 0
    while n < min(len(ids), len(other)) and ids[n] == other[n]:
        n += 1
    return n


def cut_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_seq_length: int,
    max_prompt_length: int,
    bos_id: Optional[int],
) -> tuple[list[int], list[int], list[int]]:
    """A pair whose prompt and longer answer fit in `max_seq_length` tokens, as it is; a longer one cut: first the
    prompt from the left, keeping its BOS, to leave room for the longer answer but not below `max_prompt_length`
    tokens, then both answers from the right to the room left."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_seq_length:
        return prompt, chosen, rejected
    keep = max(max_seq_length - longest, min(len(prompt), max_prompt_length))
    if keep < len(prompt):
        head = prompt[:1] if prompt[0] == bos_id else []
        prompt = head + prompt[len(prompt) - keep + len(head) :]
    room = max_seq_length - len(prompt)
    return prompt, chosen[:room], rejected[:room]


if __name__ == "__main__":
    cli(setup)
