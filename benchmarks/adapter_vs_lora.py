"""LoRA against LLaMA-Adapter v1 and v2 on the same model and records, as the Lit-LLaMA article compared them: trainable
parameters, time per step, peak memory, and the held-out loss after the same steps.

    python benchmarks/adapter_vs_lora.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data_dir data/alpaca-smollm2            # CPU, fp32: real weights, real records
    python benchmarks/adapter_vs_lora.py --device cuda --model Llama-2-7b-hf    # random weights: no held-out loss

The methods with their fine-tuning script's defaults: LoRA r=8, alpha 16, dropout 0.05 on query and value
(finetune_lora.py), LLaMA-Adapter v1 and v2 with 10 prompt vectors in every layer but the first 2 (finetune_adapter.py).
Each is built as its script builds it (lora() or adapter() around the loading, only its own tensors trainable, in fp32;
on CUDA the base in bf16 under bf16 autocast: bf16-mixed) and trained with AdamW at its script's learning rate and
weight decay (LoRA 3e-4 and 0, the Alpaca-LoRA recipe; LLaMA-Adapter 9e-3 and 0.02, the paper's) on the scripts'
schedule (a linear warmup over `warmup_steps`, then a cosine decay to 0 at the last step), one optimizer step per
micro-batch, on the same micro-batches: the records training.batch_indices gives the scripts,
packed by training.pack_batch, the loss as the scripts compute it. Timing and memory are lora_vs_peft.time_steps'
(a warm-up step, then each step timed: wall time, and on CPU also the process's CPU time, which other jobs on a
shared machine disturb less; CPU: a step's peak resident memory over what was resident before it, the model
and optimizer state already in place; CUDA: the model's weights and everything its steps allocate). The held-out
loss is the loss per target token over the first `eval_records` of test.pt, the validation loss of the scripts:
before training it is the base model's for all three (each starts from the base exactly: LoRA's B and the adapter's
gates start at zero), then after the `steps` + 1 updates of each. The methods run one after another in one process;
on a shared machine, pass --threads 1 for steadier times.

Without --checkpoint_dir, `model` (a model.Config preset) is built with random weights and the records are random
tokens of Alpaca's lengths (lora_vs_peft.alpaca_micro_batches): times and memory only, as benchmarks/gpu_check.sh
runs it for Llama-2-7b-hf.
"""

import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
sys.path.insert(0, str(Path(__file__).parent))
from lora_vs_peft import alpaca_micro_batches, free_memory, ours_loss, time_steps

from adapter import adapter, mark_only_adapter_as_trainable
from data import load_prepared_data
from lora import lora, mark_only_lora_as_trainable
from losses import cross_entropy_sum, pack_batch
from model import Config, LLaMA
from training import batch_indices
from utils import cli, load_config, load_model

METHODS = {  # name: (the context the model is built in, how its tensors are marked, learning rate, weight decay)
    "LoRA r=8 query+value": (
        lambda config: lora(r=8, alpha=16, dropout=0.05, targets=("query", "value")),
        mark_only_lora_as_trainable,
        3e-4,
        0.0,
    ),
    "LLaMA-Adapter v1": (
        lambda config: adapter(version=1, adapter_len=10, adapter_layers=max(config.n_layer - 2, 1)),
        mark_only_adapter_as_trainable,
        9e-3,
        0.02,
    ),
    "LLaMA-Adapter v2": (
        lambda config: adapter(version=2, adapter_len=10, adapter_layers=max(config.n_layer - 2, 1)),
        mark_only_adapter_as_trainable,
        9e-3,
        0.02,
    ),
}


def main(
    checkpoint_dir: Optional[Path] = None,
    data_dir: Optional[Path] = None,
    model: str = "Llama-2-7b-hf",
    device: str = "cpu",
    steps: int = 30,
    micro_batch_size: int = 4,
    max_seq_length: int = 256,
    eval_records: int = 32,
    warmup_steps: int = 5,
    threads: Optional[int] = None,
    seed: int = 1337,
) -> None:
    """Trains each method for the same steps on the same micro-batches and prints the figures side by side.

    Args:
        checkpoint_dir: a converted checkpoint (real weights); without it, `model` with random weights.
        data_dir: records prepared for `checkpoint_dir` by prepare_alpaca.py (train.pt, test.pt); with checkpoint_dir.
        model: the model.Config preset built with random weights when there is no checkpoint_dir.
        device: "cpu" (fp32), or "cuda": the base in bf16 and the trained tensors in fp32 under bf16 autocast.
        steps: timed steps per method, after one warm-up step (which also trains).
        micro_batch_size: records per step.
        max_seq_length: records are cut to this many tokens.
        eval_records: the first records of test.pt the held-out loss is computed over.
        warmup_steps: steps of the learning rate's linear warmup (then a cosine decay to 0), as --train.warmup_steps.
        threads: CPU threads for PyTorch; by default one per core.
        seed: of the order of the records, as the scripts' --train.seed.
    """
    if (checkpoint_dir is None) != (data_dir is None):
        raise ValueError("pass both --checkpoint_dir and --data_dir (real weights and records), or neither")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    config = load_config(checkpoint_dir) if checkpoint_dir else Config.from_name(model)
    if checkpoint_dir:
        data = load_prepared_data(data_dir, checkpoint_dir)
        assert data.ignore_index == -100  # what time_steps' loss and held_out_loss take as no target
        records = [
            [data.train[i] for i in batch_indices(s, micro_batch_size, len(data.train), seed)] for s in range(steps + 1)
        ]
        batches = [pack_batch(r, max_seq_length) for r in records]
        held_out = data.val[:eval_records]
    else:
        batches = alpaca_micro_batches(
            steps + 1, micro_batch_size, min(max_seq_length, config.block_size), config.vocab_size
        )
        held_out = []
    tokens = sum(ids.numel() for ids, _, _ in batches[1:])
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    source = f"records of {data_dir}" if data_dir else "random Alpaca-length records"
    print(
        f"{where}, torch {torch.__version__}, {'bf16-mixed' if cuda else 'fp32'}; "
        f"{checkpoint_dir or f'{model} with random weights'}: {config.n_layer} layers, n_embd {config.n_embd}; "
        f"micro-batches of {micro_batch_size} {source} "
        f"({tokens / steps:.0f} tokens a step on average), {steps} steps after a warm-up"
    )

    rows = {}
    for name, (context, mark_trainable, lr, weight_decay) in METHODS.items():
        net = build(context(config), mark_trainable, checkpoint_dir, config, device)
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        total = sum(p.numel() for p in net.parameters())
        before = held_out_loss(net, held_out, micro_batch_size, max_seq_length, device, autocast) if held_out else None
        figures, _ = time_steps(
            net, ours_loss(net), batches, device, autocast, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps
        )
        after = held_out_loss(net, held_out, micro_batch_size, max_seq_length, device, autocast) if held_out else None
        rows[name] = dict(trainable=trainable, share=trainable / total, before=before, after=after, **figures)
        print(f"  {name}: done", flush=True)
        del net
        free_memory(device)

    timed = "times" if cuda else "cpu_times"  # on CPU the process's CPU time: steadier on a shared machine
    print(
        f"\n| method | trainable parameters | step (median{'' if cuda else ', CPU time'}) | tokens/s | peak memory "
        f"| held-out loss, before -> after {steps + 1} steps |\n|---|---:|---:|---:|---:|---|"
    )
    for name, r in rows.items():
        loss = f"{r['before']:.3f} -> {r['after']:.3f}" if r["before"] is not None else "(random weights)"
        print(
            f"| {name} | {r['trainable']:,} ({100 * r['share']:.2f}%) | {1000 * statistics.median(r[timed]):.0f} ms "
            f"| {tokens / sum(r[timed]):,.0f} | {r['peak_gb']:.2f} GB | {loss} |"
        )
    lora_row = rows["LoRA r=8 query+value"]
    for name, r in rows.items():
        if r is not lora_row:
            print(
                f"{name} / LoRA: trainable {r['trainable'] / lora_row['trainable']:.2f}x, "
                f"step time {statistics.median(r[timed]) / statistics.median(lora_row[timed]):.2f}x "
                f"(wall {statistics.median(r['times']) / statistics.median(lora_row['times']):.2f}x), "
                f"peak memory {r['peak_gb'] / lora_row['peak_gb']:.2f}x"
            )


def build(context, mark_trainable, checkpoint_dir: Optional[Path], config: Config, device: torch.device) -> LLaMA:
    """The model as its fine-tuning script holds it: the base (from checkpoint_dir, else random weights made on
    `device`, seeded) in bf16 on CUDA and fp32 on CPU, built inside `context`; only the method's tensors trainable,
    in fp32."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if checkpoint_dir:
        with context:
            model = load_model(checkpoint_dir, device, dtype)
    else:
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in place in its dtype: a 7B model in fp32 would be twice the memory
        try:
            with device, context:
                model = LLaMA(config)
        finally:
            torch.set_default_dtype(default_dtype)
    mark_trainable(model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


@torch.no_grad()
def held_out_loss(
    model: LLaMA, records: list[dict], micro_batch_size: int, max_seq_length: int, device: torch.device, autocast
) -> float:
    """The loss per target token over `records`, as training.validate computes the validation loss."""
    model.eval()
    loss, targets = 0.0, 0
    for i in range(0, len(records), micro_batch_size):
        input_ids, target, lengths = pack_batch(records[i : i + micro_batch_size], max_seq_length)
        input_ids, target = input_ids.to(device), target.to(device)
        where = target != -100
        with autocast:
            loss += cross_entropy_sum(model(input_ids, lengths=lengths, logits_at=where), target[where]).item()
        targets += int(where.sum())
    model.train()
    return loss / max(targets, 1)


if __name__ == "__main__":
    cli(main)
