"""The tokenizer of a checkpoint directory, whichever kind it ships:

- `tokenizer.json` (Llama 3.x, SmolLM2, Mistral v0.3, most recent models), read with Hugging Face's `tokenizers`
  library: the Rust tokenizer transformers itself uses for these files, so the ids are transformers' by construction
  (pre-tokenizer regexes, byte-level BPE, special tokens inside ordinary text) instead of a reimplementation's;
- `tokenizer.model` (LLaMA 1 and 2, Mistral v0.1, TinyLlama), read with sentencepiece.

`tokenizer.json` wins when a directory has both, as in transformers. Beside it, `tokenizer_config.json` names the BOS
and EOS tokens (and, for sentencepiece, whether prompts start with BOS), `generation_config.json` the ids that end
generation, and `chat_template.jinja` (or `chat_template` in tokenizer_config.json) the chat template.

`Tokenizer.apply_chat_template` renders a conversation with that template (or a built-in one from `CHAT_TEMPLATES`)
the way transformers' `apply_chat_template` does. Chat templates are Jinja programs from the Hub, so untrusted code:
they run in jinja2's sandbox, which needs jinja2 3.1.6 or later (earlier versions have known sandbox escapes).
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import torch

from utils import one_line

# Built-in chat templates for checkpoints that ship none (prepare_chat.py --template NAME), in the Jinja of the Hub's
# tokenizer_config.json files: Meta's Llama 3.1 Instruct and Llama 2 chat templates, ChatML (SmolLM2, Qwen) and the
# Alpaca prompt of prepare_alpaca.py with one "### Instruction:" / "### Response:" pair per turn.
CHAT_TEMPLATES = {
    "llama-3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
        "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
        "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + "
        "'\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
        "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token or '' }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}"
        "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.' }}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '\n\n### Instruction:\n' + message['content'] + '\n\n### Response:' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}


def check_template_name(template: Optional[str]) -> None:
    """--template of chat.py and prepare_chat.py: a name from CHAT_TEMPLATES, or None for the checkpoint's own (any
    other string would be rendered as a template of its own: the model prompted with the name's text)."""
    if template is not None and template not in CHAT_TEMPLATES:
        raise ValueError(f"--template {template} is not one of {', '.join(CHAT_TEMPLATES)}")


# the tokens transformers passes to a template by name (its special_tokens_map), as tokenizer_config.json gives them
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def tokenizer_file(checkpoint_dir: Union[str, Path]) -> Path:
    """The file that defines the tokenizer of `checkpoint_dir`: tokenizer.json, else tokenizer.model."""
    checkpoint_dir = Path(checkpoint_dir)
    for name in ("tokenizer.json", "tokenizer.model"):
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    raise ValueError(f"{checkpoint_dir} has no tokenizer.model or tokenizer.json; see howto/download_weights.md")


class Tokenizer:
    def __init__(self, checkpoint_dir: Union[str, Path]) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        self.path = tokenizer_file(checkpoint_dir)
        config = read_json(checkpoint_dir / "tokenizer_config.json")
        generation = read_json(checkpoint_dir / "generation_config.json")
        if self.path.name == "tokenizer.json":
            self.processor = load_tokenizer_json(self.path)
            token_to_id = self.processor.token_to_id
            self.vocab_size = self.processor.get_vocab_size(with_added_tokens=True)
        else:
            self.processor = load_sentencepiece(self.path)

            def token_to_id(piece: str) -> Optional[int]:
                return piece_id(self.processor, piece)

            self.vocab_size = self.processor.vocab_size()

        self.bos_id = special_id(config.get("bos_token"), token_to_id, generation.get("bos_token_id"))
        self.eos_id = special_id(config.get("eos_token"), token_to_id, generation.get("eos_token_id"))
        if self.path.name == "tokenizer.model":  # sentencepiece knows its own, and LLaMA's configs may name none
            self.bos_id = self.processor.bos_id() if self.bos_id is None else self.bos_id
            self.eos_id = self.processor.eos_id() if self.eos_id is None else self.eos_id
        if self.eos_id is None or self.eos_id < 0:
            raise ValueError(f"{checkpoint_dir} names no EOS token; add eos_token to its tokenizer_config.json")
        if self.bos_id is not None and self.bos_id < 0:
            self.bos_id = None
        # Whether a prompt starts with BOS, as the tokenizer's own files say: tokenizer.json's post-processor (Llama 3.1
        # adds <|begin_of_text|>, SmolLM2 nothing), for sentencepiece add_bos_token (true unless the config says not)
        if self.path.name == "tokenizer.json":
            ids, plain = self.processor.encode("a").ids, self.processor.encode("a", add_special_tokens=False).ids
            self.add_bos = ids[1:] == plain  # the post-processor puts one token, BOS, before the text
            self.bos_id = ids[0] if self.add_bos else self.bos_id
        else:
            self.add_bos = bool(config.get("add_bos_token", True))
        # Every id that ends generation: EOS, and the end-of-turn tokens generation_config.json lists
        # (Llama 3.1 Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>)
        stop = generation.get("eos_token_id")
        stop = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *stop]))
        template = checkpoint_dir / "chat_template.jinja"
        self.chat_template: Optional[str] = template.read_text() if template.is_file() else config.get("chat_template")
        if isinstance(self.chat_template, list):  # several named templates, as some repos have: the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.special_tokens = {
            name: token["content"] if isinstance(token, dict) else token
            for name, token in ((name, config.get(name)) for name in SPECIAL_TOKENS)
            if token is not None
        }

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False, template: Optional[str] = None
    ) -> str:
        """`messages` ([{"role": "system" | "user" | "assistant", "content": ...}, ...]) as text in a chat template:
        `template` (a name from CHAT_TEMPLATES, or Jinja source), by default the checkpoint's own. With
        `add_generation_prompt` the text ends with the header of an assistant turn, for the model to answer.
        Encode the result with `encode(text, bos=False)`: the template writes BOS itself where it wants one.
        Text and ids equal transformers' `apply_chat_template(messages, tokenize=...)`."""
        source = CHAT_TEMPLATES.get(template, template) if template is not None else self.chat_template
        if source is None:
            raise ValueError(
                f"{self.path.parent} has no chat template (no chat_template.jinja, none in tokenizer_config.json); "
                f"choose one of {', '.join(CHAT_TEMPLATES)}"
            )
        try:
            return compile_chat_template(source).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except Exception as e:  # the template's raise_exception, or any error of the Jinja program
            import jinja2

            kind = "" if type(e) is jinja2.TemplateError else f"{type(e).__name__}: "
            raise ValueError(f"the chat template failed: {kind}{e}") from None

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False, max_length: int = -1) -> torch.Tensor:
        """The ids of `text`, special-token strings inside it included. `bos` None adds BOS when the tokenizer
        does (`add_bos`), which is what transformers' `AutoTokenizer(text)` gives."""
        ids = self.encode_batch([text])[0]
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path} has no BOS token; encode with bos=False")
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Plain ids (no BOS/EOS) of many texts at once, encoded on several threads."""
        if self.path.name == "tokenizer.json":
            return [encoding.ids for encoding in self.processor.encode_batch(texts, add_special_tokens=False)]
        return self.processor.encode(texts)

    def decode(self, ids: Union[torch.Tensor, list[int]], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; `skip_special_tokens` leaves out the special tokens of a tokenizer.json (EOS, end of turn,
        ...), as transformers' decode(ids, skip_special_tokens=True) does. sentencepiece decodes BOS and EOS to nothing
        either way."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if self.path.name == "tokenizer.json":
            return self.processor.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.processor.decode(ids)


@lru_cache(maxsize=8)
def compile_chat_template(source: str) -> Any:
    """The Jinja template of a chat template's source, in the environment transformers renders chat templates in:
    a sandbox that cannot reach Python's internals, blocks trimmed, `break`/`continue`, a `tojson` filter that keeps
    non-ASCII text and does not escape HTML, and the functions `raise_exception(message)` and `strftime_now(format)`."""
    import jinja2  # imported here: only chat data and chat need it
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def load_tokenizer_json(path: Path) -> Any:
    from tokenizers import Tokenizer as HFTokenizer  # imported here: sentencepiece checkpoints never need it

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for malformed JSON or an unknown model
        raise ValueError(f"{path} is not a Hugging Face tokenizer ({one_line(e)}); download it again") from None


def load_sentencepiece(path: Path) -> Any:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path} is not a sentencepiece model ({e}); download it again") from None
    return processor


def piece_id(processor: Any, piece: str) -> Optional[int]:
    """sentencepiece's id of `piece`, None where it does not know it (piece_to_id would give <unk>'s id)."""
    token_id = processor.piece_to_id(piece)
    return token_id if processor.id_to_piece(token_id) == piece else None


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; download it again")
    return data


def special_id(token: Any, token_to_id, fallback: Any) -> Optional[int]:
    """The id of a special token as tokenizer_config.json names it (a string, or {"content": ...} in older files),
    else the first id generation_config.json gives."""
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str):
        token_id = token_to_id(token)
        if token_id is not None and token_id >= 0:
            return token_id
    if isinstance(fallback, list):
        fallback = fallback[0] if fallback else None
    return fallback
