"""Memory of --quantize and --optimizer: loading + generating, a LoRA step and a full fine-tuning step.

    python benchmarks/memory.py

On CPU, the 134M config (n_embd 768, 12 layers, vocab 32000) with random N(0, 0.02) weights, saved as a converted
fp32 checkpoint. Each measurement runs in its own process, so that its peak resident memory (max RSS) is its own:
  - load + generate: utils.load_model with each --quantize mode, then 32 greedy tokens after a 16-token prompt;
  - LoRA step: finetune_lora.py's model (r=8 on query and value) on an fp32 and an nf4 base, one forward, backward
    and optimizer step on 1 x 512 tokens, with each --optimizer;
  - full step: finetune_full.py's (every weight trains, fp32), the same step, with each --optimizer.
Every process imports torch and bitsandbytes before measuring, so they start from the same baseline; the figures are
the peak RSS (VmHWM), the peak over that baseline, the memory still resident after generating (model held, freed heap
memory handed back), and the bytes of the weights (every tensor of the state dict, quantization scales included) and
of the optimizer state.

On a machine with CUDA it then measures QLoRA on the Llama-2-7b-hf config with random weights: nf4-dq base in bf16,
LoRA r=8 on query and value in fp32 under bf16 autocast (finetune_lora.py's bf16-mixed), micro-batch 1 x 512, AdamW:
the peak of torch.cuda.max_memory_allocated. Without CUDA it says so and skips that part.
"""

import ctypes
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8")
OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "PagedAdamW")
LORA = dict(r=8, alpha=16, dropout=0.05, query=True, value=True)


def main(
    seq_len: int = 512,
    new_tokens: int = 32,
    gpu_model: str = "Llama-2-7b-hf",
    cpu: bool = True,
    measure: Optional[Literal["generate", "lora", "full"]] = None,
    checkpoint_dir: Optional[Path] = None,
    quantize: Optional[str] = None,
    optimizer: str = "AdamW",
    device: str = "cpu",
) -> None:
    """Measures each case in its own process and prints the figures and their ratios.

    Args:
        seq_len: tokens of the training steps' single sequence.
        new_tokens: tokens generated greedily after a 16-token prompt.
        gpu_model: the model.Config preset of the CUDA part.
        cpu: run the CPU part (false: only the CUDA part, where there is a GPU).
        measure: internal: measure this case in this process and print its figures as JSON.
        checkpoint_dir: internal: the checkpoint to measure with.
        quantize: internal: the --quantize mode of the case, if any.
        optimizer: internal: the --optimizer of the case.
        device: internal: where the case runs.
    """
    if measure is not None:
        import bitsandbytes  # noqa: F401  every case pays for the import, so that the baselines are equal

        baseline = max_rss_mb()
        if measure == "generate":
            figures = measure_generate(checkpoint_dir, quantize, new_tokens)
        else:
            figures = measure_step(checkpoint_dir, measure, quantize, optimizer, seq_len, device)
        print(json.dumps({"baseline_mb": baseline, "peak_mb": max_rss_mb(), **figures}))
        return

    if cpu:
        measure_cpu(seq_len, new_tokens)
    if not torch.cuda.is_available():
        print(f"\nno CUDA device: skipped QLoRA on the {gpu_model} config (nf4-dq, r=8, 1 x {seq_len}; target <= 8 GB)")
        return
    measure_gpu(gpu_model, seq_len)


def measure_cpu(seq_len: int, new_tokens: int) -> None:
    import bitsandbytes

    print(f"134M config on CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, bitsandbytes "
          f"{bitsandbytes.__version__}; every row in its own process, whose peak RSS includes its baseline (torch and "
          "bitsandbytes imported)")
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint_dir = Path(workdir) / "134M"
        make_checkpoint(checkpoint_dir, "134M", torch.float32)

        print(f"\nload + generate {new_tokens} tokens  weights (all)     projections     peak RSS  over baseline  resident after")
        rows = {mode: run("generate", checkpoint_dir, quantize=mode) for mode in (None, *MODES)}
        fp32 = rows[None]
        for mode, row in rows.items():
            after = row["resident_mb"] - row["baseline_mb"]
            print(f"  {mode or 'fp32':26s} {row['weight_mb']:6.1f} MB {row['weight_mb'] / fp32['weight_mb']:.2f}x"
                  f"  {row['projection_mb']:5.1f} MB {row['projection_mb'] / fp32['projection_mb']:.2f}x"
                  f"  {row['peak_mb']:6.0f} MB  {over(row):5.0f} MB {over(row) / over(fp32):.2f}x"
                  f"  {after:5.0f} MB {after / (fp32['resident_mb'] - fp32['baseline_mb']):.2f}x")

        print(f"\nLoRA step (r=8, query and value; 1 x {seq_len} tokens)    optimizer state   peak RSS   over baseline")
        reference = None
        for base in (None, "bnb.nf4"):
            for optimizer in OPTIMIZERS:
                row = run("lora", checkpoint_dir, quantize=base, optimizer=optimizer, seq_len=seq_len)
                reference = reference or row
                print(f"  base {base or 'fp32':8s} {optimizer:16s}                {row['optimizer_mb']:8.2f} MB"
                      f"  {row['peak_mb']:6.0f} MB  {over(row):6.0f} MB {over(row) / over(reference):.2f}x")

        print(f"\nfull fine-tuning step (fp32; 1 x {seq_len} tokens)             optimizer state   peak RSS   over baseline")
        reference = None
        for optimizer in OPTIMIZERS:
            row = run("full", checkpoint_dir, optimizer=optimizer, seq_len=seq_len)
            reference = reference or row
            print(f"  {optimizer:47s} {row['optimizer_mb']:8.1f} MB {row['optimizer_mb'] / reference['optimizer_mb']:.2f}x"
                  f"  {row['peak_mb']:6.0f} MB  {over(row):6.0f} MB {over(row) / over(reference):.2f}x")


def measure_gpu(gpu_model: str, seq_len: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint_dir = Path(workdir) / gpu_model
        t0 = time.perf_counter()
        make_checkpoint(checkpoint_dir, gpu_model, torch.bfloat16)
        print(f"\n{gpu_model} config, random weights (written in {time.perf_counter() - t0:.0f} s), on "
              f"{torch.cuda.get_device_name()}: QLoRA step, nf4-dq base in bf16, LoRA r=8 on query and value in fp32 "
              f"under bf16 autocast, AdamW, 1 x {seq_len} tokens")
        row = run("lora", checkpoint_dir, quantize="bnb.nf4-dq", optimizer="AdamW", seq_len=seq_len, device="cuda")
        print(f"  peak GPU memory {row['cuda_peak_gb']:.2f} GB (target <= 8 GB), of which weights {row['weight_mb'] / 1e3:.2f} GB; "
              f"{row['step_s']:.2f} s for the step, the first (warm-up included)")


def make_checkpoint(directory: Path, name: str, dtype: torch.dtype) -> None:
    """A converted checkpoint directory with random N(0, 0.02) weights (norms 1) and the shared tokenizer."""
    from safetensors.torch import save_file

    from model import LLaMA, Config

    config = Config.from_name(name)
    with torch.device("meta"):
        shapes = {name: param.shape for name, param in LLaMA(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=dtype)
        state_dict[name] = tensor.fill_(1.0) if len(shape) == 1 else tensor.normal_(0, 0.02, generator=generator)
    directory.mkdir(parents=True)
    save_file(state_dict, directory / "lit_model.safetensors", metadata={"format": "pt"})
    config.to_file(directory / "model_config.json")
    shutil.copyfile(ROOT.parent / "shared" / "data" / "tokenizer.model", directory / "tokenizer.model")


def run(measure: str, checkpoint_dir: Path, quantize: Optional[str] = None, optimizer: str = "AdamW",
        seq_len: int = 512, device: str = "cpu") -> dict:
    command = [sys.executable, __file__, "--measure", measure, "--checkpoint_dir", str(checkpoint_dir),
               "--optimizer", optimizer, "--seq_len", str(seq_len), "--device", device]
    if quantize:
        command += ["--quantize", quantize]
    output = subprocess.run(command, capture_output=True, text=True)
    if output.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[1:])} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def measure_generate(checkpoint_dir: Path, quantize: Optional[str], new_tokens: int) -> dict:
    from generate import generate
    from utils import load_model

    model = load_model(checkpoint_dir, quantize=quantize).eval()
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    generate(model, prompt, new_tokens, temperature=0.0)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back to the system: RSS then shows what is held
    return {"resident_mb": max_rss_mb("VmRSS"), **weight_figures(model)}  # with the model still held


def measure_step(checkpoint_dir: Path, kind: str, quantize: Optional[str], optimizer_name: str, seq_len: int, device: str) -> dict:
    """One forward, backward and optimizer step as the fine-tuning scripts take it (utils.cross_entropy_sum over every
    position; on CUDA bf16 weights, LoRA in fp32, under bf16 autocast as in bf16-mixed)."""
    from contextlib import nullcontext

    from lora import lora, mark_only_lora_as_trainable
    from utils import cross_entropy_sum, load_model, make_optimizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with lora(**LORA) if kind == "lora" else nullcontext():
        model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize)
    if kind == "lora":
        mark_only_lora_as_trainable(model)
    trainable = [param for param in model.parameters() if param.requires_grad]
    for param in trainable:
        param.data = param.data.float()
    optimizer = make_optimizer(optimizer_name, trainable, lr=1e-4, weight_decay=0.0)
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    model.train()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext():
        loss = cross_entropy_sum(model, tokens[:, :-1], tokens[:, 1:]) / seq_len
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    figures = {"step_s": time.perf_counter() - t0, "loss": loss.item(), **weight_figures(model)}
    figures["optimizer_mb"] = sum(t.numel() * t.element_size() for t in tensors(optimizer.state_dict()["state"])) / 1e6
    if device == "cuda":
        figures["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return figures


def weight_figures(model: torch.nn.Module) -> dict:
    """MB of every tensor of the state dict (codes and quantization scales; a tied tensor once) and of the projections'."""
    unique = {t.data_ptr(): (name, t) for name, t in model.state_dict().items()}.values()
    size = {name: t.numel() * t.element_size() for name, t in unique}
    projections = sum(n for name, n in size.items() if not name.startswith(("embed.", "norm.")) and "_norm." not in name)
    return {"weight_mb": sum(size.values()) / 1e6, "projection_mb": projections / 1e6}


def tensors(value):
    """Every tensor inside nested dicts, lists and tuples (bitsandbytes nests its optimizer state)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from tensors(item)


def over(row: dict) -> float:
    return row["peak_mb"] - row["baseline_mb"]


def max_rss_mb(field: str = "VmHWM") -> float:
    """This process's peak resident memory (VmHWM; VmRSS: now), from /proc: getrusage's ru_maxrss is carried over from
    the parent through fork and exec on Linux, so a child of a larger process would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1e3  # kB


if __name__ == "__main__":
    CLI(main)
