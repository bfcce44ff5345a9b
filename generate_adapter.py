"""Answers an instruction with a base checkpoint and a LLaMA-Adapter (v1 or v2) from finetune_adapter.py.

    python generate_adapter.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --adapter_path out/adapter/alpaca/lit_model_adapter_finetuned.safetensors --prompt "What do llamas eat?"

Wraps the instruction (and --input) in the prompt the adapter was trained with: the Alpaca template
(prepare_alpaca.py), or, for an adapter trained on conversations (prepare_chat.py), a one-turn conversation in the
chat template recorded in the adapter, followed by the assistant header. It reads the version, the prompt length and
the adapted layers from the adapter itself. The learned prompts stay separate from the weights (they cannot merge, see
adapter.py): each adapted layer attends to its prompt's keys and values, computed once for the whole answer. Prints
only the response to stdout; load time, tokens/sec and peak memory go to stderr. For a LoRA adapter, use
generate_lora.py.
"""

import sys
from pathlib import Path
from typing import Optional

from adapter import read_adapter_chat_template
from data import encode_prompt
from decode import check_sampling, load_inference_model, print_answer
from tokenizer import Tokenizer
from utils import cli, load_config


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    adapter_path: Path = Path("out/adapter/alpaca/lit_model_adapter_finetuned.safetensors"),
    prompt: str = "What food do llamas eat?",
    input: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    seed: int = 1234,
    precision: Optional[str] = None,
) -> None:
    """Generates the response of the fine-tuned model to an instruction.

    Args:
        checkpoint_dir: the base checkpoint the adapter was trained on (lit_model.safetensors, model_config.json,
            tokenizer.model or tokenizer.json).
        adapter_path: the LLaMA-Adapter written by finetune_adapter.py; its settings are read from it.
        prompt: the instruction, put into the Alpaca template, or the adapter's chat template, as in training.
        input: optional context for the instruction (the template's "### Input:" section).
        max_new_tokens: how many tokens to generate at most; generation also stops at the EOS token (or another
            stop token of the checkpoint's generation_config.json, such as Llama 3's <|eot_id|>).
        temperature: 0 picks the most likely token every step (greedy); higher values sample more freely.
        top_k: sample only among the k most likely tokens; None samples from the whole vocabulary.
        seed: random seed, so that a command line gives the same text every time.
        precision: "bf16-true", "16-true" or "32-true"; by default bf16-true on GPUs that support it and
            32-true elsewhere (on CPUs bf16 matrix products are often hundreds of times slower).
    """
    check_sampling(temperature, top_k, None, max_new_tokens)
    config = load_config(checkpoint_dir)
    chat_template = read_adapter_chat_template(adapter_path)  # a missing or foreign file stops here
    tokenizer = Tokenizer(checkpoint_dir)
    encoded = encode_prompt(tokenizer, {"instruction": prompt, "input": input}, chat_template)
    if len(encoded) + max_new_tokens > config.block_size:
        raise ValueError(
            f"the prompt ({len(encoded)} tokens with the template) plus --max_new_tokens {max_new_tokens} "
            f"exceeds the model's block_size {config.block_size}; shorten the prompt or lower --max_new_tokens"
        )
    model, loaded = load_inference_model(checkpoint_dir, adapter_path=adapter_path, merge=False, precision=precision)
    print(loaded, file=sys.stderr)

    print_answer(model, tokenizer, encoded, max_new_tokens, temperature, top_k, seed)


if __name__ == "__main__":
    cli(main)
