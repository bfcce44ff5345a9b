"""DPO with LoRA, step time and memory: ours (finetune_dpo.py's step) vs TRL's DPOTrainer with PEFT, on CPU in fp32
or on a GPU in bf16-mixed.

    python benchmarks/dpo_vs_trl.py
    python benchmarks/dpo_vs_trl.py --device cuda --model Llama-3.2-1B    # benchmarks/gpu_check.sh runs this

A model.py preset with random weights (benchmarks/export.py's checkpoint: the 134M LLaMA in fp32 or Llama-3.2-1B in
bf16, with the shared LLaMA-2 or Llama 3.1 tokenizer) in our format and, converted by
scripts/convert_lit_checkpoint.py, in Hugging Face's; one initial LoRA adapter (r=8, alpha=16, dropout 0, query and
value; B made non-zero so the model is not yet its reference) exported with scripts/export_peft.py; and preference
pairs made of real Alpaca records (../shared/data/alpaca_en_demo.json): the prompt in the Alpaca template, the chosen
answer the record's own output, the rejected one the next record's, prepared by prepare_preferences.py
(--max_seq_length 256). Both sides take the same micro-batches of pairs, and in both the reference is the same model
with the adapter switched off:

- ours as finetune_dpo.py's step: the reference log-probabilities under lora.lora_disabled without gradients, then
  the model's, chosen and rejected answers packed into one row without padding (answer_logps), preference_loss,
  backward, AdamW over the LoRA weights;
- TRL as its trainer computes a step: DPOTrainer(peft_config=...) with the same adapter weights, its collator
  padding the batch, its compute_loss (the reference forward with the adapter disabled, then the model's), backward,
  AdamW over the LoRA weights.

On CPU everything is fp32; on CUDA both hold the base in bf16 and the LoRA weights in fp32 and run the forward pass
under bf16 autocast (finetune_dpo.py's bf16-mixed), eager (finetune_dpo.py compiles the Blocks on CUDA by default;
TRL does not), without activation checkpointing on either side.

Each side runs in its own process, so that its peak memory (resident, VmHWM; on CUDA also the GPU's, allocated) is its
own, and the two take turns one step each, so that both meet the same load on a shared machine (finetune_vs_hf.serve
and take_turns). The ratios: TRL's step time over ours (the sum over every step but the first, and the median of the
paired steps) and the CPU time per step; our peak memory over TRL's.
"""

import json
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from export import make_checkpoint
from finetune_vs_hf import SHARED_DATA, serve, take_turns  # which puts the repository and scripts/ on sys.path
from jsonargparse import CLI

LORA = dict(r=8, alpha=16, dropout=0.0, targets=("query", "value"))
BETA = 0.1
NAMES = {"ours": "ours (finetune_dpo.py's step)", "trl": "TRL DPOTrainer + peft"}


def main(
    steps: int = 6,
    micro_batch_size: int = 4,
    rounds: int = 2,
    model: Literal["134M", "Llama-3.2-1B"] = "134M",
    device: Literal["cpu", "cuda"] = "cpu",
    threads: Optional[int] = None,
    side: Optional[Literal["ours", "trl"]] = None,
    workdir: Optional[Path] = None,
) -> None:
    """Times DPO steps with LoRA of ours and of TRL on the same weights and pairs.

    Args:
        steps: micro-batches of pairs (one optimizer step each) per round.
        micro_batch_size: pairs per step.
        rounds: passes over the micro-batches; the sides alternate step by step.
        model: the model.py preset, with random weights.
        device: "cpu" (fp32) or "cuda" (bf16-mixed).
        threads: CPU threads for PyTorch; by default one per core.
        side: internal: serve the steps of one side in this process.
        workdir: internal: the directory with the checkpoint, adapters and batches.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    if side is not None:
        if threads:
            torch.set_num_threads(threads)
        build = train_ours if side == "ours" else train_trl
        serve(workdir, lambda workdir: build(workdir, torch.device(device)))
        return

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        tokens = make_inputs(workdir, model, steps, micro_batch_size)
        command = [sys.executable, __file__, "--workdir", str(workdir), "--device", device]
        command += ["--threads", str(threads)] if threads else []
        reports, results = take_turns(command, list(NAMES), steps, rounds)
    times, cpu_times, losses = ({name: results[name][key] for name in NAMES} for key in ("time", "cpu", "loss"))

    paired = statistics.median(trl / ours for trl, ours in zip(times["trl"][1:], times["ours"][1:]))
    where = (
        f"{torch.cuda.get_device_name()}, bf16-mixed"
        if device == "cuda"
        else f"fp32, CPU ({reports['ours']['threads']} threads)"
    )
    print(
        f"{model} LLaMA (random weights), DPO (beta {BETA}) with LoRA r=8 on query and value, {where}, {rounds} x "
        f"{steps} steps of {micro_batch_size} Alpaca pairs (about {sum(tokens) // len(tokens)} tokens of prompt + "
        "answers a step), the sides taking turns:"
    )
    for name in NAMES:
        cuda = f"   peak GPU memory {reports[name]['max_cuda_gb']:.2f} GB" if device == "cuda" else ""
        print(
            f"  {NAMES[name]:32s} {statistics.mean(times[name][1:]):6.3f} s a step   max RSS "
            f"{reports[name]['max_rss_gb']:.2f} GB (after loading: {reports[name]['loaded_rss_gb']:.2f} GB){cuda}"
        )
    print(
        f"  step time TRL / ours: {sum(times['trl'][1:]) / sum(times['ours'][1:]):.2f}x "
        f"(median of paired steps: {paired:.2f}x; "
        f"CPU time per step: {sum(cpu_times['trl'][1:]) / sum(cpu_times['ours'][1:]):.2f}x)"
    )
    print(f"  max RSS ours / TRL:   {reports['ours']['max_rss_gb'] / reports['trl']['max_rss_gb']:.2f}x")
    if device == "cuda":
        print(f"  peak GPU memory ours / TRL: {reports['ours']['max_cuda_gb'] / reports['trl']['max_cuda_gb']:.2f}x")
    # the same weights and pairs: the first step's losses agree (later ones drift apart with rounding in AdamW)
    print(f"  first-step loss: ours {losses['ours'][0]:.6f}, TRL {losses['trl'][0]:.6f}")


def make_inputs(workdir: Path, name: str, n_batches: int, micro_batch_size: int) -> list[int]:
    """The checkpoint of preset `name` in both formats, the initial adapter in both formats, and the micro-batches of
    pairs; returns the tokens of each (prompt + chosen + prompt + rejected)."""
    from convert_lit_checkpoint import convert_lit_checkpoint
    from export_peft import export_peft
    from lora import LoRA, lora, save_lora_checkpoint
    from model import LLaMA
    from prepare_preferences import setup as prepare
    from utils import load_config

    checkpoint_dir = workdir / "checkpoint"
    make_checkpoint(name, checkpoint_dir)
    convert_lit_checkpoint(checkpoint_dir=checkpoint_dir, out_dir=workdir / "hf")
    with torch.device("meta"), lora(**LORA):  # the LoRA tensors alone are made real
        skeleton = LLaMA(load_config(checkpoint_dir))
    torch.manual_seed(0)
    for module in skeleton.modules():
        if isinstance(module, LoRA):
            module.to_empty(device="cpu")
            module.reset_parameters()
            module.B.data.normal_(0, 0.01)  # B non-zero: the model differs from its reference, as after some training
    save_lora_checkpoint(skeleton, workdir / "adapter.safetensors")
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


def train_ours(workdir: Path, device: torch.device) -> Callable[[list[dict]], float]:
    from finetune_dpo import Preference, answer_logps, preference_loss, reference_logps
    from lora import load_lora_checkpoint, lora, mark_only_lora_as_trainable
    from utils import load_model

    cuda = device.type == "cuda"
    with lora(**LORA):
        model = load_model(workdir / "checkpoint", device, torch.bfloat16 if cuda else torch.float32)
    mark_only_lora_as_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:  # fp32, as finetune_dpo.py keeps them under bf16-mixed
        param.data = param.data.float()
    load_lora_checkpoint(model, workdir / "adapter.safetensors")
    optimizer = torch.optim.AdamW(trainable, lr=5e-5)
    preference = Preference("dpo", BETA, None, "base")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    model.train()

    def step(pairs: list[dict]) -> float:
        with autocast:
            reference = reference_logps(model, pairs, None, preference, 256, -100)
            logps, n_tokens = answer_logps(model, pairs, 256, -100)
            losses, _ = preference_loss(preference, logps, reference, n_tokens)
        loss = losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def train_trl(workdir: Path, device: torch.device) -> Callable[[list[dict]], float]:
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    cuda = device.type == "cuda"
    model = LlamaForCausalLM.from_pretrained(
        workdir / "hf", dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa"
    )
    # TRL wants a tokenizer, which the pairs, tokenized already, do not need: transformers reads LLaMA's
    # tokenizer.model only with protobuf, so Llama 3.1's tokenizer.json stands in (with id 0 to pad, below)
    tokenizer = AutoTokenizer.from_pretrained(SHARED_DATA / "llama-3.1")
    tokenizer.pad_token = tokenizer.eos_token
    peft_config = LoraConfig.from_pretrained(workdir / "peft")
    peft_config.inference_mode = False
    args = DPOConfig(  # no activation checkpointing, as ours (TRL's defaults: bf16 and checkpointing)
        output_dir=str(workdir / "trl"),
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,
        bf16=False,  # the step below runs under the same autocast as ours: the trainer's own is not in compute_loss
        gradient_checkpointing=False,
        use_cpu=not cuda,
        report_to="none",
    )
    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # stands by: batches are ours
    trainer = DPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    trainer.data_collator.pad_token_id = 0  # an id of this vocabulary; padding is masked out anyway
    set_peft_model_state_dict(trainer.model, load_file(workdir / "peft" / "adapter_model.safetensors"))
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.device.type == device.type for p in trainable)  # PEFT's fp32 LoRA
    optimizer = torch.optim.AdamW(trainable, lr=5e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    trainer.model.train()

    def step(pairs: list[dict]) -> float:
        features = [{key: pair[key].tolist() for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for pair in pairs]
        batch = {key: value.to(device) for key, value in trainer.data_collator(features).items()}
        with autocast:
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


if __name__ == "__main__":
    CLI(main)
