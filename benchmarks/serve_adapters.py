"""Many adapters in one batch (batched.py + multilora.py, what serve.py runs) against one request after another and
against PEFT's mixed-adapter batch.

    python benchmarks/serve_adapters.py

The 134M config (n_embd 768, 12 layers, vocab 32000) with the same random base weights everywhere, 16 LoRA adapters
(r 8, alpha 16, query and value, random non-zero A and B), 16 requests of 128 new tokens each after prompts of 16 to 46
random tokens, greedy, every request to its full length (no stop token):

- ours, the 16 requests submitted at once to one BatchGenerator (16 slots), their rows on 1, 4 or 16 distinct
  adapters: throughput (new tokens of all requests / wall time) and the p50 / p99 of the requests' latencies (from the
  submission of all to each one's last token), the median of `repeats` runs taken in turns over the adapter counts;
- ours, the decode step of 16 rows on 16 adapters (the median step once every request is decoding) against the
  machine's bound: every projection's weight read once per step at the memory bandwidth (a large matrix-vector
  product's), or the step's matrix products at the rate of a large matrix product, whichever takes longer (the KV
  cache is not counted: at these lengths it adds about a quarter to the weights' bytes); and the base's projections
  timed alone at 16 rows, what the step would take if nothing else cost anything;
- the same 16 requests one after another as generate_lora.py runs one (its adapter merged into the weights, then
  generate.generate); loading and merging each adapter is not timed, only generation;
- transformers + PEFT with the same 16 adapters loaded, one `generate(..., adapter_names=[...])` call over the 16
  requests left-padded into one batch, 16 distinct adapters (PEFT runs each adapter's rows as a sub-batch).

Targets: 16 distinct adapters at least 0.8x the throughput of 16 rows of one adapter, at least 4x the one after
another, and faster than PEFT's mixed batch (issue 15); the decode step at least 50% of the bound (issue 21). On a GPU
(--device cuda) everything runs in bf16. Other processes on the same cores slow the multi-threaded products far more
than their share: compare figures of one run, on an otherwise idle machine.
"""

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from jsonargparse import CLI

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
sys.path.insert(0, str(Path(__file__).parent))
from lora_vs_peft import build_hf_model, synchronize

from batched import BatchGenerator, Job
from convert_hf_checkpoint import hf_to_lit_name
from decode import Completion, generate
from export_peft import lit_to_peft_name
from lora import LoRALinear, lora, lora_state_dict, merge_lora_weights
from model import Config, LLaMA
from multilora import AdapterStack, Update
from utils import PackedLinear, PackedProjections, pack_linears, split_linears

R, ALPHA, TARGETS = 8, 16, ("query", "value")


def main(
    model_name: str = "134M",
    requests: int = 16,
    new_tokens: int = 128,
    adapter_counts: tuple[int, ...] = (1, 4, 16),
    sequential: bool = True,
    peft: bool = True,
    threads: Optional[int] = None,
    device: str = "cpu",
    repeats: int = 3,
) -> None:
    """Times each way of serving the requests and prints the figures and the ratios.

    Args:
        model_name: a preset of model.Config.
        requests: concurrent requests (and distinct adapters at most).
        new_tokens: tokens each request generates.
        adapter_counts: the numbers of distinct adapters the batch's rows use, ours.
        sequential: also time the requests one after another (the slowest part on a CPU).
        peft: also time transformers + PEFT's mixed-adapter batch.
        threads: CPU threads for PyTorch; by default one per core.
        device: "cpu" (fp32) or "cuda" (bf16).
        repeats: runs of ours per adapter count, in turns; the median run counts.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Config.from_name(model_name)
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"{model_name}: {config.n_layer} layers, n_embd {config.n_embd}; "
        f"{requests} requests x {new_tokens} new tokens, "
        f"{dtype}, {where}, torch {torch.__version__}",
        file=sys.stderr,
    )

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:
        hf_model = build_hf_model(config, device, dtype).eval()
        weights = {hf_to_lit_name(name): t for name, t in hf_model.state_dict().items()}
        with lora(r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS):
            lora_model = LLaMA(config).eval()
        lora_model.load_state_dict(weights, strict=False)
        base = LLaMA(config).eval()
        base.load_state_dict(weights)
    torch.set_default_dtype(default_dtype)
    if device.type == "cpu":  # as generate_lora.py (one row) and serve.py (many) lay the weights out on CPU
        split_linears(lora_model)
        pack_linears(base, fuse=True)
    adapters = [random_adapter(lora_model, seed) for seed in range(requests)]  # {name in lora_state_dict: tensor}
    prompts = [torch.randint(0, config.vocab_size, (16 + 2 * i,)).tolist() for i in range(requests)]
    figures = {}

    stack = AdapterStack(base)
    for i, adapter in enumerate(adapters):
        stack.add(f"a{i}", updates_of(adapter))
    generator = BatchGenerator(base, stack, requests, max(map(len, prompts)) + new_tokens)
    run_batched(generator, prompts[:2], ["a0", "a1"], 4, device)  # warm-up
    runs = {n: [] for n in adapter_counts}
    for _ in range(repeats):  # in turns: a slow minute of a shared machine falls on every count alike
        for n in adapter_counts:
            runs[n].append(run_batched(generator, prompts, [f"a{i % n}" for i in range(requests)], new_tokens, device))
    for n in adapter_counts:
        wall, latencies, _ = sorted(runs[n])[len(runs[n]) // 2]
        figures[f"ours, {n} adapters"] = (wall, latencies)
        report(f"ours, {n} adapters", figures[f"ours, {n} adapters"], requests * new_tokens)
    step = statistics.median(statistics.median(steps) for _, _, steps in runs[max(adapter_counts)])
    bound, why = machine_bound(base, requests, device, dtype)
    alone = projections_alone(base, requests, device, dtype)
    generator.model.clear_kv_cache()

    if sequential:
        latencies, elapsed = [], 0.0
        for prompt, adapter in zip(prompts, adapters):
            lora_model.load_state_dict(adapter, strict=False)  # not timed: what loading the adapter file does
            merge_lora_weights(lora_model)
            synchronize(device)
            t0 = time.perf_counter()
            generate(lora_model, torch.tensor(prompt, device=device), new_tokens, temperature=0.0)
            synchronize(device)
            elapsed += time.perf_counter() - t0
            latencies.append(elapsed)  # each waits for those before it
            for module in lora_model.modules():
                if isinstance(module, LoRALinear):
                    module.unmerge()
        figures["one after another"] = (elapsed, latencies)
        report("one after another (generate_lora.py)", figures["one after another"], requests * new_tokens)

    if peft:
        figures["peft"] = run_peft(hf_model, adapters, prompts, new_tokens, device)
        report(f"transformers + peft, {requests} adapters", figures["peft"], requests * new_tokens)

    throughput = {name: requests * new_tokens / wall for name, (wall, _) in figures.items()}
    most = f"ours, {max(adapter_counts)} adapters"
    print()
    if "ours, 1 adapters" in throughput:
        print(
            f"{most} / ours, 1 adapter:      {throughput[most] / throughput['ours, 1 adapters']:.2f}x  (target >= 0.8x)"
        )
    if sequential:
        print(f"{most} / one after another: {throughput[most] / throughput['one after another']:.2f}x  (target >= 4x)")
    if peft:
        print(f"{most} / transformers + peft: {throughput[most] / throughput['peft']:.2f}x  (target > 1x)")
    print(
        f"decode step, {requests} rows on {max(adapter_counts)} adapters: {step * 1e3:.1f} ms "
        f"({requests / step:.0f} tokens/s); the bound {bound * 1e3:.1f} ms ({why}): {bound / step:.0%} of the bound "
        f"(target >= 50%); the base's projections alone at {requests} rows: {alone[0] * 1e3:.1f} ms as laid out, "
        f"{alone[1] * 1e3:.1f} ms row-major"
    )


def random_adapter(lora_model: LLaMA, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(param.shape, generator=generator) * 0.02).to(param.dtype).to(param.device)
        for name, param in lora_state_dict(lora_model).items()
    }


def updates_of(adapter: dict[str, torch.Tensor]) -> dict:
    """The adapter as multilora.adapter_updates reads it from a file."""
    modules = {name.removesuffix(".lora.A") for name in adapter if name.endswith(".lora.A")}
    return {m: Update(adapter[f"{m}.lora.A"], adapter[f"{m}.lora.B"], ALPHA / R) for m in modules}


def run_batched(
    generator: BatchGenerator, prompts: list[list[int]], names: list[str], new_tokens: int, device: torch.device
) -> tuple[float, list[float], list[float]]:
    """All requests submitted at once, stepped to the end: the wall time, each request's latency, and the time of each
    step after the first (which starts every request: their prompts, then a token each) while all are decoding."""
    done: dict[int, float] = {}
    jobs = [Job(Completion(p, new_tokens), adapter=name) for p, name in zip(prompts, names)]
    for i, job in enumerate(jobs):
        job.on_end = lambda i=i: done.setdefault(i, time.perf_counter())
    synchronize(device)
    t0 = time.perf_counter()
    for job in jobs:
        generator.submit(job)
    steps = []
    while generator.busy():
        start = time.perf_counter()
        generator.step()
        synchronize(device)
        steps.append(time.perf_counter() - start)
    wall = time.perf_counter() - t0
    assert all(len(job.completion.tokens) == new_tokens for job in jobs)
    return wall, [done[i] - t0 for i in range(len(jobs))], steps[1:]


def machine_bound(model: LLaMA, rows: int, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The least time a decode step of `rows` rows can take, and why: every projection's weight read once at the
    memory bandwidth of a large matrix-vector product (393 MB in fp32, in the faster of both layouts, far larger than
    the caches), or 2 x rows x weights operations at the rate of a large matrix product, whichever takes longer."""
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear, PackedProjections))]
    weight_bytes, operations = sum(w.nbytes for w in weights), 2 * rows * sum(w.numel() for w in weights)
    x, big = torch.randn(1, 768, device=device, dtype=dtype), torch.randn(128_000, 768, device=device, dtype=dtype)
    read = min(timed(lambda w=w: F.linear(x, w), device) for w in (big, big.t().contiguous().t()))
    bandwidth = big.nbytes / read
    a, b = (torch.randn(4096, 4096, device=device, dtype=dtype) for _ in range(2))
    rate = 2 * 4096**3 / timed(lambda: a @ b, device)
    bound = max(weight_bytes / bandwidth, operations / rate)
    why = (
        f"{weight_bytes / 1e6:.0f} MB of weights at {bandwidth / 1e9:.1f} GB/s, "
        f"or {operations / 1e9:.1f} GFLOP at {rate / 1e9:.0f} GFLOP/s"
    )
    return bound, why


def projections_alone(model: LLaMA, rows: int, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Seconds the products of `rows` rows with every projection's weight take one after another, nothing else around
    them: with the weights as the model lays them out (packed for oneDNN on a CPU, q, k and v and gate and up fused, as
    serve.py does), and as nn.Linear does (row-major, (out, in))."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear, PackedProjections))]
    inputs = {m.in_features: torch.randn(rows, m.in_features, device=device, dtype=dtype) for m in layers}
    as_laid_out = timed(lambda: [m(inputs[m.in_features]) for m in layers], device)
    weights = [m.weight.contiguous() for m in layers]
    return as_laid_out, timed(lambda: [F.linear(inputs[w.size(1)], w) for w in weights], device)


def timed(run: Callable[[], object], device: torch.device, repeats: int = 7) -> float:
    """The median seconds of `repeats` calls, after one not timed."""
    run()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def run_peft(
    hf_model, adapters: list[dict[str, torch.Tensor]], prompts: list[list[int]], new_tokens: int, device: torch.device
) -> tuple[float, list[float]]:
    from peft import LoraConfig, get_peft_model

    settings = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(hf_model, settings, adapter_name="a0")
    for i in range(1, len(adapters)):
        peft_model.add_adapter(f"a{i}", settings)
    state = peft_model.state_dict()
    for i, adapter in enumerate(adapters):
        for name, tensor in adapter.items():
            state[lit_to_peft_name(name).replace(".weight", f".a{i}.weight")].copy_(tensor)
    peft_model.eval()
    width = max(map(len, prompts))
    pad = 0
    idx = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    names = [f"a{i}" for i in range(len(prompts))]
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, use_cache=True
    )  # the model is built for training steps, without a KV cache
    with torch.no_grad():
        peft_model.generate(
            input_ids=idx[:2, -4:],
            attention_mask=mask[:2, -4:],
            adapter_names=names[:2],
            **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4},
        )  # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        out = peft_model.generate(input_ids=idx, attention_mask=mask, adapter_names=names, **kwargs)
        synchronize(device)
    wall = time.perf_counter() - t0
    assert out.shape[1] == width + new_tokens
    return wall, [wall] * len(prompts)  # every request ends with the batch


def report(name: str, figures: tuple[float, list[float]], n_tokens: int) -> None:
    wall, latencies = figures
    p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98] if len(latencies) > 1 else latencies[0]
    print(
        f"  {name:40s} {n_tokens / wall:8.1f} tokens/s   latency p50 {statistics.median(latencies):6.2f} s   "
        f"p99 {p99:6.2f} s",
        flush=True,
    )


if __name__ == "__main__":
    CLI(main)
