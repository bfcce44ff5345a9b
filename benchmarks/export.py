"""Time and peak memory of the exports: scripts/convert_lit_checkpoint.py (Hugging Face directory) beside transformers'
own way of writing one (from_pretrained + save_pretrained of the same directory), and scripts/export_gguf.py (f16 and
q8_0) beside the size of the weights.

    python benchmarks/export.py                                    # the 134M config, fp32 (about a minute)
    python benchmarks/export.py --models '[134M, Llama-3.2-1B]'    # and a 1.24B model stored in bf16 (2.5 GB)

Each model is a converted checkpoint directory with random N(0, 0.02) weights in the dtype given (134M: float32,
Llama-3.2-1B: bfloat16, as the Hub ships it), the real LLaMA tokenizer.model for 32000-token vocabularies and Llama
3.1's tokenizer.json for 128256. Each measurement runs in its own process, so that its peak resident memory (VmHWM)
is its own: the figures are the wall time, the peak RSS, the peak over the baseline of that process after its imports,
and the bytes of the weights in the file. No llama.cpp converter is installed here (it is not on PyPI), so the GGUF
export is compared with the weights' size: the target is a peak over the baseline well under one copy of the model.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import CLI
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model import Config, LLaMA  # noqa: E402  after the path is set
from utils import copy_tokenizer  # noqa: E402

DTYPES = {"134M": torch.float32, "Llama-3.2-1B": torch.bfloat16}
SHARED = ROOT.parent / "shared" / "data"

# run in a child process: imports, baseline, the export, then time and memory as JSON on the last line
CHILD = """
import json, sys, time
sys.path[:0] = [{root!r}, {root!r} + "/scripts"]
import torch, transformers, gguf
from convert_lit_checkpoint import convert_lit_checkpoint
from export_gguf import export_gguf
def hwm():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
baseline, start = hwm(), time.perf_counter()
{work}
print(json.dumps(dict(seconds=time.perf_counter() - start, peak=hwm(), baseline=baseline)))
"""
WORK = {
    "convert_lit_checkpoint.py": "convert_lit_checkpoint({ckpt!r}, {out!r} + '/hf')",
    "transformers from_pretrained + save_pretrained": (
        "transformers.AutoModelForCausalLM.from_pretrained({out!r} + '/hf', dtype='auto')"
        ".save_pretrained({out!r} + '/hf_ref')"
    ),
    "export_gguf.py --dtype f16": "export_gguf({ckpt!r}, {out!r} + '/model.f16.gguf', dtype='f16')",
    "export_gguf.py --dtype q8_0": "export_gguf({ckpt!r}, {out!r} + '/model.q8_0.gguf', dtype='q8_0')",
}


def main(models: list[str] = ["134M"]) -> None:
    """
    Args:
        models: model.py presets to measure: "134M" (float32) and "Llama-3.2-1B" (bfloat16, 2.5 GB of disk per copy,
            about 8 GB of memory for transformers' reference).
    """
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for name in models:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "out"
            weights = make_checkpoint(name, ckpt)
            print(f"\n{name}: {weights / 1e9:.2f} GB of weights in {DTYPES[name]}")
            print(
                "| step | time | peak RSS | peak over baseline | over baseline / weights |\n|---|---:|---:|---:|---:|"
            )
            results = {}
            for step, work in WORK.items():
                out.mkdir(exist_ok=True)
                code = CHILD.format(root=str(ROOT), work=work.format(ckpt=str(ckpt), out=str(out)))
                run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if run.returncode != 0:
                    raise RuntimeError(f"{step} failed:\n{run.stderr[-2000:]}")
                r = results[step] = json.loads(run.stdout.strip().splitlines()[-1])
                over = r["peak"] - r["baseline"]
                print(
                    f"| {step} | {r['seconds']:.1f} s | {r['peak'] / 1e9:.2f} GB | {over / 1e9:.2f} GB "
                    f"| {over / weights:.2f} |"
                )
            ours, ref = results["convert_lit_checkpoint.py"], results["transformers from_pretrained + save_pretrained"]
            print(
                f"Hugging Face export, ours / transformers: time {ours['seconds'] / ref['seconds']:.2f}x, peak over "
                f"baseline {(ours['peak'] - ours['baseline']) / (ref['peak'] - ref['baseline']):.2f}x"
            )


def make_checkpoint(name: str, directory: Path, dtype: Optional[torch.dtype] = None) -> int:
    """A converted checkpoint of preset `name` with random N(0, 0.02) weights (norms 1) in `dtype` (by default
    DTYPES[name]) and the shared tokenizer of its vocabulary, written one tensor at a time into the dict that is
    saved (never an fp32 copy of a bf16 model). Returns the bytes of the weights. Other benchmarks use it too."""
    dtype = dtype or DTYPES[name]
    config = Config.from_name(name)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LLaMA(config).state_dict().items()}
    if config.tie_embeddings:
        del shapes["lm_head.weight"]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for n, shape in shapes.items():
        tensors[n] = (
            torch.ones(shape, dtype=dtype)
            if n.endswith("norm.weight")
            else torch.empty(shape, dtype=dtype).normal_(std=0.02, generator=generator)
        )
    directory.mkdir(parents=True)
    save_file(tensors, directory / "lit_model.safetensors")
    config.to_file(directory / "model_config.json")
    copy_tokenizer(SHARED if config.vocab_size == 32000 else SHARED / "llama-3.1", directory)
    return sum(t.numel() * t.element_size() for t in tensors.values())


if __name__ == "__main__":
    CLI(main)
