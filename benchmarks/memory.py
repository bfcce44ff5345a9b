"""Memory of --quantize and --optimizer: loading + generating, a LoRA step and a full fine-tuning step; and the peak
memory of loading a 1.1B bf16 checkpoint in fp32.

    python benchmarks/memory.py
    python benchmarks/memory.py --part load  # only the loading part (about a minute, 2.2 GB of disk, 7 GB of memory)

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

The load part writes a converted checkpoint of the TinyLlama-1.1B-intermediate-step-1431k-3T config with random
weights stored in bf16 (2.2 GB; never the whole model in fp32) and a LoRA adapter for it (r=8 on query and value, B
non-zero), then measures, each in its own process as above: utils.load_model in fp32 (generate.py on a CPU), the
adapter loaded and merged in fp32 as generate_lora.py does (lora.load_lora_model, merge=True), and utils.load_model
in the file's own bf16 for reference. The figures are the peak RSS (VmHWM), the baseline before loading, the bytes of
the loaded weights (every tensor of the state dict, a shared one once), and the ratios of the peak and of the peak
over the baseline to the weights; the target is a peak RSS of at most 1.15x the weights, in the dtype they are held in.
After loading, every weight is read once, as generating would: a tensor left mapped from the file (bf16 loaded as
bf16) is resident only once read. The resident memory after that (VmRSS) and the load time are shown too.
"""

import ctypes
import json
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from export import make_checkpoint  # noqa: E402  after the path is set

from quantize import BNB_OPTIMIZERS, QUANTIZE_MODES  # noqa: E402

LORA = dict(r=8, alpha=16, dropout=0.05, targets=("query", "value"))
LOAD_MODEL = "TinyLlama-1.1B-intermediate-step-1431k-3T"
LOAD_TARGET = 1.15  # peak RSS / the weights, in the dtype they are held in
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(
    seq_len: int = 512,
    new_tokens: int = 32,
    gpu_model: str = "Llama-2-7b-hf",
    cpu: bool = True,
    part: Optional[Literal["cpu", "load", "gpu"]] = None,
    measure: Optional[Literal["generate", "lora", "full", "load"]] = None,
    checkpoint_dir: Optional[Path] = None,
    quantize: Optional[str] = None,
    optimizer: str = "AdamW",
    device: str = "cpu",
    lora_path: Optional[Path] = None,
    dtype: Optional[Literal["float32", "bfloat16"]] = None,
) -> None:
    """Measures each case in its own process and prints the figures and their ratios.

    Args:
        seq_len: tokens of the training steps' single sequence.
        new_tokens: tokens generated greedily after a 16-token prompt.
        gpu_model: the model.Config preset of the CUDA part.
        cpu: run the CPU parts, the 134M one and loading (false: only the CUDA part, where there is a GPU).
        part: run only this part: "cpu" (the 134M config), "load" (loading the 1.1B bf16 checkpoint) or "gpu"
            (QLoRA on CUDA); by default all of them.
        measure: internal: measure this case in this process and print its figures as JSON.
        checkpoint_dir: internal: the checkpoint to measure with.
        quantize: internal: the --quantize mode of the case, if any.
        optimizer: internal: the --optimizer of the case.
        device: internal: where the case runs.
        lora_path: internal: the adapter of a "load" case, if any (loaded and merged).
        dtype: internal: the dtype a "load" case holds the weights in (by default the file's).
    """
    if measure is not None:
        import bitsandbytes  # noqa: F401  every case pays for the import, so that the baselines are equal

        baseline = max_rss_mb()
        if measure == "generate":
            figures = measure_generate(checkpoint_dir, quantize, new_tokens)
        elif measure == "load":
            figures = measure_load(checkpoint_dir, lora_path, dtype)
        else:
            figures = measure_step(checkpoint_dir, measure, quantize, optimizer, seq_len, device)
        print(json.dumps({"baseline_mb": baseline, "peak_mb": max_rss_mb(), **figures}))
        return

    parts = {part} if part else {"cpu", "load", "gpu"} if cpu else {"gpu"}
    if "cpu" in parts:
        measure_cpu(seq_len, new_tokens)
    if "load" in parts:
        measure_loading()
    if "gpu" not in parts:
        return
    if not torch.cuda.is_available():
        print(f"\nno CUDA device: skipped QLoRA on the {gpu_model} config (nf4-dq, r=8, 1 x {seq_len}; target <= 8 GB)")
        return
    measure_gpu(gpu_model, seq_len)


def measure_cpu(seq_len: int, new_tokens: int) -> None:
    import bitsandbytes

    print(
        f"134M config on CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, bitsandbytes "
        f"{bitsandbytes.__version__}; every row in its own process, whose peak RSS includes its baseline (torch and "
        "bitsandbytes imported)"
    )
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint_dir = Path(workdir) / "134M"
        make_checkpoint("134M", checkpoint_dir, torch.float32)

        print(
            f"\nload + generate {new_tokens} tokens  weights (all)     projections     peak RSS  over baseline  "
            "resident after"
        )
        rows = {mode: run("generate", checkpoint_dir, quantize=mode) for mode in (None, *QUANTIZE_MODES)}
        fp32 = rows[None]
        for mode, row in rows.items():
            after = row["resident_mb"] - row["baseline_mb"]
            print(
                f"  {mode or 'fp32':26s} {row['weight_mb']:6.1f} MB {row['weight_mb'] / fp32['weight_mb']:.2f}x"
                f"  {row['projection_mb']:5.1f} MB {row['projection_mb'] / fp32['projection_mb']:.2f}x"
                f"  {row['peak_mb']:6.0f} MB  {over(row):5.0f} MB {over(row) / over(fp32):.2f}x"
                f"  {after:5.0f} MB {after / (fp32['resident_mb'] - fp32['baseline_mb']):.2f}x"
            )

        print(f"\nLoRA step (r=8, query and value; 1 x {seq_len} tokens)    optimizer state   peak RSS   over baseline")
        reference = None
        for base in (None, "bnb.nf4"):
            for optimizer in ("AdamW", *BNB_OPTIMIZERS):
                row = run("lora", checkpoint_dir, quantize=base, optimizer=optimizer, seq_len=seq_len)
                reference = reference or row
                print(
                    f"  base {base or 'fp32':8s} {optimizer:16s}                {row['optimizer_mb']:8.2f} MB"
                    f"  {row['peak_mb']:6.0f} MB  {over(row):6.0f} MB {over(row) / over(reference):.2f}x"
                )

        print(
            f"\nfull fine-tuning step (fp32; 1 x {seq_len} tokens)             optimizer state   peak RSS   "
            "over baseline"
        )
        reference = None
        for optimizer in ("AdamW", *BNB_OPTIMIZERS):
            row = run("full", checkpoint_dir, optimizer=optimizer, seq_len=seq_len)
            reference = reference or row
            print(
                f"  {optimizer:47s} {row['optimizer_mb']:8.1f} MB "
                f"{row['optimizer_mb'] / reference['optimizer_mb']:.2f}x"
                f"  {row['peak_mb']:6.0f} MB  {over(row):6.0f} MB {over(row) / over(reference):.2f}x"
            )


def measure_loading() -> None:
    """Peak RSS of loading a 1.1B checkpoint stored in bf16: in fp32, plain and with a LoRA adapter merged (as
    generate.py and generate_lora.py do on a CPU), and in bf16 for reference."""
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint_dir = Path(workdir) / LOAD_MODEL
        t0 = time.perf_counter()
        make_checkpoint(LOAD_MODEL, checkpoint_dir, torch.bfloat16)
        adapter = Path(workdir) / "adapter.safetensors"
        make_adapter(checkpoint_dir, adapter)
        size = (checkpoint_dir / "lit_model.safetensors").stat().st_size
        print(
            f"\nloading: {LOAD_MODEL} config, random weights stored in bf16 ({size / 1e9:.2f} GB file, LoRA adapter "
            f"r={LORA['r']} on query and value; written in {time.perf_counter() - t0:.0f} s); every row in its own "
            "process, whose baseline is torch and bitsandbytes imported"
        )
        cases = {
            "(a) utils.load_model, fp32": dict(dtype="float32"),
            "(b) lora.load_lora_model, fp32, merged": dict(dtype="float32", lora_path=adapter),
            "(c) utils.load_model, bf16 (file's)": dict(),
        }
        print(
            f"  {'':40s} {'weights':>9s} {'baseline':>9s} {'peak RSS':>9s} {'peak/weights':>13s} "
            f"{'(peak-baseline)/weights':>24s} {'resident after':>15s} {'load':>6s}"
        )
        for label, settings in cases.items():
            row = run("load", checkpoint_dir, **settings)
            weights = row["weight_mb"]
            print(
                f"  {label:40s} {weights / 1e3:6.2f} GB {row['baseline_mb'] / 1e3:6.2f} GB"
                f" {row['peak_mb'] / 1e3:6.2f} GB {row['peak_mb'] / weights:12.2f}x {over(row) / weights:23.2f}x"
                f" {row['resident_mb'] / 1e3:12.2f} GB"
                f" {row['load_s']:5.1f} s"
            )
    print(f"  target: peak RSS <= {LOAD_TARGET}x the weights (in the dtype they are held in)")


def measure_gpu(gpu_model: str, seq_len: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint_dir = Path(workdir) / gpu_model
        t0 = time.perf_counter()
        make_checkpoint(gpu_model, checkpoint_dir, torch.bfloat16)
        print(
            f"\n{gpu_model} config, random weights (written in {time.perf_counter() - t0:.0f} s), on "
            f"{torch.cuda.get_device_name()}: QLoRA step, nf4-dq base in bf16, LoRA r=8 on query and value in fp32 "
            f"under bf16 autocast, AdamW, 1 x {seq_len} tokens"
        )
        row = run("lora", checkpoint_dir, quantize="bnb.nf4-dq", optimizer="AdamW", seq_len=seq_len, device="cuda")
        print(
            f"  peak GPU memory {row['cuda_peak_gb']:.2f} GB (target <= 8 GB), "
            f"of which weights {row['weight_mb'] / 1e3:.2f} GB; "
            f"{row['step_s']:.2f} s for the step, the first (warm-up included)"
        )


def make_adapter(checkpoint_dir: Path, path: Path) -> None:
    """A LoRA adapter for the checkpoint's config (LORA: r=8 on query and value), B non-zero so that merging changes
    the weights, written by lora.save_lora_checkpoint from a model on the meta device whose LoRA tensors alone are real
    (as finetune_lora.py's `save` does with its skeleton)."""
    from lora import lora, save_lora_checkpoint
    from model import Config, LLaMA

    with torch.device("meta"), lora(**LORA):
        skeleton = LLaMA(Config.from_file(checkpoint_dir / "model_config.json"))
    generator = torch.Generator().manual_seed(1)
    for module in skeleton.modules():
        if getattr(module, "adapter", False):  # LoRA's A and B, as utils.load_weights finds them
            module.to_empty(device="cpu")
            for param in module.parameters():
                param.data.normal_(0, 0.02, generator=generator)
    save_lora_checkpoint(skeleton, path)


def run(
    measure: str,
    checkpoint_dir: Path,
    quantize: Optional[str] = None,
    optimizer: str = "AdamW",
    seq_len: int = 512,
    device: str = "cpu",
    lora_path: Optional[Path] = None,
    dtype: Optional[str] = None,
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--measure",
        measure,
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--optimizer",
        optimizer,
        "--seq_len",
        str(seq_len),
        "--device",
        device,
    ]
    if quantize:
        command += ["--quantize", quantize]
    if lora_path:
        command += ["--lora_path", str(lora_path)]
    if dtype:
        command += ["--dtype", dtype]
    output = subprocess.run(command, capture_output=True, text=True)
    if output.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[1:])} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def measure_generate(checkpoint_dir: Path, quantize: Optional[str], new_tokens: int) -> dict:
    from decode import generate
    from utils import load_model

    model = load_model(checkpoint_dir, quantize=quantize).eval()
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    generate(model, prompt, new_tokens, temperature=0.0)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back to the system: RSS then shows what is held
    return {"resident_mb": max_rss_mb("VmRSS"), **weight_figures(model)}  # with the model still held


def measure_load(checkpoint_dir: Path, lora_path: Optional[Path], dtype: Optional[str]) -> dict:
    """Loads the checkpoint in `dtype` (None: the file's), with the adapter at `lora_path` merged when there is one, as
    generate_lora.py does, then reads every weight once, as generating does: a tensor still mapped from the file takes
    memory only once its pages are read. The peak RSS is read by the caller."""
    from lora import load_lora_model
    from utils import load_model

    t0 = time.perf_counter()
    if lora_path is None:
        model = load_model(checkpoint_dir, dtype=DTYPES.get(dtype))
    else:
        model = load_lora_model(checkpoint_dir, lora_path, dtype=DTYPES.get(dtype), merge=True)
    load_s = time.perf_counter() - t0
    for tensor in model.state_dict().values():
        tensor.max()  # a reduction: reads every page, allocates nothing the tensor's size
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # as in measure_generate: RSS then shows what is held
    return {"load_s": load_s, "resident_mb": max_rss_mb("VmRSS"), **weight_figures(model)}


def measure_step(
    checkpoint_dir: Path, kind: str, quantize: Optional[str], optimizer_name: str, seq_len: int, device: str
) -> dict:
    """One forward, backward and optimizer step as the fine-tuning scripts take it (training.cross_entropy_sum over
    every position; on CUDA bf16 weights, LoRA in fp32, under bf16 autocast as in bf16-mixed)."""
    from contextlib import nullcontext

    from lora import lora, mark_only_lora_as_trainable
    from losses import cross_entropy_sum
    from quantize import make_optimizer
    from utils import load_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with lora(**LORA) if kind == "lora" else nullcontext():
        model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize)
    if kind == "lora":
        mark_only_lora_as_trainable(model)
    trainable = [param for param in model.parameters() if param.requires_grad]
    for param in trainable:
        param.data = param.data.float()
    optimizer = make_optimizer(optimizer_name, trainable, lr=1e-4, weight_decay=0.0)
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    model.train()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext():
        loss = cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]) / seq_len
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    figures = {"step_s": time.perf_counter() - t0, "loss": loss.item(), **weight_figures(model)}
    figures["optimizer_mb"] = sum(t.numel() * t.element_size() for t in tensors(optimizer.state_dict()["state"])) / 1e6
    if device == "cuda":
        figures["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return figures


def weight_figures(model: torch.nn.Module) -> dict:
    """MB of every tensor of the state dict (codes and quantization scales; a tied tensor once) and of the
    projections'."""
    unique = {t.data_ptr(): (name, t) for name, t in model.state_dict().items()}.values()
    size = {name: t.numel() * t.element_size() for name, t in unique}
    projections = sum(
        n for name, n in size.items() if not name.startswith(("embed.", "norm.")) and "_norm." not in name
    )
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
