"""Peak memory per process of full fine-tuning under --strategy fsdp (FSDP2) on 2 processes, against one process.

    python benchmarks/fsdp_memory.py   # a few minutes on 2 CPU cores

On CPU (gloo), the 134M config (n_embd 768, 12 layers, vocab 32000) with random N(0, 0.02) weights in fp32, 16 records
of 512 tokens (shared Alpaca answers joined), finetune_full.py for 1 step of 2 records in micro-batches of 1 with
gradient checkpointing (its default), then its checkpoints: the same micro-batch on every process. The figure is each
process's peak resident memory (VmHWM, read from /proc every 20 ms until it exits; the interpreter and libraries
alone take about 0.45 GB), and the progress bar's peak during the steps (the first process's).
Each process first loads the whole checkpoint into CPU memory, then keeps its half (`training.shard_model`).
"""

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from export import SHARED, make_checkpoint  # noqa: E402  after the path is set

from prepare_alpaca import setup as prepare  # noqa: E402


def main(steps: int = 1, seq_len: int = 512) -> None:
    """Args:
    steps: optimizer steps of each run.
    seq_len: tokens per record (each record is cut to it).
    """
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, data = Path(tmp) / "ckpt", Path(tmp) / "data"
        weights = make_checkpoint("134M", ckpt)
        answers = " ".join(r["output"] for r in json.loads((SHARED / "alpaca_en_demo.json").read_text()))
        texts = [answers[i * 97 : i * 97 + 4000] for i in range(17)]  # each over seq_len tokens
        records = [{"instruction": f"Repeat text {i}.", "input": "", "output": text} for i, text in enumerate(texts)]
        data.mkdir()
        (data / "records.json").write_text(json.dumps(records))
        prepare(
            destination_path=data,
            checkpoint_dir=ckpt,
            data_file_path=data / "records.json",
            test_split_fraction=1 / 17,
            max_seq_length=seq_len,
        )
        print(f"134M: {weights / 1e9:.2f} GB of fp32 weights; 16 bytes per parameter: {4 * weights / 1e9:.2f} GB")
        print("| run | process | peak RSS | progress bar's peak |\n|---|---|---:|---:|")
        for name, flags in (("1 process", []), ("FSDP2, 2 processes", ["--devices", "2", "--strategy", "fsdp"])):
            command = [sys.executable, "finetune_full.py", "--data_dir", str(data), "--checkpoint_dir", str(ckpt)]
            command += ["--out_dir", str(Path(tmp) / name.replace(" ", "_")), *flags, "--train.batch_size", "2"]
            command += ["--train.micro_batch_size", "1", "--train.max_steps", str(steps), "--train.warmup_steps", "1"]
            command += ["--train.eval_interval", "1000", "--train.save_interval", "1000"]
            command += ["--train.max_seq_length", str(seq_len)]
            peaks, output = run_watching_memory(command)
            bar = re.findall(r"peak_memory=([\d.]+) GB", output)[-1]
            for rank, peak in enumerate(peaks):
                print(f"| {name} | {rank} | {peak / 1e9:.2f} GB | {bar + ' GB' if rank == 0 else ''} |")


def run_watching_memory(command: list[str]) -> tuple[list[int], str]:
    """Runs `command` (and the processes it starts) to the end; returns each process's last peak resident memory
    (VmHWM, bytes; the launcher first) and what it wrote to stderr and stdout."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    output = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        for pid in [process.pid, *children(process.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if found := re.search(r"VmHWM:\s+(\d+) kB", status):  # not once it has exited
                peaks[pid] = int(found.group(1)) * 1024
        time.sleep(0.02)
    reader.join()
    if process.returncode != 0:
        raise RuntimeError("".join(output)[-3000:])
    return list(peaks.values()), "".join(output)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


if __name__ == "__main__":
    CLI(main)
