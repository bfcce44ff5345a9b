"""The one decoding loop: every script that generates (generate*.py, chat.py, evaluate.py's `generate_until` and
serve.py through batched.py's continuous batching, the fine-tuning scripts' sample answers) decodes with it.

A `Completion` is one prompt's request (how many new tokens, greedy or sampled, where to stop) and what decoding gave
it. `stream` decodes several together, one per row of the model's KV cache:

- prefill: every prompt in one forward pass, right-padded to the longest, each row at its own positions. A pad only
  follows a prompt's tokens, and the row's first new token overwrites the first pad in the cache before any query
  attends to it, so padding changes nothing.
- then one token a step for every row still going, each at its own position (model.forward's per-row `input_pos`);
  a row ends at a stop id, at a stop string (looked for in the newly decoded text only) or after max_new_tokens.

Greedy, or sampled with temperature, top-k and top-p from a torch.Generator: the same seed gives the same text.
`Batch` is the step itself, for batched.py's continuous batching, where rows start and end while others decode.
What is fast when, and why: howto/inference.md.

    completions = [Completion(tokenizer.encode(p).tolist(), max_new_tokens=64) for p in prompts]
    for row, token in stream(model, completions): ...  # or decode_all(model, completions)
    completions[0].tokens
"""

import sys
import time
from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from adapter import load_adapter_model, merge_adapter_v2, read_adapter_config
from lora import check_same_base, load_lora_model, read_lora_config
from model import LLaMA
from quantize import check_mode
from tokenizer import Tokenizer
from utils import (
    default_precision,
    load_config,
    load_model,
    pack_linears,
    peak_memory_gb,
    precision_to_dtype,
    split_linears,
)


@dataclass
class Completion:
    """One prompt's completion: what is asked, and what decoding gives (tokens, text, finish_reason)."""

    prompt: list[int]  # token ids, at least one
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    generator: Optional[torch.Generator] = None  # random numbers of its own, else torch's global ones
    stop_ids: Collection[int] = ()  # decoding ends after one of these (it is kept in `tokens`)
    stop_strings: Collection[str] = ()  # ... or once the text holds one of these (cut from `text`); needs detokenize
    detokenize: Optional[Callable[[list[int]], str]] = None  # token ids -> text, for stop_strings and `text`
    on_token: Optional[Callable[[int], None]] = None  # called with each new token, once `text` has taken it
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the text of `tokens` up to a stop string (kept only with detokenize)
    finish_reason: Optional[str] = None  # "stop" (a stop id or string) or "length" (max_new_tokens)
    decoded: tuple[int, int] = (0, 0)  # detokenize's window: tokens[decoded[0]:decoded[1]] gave the end of `text`

    def add(self, token: int) -> bool:
        """Takes one new token; returns whether the completion has ended. A stop id ends it without text of its own."""
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.detokenize is not None:
            self.add_text()  # ends it at a stop string
        if self.finish_reason is None and len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.on_token is not None:
            self.on_token(token)
        return self.finish_reason is not None

    def add_text(self) -> None:
        """Adds the newest token's text to `text`, decoding only the last few tokens: a token may complete a character
        that earlier ones began (then it adds nothing until the character is whole), and a sentencepiece word's leading
        space shows only after the word before it, so the text of the window before the new token is taken from the
        window with it. Ends the completion at a stop string found in the new text."""
        start, end = self.decoded
        before, now = self.detokenize(self.tokens[start:end]), self.detokenize(self.tokens[start:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return
        new = now[len(before) :]
        self.decoded = (end, len(self.tokens))
        longest = max((len(stop) for stop in self.stop_strings), default=0)
        searched = max(0, len(self.text) - longest + 1)  # a stop string may begin in the text before the new
        self.text += new
        found = [at for at in (self.text.find(stop, searched) for stop in self.stop_strings if stop) if at >= 0]
        if found:
            self.text, self.finish_reason = self.text[: min(found)], "stop"


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float], max_new_tokens: int) -> None:
    """The scripts' check of their sampling flags."""
    if temperature < 0 or (top_k is not None and top_k < 1) or not 0 < (top_p or 1.0) <= 1 or max_new_tokens < 1:
        raise ValueError(
            f"--temperature must be >= 0, --top_k >= 1 (or null), --top_p in (0, 1] and --max_new_tokens >= 1, not "
            f"{temperature}, {top_k}, {top_p} and {max_new_tokens}"
        )


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One token id per row, (B,), from the logits (B, vocab_size) of each row's last position: the most likely at
    temperature 0, else drawn from the softmax at `temperature` among the `top_k` most likely tokens, and among those of
    them whose probabilities add up to `top_p` (nucleus sampling; the most likely token always stays)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    candidates = None
    if top_k is not None:  # softmax and draw among the k best only: cheaper than masking the other vocab_size - k
        logits, candidates = torch.topk(logits, min(top_k, logits.size(-1)))
    logits = logits.float()
    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # no division at 1
    if top_p is not None and top_p < 1.0:
        probs = nucleus(probs, top_p)
    choice = draw(probs, generator)  # (B, 1)
    return (choice if candidates is None else candidates.gather(-1, choice))[:, 0]


def nucleus(probs: torch.Tensor, top_p: float, k: int = 64) -> torch.Tensor:
    """probs (B, n) with each row's tokens outside its nucleus set to 0: a token stays if the more likely tokens before
    it add up to less than top_p. Those lie among the k most likely as soon as the k add up to top_p, so the k are
    taken first (torch.topk, sorted), then eight times as many for the rows whose k fell short, and so on: a trained
    model's nucleus is mostly far smaller than its vocabulary, which a sort of every row reads whole (the figures:
    howto/inference.md)."""
    kept = torch.zeros_like(probs)
    rows = torch.arange(probs.size(0), device=probs.device)  # those whose nucleus is still to find
    while rows.numel():
        k = min(k, probs.size(-1))
        top, order = (probs if rows.numel() == probs.size(0) else probs[rows]).topk(k, dim=-1)  # most likely first
        total = top.cumsum(-1)
        found = (total[:, -1] >= top_p) | (k == probs.size(-1))
        kept[rows[found][:, None], order[found]] = (top * (total - top < top_p))[found]
        rows, k = rows[~found], k * 8
    return kept


def draw(probs: torch.Tensor, generator: Optional[torch.Generator], block: int = 256) -> torch.Tensor:
    """One index per row of `probs` (B, n), (B, 1): index i with probability probs[i] / the row's sum. One uniform
    number per row, scaled to the sum and looked up in the cumulative probabilities, in two steps: the block of `block`
    indices it falls in (the running sum of the blocks' sums, in float64), then the index within that block (the
    running sum of that block alone). For 32 rows of 32,000 this reads the probabilities once (howto/inference.md has
    the times), where one running sum over the whole row, or torch.multinomial's exponential number per index, costs
    several times as much."""
    rows, n = probs.shape
    blocks = -(-n // block)
    if blocks * block != n:
        probs = F.pad(probs, (0, blocks * block - n))  # zeros: an index without probability is never drawn
    grouped = probs.view(rows, blocks, block)
    ends = grouped.sum(-1, dtype=torch.float64).cumsum(-1)  # (B, blocks): where each block's share ends
    uniform = torch.rand(rows, 1, generator=generator, device=probs.device, dtype=ends.dtype) * ends[:, -1:]
    chosen = torch.searchsorted(ends, uniform, right=True).clamp_(max=blocks - 1)  # (B, 1)
    begins = F.pad(ends, (1, 0)).gather(1, chosen)  # where the chosen block's share begins
    inside = grouped.gather(1, chosen[:, :, None].expand(rows, 1, block))[:, 0].double().cumsum(-1)  # (B, block)
    at = torch.searchsorted(inside, uniform - begins, right=True).clamp_(max=block - 1)
    return (chosen * block + at).clamp_(max=n - 1)


def pick(completions: list[Completion], logits: torch.Tensor) -> list[int]:
    """The next token of each completion from its row of logits (B, vocab_size): rows with the same settings and
    generator in one `sample` call (all greedy rows in one argmax), one host sync for each such group."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(completions):
        key = (0.0,) if c.temperature == 0 else (c.temperature, c.top_k, c.top_p, id(c.generator))
        groups.setdefault(key, []).append(i)
    tokens = [0] * len(completions)
    for rows in groups.values():
        c = completions[rows[0]]
        chosen = logits if len(rows) == len(completions) else logits[rows]
        for i, token in zip(rows, sample(chosen, c.temperature, c.top_k, c.top_p, c.generator).tolist()):
            tokens[i] = token
    return tokens


def prefill(model: LLaMA, prompts: list[list[int]], starts: Optional[list[int]] = None) -> torch.Tensor:
    """Feeds the prompts into rows 0..B-1 of the model's KV cache in one forward pass, prompt r at positions
    starts[r], starts[r] + 1, ... (0 by default; chat.py continues a conversation the cache holds), right-padded to
    the longest; a prompt that several rows share is fed once. Returns the logits at each prompt's last token,
    (B, vocab_size)."""
    device = model.embed.weight.device
    first_row = {}  # of each distinct prompt
    for i, prompt in enumerate(prompts):
        first_row.setdefault(tuple(prompt), i)
    if starts is None and len(first_row) < len(prompts):  # GRPO's groups: each prompt fed once, its cache row copied
        rows = list(first_row.values())
        logits = prefill(model, [prompts[i] for i in rows])
        index = torch.tensor([rows.index(first_row[tuple(prompt)]) for prompt in prompts], device=device)
        for block in model.blocks:
            block.attn.kv_cache.repeat_rows(index, max(len(prompt) for prompt in prompts))
        return logits[index]
    starts = starts or [0] * len(prompts)
    lengths = [len(prompt) for prompt in prompts]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    width = max(lengths)
    idx = torch.tensor([prompt + [0] * (width - len(prompt)) for prompt in prompts], device=device)
    if len(set(lengths)) == 1 and len(set(starts)) == 1:  # one set of positions for every row
        input_pos = torch.arange(starts[0], starts[0] + width, device=device)
    else:
        input_pos = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)
    last = torch.arange(width, device=device) == torch.tensor(lengths, device=device)[:, None] - 1  # (B, width)
    with attending(model, max(start + n for start, n in zip(starts, lengths))):
        return model(idx, input_pos, logits_at=last)


@contextmanager
def attending(model: LLaMA, length: Optional[int]) -> Iterator[None]:
    """For the span of an eager forward pass, every layer's KV cache attends over its first `length` positions only
    (model.KVCache.length; a compiled step keeps the whole cache, its shapes fixed). With many rows the keys and values
    are as many bytes as the weights, and are read at every step: a cache sized for the longest answer is read only
    as far as written."""
    caches = [block.attn.kv_cache for block in model.blocks]
    for cache in caches:
        cache.length = length
    try:
        yield
    finally:
        for cache in caches:
            cache.length = None


class Batch:
    """The completions decoding together, one per row of the model's KV cache, each at its own position: `begin`
    takes each new one's first token from its prefill logits, `step` gives every row still going one more token."""

    def __init__(self, model: LLaMA, batch_size: int, step_model: Optional[Callable] = None) -> None:
        self.model, self.device = model, model.embed.weight.device
        self.step_model = model if step_model is None else step_model  # or compile_step's
        self.rows: list[Optional[Completion]] = [None] * batch_size  # None: free, or ended
        self.positions = [0] * batch_size  # where each row's next token goes
        self.last = [0] * batch_size  # each row's newest token, fed at the next step

    def begin(self, rows: list[int], completions: list[Completion], logits: torch.Tensor, positions: list[int]) -> list:
        """Starts each completion in its row, its prompt's last token fed at positions[i] - 1: takes its first token
        from `logits` (len(rows), vocab_size). Returns the (row, token) pairs taken."""
        taken = []
        for row, completion, token, position in zip(rows, completions, pick(completions, logits), positions):
            ended = completion.add(token)
            self.rows[row] = None if ended else completion
            self.positions[row], self.last[row] = position, token
            taken.append((row, token))
        return taken

    @property
    def width(self) -> int:
        """The rows the next step feeds: 0 up to the last one still going."""
        return max((i + 1 for i, c in enumerate(self.rows) if c is not None), default=0)

    def step(self) -> list[tuple[int, int]]:
        """One forward pass over rows 0..width-1 (an ended or free row among them is fed a dummy token at position 0
        of its own row, which whatever starts there next overwrites), and one new token for each row still going.
        Returns the (row, token) pairs taken."""
        n = self.width
        idx = torch.tensor(self.last[:n], device=self.device)[:, None]  # (n, 1)
        input_pos = torch.tensor(self.positions[:n], device=self.device)  # (n,): one row's position, in fewer ops
        input_pos = input_pos[:, None] if n > 1 else input_pos  # (n, 1): each row its own
        eager = self.step_model is self.model
        with attending(self.model, max(self.positions[:n]) + 1 if eager else None):
            logits = self.step_model(idx, input_pos)[:, -1]  # (n, vocab_size)
        going = [i for i in range(n) if self.rows[i] is not None]
        tokens = pick([self.rows[i] for i in going], logits if len(going) == n else logits[going])
        for i, token in zip(going, tokens):
            self.positions[i] += 1
            self.last[i] = token
            if self.rows[i].add(token):
                self.rows[i], self.positions[i], self.last[i] = None, 0, 0
        return list(zip(going, tokens))


def compile_step(model: LLaMA) -> Callable:
    """The model compiled by torch.compile (inductor) for decode steps, to pass to `stream` as its step_model: one
    token per row, static shapes (the whole cache attended, masked), one graph for each batch size and cache length.
    Compiling takes tens of seconds on a small CPU, then each step leaves out most of eager PyTorch's cost per operation
    (the figures: howto/inference.md); prefill stays eager, its shapes change with every prompt."""
    model.rope(model.embed.weight.device)  # built now, the compiled graph never sees it missing
    return torch.compile(model, dynamic=False)


@torch.no_grad()
def stream(
    model: LLaMA,
    completions: list[Completion],
    starts: Optional[list[int]] = None,
    step_model: Optional[Callable] = None,
) -> Iterator[tuple[int, int]]:
    """Decodes the completions together, yielding (index, token) for each new token as it comes. Without `starts`
    the prompts begin at position 0 in a KV cache made for them and freed at the end (it can be as large as the
    weights; for a compiled step_model its length rounded up to a multiple of 64, so that it meets few lengths); with
    `starts`, prompt i continues at position starts[i] in the cache the model has (chat.py's). step_model: what runs
    the steps (compile_step's), by default the model.

    Runs under no_grad, not inference_mode: tensors inference_mode creates (the model's cached rotary tables) could not
    be used by a later training step."""
    if not completions:
        return
    if min(c.max_new_tokens for c in completions) < 1:
        raise ValueError("max_new_tokens must be at least 1")
    firsts = starts or [0] * len(completions)
    ends = [first + len(c.prompt) for first, c in zip(firsts, completions)]  # where each prompt's first new token goes
    if max(end + c.max_new_tokens - 1 for end, c in zip(ends, completions)) >= model.config.block_size:
        raise ValueError(f"a prompt plus its max_new_tokens exceeds the model's block_size {model.config.block_size}")
    if starts is None:
        length = max(ends) + max(c.max_new_tokens for c in completions)
        length = length if step_model is None else -(-length // 64) * 64
        model.set_kv_cache(len(completions), min(length, model.config.block_size))
    try:
        batch = Batch(model, len(completions), step_model)
        logits = prefill(model, [c.prompt for c in completions], starts)
        yield from batch.begin(list(range(len(completions))), completions, logits, ends)
        while batch.width:
            yield from batch.step()
    finally:
        if starts is None:
            model.clear_kv_cache()


def decode_all(model: LLaMA, completions: list[Completion], step_model: Optional[Callable] = None) -> list[Completion]:
    """`stream` to the end: fills every completion's tokens (and text), and returns them."""
    for _ in stream(model, completions, step_model=step_model):
        pass
    return completions


def generate(
    model: LLaMA,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_ids: Collection[int] = (),
    generator: Optional[torch.Generator] = None,
    step_model: Optional[Callable] = None,
) -> torch.Tensor:
    """One prompt `idx` (a 1-D LongTensor) followed by up to `max_new_tokens` new tokens, the last of them one of
    `stop_ids` (the tokenizer's: EOS, end of turn) if it stopped there."""
    if idx.dim() != 1:
        raise ValueError(f"idx must be the prompt's token ids as a 1-D tensor, not of shape {tuple(idx.shape)}")
    completion = Completion(idx.tolist(), max_new_tokens, temperature, top_k, top_p, generator, stop_ids)
    decode_all(model, [completion], step_model)
    return torch.cat([idx, torch.tensor(completion.tokens, dtype=idx.dtype, device=idx.device)])


def printable(ids: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """`ids` without a leading BOS and a final stop token, the text to print: sentencepiece decodes those to nothing,
    a tokenizer.json to their names ("<|begin_of_text|>", "<|eot_id|>")."""
    start = 1 if len(ids) and ids[0].item() == tokenizer.bos_id else 0
    end = len(ids) - 1 if len(ids) > start and ids[-1].item() in tokenizer.stop_ids else len(ids)
    return ids[start:end]


def print_answer(
    model: LLaMA,
    tokenizer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    seed: int,
) -> None:
    """generate_lora.py's and generate_adapter.py's output: the answer to `prompt` on stdout; its speed, a hint if it
    ended at once, and the peak memory on stderr."""
    prompt = prompt.to(model.embed.weight.device)
    generator = torch.Generator(prompt.device).manual_seed(seed)
    t0 = time.perf_counter()
    output = generate(
        model,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        stop_ids=tokenizer.stop_ids,
        generator=generator,
    )
    t = time.perf_counter() - t0
    new = output[len(prompt) :]
    print(tokenizer.decode(printable(new, tokenizer)), flush=True)
    print(f"{len(new)} tokens in {t:.2f} s, {len(new) / t:.2f} tokens/sec", file=sys.stderr)
    if hint := ended_at_once(new.tolist(), tokenizer.stop_ids):
        print(hint, file=sys.stderr)
    print(f"Peak memory: {peak_memory_gb(prompt.device):.2f} GB", file=sys.stderr)


def ended_at_once(new_tokens: list[int], stop_ids: Collection[int]) -> Optional[str]:
    """What to say on stderr when an answer ends before it begins (its first token is a stop token), else None."""
    if not new_tokens or new_tokens[0] not in stop_ids:
        return None
    return (
        "the answer is empty: the model's first token was a stop token. Try sampling (--temperature 0.7), a prompt in "
        "the format the model was tuned on (its chat template, or the Alpaca prompt of a fine-tune), or more context"
    )


def check_inference_model(
    checkpoint_dir: Path, lora_path: Optional[Path], adapter_path: Optional[Path], merge: bool, quantize: Optional[str]
) -> None:
    """load_inference_model's checks of the files and flags, for a script to run before its other slow work: the
    checkpoint, the adapter file (of the right kind, for this base), and which combinations make sense."""
    if lora_path is not None and adapter_path is not None:
        raise ValueError("pass --lora_path (a LoRA adapter) or --adapter_path (a LLaMA-Adapter), not both")
    if quantize is not None:
        check_mode(quantize)
        if adapter_path is not None:
            raise ValueError("--quantize is for LoRA adapters (QLoRA); a LLaMA-Adapter runs on the unquantized base")
        if lora_path is not None and merge:
            raise ValueError(
                f"--quantize {quantize} holds the base in 4 or 8 bits, which would round the merged adapter's small "
                "update away; pass --merge false to apply LoRA on top of the quantized base"
            )
    config = load_config(checkpoint_dir)
    if lora_path is not None:
        check_same_base(read_lora_config(lora_path)[1], config, lora_path)
    if adapter_path is not None:
        adapter_config, adapter_base = read_adapter_config(adapter_path)
        check_same_base(adapter_base, config, adapter_path)
        if merge and (adapter_config.version != 2 or adapter_config.adapter_layers):
            raise ValueError(
                f"{adapter_path} holds prompts (LLaMA-Adapter v{adapter_config.version}, adapter_layers "
                f"{adapter_config.adapter_layers}), which cannot merge into weights: leave out --merge"
            )


def load_inference_model(
    checkpoint_dir: Path,
    lora_path: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    merge: bool = True,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    many_rows: bool = False,
) -> tuple[LLaMA, str]:
    """The model every script that generates, chats, evaluates or serves runs: the base of `checkpoint_dir` on the GPU
    if there is one, in `precision` (by default the device's, utils.default_precision), its projections held in 4 or 8
    bits with `quantize`, plus a LoRA adapter (merged into the weights when `merge`: no cost per token) or a
    LLaMA-Adapter (v2 without prompts merged when `merge`), in eval mode, its projections set for decoding on a CPU:
    one row at a time (utils.split_linears), or, with `many_rows`, several (utils.pack_linears, q, k and v and gate
    and up fused: serving, batched evaluation; not for compile_step). Checks the files and flags first
    (check_inference_model). Returns the model and a line for stderr that says what was loaded, how, and in how long."""
    check_inference_model(checkpoint_dir, lora_path, adapter_path, merge, quantize)
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision_to_dtype(precision or default_precision())
    if lora_path is not None:
        model = load_lora_model(checkpoint_dir, lora_path, device, dtype, merge=merge, quantize=quantize)
        what = f" with {lora_path} ({'merged' if merge else 'not merged'})"
    elif adapter_path is not None:
        adapter_config, _ = read_adapter_config(adapter_path)
        model = load_adapter_model(checkpoint_dir, adapter_path, device, dtype)
        model = merge_adapter_v2(model) if merge else model
        what = (
            f" with {adapter_path} (LLaMA-Adapter v{adapter_config.version}, {adapter_config.adapter_len} prompt "
            f"vectors in the top {adapter_config.adapter_layers} layers, {'merged' if merge else 'not merged'})"
        )
    else:
        model, what = load_model(checkpoint_dir, device, dtype, quantize), ""
    model.eval()
    if device.type == "cpu":
        pack_linears(model, fuse=True) if many_rows else split_linears(model)
    seconds = time.perf_counter() - t0
    return model, f"Loaded {checkpoint_dir}{what} in {seconds:.2f} s ({dtype}, {quantize or 'not quantized'}, {device})"
