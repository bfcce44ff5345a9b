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
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from adapter import load_adapter_model, read_adapter_chat_template, read_adapter_config
from generate import generate_tokens
from lora import load_lora_model, read_lora_chat_template, read_lora_config
from model import LLaMA
from tokenizer import CHAT_TEMPLATES, Tokenizer, check_template_name
from utils import cli, default_precision, load_config, load_model, one_line, precision_to_dtype, use_cpu_decode_layout


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
    if temperature < 0 or (top_k is not None and top_k < 1) or max_new_tokens < 1:
        raise ValueError(
            f"--temperature must be >= 0, --top_k >= 1 (or null) and --max_new_tokens >= 1, "
            f"not {temperature}, {top_k} and {max_new_tokens}"
        )
    check_template_name(template)
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    if lora_path is not None and adapter_path is not None:
        raise ValueError("pass --lora_path (a LoRA adapter) or --adapter_path (a LLaMA-Adapter), not both")
    if adapter_path is not None and quantize is not None:
        raise ValueError("--quantize is for LoRA adapters (QLoRA); a LLaMA-Adapter runs on the unquantized base")
    if lora_path is not None:
        read_lora_config(lora_path)  # a missing or foreign adapter stops here, before the slow part
        template = template or read_lora_chat_template(lora_path)  # what it was trained on, if conversations
    if adapter_path is not None:
        read_adapter_config(adapter_path)
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision_to_dtype(precision or default_precision())

    t0 = time.perf_counter()
    if adapter_path is not None:
        model = load_adapter_model(checkpoint_dir, adapter_path, device=device, dtype=dtype)
    elif lora_path is None:
        model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize)
    else:  # merged, unless the base is quantized: 4 or 8 bits would round the adapter's small update away
        model = load_lora_model(
            checkpoint_dir, lora_path, device=device, dtype=dtype, merge=quantize is None, quantize=quantize
        )
    model.eval()
    if device.type == "cpu":
        use_cpu_decode_layout(model)
    print(
        f"Loaded {checkpoint_dir} in {time.perf_counter() - t0:.2f} s "
        f"({dtype}, {quantize or 'not quantized'}, {device})",
        file=sys.stderr,
    )

    torch.manual_seed(seed)
    chat = Chat(model, tokenizer, system, template, max_new_tokens, temperature, top_k)
    if prompt is not None:
        for text in chat.reply(prompt):
            print(text, end="", flush=True)
        print()
        return

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
    ) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
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
        device = self.model.embed.weight.device
        if len(ids) + self.max_new_tokens > self.capacity:  # a new, longer cache: the conversation is fed again
            self.capacity = min(
                self.model.config.block_size, max(2 * self.capacity, len(ids) + self.max_new_tokens, 1024)
            )
            self.model.set_kv_cache(batch_size=1, max_seq_length=self.capacity)
            self.cached = []
        n = common_prefix_length(self.cached, ids)
        n = min(n, len(ids) - 1)  # feed at least the last token: its logits give the answer's first token
        self.cached = ids[:n]

        answer: list[int] = []
        printed = ""
        new_tokens = generate_tokens(
            self.model,
            torch.tensor(ids[n:], device=device),
            torch.arange(n, len(ids), device=device),
            self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            stop_ids=self.tokenizer.stop_ids,
        )
        self.messages.append({"role": "assistant", "content": ""})
        for token in new_tokens:
            self.cached = ids + answer  # fed so far: the conversation, and each token yielded before this one
            if token.item() in self.tokenizer.stop_ids:
                break
            answer.append(token.item())
            # decode the whole answer and print what is new: a character of several bytes may span tokens, and
            # decodes to U+FFFD until its last byte has come
            text = self.tokenizer.decode(answer)
            self.messages[-1]["content"] = text
            if not text.endswith("\ufffd") and text.startswith(printed):
                yield text[len(printed) :]
                printed = text

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
