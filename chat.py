"""Chats with a converted checkpoint in the terminal, in the model's chat template.

    python chat.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python chat.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --prompt "What is the capital of France?"

Type a message and the answer appears as it is generated; a turn ends at the template's end-of-turn token (the
tokenizer's stop ids). `/reset` starts the conversation again, `/exit` or Ctrl-D quits. With --prompt it answers that
one message and exits, printing only the answer to stdout. The KV cache is kept from one turn to the next, so a new
turn only feeds the model its new tokens; when the conversation would outgrow the model's block size, the oldest turns
are dropped (said on stderr). See howto/chat.md.
"""

import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from adapter import read_adapter_chat_template
from decode import Completion, check_sampling, ended_at_once, load_inference_model, stream
from lora import read_lora_chat_template
from model import LLaMA
from tokenizer import CHAT_TEMPLATES, Tokenizer, check_template_name
from utils import cli, load_config, one_line


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    lora_path: Optional[Path] = None,
    system: Optional[str] = None,
    prompt: Optional[str] = None,
    max_new_tokens: int = 512,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    seed: int = 1234,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    template: Optional[str] = None,
    adapter_path: Optional[Path] = None,
) -> None:
    """Opens an interactive chat with a converted checkpoint, or answers one message with --prompt.

    Args:
        checkpoint_dir: directory with lit_model.safetensors, model_config.json and the tokenizer, with its chat
            template (chat_template.jinja or tokenizer_config.json's chat_template; see howto/download_weights.md).
        lora_path: a LoRA adapter written by finetune_lora.py to chat with, merged into the weights (on top of the
            quantized base, unmerged, with --quantize).
        system: a system prompt, the first message of the conversation; /reset keeps it.
        prompt: answer this one message, print only the answer to stdout, and exit (for scripts).
        max_new_tokens: the longest answer, in tokens; an answer also ends at the template's end-of-turn token.
        temperature: 0 picks the most likely token every step (greedy); higher values sample more freely.
        top_k: sample only among the k most likely tokens; null samples from the whole vocabulary.
        seed: random seed, so that a conversation gives the same answers every time.
        precision: "bf16-true", "16-true" or "32-true"; by default bf16-true on GPUs that support it and 32-true
            elsewhere.
        quantize: hold the projections in 4 bits ("bnb.nf4", "bnb.fp4"; "-dq" quantizes their scales too) or 8 bits
            ("bnb.int8") with bitsandbytes (see howto/quantize.md).
        template: a chat template built into tokenizer.py (llama-3, llama-2, chatml, alpaca), for a checkpoint that
            ships none (or to override its own). By default the adapter's, when it was trained on conversations
            (prepare_chat.py records the template), else the checkpoint's.
        adapter_path: a LLaMA-Adapter (v1 or v2) written by finetune_adapter.py to chat with, instead of --lora_path;
            its prompts stay separate from the weights (they cannot merge), and the base is not quantized.
    """
    check_sampling(temperature, top_k, None, max_new_tokens)
    check_template_name(template)
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    if lora_path is not None:  # the template of what the adapter was trained on, if conversations
        template = template or read_lora_chat_template(lora_path)
    if adapter_path is not None:
        template = template or read_adapter_chat_template(adapter_path)
    if template is None and tokenizer.chat_template is None:
        raise ValueError(
            f"{checkpoint_dir} has no chat template (no chat_template.jinja, no chat_template in "
            f"tokenizer_config.json); pass --template with one of {', '.join(CHAT_TEMPLATES)}"
        )
    if max_new_tokens >= config.block_size:
        raise ValueError(
            f"--max_new_tokens {max_new_tokens} leaves no room for the conversation in the model's "
            f"block_size {config.block_size}"
        )
    # LoRA merged, unless the base is quantized: 4 or 8 bits would round the adapter's small update away
    model, loaded = load_inference_model(
        checkpoint_dir,
        lora_path,
        adapter_path,
        merge=lora_path is not None and quantize is None,
        quantize=quantize,
        precision=precision,
    )
    print(loaded, file=sys.stderr)

    generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
    chat = Chat(model, tokenizer, system, template, max_new_tokens, temperature, top_k, generator)
    if prompt is not None:
        for text in chat.reply(prompt):
            print(text, end="", flush=True)
        print()
        return

    converse(chat)


def converse(chat: "Chat") -> None:
    """The interactive loop: a message at a time from stdin, each answer printed as it is generated."""
    print("Type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            message = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if message.strip() == "/exit":
            return
        if message.strip() == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not message.strip():
            continue
        try:
            for text in chat.reply(message):
                print(text, end="", flush=True)
        except ValueError as e:  # a message too long for the block size: say so, and keep chatting
            print(f"error: {one_line(e)}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C stops the answer; what was generated so far stays in the conversation
            pass
        print()


class Chat:
    """A conversation: its messages, and the token ids whose keys and values are in the model's KV cache (positions
    0, 1, ...). Each turn renders the whole conversation with the chat template, keeps the cache's longest common
    prefix with it, and feeds the model only the rest."""

    def __init__(
        self,
        model: LLaMA,
        tokenizer: Tokenizer,
        system: Optional[str],
        template: Optional[str],
        max_new_tokens: int,
        temperature: float,
        top_k: Optional[int],
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_new_tokens, self.temperature, self.top_k, self.generator = (
            max_new_tokens,
            temperature,
            top_k,
            generator,
        )
        self.system = [] if system is None else [{"role": "system", "content": system}]
        self.messages = list(self.system)
        self.cached: list[int] = []  # the ids in the cache, at positions 0..len(cached)-1
        self.capacity = 0  # the cache's length: grown as the conversation needs, not block_size up front

    def reset(self) -> None:
        """Forgets every turn but the system prompt (the cache keeps what the next conversation shares with it)."""
        self.messages = list(self.system)

    def reply(self, message: str) -> Iterator[str]:
        """Adds the user's `message`, then yields the answer's text as it is generated, piece by piece; at the end
        the answer is the conversation's last message."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": message})
        try:
            ids = self.encode_fitting()
        except ValueError:  # a message too long even alone: refused, and the conversation stays as it was
            self.messages = before
            raise
        if len(ids) + self.max_new_tokens > self.capacity:  # a new, longer cache: the conversation is fed again
            self.capacity = min(
                self.model.config.block_size, max(2 * self.capacity, len(ids) + self.max_new_tokens, 1024)
            )
            self.model.set_kv_cache(batch_size=1, max_seq_length=self.capacity)
            self.cached = []
        n = common_prefix_length(self.cached, ids)
        n = min(n, len(ids) - 1)  # feed at least the last token: its logits give the answer's first token
        self.cached = ids[:n]

        answer = Completion(
            ids[n:],
            self.max_new_tokens,
            self.temperature,
            self.top_k,
            None,
            self.generator,
            self.tokenizer.stop_ids,
            detokenize=self.tokenizer.decode,
        )
        self.messages.append({"role": "assistant", "content": ""})
        for _ in stream(self.model, [answer], starts=[n]):
            self.cached = ids + answer.tokens[:-1]  # fed so far: the conversation, and each token before this one
            if hint := ended_at_once(answer.tokens, self.tokenizer.stop_ids):
                print(hint, file=sys.stderr)
            # the text grows as tokens complete characters (a character of several bytes may span tokens)
            new = answer.text[len(self.messages[-1]["content"]) :]
            self.messages[-1]["content"] = answer.text
            if new:
                yield new

    def encode_fitting(self) -> list[int]:
        """The conversation's ids in the chat template, ending with the assistant's turn opened; while they and
        max_new_tokens do not fit in block_size, the oldest user/assistant turn is dropped (the system prompt stays)."""
        block_size = self.model.config.block_size
        while True:
            text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, template=self.template)
            ids = self.tokenizer.encode(text, bos=False).tolist()  # the template writes BOS itself where it has one
            if len(ids) + self.max_new_tokens <= block_size:
                return ids
            first = len(self.system)
            if len(self.messages) - first <= 1:  # only the new message is left
                raise ValueError(
                    f"the message ({len(ids)} tokens in the template) plus --max_new_tokens {self.max_new_tokens} "
                    f"exceeds the model's block_size {block_size}; shorten it or lower --max_new_tokens"
                )
            dropped = 2 if self.messages[first + 1]["role"] == "assistant" else 1
            del self.messages[first : first + dropped]
            print(
                f"(the conversation outgrew the block size of {block_size} tokens: dropped its oldest turn)",
                file=sys.stderr,
            )


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    cli(main)
