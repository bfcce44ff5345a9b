"""LoRA and DoRA training steps: ours vs Hugging Face transformers + PEFT (and transformers + Liger Kernel + PEFT where
installed), QLoRA's peak memory, and merged-model generation speed.

    python benchmarks/lora_vs_peft.py --device cuda     # Llama-2-7b-hf and Llama-3.1-8B configs, bf16-mixed
    python benchmarks/lora_vs_peft.py                   # CPU: the 134M config, fp32
    python benchmarks/lora_vs_peft.py --models '[tiny]' --steps 2 --memory false  # the code path in a minute
    python benchmarks/lora_vs_peft.py --targets '[query+value]' --steps 3 --new_tokens 0 --threads 1  # CPU, with DoRA

Every model has random weights (the same in ours and transformers') and LoRA r=8, alpha 16, dropout 0.05 on query
and value, then on every projection but the head (all_linear). A step is finetune_lora.py's: one micro-batch of 4
records packed into one row without padding, forward, backward, AdamW; ours computes the loss as finetune_lora.py does
(the output head only where there is a target), transformers + PEFT over all the logits of the same packed row (its
`position_ids` restart at each record, and with no attention mask transformers then keeps the records apart too).
The records are random tokens with Alpaca's lengths (ALPACA_LENGTHS) up to 512, the first 27% of each masked as
its prompt. For each: the time per step over the same micro-batches, tokens per second, model FLOP utilisation
(MFU: the step's matrix-product FLOPs, forward and backward through the activations, over a bf16 (CUDA) or fp32
(CPU) matrix product's measured rate) and the peak memory (CUDA: allocated by this implementation, weights
included; CPU: the step's peak resident memory (VmHWM, reset through /proc/self/clear_refs after handing freed heap
memory back) over the resident memory before it, the model, its optimizer state and gradient buffers already in
place). The first losses of ours and PEFT are printed side by side: the same weights, so they must agree.

Then, on the targets of `dora_targets` (query+value by default), the same for DoRA (Liu et al. 2024: a learned
magnitude per output row; PEFT's use_dora=True) on both sides, eager: ours against PEFT's, and our DoRA step against
our LoRA step on the same targets.

On a GPU (--device cuda) as finetune_lora.py's bf16-mixed trains: the frozen base in bf16, LoRA's A and B in fp32,
under bf16 autocast, on both sides (PEFT keeps its adapters in fp32 itself), ours also with --train.compile's
compiled Blocks. Then our step's peak memory at full-length records (4 x 512 with the base in bf16, 1 x 512 with
it in bnb.nf4-dq: QLoRA), with and without gradient checkpointing. benchmarks/gpu_check.sh runs this with the
GPU tests.
"""

import ctypes
import gc
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
sys.path.insert(0, str(Path(__file__).parent))
from memory import max_rss_mb

from convert_hf_checkpoint import hf_to_lit_name
from decode import generate
from export_peft import lit_to_peft_name
from lora import TARGETS, LoRAConfig, LoRALinear, lora, mark_only_lora_as_trainable, merge_lora_weights
from losses import cross_entropy_sum, pack_batch
from model import Config, LLaMA
from quantize import quantize_weight, quantized_layers, swap_in_layers
from training import learning_rate
from utils import cli

# Token lengths of the 999 records of ../shared/data/alpaca_en_demo.json (prepare_alpaca.tokenize, the LLaMA
# tokenizer, cut at 512), counted in bins of 32 tokens: 0-31, 32-63, ..., 480-512 (54 of the last 79 were cut).
# Median 188 tokens, mean 229; their prompts (masked) are 27% of the tokens.
ALPACA_LENGTHS = (0, 33, 202, 121, 79, 73, 71, 49, 45, 41, 48, 37, 48, 39, 34, 79)
PROMPT_SHARE = 0.27
# the --targets this benchmark times, as LoRAConfig's targets (keys of lora.TARGETS or lora.SHORTHANDS)
TARGET_SETS = {"query+value": ("query", "value"), "all_linear": ("all_linear",)}


def main(
    models: Optional[list[str]] = None,
    targets: list[str] = ["query+value", "all_linear"],
    dora_targets: list[str] = ["query+value"],
    micro_batch_size: int = 4,
    max_seq_length: int = 512,
    steps: int = 10,
    device: str = "cpu",
    compile: Optional[bool] = None,
    memory: Optional[bool] = None,
    new_tokens: Optional[int] = None,
    threads: Optional[int] = None,
) -> None:
    """Times training steps and prints each figure and the ratios.

    Args:
        models: presets of model.Config; by default Llama-2-7b-hf and Llama-3.1-8B on CUDA, 134M on CPU.
        targets: LoRA targets to time, some of "query+value" and "all_linear".
        dora_targets: those of `targets` to time DoRA on too (ours and PEFT's use_dora, eager), [] for none.
        micro_batch_size: records packed into each step's row.
        max_seq_length: records are cut to this many tokens.
        steps: timed steps per implementation, each on another micro-batch (the same ones for all), after one
            warm-up step (with `compile`: the compilation, whose time is printed).
        device: "cpu" (fp32), or "cuda": the base in bf16 and LoRA in fp32 under bf16 autocast (bf16-mixed).
        compile: also time ours with each Block compiled (finetune_lora.py --train.compile); by default on CUDA only.
        memory: also measure our step's peak memory at full-length records, a target at every position: micro_batch_size
            x max_seq_length with the base in bf16, and QLoRA (bnb.nf4-dq) at 1 x max_seq_length, each with and
            without gradient checkpointing; by default on CUDA only.
        new_tokens: tokens generated greedily from a merged adapter and from the base model (batch 1, after a 16-token
            prompt), 0 for none; by default 100 on CPU and 0 on CUDA, where batch-1 decoding is bound by the host.
        threads: CPU threads for PyTorch; by default one per core. On a machine shared with other jobs,
            1 thread gives steadier figures (waiting threads of a busy machine slow every operation).
    """
    unknown = [name for name in {*targets, *dora_targets} if name not in TARGET_SETS]
    if unknown:
        raise ValueError(f"--targets and --dora_targets must be some of {list(TARGET_SETS)}, not {unknown}")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    cuda = device.type == "cuda"
    models = models or (["Llama-2-7b-hf", "Llama-3.1-8B"] if cuda else ["134M"])
    compile = cuda if compile is None else compile
    memory = cuda if memory is None else memory
    new_tokens = (0 if cuda else 100) if new_tokens is None else new_tokens
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    import peft
    import transformers

    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    peak_rate = matmul_rate(device, dtype)
    print(
        f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"{'bf16-mixed' if cuda else 'fp32'}; a {dtype} matrix product (measured): {peak_rate / 1e9:,.0f} GFLOP/s"
    )
    liger = liger_kernel_version()
    if liger is None:
        print("liger_kernel is not installed: no transformers + Liger row")

    for name in models:
        config = Config.from_name(name)
        max_length = min(max_seq_length, config.block_size)
        batches = alpaca_micro_batches(steps + 1, micro_batch_size, max_length, config.vocab_size)
        tokens = sum(ids.numel() for ids, _, _ in batches[1:])
        flops = sum(step_flops(config, lengths) for _, _, lengths in batches[1:])
        print(
            f"\n{name}: {config.n_layer} layers, n_embd {config.n_embd}, vocab {config.vocab_size}; micro-batches of "
            f"{micro_batch_size} Alpaca-length records packed into one row ({tokens / steps:.0f} tokens a step on "
            f"average, at most {max_length} a record), {steps} steps after a warm-up"
        )
        for target_name in targets:
            lora_config = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=TARGET_SETS[target_name])
            results, first_losses = {}, {}
            peft_model = build_peft_model(config, lora_config, device, dtype)
            ours = build_ours(peft_model, config, lora_config, device, dtype)  # the same weights, before any step
            results["transformers + peft"], first_losses["transformers + peft"] = time_steps(
                peft_model, hf_loss(peft_model), batches, device, autocast
            )
            del peft_model
            free_memory(device)
            results["ours"], first_losses["ours"] = time_steps(ours, ours_loss(ours), batches, device, autocast)
            if compile:
                for block in ours.blocks:
                    block.compile(dynamic=True)
                results["ours, compiled Blocks"], _ = time_steps(ours, ours_loss(ours), batches, device, autocast)
            del ours
            free_memory(device)
            if liger:
                try:
                    with liger_patched():
                        liger_model = build_peft_model(config, lora_config, device, dtype, liger=True)
                        results["transformers + liger + peft"], _ = time_steps(
                            liger_model, hf_loss(liger_model, liger=True), batches, device, autocast
                        )
                        del liger_model
                except Exception as e:  # Liger's kernels are young: a failure there should not lose the other rows
                    print(f"  transformers + liger + peft failed: {type(e).__name__}: {str(e)[:300]}")
                free_memory(device)
            if target_name in dora_targets:  # eager only: DoRA's extra cost as a fine-tuning step pays it by default
                dora_config = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=TARGET_SETS[target_name], dora=True)
                peft_model = build_peft_model(config, dora_config, device, dtype)
                ours = build_ours(peft_model, config, dora_config, device, dtype)
                results["transformers + peft, DoRA"], first_losses["transformers + peft, DoRA"] = time_steps(
                    peft_model, hf_loss(peft_model), batches, device, autocast
                )
                del peft_model
                free_memory(device)
                results["ours, DoRA"], first_losses["ours, DoRA"] = time_steps(
                    ours, ours_loss(ours), batches, device, autocast
                )
                del ours
                free_memory(device)
            print(
                f"  LoRA on {target_name}; first step's loss: "
                + ", ".join(f"{impl} {loss:.5f}" for impl, loss in first_losses.items())
            )
            report(results, tokens, flops, steps, peak_rate, cuda)
        if memory:
            memory_figures(config, micro_batch_size, max_length, device)

    if new_tokens:
        generation_speed(Config.from_name(models[0]), new_tokens, device, dtype, autocast)


def alpaca_micro_batches(
    n: int, micro_batch_size: int, max_seq_length: int, vocab_size: int
) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """`n` micro-batches of random-token records with lengths drawn from ALPACA_LENGTHS (a bin, then a length within
    it), the first PROMPT_SHARE of each masked out of the labels, packed by training.pack_batch. Seeded: the same on
    every run and machine."""
    generator = torch.Generator().manual_seed(0)
    bins = torch.multinomial(
        torch.tensor(ALPACA_LENGTHS, dtype=torch.float), n * micro_batch_size, replacement=True, generator=generator
    )
    batches = []
    for i in range(n):
        records = []
        for b in bins[i * micro_batch_size : (i + 1) * micro_batch_size].tolist():
            length = min(32 * b + int(torch.randint(0, 32, (1,), generator=generator)) + 2, max_seq_length + 1)
            ids = torch.randint(3, vocab_size, (length,), generator=generator)
            labels = ids.clone()
            labels[: max(1, round(PROMPT_SHARE * length))] = -100
            records.append({"input_ids": ids, "labels": labels})
        batches.append(pack_batch(records, max_seq_length + 1))
    return batches


def step_flops(config: Config, lengths: list[int]) -> float:
    """The model FLOPs of one LoRA step on packed records of `lengths`: every matrix product of the frozen base
    (the head at every position), forward (2 per weight and token) and backward through the activations only (2
    more: no weight gradients), and causal attention within each record (forward 2·T²·n_embd per layer, backward
    twice that). LoRA's own products (under 1% at r=8) and the recomputation of checkpointing are not counted."""
    C, kv = config.n_embd, config.n_query_groups * config.head_size
    weights = config.n_layer * (2 * C * C + 2 * C * kv + 3 * C * config.intermediate_size) + C * config.vocab_size
    attention = 6 * sum(T * T for T in lengths) * C * config.n_layer
    return 4 * weights * sum(lengths) + attention


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the best of 10 square matrix products in `dtype`: 8192 on a GPU, 1024 on a CPU."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(11):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times[1:])


def build_peft_model(
    config: Config, lora_config: LoRAConfig, device: torch.device, dtype: torch.dtype, liger: bool = False
) -> torch.nn.Module:
    """`build_hf_model` with PEFT's LoRA (DoRA with `lora_config.dora`) on the projections `lora_config` names."""
    from peft import LoraConfig, get_peft_model

    model = build_hf_model(config, device, dtype, liger)
    modules = [TARGETS[target] for target in lora_config.targets]  # LoRAConfig has spelled shorthands out
    return get_peft_model(
        model,
        LoraConfig(
            r=lora_config.r,
            lora_alpha=lora_config.alpha,
            lora_dropout=lora_config.dropout,
            target_modules=modules,
            use_dora=lora_config.dora,
        ),
    )


def build_hf_model(config: Config, device: torch.device, dtype: torch.dtype, liger: bool = False) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with random weights (seeded: the same every time), in `dtype` on `device`; with
    `liger`, Liger Kernel's RMSNorm, rotary, SwiGLU and fused head + cross-entropy patched in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": config.rope_base}
    if config.rope_scaling:
        rope = {**rope, "rope_type": "llama3", **config.rope_scaling}
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings,
        attn_implementation="sdpa",
        use_cache=False,
    )
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place in its dtype: a 7B model in fp32 would not fit beside others
    try:
        with device:
            model = LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    return model


def build_ours(
    peft_model: torch.nn.Module, config: Config, lora_config: LoRAConfig, device: torch.device, dtype: torch.dtype
) -> LLaMA:
    """Our LLaMA with LoRA on the same projections, holding the weights of `peft_model` (base and LoRA alike, DoRA's
    magnitude too), the base in `dtype` and LoRA's A and B (and magnitude) in fp32, as finetune_lora.py holds them
    (PEFT does the same with its own)."""
    with torch.device("meta"), lora(**vars(lora_config)):
        model = LLaMA(config)
    peft_state = peft_model.state_dict()
    state = {}
    for name, tensor in peft_state.items():
        if ".lora_" not in name:
            state[hf_to_lit_name(name.removeprefix("base_model.model.").replace(".base_layer", ""))] = tensor.clone()
    for name, _param in model.named_parameters():
        if ".lora." in name:
            peft_name = lit_to_peft_name(name).replace(".weight", ".default.weight")
            peft_name = peft_name.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
            state[name] = peft_state[peft_name].float().clone()
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    mark_only_lora_as_trainable(model)
    return model.to(device)


def ours_loss(model: LLaMA) -> Callable:
    """The fine-tuning scripts' loss: logits only where there is a target, their summed cross-entropy."""

    def loss(input_ids: torch.Tensor, targets: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        where = targets != -100
        return cross_entropy_sum(model(input_ids, lengths=lengths, logits_at=where), targets[where])

    return loss


def hf_loss(model: torch.nn.Module, liger: bool = False) -> Callable:
    """The summed loss of transformers' model on a packed row: `position_ids` restart at each record. With Liger,
    through its fused head + cross-entropy (given the already shifted targets); else over all the logits."""

    def loss(input_ids: torch.Tensor, targets: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        positions = torch.cat([torch.arange(n, device=input_ids.device) for n in lengths])[None]
        if liger:
            n_targets = int((targets != -100).sum())
            return model(input_ids=input_ids, position_ids=positions, shift_labels=targets).loss * n_targets
        logits = model(input_ids=input_ids, position_ids=positions).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")

    return loss


def time_steps(
    model: torch.nn.Module,
    loss_of: Callable,
    batches: list,
    device: torch.device,
    autocast,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    warmup_steps: Optional[int] = None,
) -> tuple[dict, float]:
    """A warm-up step on batches[0], then one timed step on each of the rest: forward, backward, AdamW (`lr`,
    `weight_decay`; with `warmup_steps`, the fine-tuning scripts' schedule over these steps, training.learning_rate), as
    a fine-tuning script takes them (the loss divided by the number of targets). Returns the figures (the time of each
    step, wall and this process's CPU time, and the peak memory as the module docstring says) and the first step's
    loss."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    if device.type == "cuda":  # its own weights, and all its steps allocate (not other models' weights)
        free_memory(device)
        own = sum(t.numel() * t.element_size() for t in {*model.parameters(), *model.buffers()})
        others = torch.cuda.memory_allocated(device) - own
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times, first_loss, cpu_peaks = [], [], None, []
    for step, (input_ids, targets, lengths) in enumerate(batches):
        input_ids, targets = input_ids.to(device), targets.to(device)
        if warmup_steps is not None:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, lr, warmup_steps, len(batches))
        if device.type == "cpu":
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory back to the system, so that reusing it shows
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            rss_before = max_rss_mb("VmRSS")
        synchronize(device)
        t0, cpu0 = time.perf_counter(), time.process_time()
        with autocast:
            loss = loss_of(input_ids, targets, lengths) / (targets != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - cpu0)
        if device.type == "cpu":
            cpu_peaks.append((max_rss_mb("VmHWM") - rss_before) / 1e3)
        first_loss = loss.item() if first_loss is None else first_loss
    # CUDA: this model's weights and all its steps allocate; CPU: the most a timed step took over what it found
    peak = (torch.cuda.max_memory_allocated(device) - others) / 1e9 if device.type == "cuda" else max(cpu_peaks[1:])
    return {"first": times[0], "times": times[1:], "cpu_times": cpu_times[1:], "peak_gb": peak}, first_loss


def report(results: dict, tokens: int, flops: float, steps: int, peak_rate: float, cuda: bool) -> None:
    print(
        f"    {'':30s} {'mean step':>10s} {'median':>8s} {'tokens/s':>9s} {'MFU':>6s} {'peak mem':>9s} "
        f"{'first step':>10s}"
    )
    for name, r in results.items():
        total = sum(r["times"])
        memory = f"{r['peak_gb']:6.2f} GB"
        print(
            f"    {name:30s} {1000 * total / steps:7.1f} ms {1000 * statistics.median(r['times']):5.1f} ms "
            f"{tokens / total:9.0f} {100 * flops / total / peak_rate:5.1f}% {memory} {r['first']:9.1f} s"
        )
    mean = {name: sum(r["times"]) for name, r in results.items()}
    peak = {name: r["peak_gb"] for name, r in results.items()}
    ratios = [(name, "ours") for name in results if name != "ours" and "DoRA" not in name]
    if "ours, DoRA" in results:
        ratios += [("transformers + peft, DoRA", "ours, DoRA"), ("ours, DoRA", "ours")]
    for name, over in ratios:
        if name in results and over in results:
            print(
                f"    {name} / {over}: time {mean[name] / mean[over]:.2f}x, peak memory {peak[name] / peak[over]:.2f}x"
            )


def memory_figures(config: Config, micro_batch_size: int, max_seq_length: int, device: torch.device) -> None:
    """The peak memory of our LoRA step (r=8 on query and value, fp32, AdamW, bf16 autocast on CUDA) at full-length
    records, a target at every position (the most the head and the loss can take): the base in bf16 at
    micro_batch_size x max_seq_length, then quantized (bnb.nf4-dq: QLoRA) at 1 x max_seq_length, each with and
    without gradient checkpointing. Random weights; nothing else is on the device meanwhile."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for quantize, rows in ((None, micro_batch_size), ("bnb.nf4-dq", 1)):
        model = random_lora_model(config, device, quantize)
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e9
        ids = torch.randint(
            3, config.vocab_size, (3, rows, max_seq_length + 1), generator=torch.Generator().manual_seed(0)
        )
        batches = [
            pack_batch([{"input_ids": row, "labels": row} for row in batch], max_seq_length + 1) for batch in ids
        ]
        base = quantize or ("bf16" if device.type == "cuda" else "fp32")
        print(
            f"  ours, {base} base ({weights:.2f} GB of weights), LoRA query+value, "
            f"micro-batch {rows} x {max_seq_length}:"
        )
        for checkpointing in (True, False):
            model.gradient_checkpointing = checkpointing
            free_memory(device)
            r, _ = time_steps(model, ours_loss(model), batches, device, autocast)
            # all the device holds (the 4-bit weights' scales too) is this model's
            peak = (
                f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB"
                if device.type == "cuda"
                else "not measured on CPU"
            )
            print(
                f"    gradient checkpointing {'on ' if checkpointing else 'off'}: peak memory {peak}, "
                f"step {1000 * statistics.median(r['times']):.0f} ms"
            )
        del model
        free_memory(device)


def random_lora_model(config: Config, device: torch.device, quantize: Optional[str] = None) -> LLaMA:
    """Our LLaMA with LoRA r=8 on query and value, random weights made on `device` one tensor at a time: the base in
    bf16 on CUDA (fp32 on CPU), or quantized with bitsandbytes (`quantize`, as finetune_lora.py --quantize); LoRA in
    fp32, trainable."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"), lora(r=8, alpha=16, dropout=0.05, targets=("query", "value")):
        model = LLaMA(config)
        if quantize:
            swap_in_layers(model, quantize, dtype)
    torch.manual_seed(0)
    if quantize:
        for layer in quantized_layers(model).values():  # one full-precision weight at a time
            weight = torch.randn(layer.out_features, layer.in_features, device=device, dtype=dtype) * 0.02
            quantize_weight(layer, weight, device)
    rest = {
        name: torch.randn(param.shape, device=device, dtype=dtype) * 0.02
        for name, param in model.named_parameters()
        if param.is_meta
    }
    model.load_state_dict(rest, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora.float()
    mark_only_lora_as_trainable(model)
    return model


def generation_speed(config: Config, new_tokens: int, device: torch.device, dtype: torch.dtype, autocast) -> None:
    """Greedy decoding with generate.generate (KV cache) from a model with a trained-looking adapter merged in,
    against the base model: a merged adapter must cost nothing."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:
        with lora(r=8, alpha=16, dropout=0.05, targets=("query", "value")):
            merged = LLaMA(config)
        base = LLaMA(config)
    torch.set_default_dtype(default_dtype)
    base.load_state_dict(merged.state_dict(), strict=False)
    with torch.no_grad():
        for module in merged.modules():
            if isinstance(module, LoRALinear):
                module.lora.B.normal_(std=0.02)
    merge_lora_weights(merged)
    prompt = torch.randint(0, config.vocab_size, (16,), device=device)
    models = {"merged LoRA model": merged.eval(), "base model": base.eval()}
    times = {name: [] for name in models}
    for rep in range(6):
        for name, model in models.items():
            synchronize(device)
            t0 = time.perf_counter()
            with autocast:
                generate(model, prompt, new_tokens, temperature=0.0)
            synchronize(device)
            if rep > 0:
                times[name].append(time.perf_counter() - t0)
    print(f"\ngreedy decoding, batch 1, 16-token prompt + {new_tokens} new tokens, best and median of 5")
    for name, t in times.items():
        print(f"  {name:30s} {new_tokens / min(t):7.1f} tokens/s  {new_tokens / statistics.median(t):7.1f} tokens/s")
    print(f"  merged / base time:            {min(times['merged LoRA model']) / min(times['base model']):.3f}x")


def liger_kernel_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        import liger_kernel.transformers  # noqa: F401

        return version("liger-kernel")
    except Exception:  # not installed, or its Triton kernels cannot load here (no GPU)
        return None


@contextmanager
def liger_patched() -> Iterator[None]:
    """Within it, Liger Kernel may patch transformers' Llama modules (apply_liger_kernel_to_llama replaces functions
    and classes of modeling_llama, not only the model's); after it they are transformers' own again."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    saved, forward = dict(vars(modeling_llama)), LlamaForCausalLM.forward
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(modeling_llama, name, value)
        LlamaForCausalLM.forward = forward


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock


if __name__ == "__main__":
    cli(main)
