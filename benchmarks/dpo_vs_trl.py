"""DPO with LoRA, step time and memory: ours (finetune_dpo.py's step) vs TRL's DPOTrainer with PEFT, on CPU in fp32.

    python benchmarks/dpo_vs_trl.py

The random 134M LLaMA of benchmarks/finetune_vs_hf.py (the same weights for both sides), one initial LoRA adapter
(r=8, alpha=16, dropout 0, query and value; B made non-zero so the model is not yet its reference) exported with
scripts/export_peft.py, and preference pairs made of real Alpaca records (../shared/data/alpaca_en_demo.json): the
prompt in the Alpaca template, the chosen answer the record's own output, the rejected one the next record's,
prepared by prepare_preferences.py (--max_seq_length 256). Both sides take the same micro-batches of pairs, and in
both the reference is the same model with the adapter switched off:

- ours as finetune_dpo.py's step: the reference log-probabilities under lora.lora_disabled without gradients, then
  the model's, chosen and rejected answers packed into one row without padding (answer_logps), preference_loss,
  backward, AdamW over the LoRA weights;
- TRL as its trainer computes a step: DPOTrainer(peft_config=...) with the same adapter weights, its collator
  padding the batch, its compute_loss (the reference forward with the adapter disabled, then the model's), backward,
  AdamW over the LoRA weights.

Each side runs in its own process, so that its peak resident memory (VmHWM) is its own, and the two take turns one
step each, so that both meet the same load on a shared machine (finetune_vs_hf.serve). The ratios: TRL's step time
over ours (the sum over every step but the first, and the median of the paired steps) and the CPU time per step;
our peak memory over TRL's.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from finetune_vs_hf import SHARED_DATA, make_checkpoint, serve  # which puts the repository on sys.path
from jsonargparse import CLI

LORA = dict(r=8, alpha=16, dropout=0.0, targets=("query", "value"))
BETA = 0.1
NAMES = {"ours": "ours (finetune_dpo.py's step)", "trl": "TRL DPOTrainer + peft"}


def main(
    steps: int = 6,
    micro_batch_size: int = 4,
    rounds: int = 2,
    threads: Optional[int] = None,
    side: Optional[Literal["ours", "trl"]] = None,
    workdir: Optional[Path] = None,
) -> None:
    """Times DPO steps with LoRA of ours and of TRL on the same weights and pairs.

    Args:
        steps: micro-batches of pairs (one optimizer step each) per round.
        micro_batch_size: pairs per step.
        rounds: passes over the micro-batches; the sides alternate step by step.
        threads: CPU threads for PyTorch; by default one per core.
        side: internal: serve the steps of one side in this process.
        workdir: internal: the directory with the checkpoint, adapters and batches.
    """
    if side is not None:
        if threads:
            torch.set_num_threads(threads)
        serve(workdir, train_ours if side == "ours" else train_trl)
        return

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        tokens = make_inputs(workdir, steps, micro_batch_size)
        command = [sys.executable, __file__, "--workdir", str(workdir)]
        command += ["--threads", str(threads)] if threads else []
        processes = {
            name: subprocess.Popen(command + ["--side", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for name in NAMES
        }
        reports = {name: json.loads(process.stdout.readline()) for name, process in processes.items()}  # loaded
        times, cpu_times, losses = ({name: [] for name in NAMES} for _ in range(3))
        for step in range(rounds * steps):
            order = list(NAMES) if step % 2 == 0 else list(reversed(NAMES))  # neither side always goes first
            for name in order:
                processes[name].stdin.write(f"{step % steps}\n")
                processes[name].stdin.flush()
                result = json.loads(processes[name].stdout.readline())
                times[name].append(result["time"])
                cpu_times[name].append(result["cpu"])
                losses[name].append(result["loss"])
        for name, process in processes.items():
            process.stdin.close()
            reports[name].update(json.loads(process.stdout.readline()))
            process.wait()

    paired = statistics.median(trl / ours for trl, ours in zip(times["trl"][1:], times["ours"][1:]))
    print(
        f"134M LLaMA, DPO (beta {BETA}) with LoRA r=8 on query and value, fp32, CPU ({reports['ours']['threads']} "
        f"threads), {rounds} x {steps} steps of {micro_batch_size} Alpaca pairs (about {sum(tokens) // len(tokens)} "
        "tokens of prompt + answers a step), the sides taking turns:"
    )
    for name in NAMES:
        print(
            f"  {NAMES[name]:32s} {statistics.mean(times[name][1:]):6.2f} s a step   max RSS "
            f"{reports[name]['max_rss_gb']:.2f} GB (after loading: {reports[name]['loaded_rss_gb']:.2f} GB)"
        )
    print(
        f"  step time TRL / ours: {sum(times['trl'][1:]) / sum(times['ours'][1:]):.2f}x "
        f"(median of paired steps: {paired:.2f}x; "
        f"CPU time per step: {sum(cpu_times['trl'][1:]) / sum(cpu_times['ours'][1:]):.2f}x)"
    )
    print(f"  max RSS ours / TRL:   {reports['ours']['max_rss_gb'] / reports['trl']['max_rss_gb']:.2f}x")
    # the same weights and pairs: the first step's losses agree (later ones drift apart with rounding in AdamW)
    print(f"  first-step loss: ours {losses['ours'][0]:.6f}, TRL {losses['trl'][0]:.6f}")


def make_inputs(workdir: Path, n_batches: int, micro_batch_size: int) -> list[int]:
    """The checkpoint, the initial adapter in both formats, and the micro-batches of pairs; returns the tokens of each
    (prompt + chosen + prompt + rejected)."""
    from export_peft import export_peft
    from lora import LoRALinear, lora, save_lora_checkpoint
    from prepare_preferences import setup as prepare
    from utils import load_model

    checkpoint_dir = make_checkpoint(workdir / "checkpoint")
    with lora(**LORA):
        model = load_model(checkpoint_dir)
    for module in model.modules():  # B non-zero: the model differs from its reference, as after some training
        if isinstance(module, LoRALinear):
            module.lora.B.data = torch.randn(module.lora.B.shape) * 0.01
    save_lora_checkpoint(model, workdir / "adapter.safetensors")
    export_peft(lora_path=workdir / "adapter.safetensors", out_dir=workdir / "peft")

    records = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text())
    pairs = [
        {
            "prompt": record["instruction"] + ("\n\n" + record["input"] if record["input"] else ""),
            "chosen": record["output"],
            "rejected": records[(i + 1) % len(records)]["output"],
        }
        for i, record in enumerate(records)
    ]
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    prepare(
        destination_path=workdir / "data",
        checkpoint_dir=checkpoint_dir,
        data_file_path=workdir / "pairs.jsonl",
        max_seq_length=256,
        max_prompt_length=128,
    )
    pairs = torch.load(workdir / "data" / "train.pt", weights_only=True)  # in random order
    batches = [pairs[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(n_batches)]
    torch.save(batches, workdir / "batches.pt")
    return [
        sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in batch)
        for batch in batches
    ]


def train_ours(workdir: Path) -> Callable[[list[dict]], float]:
    from finetune_dpo import Preference, answer_logps, preference_loss, reference_logps
    from lora import load_lora_checkpoint, lora, mark_only_lora_as_trainable
    from utils import load_model

    with lora(**LORA):
        model = load_model(workdir / "checkpoint")
    load_lora_checkpoint(model, workdir / "adapter.safetensors")
    mark_only_lora_as_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    preference = Preference("dpo", BETA, None, "base")
    model.train()

    def step(pairs: list[dict]) -> float:
        reference = reference_logps(model, pairs, None, preference, 256, -100)
        logps, n_tokens = answer_logps(model, pairs, 256, -100)
        losses, _ = preference_loss(preference, logps, reference, n_tokens)
        loss = losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def train_trl(workdir: Path) -> Callable[[list[dict]], float]:
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = LlamaForCausalLM.from_pretrained(workdir / "checkpoint", dtype=torch.float32, attn_implementation="sdpa")
    # TRL wants a tokenizer, which the pairs, tokenized already, do not need: transformers reads LLaMA's
    # tokenizer.model only with protobuf, so Llama 3.1's tokenizer.json stands in (with id 0 to pad, below)
    tokenizer = AutoTokenizer.from_pretrained(SHARED_DATA / "llama-3.1")
    tokenizer.pad_token = tokenizer.eos_token
    peft_config = LoraConfig.from_pretrained(workdir / "peft")
    peft_config.inference_mode = False
    args = DPOConfig(  # fp32 and no activation checkpointing, as ours (TRL's defaults: bf16 and checkpointing)
        output_dir=str(workdir / "trl"),
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
    )
    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # stands by: batches are ours
    trainer = DPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    trainer.data_collator.pad_token_id = 0  # an id of this vocabulary; padding is masked out anyway
    set_peft_model_state_dict(trainer.model, load_file(workdir / "peft" / "adapter_model.safetensors"))
    optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=5e-5)
    trainer.model.train()

    def step(pairs: list[dict]) -> float:
        features = [{key: pair[key].tolist() for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for pair in pairs]
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(features))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


if __name__ == "__main__":
    CLI(main)
