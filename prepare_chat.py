"""Turns conversations (several system / user / assistant turns each) into token ids for fine-tuning a chat model.

    python prepare_chat.py --data_file_path chats.jsonl --destination_path data/chat \
        --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B-Instruct

Reads a JSON array or JSONL file of conversations in either of the two usual formats (one per file):

    OpenAI:   {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    ShareGPT: {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}

Each conversation is rendered with the checkpoint's chat template (or --template llama-3 | llama-2 | chatml | alpaca
for a checkpoint without one: tokenizer.CHAT_TEMPLATES) and encoded as one text, exactly as transformers'
`apply_chat_template(..., tokenize=True)` gives it. The labels repeat the ids over every assistant turn, from its
first token to its end-of-turn token (<|eot_id|>, <|im_end|>, EOS) included, and are `ignore_index` everywhere else
(system and user turns, the template's headers), so the model learns to answer and to stop, in every turn.
Writes the train.pt, test.pt and metadata.json of prepare_alpaca.py, the template in the metadata: finetune_lora.py
and finetune_full.py train on them as they are. Reading, splitting, the metadata and writing are data.py's parts.
See howto/prepare_dataset.md.
"""

from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from data import (
    METADATA_FORMAT,
    chat_template_for,
    find_data_file,
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

# the two formats: the key of the message list, the keys of role and text, and their role names -> ours
FORMATS = {
    "OpenAI": ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "ShareGPT": ("conversations", "from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
}


def setup(
    destination_path: Path = Path("data/chat"),
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-3.2-1B-Instruct"),
    data_file_path: Optional[Path] = None,
    data_repo_id: Optional[str] = None,
    data_file_name: Optional[str] = None,
    template: Optional[str] = None,
    test_split_fraction: float = 0.05,
    max_seq_length: int = 1024,
    ignore_index: int = -100,
    seed: int = 42,
) -> None:
    """Tokenize conversations into train.pt and test.pt for fine-tuning, masking all but the assistant's turns.

    Args:
        destination_path: directory that receives train.pt, test.pt and metadata.json.
        checkpoint_dir: checkpoint whose tokenizer.json, tokenizer_config.json and chat template are used.
        data_file_path: a local JSON array or JSONL file of conversations (OpenAI or ShareGPT format); when left
            out, `data_file_name` is downloaded from the Hub dataset `data_repo_id`.
        data_repo_id: Hugging Face Hub dataset repository to download from.
        data_file_name: file to download from `data_repo_id`.
        template: a built-in chat template (llama-3, llama-2, chatml, alpaca) for checkpoints without one, or to
            use instead of theirs; by default the checkpoint's own.
        test_split_fraction: fraction of the conversations held out as test.pt (rounded down).
        max_seq_length: longer conversations keep as many whole leading turns as fit in this many tokens;
            those whose first assistant turn does not fit are left out and reported.
        ignore_index: label value the loss skips; must not be a token id.
        seed: seed of the train/test split.
    """
    destination_path, checkpoint_dir = Path(destination_path), Path(checkpoint_dir)
    tokenizer_file(checkpoint_dir)  # a missing tokenizer is the first thing to say
    check_template_name(template)
    if not 0 < test_split_fraction < 1:
        raise ValueError(f"--test_split_fraction must be between 0 and 1, not {test_split_fraction}")
    if max_seq_length < 2:
        raise ValueError(f"--max_seq_length must be at least 2, not {max_seq_length}")
    tokenizer = Tokenizer(checkpoint_dir)
    chat_template = chat_template_for(tokenizer, template)
    if 0 <= ignore_index < tokenizer.vocab_size:
        raise ValueError(f"--ignore_index {ignore_index} is a token id; use a negative value such as -100")

    data_file_path, source = find_data_file(data_file_path, data_repo_id, data_file_name)
    records = load_records(data_file_path)
    conversations = to_conversations(records, data_file_path)
    print(f"Read {len(conversations)} conversations from {data_file_path}")
    order = split_order(len(conversations), test_split_fraction, seed)  # before tokenizing: the same for any length

    samples, lengths, truncated, too_long = tokenize(
        conversations, [where for where, _ in records], tokenizer, chat_template, max_seq_length, ignore_index
    )
    print_summary(lengths, truncated, max_seq_length)
    if too_long:
        print(
            f"Left out {len(too_long)} conversations whose first assistant turn does not fit in --max_seq_length "
            f"{max_seq_length} (e.g. {', '.join(too_long[:3])}); raise it to keep them"
        )
    n_test = int(len(conversations) * test_split_fraction)
    train_set, test_set = split_samples(samples, order, n_test)
    if not train_set or not test_set:
        raise ValueError(f"no conversation of a split fits in --max_seq_length {max_seq_length}; raise it")
    metadata = {
        "format": METADATA_FORMAT,
        "template": "chat",
        "chat_template_name": template or "checkpoint",
        "chat_template": chat_template,
        "tokenization": "encode(apply_chat_template(messages), bos=False); labels over assistant turns + end-of-turn",
        **tokenizer_metadata(tokenizer),
        **split_metadata(train_set, test_set, max_seq_length, ignore_index, test_split_fraction, seed, source),
        "mask_inputs": True,
        "truncated": truncated,
        "left_out_first_turn_too_long": len(too_long),
    }
    write_prepared(destination_path, train_set, test_set, metadata)


def to_conversations(records: list[tuple[str, Any]], path: Path) -> list[list[dict[str, str]]]:
    """The conversations of a file as OpenAI-style message lists; the first record decides the file's format, and
    anything else in it stops with the record's place."""
    conversations, format_name = [], None
    for where, record in records:
        found = [name for name, (key, *_) in FORMATS.items() if isinstance(record, dict) and key in record]
        if len(found) != 1:
            raise ValueError(f"{path} {where} has neither a 'messages' (OpenAI) nor a 'conversations' (ShareGPT) list")
        format_name = format_name or found[0]
        if found[0] != format_name:
            raise ValueError(
                f"{path} {where} is in the {found[0]} format but the file starts in the {format_name} format; "
                "use one format per file"
            )
        key, role_key, text_key, roles = FORMATS[format_name]
        messages = record[key]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path} {where}: {key!r} must be a non-empty list of messages")
        conversation = []
        for number, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or not isinstance(message.get(text_key), str):
                raise ValueError(f"{path} {where}: message {number} is not an object with a text {text_key!r}")
            if message.get(role_key) not in roles:
                raise ValueError(
                    f"{path} {where}: message {number} has the unknown {role_key!r} {message.get(role_key)!r} "
                    f"(expected one of {', '.join(roles)})"
                )
            conversation.append({"role": roles[message[role_key]], "content": message[text_key]})
        if not any(message["role"] == "assistant" for message in conversation):
            raise ValueError(f"{path} {where} has no assistant turn, so nothing to learn")
        conversations.append(conversation)
    return conversations


def tokenize(
    conversations: list[list[dict[str, str]]],
    wheres: list[str],
    tokenizer: Tokenizer,
    chat_template: str,
    max_seq_length: int,
    ignore_index: int,
) -> tuple[list[Optional[dict[str, torch.Tensor]]], list[int], int, list[str]]:
    """One {"input_ids", "labels"} per conversation (None where its first assistant turn does not fit in
    `max_seq_length`), the full length of every conversation, how many were cut, and where those left out were.

    The rendered text is encoded whole, as transformers does; a token is a target when its characters (the
    tokenizer's offsets) overlap an assistant message's content in the text, and so is the end-of-turn token
    that follows it (`assistant_targets`). A longer conversation is cut after the last assistant turn that fits."""
    special = {token.content for token in tokenizer.processor.get_added_tokens_decoder().values() if token.special}
    samples, lengths, truncated, too_long = [], [], 0, []
    for conversation, where in tqdm(
        zip(conversations, wheres), total=len(conversations), desc="Tokenizing", disable=None
    ):
        try:
            text = tokenizer.apply_chat_template(conversation, template=chat_template)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        encoding = tokenizer.processor.encode(text, add_special_tokens=False)
        spans = assistant_spans(text, conversation, tokenizer, chat_template)
        targets = assistant_targets(text, encoding.offsets, spans, special, where)
        ids = encoding.ids
        lengths.append(len(ids))
        turn_ends = [end for _, end in targets]
        if len(ids) > max_seq_length:
            fitting = [end for end in turn_ends if end <= max_seq_length]
            if not fitting:
                samples.append(None)
                too_long.append(where)
                continue
            ids = ids[: fitting[-1]]
            truncated += 1
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.full_like(input_ids, ignore_index)
        for start, end in targets:
            labels[start:end] = input_ids[start:end]
        samples.append({"input_ids": input_ids, "labels": labels})
    return samples, lengths, truncated, too_long


def assistant_spans(
    text: str, conversation: list[dict[str, str]], tokenizer: Tokenizer, chat_template: str
) -> list[tuple[int, int]]:
    """Where each assistant message's content is in the rendered `text`, as (start, end) characters. It is searched
    for after the text the conversation before it renders to with the generation prompt (the assistant header),
    and after the previous assistant turn; templates may trim it (Llama 3 does)."""
    spans, position = [], 0
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        if i > 0:
            prefix = tokenizer.apply_chat_template(conversation[:i], add_generation_prompt=True, template=chat_template)
            position = max(position, len(prefix) if text.startswith(prefix) else 0)
        content = message["content"] if message["content"] in text[position:] else message["content"].strip()
        start = text.find(content, position)
        if start < 0:
            raise ValueError(
                f"the chat template changes the text of assistant turns (turn {i + 1} is not in what it renders), so "
                "its tokens cannot be found; choose another --template"
            )
        spans.append((start, start + len(content)))
        position = start + len(content)
    return spans


def assistant_targets(
    text: str, offsets: list[tuple[int, int]], spans: list[tuple[int, int]], special: set[str], where: str
) -> list[tuple[int, int]]:
    """The token ranges [start, end) to learn: each assistant span's tokens, and after them, past any whitespace,
    the end-of-turn token, which must be one of the `special` tokens (<|eot_id|>, <|im_end|>, EOS)."""
    targets, first = [], 0
    for span_start, span_end in spans:
        while first < len(offsets) and offsets[first][1] <= span_start:
            first += 1
        last = first
        while last < len(offsets) and (offsets[last][0] < span_end or not text[slice(*offsets[last])].strip()):
            last += 1
        if last == len(offsets) or text[slice(*offsets[last])] not in special:
            found = repr(text[slice(*offsets[last])]) if last < len(offsets) else "the end of the text"
            raise ValueError(
                f"{where}: the chat template puts no end-of-turn token after an assistant turn ({found} follows it); "
                "choose another --template"
            )
        targets.append((first, last + 1))
        first = last + 1
    return targets


if __name__ == "__main__":
    cli(setup)
