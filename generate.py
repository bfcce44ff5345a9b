"""Generates text from a converted checkpoint.

    python generate.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --prompt "Hello, my name is"

Prints each sample (prompt and continuation) to stdout, and the load time, tokens/sec and peak memory to
stderr. `generate()` is the decoding loop every other script imports (generate_lora.py, fine-tuning); it runs
`generate_tokens()`, which yields the tokens one at a time, as chat.py prints them.
"""

import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from model import LLaMA
from tokenizer import Tokenizer
from utils import (
    cli,
    default_precision,
    load_config,
    load_model,
    peak_memory_gb,
    precision_to_dtype,
    use_cpu_decode_layout,
)


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    prompt: str = "Hello, my name is",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    num_samples: int = 1,
    seed: int = 1234,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
) -> None:
    """Generates `num_samples` continuations of a prompt with a converted checkpoint.

    Args:
        checkpoint_dir: directory with lit_model.safetensors, model_config.json and tokenizer.model or
            tokenizer.json (see howto/download_weights.md).
        prompt: text to continue; it is encoded with a leading BOS token when the tokenizer adds one.
        max_new_tokens: how many tokens to generate at most; generation also stops at the EOS token (or another
            stop token of the checkpoint's generation_config.json, such as Llama 3's <|eot_id|>).
        temperature: 0 picks the most likely token every step (greedy); higher values sample more freely.
        top_k: sample only among the k most likely tokens; null samples from the whole vocabulary.
        num_samples: how many continuations to generate, one after another.
        seed: random seed, so that a command line gives the same text every time.
        precision: "bf16-true", "16-true" or "32-true"; by default bf16-true on GPUs that support it and
            32-true elsewhere (CPUs without bf16 instructions process prompts several times slower in bf16).
        quantize: hold the weights of every projection in 4 bits ("bnb.nf4", "bnb.fp4"; "-dq" quantizes their scales
            too) or 8 bits ("bnb.int8") with bitsandbytes, quantized one layer at a time while loading: a fraction of
            the memory, slightly less accurate (see howto/quantize.md).
        compile: run the model through torch.compile: about 30 s to start on a small CPU (and again the first
            time the prompt length changes), then faster decoding (1.16x measured on CPU; howto/inference.md).
    """
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"--temperature must be >= 0 and --top_k >= 1 (or null), not {temperature} and {top_k}")
    config = load_config(checkpoint_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision_to_dtype(precision or default_precision())
    tokenizer = Tokenizer(checkpoint_dir)
    encoded = tokenizer.encode(prompt).to(device)
    if len(encoded) + max_new_tokens > config.block_size:
        raise ValueError(
            f"the prompt ({len(encoded)} tokens) plus --max_new_tokens {max_new_tokens} exceeds the model's "
            f"block_size {config.block_size}; shorten the prompt or lower --max_new_tokens"
        )

    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize).eval()
    if device.type == "cpu":
        use_cpu_decode_layout(model)
    if compile:
        model.rope(device)  # built now, the compiled graphs never see it missing: one compilation less
        model = torch.compile(model)
    print(
        f"Loaded {checkpoint_dir} in {time.perf_counter() - t0:.2f} s "
        f"({dtype}, {quantize or 'not quantized'}, {device})",
        file=sys.stderr,
    )

    torch.manual_seed(seed)
    for i in range(num_samples):
        t0 = time.perf_counter()
        y = generate(model, encoded, max_new_tokens, temperature=temperature, top_k=top_k, stop_ids=tokenizer.stop_ids)
        t = time.perf_counter() - t0
        print(tokenizer.decode(printable(y, tokenizer)), flush=True)
        n_new = len(y) - len(encoded)
        compiling = " (including torch.compile's compilation)" if compile and i == 0 else ""
        print(f"Sample {i + 1}: {n_new} tokens in {t:.2f} s, {n_new / t:.2f} tokens/sec{compiling}", file=sys.stderr)
    print(f"Peak memory: {peak_memory_gb(device):.2f} GB", file=sys.stderr)


@torch.no_grad()
def generate(
    model: LLaMA,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    stop_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Appends up to `max_new_tokens` tokens to the prompt `idx` (a 1-D LongTensor) and returns prompt and
    new tokens together, stopping after any of `stop_ids` (the tokenizer's `stop_ids`: EOS, end of turn). The
    prompt is processed in one pass that fills the KV cache, then every step feeds only the newest token.

    Runs under no_grad, not inference_mode: inference_mode measured no faster here, and tensors it creates
    (the model's cached rotary tables) could not be used by a later training step.
    """
    if idx.dim() != 1:
        raise ValueError(f"idx must be the prompt's token ids as a 1-D tensor, not of shape {tuple(idx.shape)}")
    T = idx.size(0)
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds block_size {model.config.block_size}"
        )
    model.set_kv_cache(batch_size=1, max_seq_length=T + max_new_tokens)
    try:
        new = list(
            generate_tokens(
                model,
                idx,
                torch.arange(T, device=idx.device),
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                stop_ids=stop_ids,
            )
        )
    finally:
        model.clear_kv_cache()  # the cache can be as large as the weights: free it for the caller
    return torch.cat([idx, *new])


@torch.no_grad()
def generate_tokens(
    model: LLaMA,
    x: torch.Tensor,
    input_pos: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[torch.Tensor]:
    """The decoding loop: feeds the tokens `x` (T,) at positions `input_pos` (T,) into the model's KV cache (allocated
    by the caller, holding whatever came before input_pos[0]), then yields up to `max_new_tokens` new tokens, each of
    shape (1,), feeding each one back, and stops after yielding one of `stop_ids`. The last token yielded is not fed
    into the cache. generate() runs it over a whole prompt; chat.py over the new part of a conversation, as it comes.
    """
    for _ in range(max_new_tokens):
        logits = model(x.view(1, -1), input_pos)[0, -1]  # (vocab_size,): only the last position predicts the next token
        next_token = sample(logits, temperature, top_k)  # (1,)
        yield next_token
        if stop_ids and next_token.item() in stop_ids:  # a host sync per token, only to look for a stop token
            return
        x, input_pos = next_token, input_pos[-1:] + 1


def printable(ids: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """`ids` without a leading BOS and a final stop token, the text to print: sentencepiece decodes those to nothing,
    a tokenizer.json to their names ("<|begin_of_text|>", "<|eot_id|>")."""
    start = 1 if len(ids) and ids[0].item() == tokenizer.bos_id else 0
    end = len(ids) - 1 if len(ids) > start and ids[-1].item() in tokenizer.stop_ids else len(ids)
    return ids[start:end]


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One token id, shape (1,), from the logits (vocab_size,) of the last position. top_p < 1 draws from the most
    likely tokens whose probabilities add up to top_p (nucleus sampling; serve.py's requests ask for it); `generator`
    draws from a request's own random numbers (serve.py's `seed`) instead of torch's global ones."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        # softmax and draw among the k best only: cheaper than masking the other vocab_size - k logits
        logits, candidates = torch.topk(logits, min(top_k, logits.size(-1)))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        # keep each token whose more likely predecessors add up to less than top_p: the most likely one always
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter_(-1, order[keep], sorted_probs[keep])  # multinomial renormalises
    choice = torch.multinomial(probs, num_samples=1, generator=generator)
    return candidates[choice] if top_k is not None else choice


if __name__ == "__main__":
    cli(main)
