"""What quantization costs a real model, the QLoRA paper's kind of table: the perplexity and peak memory of the same
checkpoint held in fp32, bf16, int8 (LLM.int8()), nf4 and nf4 with double quantization, on one corpus, in one run.

    python benchmarks/quantize_perplexity.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        [--lora_path out/lora/alpaca/lit_model_lora_finetuned.safetensors]

Each configuration is one `evaluate.py --data_file` command in a process of its own, so that its peak resident
memory (what evaluate.py records in perplexity.json) is its own: the weights as held, activations, the logits of a
batch of windows, and the Python, torch and lm-eval a process carries. With --lora_path also the adapter merged into
the fp32 weights, and unmerged on the nf4 base (how QLoRA serves it). The corpus, unless --data_file is given: the
responses of the last `records` Alpaca records in ../shared/data, joined with blank lines (no Hub needed).

A configuration that cannot run here (bitsandbytes built without a backend for this device: its 4- and 8-bit
layers then need a GPU) stays in the table with the one line evaluate.py stopped with; the others run on.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
CONFIGURATIONS = {  # name: evaluate.py flags
    "fp32": ["--precision", "32-true"],
    "bf16": ["--precision", "bf16-true"],
    "int8 (bnb.int8)": ["--precision", "32-true", "--quantize", "bnb.int8"],
    "nf4 (bnb.nf4)": ["--precision", "32-true", "--quantize", "bnb.nf4"],
    "nf4-dq (bnb.nf4-dq)": ["--precision", "32-true", "--quantize", "bnb.nf4-dq"],
}


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_file: Optional[Path] = None,
    records: int = 60,
    lora_path: Optional[Path] = None,
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 4,
) -> None:
    """Prints the table of perplexity and peak memory per configuration.

    Args:
        checkpoint_dir: a converted checkpoint directory.
        data_file: the corpus (.txt, or .jsonl with a "text" field); by default Alpaca responses.
        records: how many Alpaca records' responses make the default corpus (the last ones of the file).
        lora_path: an adapter of `checkpoint_dir`: adds the rows "fp32 + adapter merged" and "nf4 + adapter".
        max_length: perplexity window (evaluate.py --max_length).
        stride: tokens between window starts (evaluate.py --stride).
        batch_size: windows per forward pass.
    """
    configurations = dict(CONFIGURATIONS)
    if lora_path is not None:
        configurations["fp32 + adapter, merged"] = ["--precision", "32-true", "--lora_path", str(lora_path)]
        configurations["fp32 + adapter, merged"] += ["--merge", "true"]
        configurations["nf4 + adapter (QLoRA)"] = ["--precision", "32-true", "--quantize", "bnb.nf4"]
        configurations["nf4 + adapter (QLoRA)"] += ["--lora_path", str(lora_path)]
    corpus = str(data_file) if data_file else f"the responses of the last {records} Alpaca records"
    with tempfile.TemporaryDirectory() as tmp:
        if data_file is None:
            data_file = Path(tmp) / "alpaca_responses.txt"
            texts = [record["output"] for record in json.loads(ALPACA.read_text())[-records:]]
            data_file.write_text("\n\n".join(texts))
        rows = {}
        for name, flags in configurations.items():
            out_dir = Path(tmp) / f"out{len(rows)}"
            command = [sys.executable, str(ROOT / "evaluate.py"), "--checkpoint_dir", str(checkpoint_dir)]
            command += ["--data_file", str(data_file), "--max_length", str(max_length), "--stride", str(stride)]
            command += ["--batch_size", str(batch_size), "--out_dir", str(out_dir), *flags]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
                rows[name] = lines[-1]  # evaluate.py's one line, or a crash's last
                print(f"{name}: did not run: {rows[name]}", file=sys.stderr)
                continue
            rows[name] = json.loads((out_dir / "perplexity.json").read_text())
            figures = rows[name]["data_file"]
            print(f"{name}: perplexity {figures['perplexity']:.4f} in {rows[name]['seconds']:.0f} s", file=sys.stderr)
    if isinstance(rows["fp32"], str):
        raise SystemExit(f"error: the fp32 row, which the others compare with, did not run: {rows['fp32']}")

    figures = rows["fp32"]["data_file"]
    print(
        f"{checkpoint_dir} on {corpus}: {figures['tokens']} tokens, windows of {max_length} every {stride}; "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, one process per row"
    )
    print("| configuration | perplexity | vs fp32 | peak memory (RSS) | seconds |")
    print("|---|---:|---:|---:|---:|")
    base = rows["fp32"]["data_file"]["perplexity"]
    for name, row in rows.items():
        if isinstance(row, str):
            print(f"| {name} | did not run: {row} | | | |")
            continue
        perplexity = row["data_file"]["perplexity"]
        print(
            f"| {name} | {perplexity:.4f} | {perplexity / base - 1:+.2%} | {row['peak_memory_gb']:.2f} GB | "
            f"{row['seconds']:.0f} |"
        )


if __name__ == "__main__":
    CLI(main)
