"""Generates text from a converted checkpoint.

    python generate.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --prompt "Hello, my name is"

Prints each sample (prompt and continuation) to stdout, and the load time, tokens/sec and peak memory to
stderr. The decoding itself is decode.py's, which every script that generates shares.
"""

import sys
import time
from pathlib import Path
from typing import Optional

import torch

from decode import check_sampling, compile_step, ended_at_once, generate, load_inference_model, printable
from tokenizer import Tokenizer
from utils import cli, load_config, peak_memory_gb


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    prompt: str = "Hello, my name is",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
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
        top_p: sample only among the most likely tokens whose probabilities add up to top_p (nucleus sampling);
            1 keeps them all.
        num_samples: how many continuations to generate, one after another.
        seed: random seed, so that a command line gives the same text every time.
        precision: "bf16-true", "16-true" or "32-true"; by default bf16-true on GPUs that support it and
            32-true elsewhere (CPUs without bf16 instructions process prompts several times slower in bf16).
        quantize: hold the weights of every projection in 4 bits ("bnb.nf4", "bnb.fp4"; "-dq" quantizes their scales
            too) or 8 bits ("bnb.int8") with bitsandbytes, quantized one layer at a time while loading: a fraction of
            the memory, slightly less accurate (see howto/quantize.md).
        compile: compile the decode step with torch.compile (decode.compile_step): tens of seconds on a small CPU
            before the first token, then faster steps; it pays for long answers or many samples (howto/inference.md).
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    config = load_config(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    encoded = tokenizer.encode(prompt)
    if len(encoded) + max_new_tokens > config.block_size:
        raise ValueError(
            f"the prompt ({len(encoded)} tokens) plus --max_new_tokens {max_new_tokens} exceeds the model's "
            f"block_size {config.block_size}; shorten the prompt or lower --max_new_tokens"
        )

    model, loaded = load_inference_model(checkpoint_dir, quantize=quantize, precision=precision)
    print(loaded, file=sys.stderr)
    step_model = compile_step(model) if compile else None

    encoded = encoded.to(model.embed.weight.device)
    generator = torch.Generator(encoded.device).manual_seed(seed)
    for i in range(num_samples):
        t0 = time.perf_counter()
        y = generate(
            model,
            encoded,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_ids=tokenizer.stop_ids,
            generator=generator,
            step_model=step_model,
        )
        t = time.perf_counter() - t0
        print(tokenizer.decode(printable(y, tokenizer)), flush=True)
        n_new = len(y) - len(encoded)
        compiling = " (including torch.compile's compilation)" if compile and i == 0 else ""
        print(f"Sample {i + 1}: {n_new} tokens in {t:.2f} s, {n_new / t:.2f} tokens/sec{compiling}", file=sys.stderr)
        if hint := ended_at_once(y[len(encoded) :].tolist(), tokenizer.stop_ids):
            print(hint, file=sys.stderr)
    print(f"Peak memory: {peak_memory_gb(encoded.device):.2f} GB", file=sys.stderr)


if __name__ == "__main__":
    cli(main)
