"""LoRA fine-tuning throughput and memory: ours vs Hugging Face transformers + PEFT, on CPU in fp32.

    python benchmarks/finetune_vs_hf.py

Makes a random 134M LLaMA (n_embd 768, 12 layers, 12 heads, intermediate 2048, vocab 32000; benchmarks/export.py's
checkpoint) and converts it to Hub format with scripts/convert_lit_checkpoint.py, so both sides hold the same
weights; writes one initial LoRA adapter (r=8, alpha=16, dropout 0.05, query and value) and exports it with
scripts/export_peft.py, so both start from the same LoRA weights; prepares real Alpaca records
(../shared/data/alpaca_en_demo.json, prepare_alpaca.py's default max_seq_length 256) and takes the same
micro-batches of 4 for both: transformers pads each to its longest record (its documented way), ours packs the
records into one row without padding (finetune_lora.py's way).

Each side trains in its own process, so that its peak resident memory (VmHWM, Linux) is its own: ours as
finetune_lora.py does a step (training.pack_batch, training.cross_entropy_sum, AdamW over the LoRA weights), and
transformers + PEFT as its documentation does (PeftModel, the model's own loss from `labels`, no KV cache).
The two processes take turns, one step each, so that both meet the same load on a shared machine; tokens/sec
counts the records' real tokens (padding excluded) over every step but the first, and the step-time ratio is
also given as the median of the ratios of the paired steps, which load spikes disturb least, and as the ratio
of the CPU time the processes spent (with --threads 1, nearly free of other jobs' influence).
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from export import make_checkpoint
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
SHARED_DATA = ROOT.parent / "shared" / "data"
LORA = dict(r=8, alpha=16, dropout=0.05, targets=("query", "value"))
NAMES = {"ours": "ours (finetune_lora.py's step)", "hf": "transformers + peft"}


def main(
    steps: int = 8,
    micro_batch_size: int = 4,
    rounds: int = 2,
    threads: Optional[int] = None,
    side: Optional[Literal["ours", "hf"]] = None,
    workdir: Optional[Path] = None,
) -> None:
    """Times LoRA training steps of ours and of transformers + PEFT on the same weights and records.

    Args:
        steps: micro-batches (one optimizer step each) per round.
        micro_batch_size: records per step.
        rounds: passes over the micro-batches; the sides alternate step by step.
        threads: CPU threads for PyTorch; by default one per core.
        side: internal: serve the steps of one side in this process.
        workdir: internal: the directory with the checkpoint, adapters and batches.
    """
    if side is not None:
        if threads:
            torch.set_num_threads(threads)
        serve(workdir, train_ours if side == "ours" else train_hf)
        return

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        lengths = make_inputs(workdir, steps, micro_batch_size)
        command = [sys.executable, __file__, "--workdir", str(workdir)]
        command += ["--threads", str(threads)] if threads else []
        reports, results = take_turns(command, list(NAMES), steps, rounds)
    times, cpu_times, losses = ({name: results[name][key] for name in NAMES} for key in ("time", "cpu", "loss"))

    tokens = [lengths[step % steps][0] for step in range(rounds * steps)][1:]  # the first step warms up
    speed = {name: sum(tokens) / sum(times[name][1:]) for name in NAMES}
    paired = statistics.median(hf / ours for hf, ours in zip(times["hf"][1:], times["ours"][1:]))
    print(
        f"134M LLaMA, LoRA r=8 on query and value, fp32, CPU ({reports['ours']['threads']} threads), "
        f"{rounds} x {steps} "
        f"steps of {micro_batch_size} Alpaca records ({sum(tokens)} tokens, "
        f"padded to {min(padded for _, padded in lengths)}-{max(padded for _, padded in lengths)} per record), "
        "the sides taking turns:"
    )
    for name in NAMES:
        print(
            f"  {NAMES[name]:32s} {speed[name]:6.0f} tokens/s   max RSS {reports[name]['max_rss_gb']:.2f} GB "
            f"(after loading: {reports[name]['loaded_rss_gb']:.2f} GB)"
        )
    print(
        f"  throughput ours / transformers + peft: {speed['ours'] / speed['hf']:.2f}x "
        f"(median of paired steps: {paired:.2f}x; "
        f"CPU time per step: {sum(cpu_times['hf'][1:]) / sum(cpu_times['ours'][1:]):.2f}x)"
    )
    memory = reports["ours"]["max_rss_gb"] / reports["hf"]["max_rss_gb"]
    print(f"  max RSS ours / transformers + peft:    {memory:.2f}x")
    # LoRA's B starts at 0, so the first loss is the base model's and dropout cannot change it
    print(f"  first-step loss: ours {losses['ours'][0]:.5f}, transformers + peft {losses['hf'][0]:.5f}")


def make_inputs(workdir: Path, n_batches: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """The checkpoint (ours and in Hub format), the initial adapter in both formats, and the micro-batches."""
    from convert_lit_checkpoint import convert_lit_checkpoint
    from export_peft import export_peft
    from lora import lora, save_lora_checkpoint
    from prepare_alpaca import setup as prepare
    from utils import load_model

    checkpoint_dir = workdir / "checkpoint"
    make_checkpoint("134M", checkpoint_dir)
    convert_lit_checkpoint(checkpoint_dir=checkpoint_dir, out_dir=workdir / "hf")  # the same weights for transformers
    torch.manual_seed(0)
    with lora(**LORA):
        model = load_model(checkpoint_dir)  # A random, B zero
    save_lora_checkpoint(model, workdir / "adapter.safetensors")
    export_peft(lora_path=workdir / "adapter.safetensors", out_dir=workdir / "peft")

    prepare(
        destination_path=workdir / "data",
        checkpoint_dir=checkpoint_dir,
        data_file_path=SHARED_DATA / "alpaca_en_demo.json",
    )
    records = torch.load(workdir / "data" / "train.pt", weights_only=True)  # already in random order
    batches = [records[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(n_batches)]
    torch.save(batches, workdir / "batches.pt")
    # (real tokens, padded length) of each micro-batch
    return [(sum(len(r["input_ids"]) for r in batch), max(len(r["input_ids"]) for r in batch)) for batch in batches]


def train_ours(workdir: Path) -> Callable[[list[dict]], float]:
    from lora import load_lora_checkpoint, lora, mark_only_lora_as_trainable
    from losses import cross_entropy_sum, pack_batch
    from utils import load_model

    with lora(**LORA):
        model = load_model(workdir / "checkpoint")
    load_lora_checkpoint(model, workdir / "adapter.safetensors")
    mark_only_lora_as_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    model.train()

    def step(records: list[dict]) -> float:
        input_ids, targets, lengths = pack_batch(records, max_seq_length=256)
        where = targets != -100
        loss = cross_entropy_sum(model(input_ids, lengths=lengths, logits_at=where), targets[where]) / where.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def train_hf(workdir: Path) -> Callable[[list[dict]], float]:
    from peft import PeftModel
    from torch.nn.utils.rnn import pad_sequence
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32, attn_implementation="sdpa")
    model = PeftModel.from_pretrained(model, workdir / "peft", is_trainable=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    model.train()

    def step(records: list[dict]) -> float:
        input_ids = pad_sequence([r["input_ids"] for r in records], batch_first=True, padding_value=0)
        labels = pad_sequence([r["labels"] for r in records], batch_first=True, padding_value=-100)
        # right padding under causal attention needs no attention mask; the labels skip it
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def serve(workdir: Path, build: Callable[[Path], Callable[[list[dict]], float]]) -> None:
    """Builds one side, then runs the micro-batch whose index arrives on stdin, answering with its time and loss
    on stdout, until stdin closes; then reports the peak memory (and the peak CUDA memory if it used a GPU). `build`'s
    step returns its loss as a float, which waits for a GPU to finish the step."""
    step = build(workdir)
    batches = torch.load(workdir / "batches.pt", weights_only=True)
    print(json.dumps({"loaded_rss_gb": max_rss_gb(), "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss = step(batches[int(line)])
        result = {"time": time.perf_counter() - t0, "cpu": time.process_time() - cpu0, "loss": loss}
        print(json.dumps(result), flush=True)
    cuda_gb = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_initialized() else None
    print(json.dumps({"max_rss_gb": max_rss_gb(), "max_cuda_gb": cuda_gb}), flush=True)


def take_turns(command: list[str], names: list[str], steps: int, rounds: int) -> tuple[dict, dict]:
    """Starts `command --side NAME` for each side (each one `serve`s), then has them run micro-batch `step % steps`
    one step each in turn, neither side always first, for `rounds` x `steps` steps. Returns each side's reports
    (threads, memory) and its steps' results: {name: {"time": [...], "cpu": [...], "loss": [...]}}."""
    processes = {
        name: subprocess.Popen(command + ["--side", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for name in names
    }
    reports = {name: json.loads(process.stdout.readline()) for name, process in processes.items()}  # loaded
    results = {name: {"time": [], "cpu": [], "loss": []} for name in names}
    for step in range(rounds * steps):
        for name in names if step % 2 == 0 else reversed(names):
            processes[name].stdin.write(f"{step % steps}\n")
            processes[name].stdin.flush()
            for key, value in json.loads(processes[name].stdout.readline()).items():
                results[name][key].append(value)
    for name, process in processes.items():
        process.stdin.close()
        reports[name].update(json.loads(process.stdout.readline()))
        process.wait()
    return reports, results


def max_rss_gb() -> float:
    """This process's peak resident memory (VmHWM) from /proc: getrusage's ru_maxrss is carried over from the parent
    through fork and exec on Linux, so each side would report at least this benchmark's main process's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e6  # kB


if __name__ == "__main__":
    CLI(main)
