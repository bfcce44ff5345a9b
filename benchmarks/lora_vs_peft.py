"""LoRA and DoRA training steps: ours vs Hugging Face transformers + PEFT, and merged-model generation speed.

    python benchmarks/lora_vs_peft.py

The 134M config (n_embd 768, 12 layers, 12 heads, intermediate 2048, vocab 32000) with the same random
weights in both, LoRA r=8 on query and value, batch 4 x 256 tokens: the time of one forward + backward +
AdamW step of ours, of transformers + PEFT, and of ours with the base frozen and no LoRA (gradients
asked for at the same places, so it runs every matrix product a LoRA step runs except LoRA's own: the
floor any LoRA implementation sits on); then the same for DoRA (Liu et al. 2024: a learned magnitude per output row,
PEFT's use_dora) on query and value, ours against PEFT's, with the peak memory of each step. Two batches: random tokens with a target at every position, and real
Alpaca records (../shared/data, cut to 257 tokens so none is padding) whose prompts have no target, as in
fine-tuning; ours computes the loss as finetune_lora.py does (training.cross_entropy_sum: the output head only
where there is a target), transformers + PEFT over all the logits, as its `labels` loss does. Then greedy decoding with generate.generate (KV cache) from a
model with the adapter merged in, against the base model.

Peak memory of a step: on CPU the peak resident memory (VmHWM, reset through /proc/self/clear_refs after handing freed
heap memory back) over the resident memory before the step, with every model, its optimizer state and its gradients'
buffers already in place from the timed steps; on a GPU torch.cuda.max_memory_allocated over the memory allocated
before the step.

On a GPU (--device cuda) as finetune_lora.py's bf16-mixed trains: the frozen base in bf16, LoRA's A and B in fp32,
under bf16 autocast, on both sides (PEFT keeps its adapters in fp32 itself). --model_name Llama-2-7b-hf fits there.
"""

import ctypes
import gc
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from jsonargparse import CLI

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
sys.path.insert(0, str(Path(__file__).parent))
from convert_hf_checkpoint import hf_to_lit_name
from export_peft import lit_to_peft_name
from generate import generate
from lora import LoRALinear, lora, lora_layers, mark_only_lora_as_trainable, merge_lora_weights
from memory import max_rss_mb
from model import LLaMA, Config
from training import cross_entropy_sum

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main(
    model_name: str = "134M",
    batch_size: int = 4,
    seq_len: int = 256,
    steps: int = 5,
    new_tokens: int = 100,
    dtype: str = "float32",
    threads: Optional[int] = None,
    device: str = "cpu",
) -> None:
    """Times training steps and generation and prints each figure and the ratios.

    Args:
        model_name: a preset of model.Config.
        batch_size: sequences per training step.
        seq_len: tokens per sequence.
        steps: timed steps per model (after one warm-up step); the best and the median are reported.
        new_tokens: tokens generated greedily in the generation benchmark (batch 1, after a 16-token prompt).
        dtype: the weights' dtype on CPU: float32 (bf16 matmuls on most CPUs are hundreds of times slower).
        threads: CPU threads for PyTorch; by default one per core. On a machine shared with other jobs,
            1 thread gives steadier figures (waiting threads of a busy machine slow every operation).
        device: "cpu", or "cuda": the base in bf16 and LoRA in fp32 under bf16 autocast (bf16-mixed).
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Config.from_name(model_name)
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else getattr(torch, dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"{model_name}: {config.n_layer} layers, n_embd {config.n_embd}; batch {batch_size} x {seq_len} tokens, "
          f"{'bf16-mixed' if cuda else dtype}, {where}, torch {torch.__version__}", file=sys.stderr)

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # every model is built in place, in its dtype: a 7B model in fp32 would not fit twice
    with device:
        hf_model = build_hf_model(config)
        weights = {hf_to_lit_name(name): t for name, t in hf_model.state_dict().items()}
        with lora(r=8, alpha=16, dropout=0.05, targets=("query", "value")):
            ours = LLaMA(config)
        ours.load_state_dict(weights, strict=False)  # all but LoRA's A and B
        with lora(r=8, alpha=16, dropout=0.05, targets=("query", "value"), dora=True):
            ours_dora = LLaMA(config)
        ours_dora.load_state_dict(weights, strict=False)
        for layer in lora_layers(ours_dora).values():
            layer.reset_magnitude()  # ‖W‖ of the weights just loaded, as utils.load_weights does
        base = LLaMA(config)
        base.load_state_dict(weights)
        hf_model_2 = build_hf_model(config)
        hf_model_2.load_state_dict(hf_model.state_dict())
        peft_model = build_peft_model(hf_model, ours)
        peft_dora = build_peft_model(hf_model_2, ours_dora)
        del weights
    torch.set_default_dtype(default_dtype)

    for model in (ours, ours_dora):
        mark_only_lora_as_trainable(model)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # as finetune_lora.py holds them (PEFT does the same with its own)
    base.requires_grad_(False)
    hooks = [  # ask for gradients where LoRA's start: the query and value outputs of the first layer
        layer.register_forward_hook(lambda module, inputs, output: output.requires_grad_())
        for layer in (base.blocks[0].attn.q_proj, base.blocks[0].attn.v_proj)
    ]

    batches = {"random tokens, a target at every position": random_batch(config, batch_size, seq_len)}
    if not SHARED_DATA.is_dir():
        print(f"{SHARED_DATA} not found: skipping the Alpaca batch", file=sys.stderr)
    elif config.vocab_size != 32000:
        print(f"vocab_size {config.vocab_size} is not the shared tokenizer's 32000: skipping the Alpaca batch", file=sys.stderr)
    else:
        batches["Alpaca records, the prompt masked"] = alpaca_batch(batch_size, seq_len)
    models = {  # ours with the loss as finetune_lora.py computes it; transformers' over all logits, as its `labels` loss does
        "ours (LoRA)": (ours, True),
        "transformers + peft": (peft_model, False),
        "ours (frozen base, no LoRA)": (base, True),
        "ours (DoRA)": (ours_dora, True),
        "transformers + peft (DoRA)": (peft_dora, False),
    }
    for batch_name, (idx, targets) in batches.items():
        idx, targets = idx.to(device), targets.to(device)
        n_targets = int((targets != -100).sum())
        steppers = {name: make_step(model, ours_loss, idx, targets, autocast) for name, (model, ours_loss) in models.items()}
        times = {name: [] for name in steppers}
        for step in range(steps + 1):  # round-robin, so that drift in the machine's speed hits all alike
            for name, run_step in steppers.items():
                synchronize(device)
                t0 = time.perf_counter()
                run_step()
                synchronize(device)
                if step > 0:
                    times[name].append(time.perf_counter() - t0)
        print(f"\n{batch_name} ({n_targets} of {idx.numel()} positions): forward + backward + AdamW step, "
              f"best and median of {steps}")
        best = {name: min(t) for name, t in times.items()}
        for name, t in times.items():
            print(f"  {name:30s} {min(t):6.3f} s  {statistics.median(t):6.3f} s   {idx.numel() / min(t):5.0f} tokens/s")
        print(f"  transformers + peft / ours:    {best['transformers + peft'] / best['ours (LoRA)']:.2f}x")
        print(f"  ours / frozen base, no LoRA:   {best['ours (LoRA)'] / best['ours (frozen base, no LoRA)']:.2f}x")
        print(f"  transformers + peft / floor:   {best['transformers + peft'] / best['ours (frozen base, no LoRA)']:.2f}x"
              "  (the most any LoRA layer could gain on this model.py)")
        print(f"  peft DoRA / ours DoRA:         {best['transformers + peft (DoRA)'] / best['ours (DoRA)']:.2f}x")
        print(f"  ours DoRA / ours LoRA:         {best['ours (DoRA)'] / best['ours (LoRA)']:.2f}x")
        peaks = {name: step_peak_mb(run_step, device) for name, run_step in steppers.items()}
        print(f"  peak memory of a step over the memory before it ({'max allocated' if cuda else 'peak RSS'}):")
        for name, peak in peaks.items():
            print(f"  {name:30s} {peak:6.0f} MB")
        print(f"  peft DoRA / ours DoRA:         {peaks['transformers + peft (DoRA)'] / peaks['ours (DoRA)']:.2f}x")
        print(f"  ours DoRA / ours LoRA:         {peaks['ours (DoRA)'] / peaks['ours (LoRA)']:.2f}x")
    for hook in hooks:
        hook.remove()

    # generation: an adapter merged into the weights must cost nothing
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, LoRALinear):
                module.lora.B.normal_(std=0.02)  # a trained-looking, non-zero update
    merge_lora_weights(ours)
    prompt = torch.randint(0, config.vocab_size, (16,), device=device)
    models = {"merged LoRA model": ours.eval(), "base model": base.eval()}
    gen_times = {name: [] for name in models}
    for rep in range(6):
        for name, model in models.items():
            synchronize(device)
            t0 = time.perf_counter()
            with autocast:
                generate(model, prompt, new_tokens, temperature=0.0)
            synchronize(device)
            if rep > 0:
                gen_times[name].append(time.perf_counter() - t0)
    print(f"\ngreedy decoding, batch 1, 16-token prompt + {new_tokens} new tokens, best and median of 5")
    gen_best = {name: min(t) for name, t in gen_times.items()}
    for name, t in gen_times.items():
        print(f"  {name:30s} {new_tokens / min(t):7.1f} tokens/s  {new_tokens / statistics.median(t):7.1f} tokens/s")
    print(f"  merged / base time:            {gen_best['merged LoRA model'] / gen_best['base model']:.3f}x")


def build_hf_model(config: Config) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_query_groups,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_base,
        tie_word_embeddings=config.tie_embeddings, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_config).to(torch.get_default_dtype())


def build_peft_model(hf_model: torch.nn.Module, ours: LLaMA) -> torch.nn.Module:
    """transformers + PEFT with the same LoRA settings (DoRA too, if ours has it) and the same LoRA weights as ours."""
    from peft import LoraConfig, get_peft_model

    dora = any(layer.lora.magnitude is not None for layer in lora_layers(ours).values())
    peft_model = get_peft_model(hf_model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_dora=dora))
    peft_state = peft_model.state_dict()
    for name, param in ours.named_parameters():
        if ".lora." in name:
            peft_name = lit_to_peft_name(name).replace(".weight", ".default.weight")
            peft_state[peft_name.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")].copy_(param.detach())
    return peft_model


def random_batch(config: Config, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
    return tokens[:, :-1], tokens[:, 1:]


def alpaca_batch(batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch_size` shared Alpaca records of at least seq_len + 1 tokens, cut to that, so no position is
    padding; their targets, as prepare_alpaca.py makes them, skip BOS and the prompt (-100)."""
    from prepare_alpaca import tokenize
    from tokenizer import Tokenizer

    examples = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text())
    samples, lengths, _, _ = tokenize(examples, Tokenizer(SHARED_DATA), seq_len + 1,
                                      mask_inputs=True, ignore_index=-100)
    chosen = [sample for sample, length in zip(samples, lengths) if sample is not None and length > seq_len][:batch_size]
    ids, labels = torch.stack([s["input_ids"] for s in chosen]), torch.stack([s["labels"] for s in chosen])
    return ids[:, :-1], labels[:, 1:]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock


def step_peak_mb(run_step: Callable[[], None], device: torch.device) -> float:
    """The memory one step takes at its peak beyond what was held before it, in MB (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 1e6
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory back to the system, so that reusing it shows
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = max_rss_mb("VmRSS")
    run_step()
    return max_rss_mb("VmHWM") - before


def make_step(
    model: torch.nn.Module, ours_loss: bool, idx: torch.Tensor, targets: torch.Tensor, autocast
) -> Callable[[], None]:
    """One training step as a fine-tuning script does it: the loss is the mean over the targets, as finetune_lora.py
    computes it for ours (`ours_loss`), as transformers' `labels` loss does (over all the logits) otherwise."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable or [torch.zeros(1, requires_grad=True)], lr=3e-4)  # frozen base: a no-op
    n_targets = (targets != -100).sum()

    def loss_of(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if ours_loss:
            return cross_entropy_sum(model, idx, targets)
        return F.cross_entropy(model(input_ids=idx).logits.flatten(0, 1), targets.flatten(), reduction="sum")

    def step() -> None:
        with autocast:
            loss = loss_of(idx, targets) / n_targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


if __name__ == "__main__":
    CLI(main)
