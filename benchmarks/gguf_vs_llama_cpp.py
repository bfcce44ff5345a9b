"""How closely llama.cpp runs the GGUF files of scripts/export_gguf.py: for each --dtype, greedy tokens and prompt
logits of llama.cpp (through llama-cpp-python: pip install -r requirements-llamacpp.txt) beside ours (model.py, fp32).

    python benchmarks/gguf_vs_llama_cpp.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        [--lora_path out/lora/alpaca/lit_model_lora_finetuned.safetensors] \
        [--reference_gguf SmolLM2-135M-Instruct.Q4_1.gguf]

Each question is put in the checkpoint's chat template (if it has one); both sides decode `new_tokens` greedy tokens
without stopping at the end of the turn. Printed per file and llama.cpp KV-cache type (f32, and llama.cpp's default
f16): how many of the new tokens equal ours before the first difference (one figure per question), and the largest
difference of the logits over the prompts. `--reference_gguf` runs another GGUF file of the same model the same way
(e.g. one written by llama.cpp's own converter) as a point of comparison for the quantized types.
"""

import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from decode import generate  # noqa: E402
from export_gguf import export_gguf  # noqa: E402  after the path is set
from lora import load_lora_model  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from utils import load_model  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in a few sentences why the sky is blue.",
]
KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    lora_path: Optional[Path] = None,
    dtypes: list[str] = ["f32", "f16", "bf16", "q8_0"],
    new_tokens: int = 32,
    reference_gguf: Optional[Path] = None,
) -> None:
    """
    Args:
        checkpoint_dir: a converted checkpoint directory with a chat template.
        lora_path: an adapter for it, merged on both sides (export_gguf.py --lora_path; lora.load_lora_model).
        dtypes: the export_gguf.py --dtype values to measure.
        new_tokens: greedy tokens per question.
        reference_gguf: another GGUF file of the same model to run the same way.
    """
    from llama_cpp import Llama

    tokenizer = Tokenizer(checkpoint_dir)
    model = load_lora_model(checkpoint_dir, lora_path, merge=True) if lora_path else load_model(checkpoint_dir)
    model.eval()
    if tokenizer.chat_template is not None:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            for q in QUESTIONS
        ]
    else:  # a base model: the questions as they are
        texts = QUESTIONS
    prompts = [tokenizer.encode(text).tolist() for text in texts]
    ours = []
    with torch.no_grad():
        for ids in prompts:
            tokens = generate(model, torch.tensor(ids), new_tokens, temperature=0.0).tolist()[len(ids) :]
            ours.append((tokens, model(torch.tensor([ids]))[0].numpy()))
    adapter = f" + {lora_path}" if lora_path else ""
    print(f"{checkpoint_dir}{adapter}: {len(QUESTIONS)} questions, {new_tokens} greedy tokens each")
    print(f"ours, first answer: {tokenizer.decode(ours[0][0])!r}")
    print("| file | KV cache | tokens equal to ours, per question | max logit difference |\n|---|---|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for dtype in dtypes:
            files[dtype] = Path(tmp) / f"{dtype}.gguf"
            export_gguf(checkpoint_dir, files[dtype], dtype=dtype, lora_path=lora_path)
        if reference_gguf is not None:
            files[f"reference {Path(reference_gguf).name}"] = Path(reference_gguf)
        for label, path in files.items():
            for kv, kv_type in KV_TYPES.items():
                llm = Llama(
                    str(path),
                    n_ctx=512,
                    n_threads=torch.get_num_threads(),
                    logits_all=True,
                    verbose=False,
                    type_k=kv_type,
                    type_v=kv_type,
                )
                agree, worst = [], 0.0
                for ids, (expected, expected_logits) in zip(prompts, ours):
                    llm.reset()
                    llm.eval(ids)
                    worst = max(worst, float(np.abs(np.array(llm.scores[: len(ids)]) - expected_logits).max()))
                    tokens = []
                    for _ in range(new_tokens):
                        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                        llm.eval([tokens[-1]])
                    agree.append(next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), new_tokens))
                print(f"| {label} | {kv} | {', '.join(f'{a}/{new_tokens}' for a in agree)} | {worst:.2g} |")
                del llm


if __name__ == "__main__":
    CLI(main)
