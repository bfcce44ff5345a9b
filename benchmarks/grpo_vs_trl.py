"""GRPO with LoRA, step time split into generation and update, and peak memory: ours (finetune_grpo.py) vs TRL's
GRPOTrainer with PEFT, generating with transformers (no vLLM), on CPU in fp32.

    python benchmarks/grpo_vs_trl.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

The same model (a converted Hub-format directory: transformers reads its model.safetensors, we our
lit_model.safetensors), the same prompts (small additions, "What is 12 + 7? Reply with just the number.", in the
model's chat template on both sides), the same group size, completion length, sampling temperature, LoRA (r=8,
alpha=16, every linear projection, no dropout), learning rate, loss (dapo) and reward (rewards.number_match). Each side
runs in its own process, one after the other, so that its peak resident memory (ru_maxrss) is its own:

- ours: finetune_grpo.py's setup on prompts prepared by prepare_prompts.py, --train.micro_batch_size completions per
  forward and backward pass, its other settings its defaults (gradient checkpointing on); the split from its logged
  time/generation (sampling with decode.decode_all and scoring) and time/update;
- TRL: GRPOTrainer(peft_config=...) with per_device_train_batch_size = that micro-batch and as many gradient
  accumulation steps as make up the prompts x num_generations completions (one generation and one optimizer step per
  step), its other settings its defaults (gradient checkpointing on); generation time is its
  `_generate_and_score_completions` (sampling with transformers' generate, scoring), the rest of the step its update.

The first step of each side is left out of the means (warm-up). Prints a table and the ratios.
"""

import csv
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jsonargparse import CLI  # noqa: E402


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    steps: int = 4,
    prompts: int = 4,
    num_generations: int = 6,
    max_new_tokens: int = 16,
    temperature: float = 0.7,
    learning_rate: float = 3e-4,
    micro_batch_size: Optional[int] = None,
    threads: Optional[int] = None,
    side: Optional[Literal["ours", "trl"]] = None,
    workdir: Optional[Path] = None,
) -> None:
    micro_batch_size = micro_batch_size or prompts * num_generations  # by default one micro-batch a step
    settings = dict(steps=steps, prompts=prompts, num_generations=num_generations, max_new_tokens=max_new_tokens)
    settings.update(temperature=temperature, learning_rate=learning_rate, micro_batch_size=micro_batch_size)
    if prompts * num_generations % micro_batch_size:
        raise SystemExit(f"--micro_batch_size {micro_batch_size} must divide {prompts * num_generations} completions")
    if side is not None:  # one side, in this process: prints its figures as JSON
        import torch

        if threads:
            torch.set_num_threads(threads)
        run = run_ours if side == "ours" else run_trl
        figures = run(Path(checkpoint_dir), Path(workdir), **settings)
        figures["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(figures))
        return
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        write_records(workdir / "additions.jsonl")
        reports = {}
        for name in ("ours", "trl"):
            args = [sys.executable, __file__, "--side", name, "--checkpoint_dir", str(checkpoint_dir)]
            args += ["--workdir", str(workdir)] + [f"--{key}={value}" for key, value in settings.items()]
            args += [f"--threads={threads}"] if threads else []
            result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
            reports[name] = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"{prompts} prompts x {num_generations} completions of at most {max_new_tokens} tokens a step, "
        f"{steps} steps (the first left out), micro-batches of {micro_batch_size} completions, CPU fp32, "
        f"{threads or 'all'} threads"
    )
    print(f"{'':32} {'step s':>8} {'generation s':>13} {'update s':>9} {'max RSS GB':>11}")
    for name, label in (("ours", "ours (finetune_grpo.py)"), ("trl", "TRL GRPOTrainer + peft")):
        r = reports[name]
        print(f"{label:32} {r['step']:8.2f} {r['generation']:13.2f} {r['update']:9.2f} {r['max_rss_gb']:11.2f}")
    ours, trl = reports["ours"], reports["trl"]
    ratio, memory = trl["step"] / ours["step"], ours["max_rss_gb"] / trl["max_rss_gb"]
    shares = ours["generation"] / ours["step"], trl["generation"] / trl["step"]
    print(f"step time TRL / ours: {ratio:.2f}x; max RSS ours / TRL: {memory:.2f}x")
    print(f"generation's share of the step: ours {shares[0]:.2f}, TRL {shares[1]:.2f}")


def write_records(path: Path) -> None:
    random.seed(0)
    pairs = [(random.randint(1, 60), random.randint(1, 60)) for _ in range(400)]
    records = [{"prompt": f"What is {a} + {b}? Reply with just the number.", "answer": str(a + b)} for a, b in pairs]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def run_ours(checkpoint_dir: Path, workdir: Path, steps: int, prompts: int, **settings) -> dict:
    from finetune_grpo import setup
    from prepare_prompts import setup as prepare
    from training import TrainArgs

    prepare(
        destination_path=workdir / "ours_data",
        checkpoint_dir=checkpoint_dir,
        data_file_path=workdir / "additions.jsonl",
        test_split_fraction=0.01,
    )
    train = TrainArgs(
        batch_size=prompts,
        micro_batch_size=settings["micro_batch_size"],
        max_steps=steps,
        learning_rate=settings["learning_rate"],
        warmup_steps=0,
        eval_interval=10_000,
        eval_batches=1,
        save_interval=10_000,
        max_seq_length=1024,
        gradient_checkpointing=True,  # finetune_grpo.py's default, and TRL's
    )
    setup(
        data_dir=workdir / "ours_data",
        checkpoint_dir=checkpoint_dir,
        out_dir=workdir / "ours_out",
        num_generations=settings["num_generations"],
        max_new_tokens=settings["max_new_tokens"],
        temperature=settings["temperature"],
        lora_targets="all_linear",
        train=train,
    )
    rows = list(csv.DictReader(open(workdir / "ours_out" / "logs" / "version_0" / "metrics.csv")))
    rows = [row for row in rows if row.get("time/generation")][1:]  # the first step left out
    generation = statistics.mean(float(row["time/generation"]) for row in rows)
    update = statistics.mean(float(row["time/update"]) for row in rows)
    return {"step": generation + update, "generation": generation, "update": update}


def run_trl(checkpoint_dir: Path, workdir: Path, steps: int, prompts: int, **settings) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards import number_match

    records = [json.loads(line) for line in (workdir / "additions.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in records]
    )

    def reward(prompts, completions, answer, **fields):  # TRL hands conversational completions over as messages
        return number_match(prompts, [c[-1]["content"] for c in completions], answer)

    G = settings["num_generations"]
    config = GRPOConfig(
        output_dir=str(workdir / "trl_out"),
        per_device_train_batch_size=settings["micro_batch_size"],  # completions per forward and backward
        gradient_accumulation_steps=prompts * G // settings["micro_batch_size"],  # one generation, one update a step
        num_generations=G,
        max_completion_length=settings["max_new_tokens"],
        temperature=settings["temperature"],
        learning_rate=settings["learning_rate"],
        max_steps=steps,
        loss_type="dapo",
        beta=0.0,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_dropout=True,
        seed=1337,
    )
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    generation_times, step_times = [], []
    generate_and_score = trainer._generate_and_score_completions

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        output = generate_and_score(*args, **kwargs)
        generation_times.append(time.perf_counter() - t0)
        return output

    trainer._generate_and_score_completions = timed

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    trainer.train()
    step = statistics.mean(step_times[1:])
    generation = statistics.mean(generation_times[1 : len(step_times)])
    return {"step": step, "generation": generation, "update": step - generation}


if __name__ == "__main__":
    CLI(main, as_positional=False)
