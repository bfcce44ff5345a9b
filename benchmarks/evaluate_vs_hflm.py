"""lm-eval requests per second: evaluate.py's HarnessLM against lm-eval's own transformers backend (HFLM, what
`lm-eval --model hf` runs) on the same weights, tasks and batch size; on CPU in fp32.

    python benchmarks/evaluate_vs_hflm.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

The checkpoint directory holds both the Hub files (config.json, model.safetensors), which HFLM loads, and our
conversion beside them (lit_model.safetensors, from scripts/convert_hf_checkpoint.py). Three local tasks, one per
request type, are built from the 999 Alpaca records in ../shared/data (no Hub needed):

- alpaca_choice, multiple choice (loglikelihood): which of four responses' first words (the record's own and three
  others') follow the instruction, after `num_fewshot` solved examples, as ARC or HellaSwag are run;
- alpaca_text, loglikelihood_rolling: the responses as documents (the wikitext task's kind of perplexity);
- alpaca_answer, generate_until: greedy, until a blank line or 32 tokens, exact match against the response.

Each task runs `repeats` times with each backend, taking turns (the machine's load then weighs on both alike).
Printed per task and for all three: requests per second of each (the whole lm-eval call; median of the runs) of wall
time and of the process's CPU time, the ratio, and whether every per-request answer and metric agree
(log-likelihoods within 1e-4, or 1e-6 relative for long texts; the same text).
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from evaluate import HarnessLM
from tokenizer import Tokenizer
from utils import load_model, pack_linears

ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    docs: int = 40,
    num_fewshot: int = 3,
    batch_size: int = 8,
    repeats: int = 3,
    threads: Optional[int] = None,
) -> None:
    """Times HarnessLM and HFLM on the three Alpaca tasks.

    Args:
        checkpoint_dir: a Hub-format model directory converted in place by scripts/convert_hf_checkpoint.py.
        docs: documents per task (each multiple-choice document is 4 requests).
        num_fewshot: solved examples before each multiple-choice question.
        batch_size: sequences per forward pass, for both backends.
        repeats: timed runs of each backend on each task, in turns.
        threads: torch's CPU threads (torch.set_num_threads), by default one per core. On a machine other jobs
            share, take 1: the CPU time of one thread is then the work done, while several threads' wall time and
            CPU time both grow with the others' load (each kernel waits at its barriers for the slowest thread).
    """
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.disable(logging.WARNING)  # lm-eval's notes on the tasks' default metrics, once per run
    torch.set_grad_enabled(False)
    if threads is not None:
        torch.set_num_threads(threads)
    model = load_model(checkpoint_dir).eval()
    pack_linears(model, fuse=True)  # as evaluate.py does on CPU
    backends = {
        "HFLM": HFLM(pretrained=str(checkpoint_dir), device="cpu", dtype="float32", batch_size=batch_size),
        "ours": HarnessLM(model, Tokenizer(checkpoint_dir), batch_size=batch_size),
    }
    with tempfile.TemporaryDirectory() as folder:
        tasks = write_tasks(Path(folder), docs, num_fewshot)
        manager = TaskManager(include_path=folder, include_defaults=False)
        wall = {(task, name): [] for task in tasks for name in backends}
        cpu = {(task, name): [] for task in tasks for name in backends}
        answers, metrics = {}, {}
        for _ in range(repeats):
            for task in tasks:
                for name, lm in backends.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    results = simple_evaluate(
                        model=lm, tasks=[task], task_manager=manager, log_samples=True, bootstrap_iters=0
                    )
                    wall[task, name].append(time.perf_counter() - t0)
                    cpu[task, name].append(time.process_time() - c0)
                    answers[task, name] = [sample["resps"] for sample in results["samples"][task]]
                    metrics[task, name] = results["results"][task]
                times = ", ".join(f"{n} {wall[task, n][-1]:.1f} s ({cpu[task, n][-1]:.1f} s CPU)" for n in backends)
                print(f"{task}: {times}", file=sys.stderr)

    print(
        f"{checkpoint_dir}, fp32, CPU ({torch.get_num_threads()} threads), batch_size {batch_size}; "
        f"median of {repeats} runs each, in turns; requests per second of wall time (of CPU time):"
    )
    print("| task | requests | HFLM | ours | ours / HFLM | same answers and metrics |")
    print("|---|---:|---:|---:|---:|---|")
    rows = [(task, [task]) for task in tasks] + [("all three", tasks)]
    for label, row_tasks in rows:
        requests = sum(len(resps) for task in row_tasks for resps in answers[task, "ours"])
        rate = {
            (name, clock): requests / sum(statistics.median(times[task, name]) for task in row_tasks)
            for name in backends
            for clock, times in (("wall", wall), ("cpu", cpu))
        }
        same = all(
            agree(answers[task, "ours"], answers[task, "HFLM"])
            and agree_metrics(metrics[task, "ours"], metrics[task, "HFLM"])
            for task in row_tasks
        )
        figures = [f"{rate[name, 'wall']:.2f} ({rate[name, 'cpu']:.2f})" for name in backends] + [
            f"{rate['ours', 'wall'] / rate['HFLM', 'wall']:.2f}x ({rate['ours', 'cpu'] / rate['HFLM', 'cpu']:.2f}x)"
        ]
        print(f"| {label} | {requests} | {' | '.join(figures)} | {'yes' if same else 'NO'} |")


def write_tasks(folder: Path, docs: int, num_fewshot: int) -> list[str]:
    """The three task YAMLs and their JSONL files in `folder`; returns the task names."""
    records = json.loads(ALPACA.read_text())
    choice, text, answer = [], [], []
    for i, record in enumerate(records[: docs + num_fewshot]):
        prompt = record["instruction"] + (f"\n{record['input']}" if record["input"] else "")
        others = [records[(i + k * 97) % len(records)]["output"] for k in (1, 2, 3)]
        endings = [" " + " ".join(output.split()[:8]) for output in (record["output"], *others)]
        choice.append({"prompt": prompt, "endings": endings[i % 4 :] + endings[: i % 4], "label": (4 - i % 4) % 4})
        text.append({"text": record["output"]})
        answer.append({"prompt": prompt, "answer": record["output"]})
    for name, rows in (("choice", choice), ("text", text), ("answer", answer)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = "dataset_path: json\ntest_split: test\nfewshot_split: fewshot\n"

    def data_files(name: str) -> str:
        return f"dataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n    fewshot: {folder / name}.jsonl\n"

    (folder / "choice.yaml").write_text(
        f"task: alpaca_choice\n{common}{data_files('choice')}output_type: multiple_choice\n"
        f"num_fewshot: {num_fewshot}\n"
        'doc_to_text: "Instruction: {{prompt}}\\nResponse:"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "text.yaml").write_text(
        f"task: alpaca_text\n{common}{data_files('text')}output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "answer.yaml").write_text(
        f"task: alpaca_answer\n{common}{data_files('answer')}output_type: generate_until\n"
        'doc_to_text: "Instruction: {{prompt}}\\nResponse:"\ndoc_to_target: " {{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  do_sample: false\n  max_gen_toks: 32\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return ["alpaca_choice", "alpaca_text", "alpaca_answer"]


def agree(ours: list, reference: list) -> bool:
    """Per request: log-likelihoods within 1e-4 (1e-6 relative for a long text's sum), the same is_greedy and text."""
    for a, b in zip((r for resps in ours for r in resps), (r for resps in reference for r in resps)):
        a, b = a[0], b[0]
        if isinstance(a, str) and a != b:
            return False
        if isinstance(a, tuple) and (abs(a[0] - b[0]) > max(1e-4, 1e-6 * abs(b[0])) or a[1] != b[1]):
            return False
        if isinstance(a, float) and abs(a - b) > max(1e-4, 1e-6 * abs(b)):
            return False
    return True


def agree_metrics(ours: dict, reference: dict) -> bool:
    return all(
        value == reference[key] if not isinstance(value, float) else abs(value - reference[key]) <= 1e-6 * abs(value)
        for key, value in ours.items()
    )


if __name__ == "__main__":
    CLI(main)
