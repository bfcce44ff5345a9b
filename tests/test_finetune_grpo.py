"""finetune_grpo.py's GRPO math against TRL's GRPOTrainer: for the same prompts (prepared by prepare_prompts.py in the
Llama 3.1 chat template, which TRL renders itself from the same messages), the same fixed completions (TRL's generation
replaced by them) and the same rewards (rewards.py's, with a weight each and a None), the advantages, each token's
log-probability, the loss, the clip fractions and KL, and every LoRA gradient equal TRL's in float64 within 1e-10, for
each --loss, each --scale_rewards, beta 0 and above, one pass and a second pass (clipped) over the rollouts, with and
without --mask_truncated_completions, at a temperature of 0.7; on a tiny model and on the real SmolLM2-135M-Instruct.
And micro-batches, each divided by `loss_normalizer`, add up to the batch.

TRL runs its own code (`_generate_and_score_completions`, `_get_per_token_logps_and_entropies`, `_compute_loss`) on a
transformers LlamaForCausalLM with a PEFT LoRA holding the same weights as ours. Its float32 islands are lifted to
float64 as tests/test_finetune_dpo.py lifts them (`exact_in_float64`: norms, rotary tables, the fused head's
log-softmax, here with its temperature), and its rewards and nanstd's Bessel factor, float32 tensors made in the
default dtype, by making float64 the default dtype while it scores."""

import csv
import json
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import finetune_grpo
from conftest import ROOT, command, finetune, run_command
from finetune_grpo import (
    GRPO,
    TOKEN_METRICS,
    completion_logps,
    completion_mask,
    group_advantages,
    grpo_loss,
    loss_normalizer,
    reference_logps,
    setup,
)
from lora import load_lora_model, mark_only_lora_as_trainable
from prepare_prompts import setup as prepare
from rewards import combine, load_rewards, score
from test_finetune_dpo import exact_in_float64, lit_name, make_adapter
from tokenizer import Tokenizer

# three prompts, four completions each: an answer with a number, one without (number_match says None for its group)
RECORDS = [
    {"messages": [{"role": "user", "content": "Tom has 3 apples, buys 4 more. How many?"}], "answer": "3 + 4\n#### 7"},
    {"messages": [{"role": "user", "content": "What is 5 + 7?"}], "answer": "12"},
    {"messages": [{"role": "user", "content": "Say hello."}], "answer": "hello"},
    {"messages": [{"role": "user", "content": "Held out."}], "answer": "0"},
]
COMPLETIONS = [  # by prompt; a text ending in "..." is cut at MAX_NEW_TOKENS (truncated), the others end with EOS
    ["The answer is 7.", "It is 8?", "7", "I think the answer is 7 because three plus four is seven ..."],
    ["12", "The answer is 13?", "twelve", "Maybe 12, or maybe 11, or 10, or something else entirely ..."],
    ["Hello?", "Hi", "Hey there?", "Hm"],  # all None but "Hi" and "Hm", which get the same reward: a zero spread
]
G, MAX_NEW_TOKENS, TEMPERATURE = 4, 12, 0.7
WEIGHTS = [1.0, 0.5]


BREVITY = '''
def brevity(prompts, completions, **fields):
    """1.0 for a completion of at most 4 characters, 0.25 for a longer one, None for a question (it abstains)."""
    return [None if "?" in c else 1.0 if len(c) <= 4 else 0.25 for c in completions]
'''


def reward_functions(tmp_path: Path) -> list:
    """rewards.py's number_match, and a user's reward, `brevity`, loaded from its file."""
    (tmp_path / "my_rewards.py").write_text(BREVITY)
    return load_rewards(["number_match", f"{tmp_path / 'my_rewards.py'}:brevity"])


@contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def exact_with_temperature(monkeypatch: pytest.MonkeyPatch) -> None:
    """`exact_in_float64`, with TRL's fused head dividing the logits by its temperature (GRPO samples at one)."""
    import trl.trainer.utils

    exact_in_float64(monkeypatch)

    class LogProbs:  # what TRL's FusedCausalLMOutput reads: log_probs, entropy, -, mean_logits, is_top1
        @staticmethod
        def apply(hidden, weight, bias, labels, temperature, chunk_size, softcapping, scale, outputs) -> tuple:
            assert bias is None and softcapping is None and scale == 1
            logits = hidden @ weight.t() / temperature
            log_probs = logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
            return log_probs, torch.zeros_like(log_probs), None, None, None  # the entropy is only logged

    monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", LogProbs)


def make_rollouts(checkpoint_dir: Path, directory: Path, adapter_scale: float, groups: int = 3) -> dict:
    """The prompts prepared by prepare_prompts.py, each repeated G times, the completions' ids (EOS after those that
    end), their texts as decoded for the rewards, and an adapter as if trained (on every projection) with its PEFT
    export. The first `groups` prompts of RECORDS and their completions."""
    data = directory / "prompts.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    prepare(
        destination_path=directory / "data",
        checkpoint_dir=checkpoint_dir,
        data_file_path=data,
        test_split_fraction=0.25,
    )
    splits = [torch.load(directory / "data" / f"{split}.pt", weights_only=True) for split in ("train", "test")]
    by_answer = {record["answer"]: record for record in splits[0] + splits[1]}
    records = [by_answer[record["answer"]] for record in RECORDS[:groups]]  # in RECORDS's order
    tokenizer = Tokenizer(checkpoint_dir)
    completion_ids = []
    for texts in COMPLETIONS[:groups]:
        for text in texts:
            ids = tokenizer.encode(text, bos=False).tolist()
            ids = ids[:MAX_NEW_TOKENS] if text.endswith("...") else ids + [tokenizer.eos_id]
            assert len(ids) <= MAX_NEW_TOKENS
            completion_ids.append(ids)
    adapter, peft_dir = make_adapter(
        checkpoint_dir, directory / "adapter", scale=adapter_scale, targets=("all_linear",)
    )
    return {
        "records": records,
        "messages": [record["messages"] for record in RECORDS[:groups]],
        "prompt_ids": [record["prompt_ids"] for record in records for _ in range(G)],
        "completion_ids": completion_ids,
        "texts": [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids],
        "truncated": [ids[-1] not in tokenizer.stop_ids for ids in completion_ids],
        "adapter": adapter,
        "peft_dir": peft_dir,
        "directory": directory,
    }


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, llama3_checkpoint_dir) -> dict:
    """`make_rollouts` for the tiny model with Llama 3.1's tokenizer and chat template."""
    return make_rollouts(llama3_checkpoint_dir, tmp_path_factory.mktemp("grpo"), adapter_scale=0.2)


def perturbations(names: list[str], seed: int, scale: float) -> dict[str, float]:
    """What an optimizer step might do to each LoRA weight: random changes, the same on both sides."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(1, generator=generator).item() * scale for name in sorted(names)}


def ours(
    checkpoint_dir: Path, rollouts: dict, grpo: GRPO, functions: list, step: float, dtype: torch.dtype = torch.float64
) -> dict:
    """The step's parts on one micro-batch holding all the completions: rewards, advantages, the old log-probabilities
    (with a second pass: before the update), the update (`step`: each LoRA weight times 1 + its change), the reference,
    the log-probabilities, the loss and its gradients."""
    model = load_lora_model(checkpoint_dir, rollouts["adapter"], dtype=dtype)
    mark_only_lora_as_trainable(model)
    prompts, completions = rollouts["prompt_ids"], [torch.tensor(ids) for ids in rollouts["completion_ids"]]
    answers = [record["answer"] for record in rollouts["records"] for _ in range(G)]
    prompt_texts = [record["prompt"] for record in rollouts["records"] for _ in range(G)]
    per_function = score(functions, prompt_texts, rollouts["texts"], {"answer": answers})
    rewards = combine(per_function, WEIGHTS)
    advantages, zero_std = group_advantages(rewards, G, grpo.scale_rewards)
    old_logps = None
    if grpo.num_iterations > 1:  # kept from the rollouts, then the model moves
        with torch.no_grad():
            old_logps = completion_logps(model, prompts, completions, 1024, grpo.temperature)
        changes = perturbations([n for n, p in model.named_parameters() if p.requires_grad], 0, step)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.mul_(1 + changes[name])
    ref_logps = reference_logps(model, prompts, completions, 1024, grpo.temperature) if grpo.beta else None
    logps = completion_logps(model, prompts, completions, 1024, grpo.temperature)
    mask = completion_mask([len(c) for c in completions], rollouts["truncated"], grpo.mask_truncated_completions)
    normalizer = loss_normalizer(grpo, len(completions), int(mask.sum()), n_micro_batches=1)
    loss, metrics = grpo_loss(grpo, logps, old_logps, ref_logps, advantages, mask, normalizer)
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    return {
        "per_function": per_function,
        "rewards": rewards,
        "advantages": advantages,
        "zero_std": zero_std.double().mean().item(),
        "logps": logps.detach(),
        "mask": mask,
        "loss": loss.item(),
        "metrics": dict(zip(TOKEN_METRICS, (metrics / mask.sum()).tolist())),
        "grads": grads,
    }


def trl(
    checkpoint_dir: Path,
    rollouts: dict,
    grpo: GRPO,
    functions: list,
    step: float,
    tmp_path: Path,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """TRL's GRPOTrainer on the same rollouts: its generation replaced by the fixed completions, its rewards
    `functions` (given the completions' text: TRL hands conversational completions over as messages), its
    `_generate_and_score_completions` (advantages; the old and reference log-probabilities), then the same update of
    the LoRA weights, its per-token log-probabilities and its `_compute_loss`, and the gradients by our names."""
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    def for_trl(name, function):
        def reward(prompts, completions, **fields):
            return function(prompts=prompts, completions=[c[0]["content"] for c in completions], **fields)

        reward.__name__ = name
        return reward

    model = LlamaForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    peft_config = LoraConfig.from_pretrained(rollouts["peft_dir"])
    peft_config.inference_mode = False
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,  # GRPOConfig's default: bf16 autocast, which leaves float64 alone but would round fp32
        gradient_checkpointing=False,
        per_device_train_batch_size=len(rollouts["completion_ids"]),
        num_generations=G,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=grpo.temperature,
        loss_type=grpo.loss,
        scale_rewards=grpo.scale_rewards,
        beta=grpo.beta,
        epsilon=grpo.epsilon,
        epsilon_high=grpo.epsilon_high,
        num_iterations=grpo.num_iterations,
        mask_truncated_completions=grpo.mask_truncated_completions,
        reward_weights=WEIGHTS,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[for_trl(name, function) for name, function in functions],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": rollouts["messages"][0], "answer": "0"}]),  # batches are ours
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    set_peft_model_state_dict(trainer.model, load_file(rollouts["peft_dir"] / "adapter_model.safetensors"))
    seen = {}

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        seen["prompt_ids"] = prompt_ids
        return [list(ids) for ids in rollouts["completion_ids"]], None

    trainer._generate_single_turn = generate
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test does not run
    trainer.model.train()
    inputs = [
        {"prompt": messages, "answer": record["answer"]}
        for messages, record in zip(rollouts["messages"], rollouts["records"])
        for _ in range(G)
    ]
    with default_dtype(dtype):
        output = trainer._generate_and_score_completions(inputs)
    assert ("old_per_token_logps" in output) == (grpo.num_iterations > 1)
    named = {lit_name(n): p for n, p in trainer.model.named_parameters() if ".default." in n}
    if grpo.num_iterations > 1:
        changes = perturbations(list(named), 0, step)
        with torch.no_grad():
            for name, param in named.items():
                param.mul_(1 + changes[name])
    get_logps = trainer._get_per_token_logps_and_entropies

    def logps_kept(*args, **kwargs):  # the log-probabilities _compute_loss computes, kept
        seen["logps"], *rest = get_logps(*args, **kwargs)
        return seen["logps"], *rest

    trainer._get_per_token_logps_and_entropies = logps_kept
    loss = trainer._compute_loss(trainer.model, output)
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return {
        "prompt_ids": seen["prompt_ids"],
        "advantages": output["advantages"],
        "logps": seen["logps"].detach(),
        "completion_mask": output["completion_mask"],
        "loss": loss.item(),
        "metrics": metrics,
        "grads": {name: param.grad for name, param in named.items()},
        "rewards": trainer._logs["rewards"],
    }


CASES = [  # (loss, scale_rewards, beta, num_iterations, mask_truncated_completions): each loss with beta 0 and above,
    # one pass and two, each scale_rewards with several
    ("grpo", "group", 0.0, 1, False),
    ("grpo", "none", 0.04, 2, True),
    ("bnpo", "batch", 0.04, 1, False),
    ("bnpo", "group", 0.0, 2, False),
    ("dr_grpo", "none", 0.0, 2, False),
    ("dr_grpo", "batch", 0.04, 1, True),
    ("dapo", "group", 0.04, 2, False),
    ("dapo", "batch", 0.0, 1, True),
    ("dapo", "none", 0.0, 1, False),
]


def settings(loss: str, scale_rewards: str, beta: float, num_iterations: int, mask_truncated: bool) -> GRPO:
    return GRPO(
        loss=loss,
        num_generations=G,
        scale_rewards=scale_rewards,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=beta,
        num_iterations=num_iterations,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        mask_truncated_completions=mask_truncated,
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-10) -> float:
    """Within `rtol` of the expected tensor's largest magnitude; returns the relative difference."""
    scale = max(expected.abs().max().item(), 1e-300)
    error = (actual - expected).abs().max().item() / scale
    assert error <= rtol, f"{what}: {error} relative to {scale}"
    return error


def assert_same_as_trl(mine: dict, theirs: dict, grpo: GRPO, functions: list, rollouts: dict) -> dict[str, float]:
    """The checks of a batch against TRL; returns the largest relative differences."""
    # the same prompts (prepare_prompts.py's ids, TRL's own rendering) and rewards, None where TRL has NaN
    assert [list(ids) for ids in theirs["prompt_ids"]] == [ids.tolist() for ids in rollouts["prompt_ids"]]
    for j, (name, _) in enumerate(functions):
        expected = torch.tensor(theirs["rewards"][name], dtype=torch.float64)
        torch.testing.assert_close(mine["per_function"][:, j], expected, rtol=0, atol=0, equal_nan=True)
    assert mine["advantages"].abs().max() > 0
    errors = {"advantages": assert_close(mine["advantages"], theirs["advantages"], "advantages")}
    assert mine["zero_std"] == pytest.approx(theirs["metrics"]["frac_reward_zero_std"], rel=1e-7)  # TRL's: float32

    assert torch.equal(mine["mask"].bool(), theirs["completion_mask"].bool())
    # where a completion is learned from (TRL does not attend to the tokens of those truncated and masked)
    errors["logps"] = assert_close(mine["logps"] * mine["mask"], theirs["logps"] * mine["mask"], "log-probabilities")
    assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-10, abs=1e-14)
    errors["loss"] = abs(mine["loss"] - theirs["loss"]) / abs(theirs["loss"])
    assert mine["loss"] != 0
    for name in TOKEN_METRICS[:3]:  # TRL's: a float32 division
        assert mine["metrics"][name] == pytest.approx(theirs["metrics"][name], rel=1e-7, abs=1e-14), name
    if grpo.beta:
        assert mine["metrics"]["kl"] == pytest.approx(theirs["metrics"]["kl"], rel=1e-10)
        assert mine["metrics"]["kl"] > 0
    assert set(mine["grads"]) == set(theirs["grads"])
    for name, grad in mine["grads"].items():
        assert grad.abs().max() > 0, name
        errors["grads"] = max(errors.get("grads", 0), assert_close(grad, theirs["grads"][name], name))
    return errors


@pytest.mark.parametrize("loss, scale_rewards, beta, num_iterations, mask_truncated", CASES)
def test_a_batch_equals_trl_in_float64(
    loss, scale_rewards, beta, num_iterations, mask_truncated, llama3_checkpoint_dir, rollouts, tmp_path, monkeypatch
):
    grpo = settings(loss, scale_rewards, beta, num_iterations, mask_truncated)
    functions = reward_functions(tmp_path)
    step = 0.5  # the second pass's update of each LoRA weight (relative): enough to clip some tokens
    mine = ours(llama3_checkpoint_dir, rollouts, grpo, functions, step)
    exact_with_temperature(monkeypatch)
    theirs = trl(llama3_checkpoint_dir, rollouts, grpo, functions, step, tmp_path)

    errors = assert_same_as_trl(mine, theirs, grpo, functions, rollouts)
    assert mine["rewards"].isnan().sum() == 2  # completions no reward scored
    assert (mine["zero_std"] > 0) == (scale_rewards != "batch")  # a group of equal rewards
    assert len(mine["grads"]) == 2 * 7 * 2  # every projection of both layers, A and B
    if num_iterations > 1:  # the second pass clipped some tokens, not all
        assert 0 < mine["metrics"]["clip_ratio/region_mean"] < 1
    print("largest relative differences:", {name: f"{error:.1e}" for name, error in errors.items()})


def test_a_batch_on_smollm2_equals_trl_in_float64(smollm2_dir, tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct (its ChatML template, 30 layers, real log-probabilities), LoRA on every
    projection, the first two prompts and their completions: DAPO with the KL to the base, equal to TRL in float64
    within 1e-10, all 420 LoRA gradients (measured: 1e-13). One pass: a second one, clipped, agrees as well on this
    model (measured with all three prompts: 9% of the tokens clipped, gradients within 4e-13) but takes twice the
    time."""
    from convert_hf_checkpoint import convert_hf_checkpoint

    if not (smollm2_dir / "lit_model.safetensors").is_file():  # another test may have converted it already
        convert_hf_checkpoint(smollm2_dir)
    smollm2_rollouts = make_rollouts(smollm2_dir, tmp_path, adapter_scale=0.02, groups=2)
    grpo = settings("dapo", "group", 0.04, 1, mask_truncated=False)
    functions = reward_functions(tmp_path)
    mine = ours(smollm2_dir, smollm2_rollouts, grpo, functions, step=0.5)
    exact_with_temperature(monkeypatch)
    theirs = trl(smollm2_dir, smollm2_rollouts, grpo, functions, 0.5, tmp_path)
    errors = assert_same_as_trl(mine, theirs, grpo, functions, smollm2_rollouts)
    assert len(mine["grads"]) == 30 * 7 * 2
    print("largest relative differences:", {name: f"{error:.1e}" for name, error in errors.items()})


def test_a_batch_in_fp32_rounds_no_worse_than_trl(llama3_checkpoint_dir, rollouts, tmp_path, monkeypatch):
    """fp32 on both sides, TRL's own code throughout (its norm and rotary tables, its head's log-softmax in chunks):
    our log-probabilities, loss and LoRA gradients are no further from the exact values (float64, TRL's, as above)
    than twice TRL's own distance from them (DAPO, the KL to the base, a second pass clipped). Measured: the
    log-probabilities 1.0e-7 both, the loss 3.2e-8 ours and 1.6e-7 TRL's, the gradients 2.4e-6 and 3.1e-6 (relative
    to the largest magnitude)."""
    grpo = settings("dapo", "group", 0.04, 2, mask_truncated=False)
    functions = reward_functions(tmp_path)
    mine = ours(llama3_checkpoint_dir, rollouts, grpo, functions, 0.5, dtype=torch.float32)
    theirs = trl(llama3_checkpoint_dir, rollouts, grpo, functions, 0.5, tmp_path / "fp32", dtype=torch.float32)
    exact_with_temperature(monkeypatch)
    exact = trl(llama3_checkpoint_dir, rollouts, grpo, functions, 0.5, tmp_path / "float64")

    def distances(side: dict) -> dict[str, float]:
        mask = mine["mask"]
        logps = (side["logps"].double() - exact["logps"]) * mask
        found = {"logps": logps.abs().max().item() / (exact["logps"] * mask).abs().max().item()}
        found["loss"] = abs(side["loss"] - exact["loss"]) / abs(exact["loss"])
        for name, grad in exact["grads"].items():
            error = (side["grads"][name].double() - grad).abs().max().item() / grad.abs().max().item()
            found["grads"] = max(found.get("grads", 0.0), error)
        return found

    ours_rounding, trl_rounding = distances(mine), distances(theirs)
    print("relative distance from the exact values, ours:", ours_rounding, "TRL:", trl_rounding)
    assert min(trl_rounding.values()) > 0 and trl_rounding["grads"] > 1e-7  # fp32 did round: a comparison
    for what, error in ours_rounding.items():
        assert error <= 2 * trl_rounding[what], what


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_micro_batches_add_up_to_the_batch(loss, llama3_checkpoint_dir, rollouts, tmp_path):
    """The batch's 12 completions in micro-batches of 5, 5 and 2, each loss divided by `loss_normalizer`: their sum and
    gradients are those of the batch in one micro-batch (grpo, dr_grpo, dapo), or, for bnpo, whose loss TRL defines
    per micro-batch, the mean of the micro-batches' own token means."""
    grpo = settings(loss, "group", 0.04, 1, mask_truncated=True)
    model = load_lora_model(llama3_checkpoint_dir, rollouts["adapter"], dtype=torch.float64)
    mark_only_lora_as_trainable(model)
    prompts, completions = rollouts["prompt_ids"], [torch.tensor(ids) for ids in rollouts["completion_ids"]]
    answers = [record["answer"] for record in rollouts["records"] for _ in range(G)]
    rewards = combine(score(reward_functions(tmp_path), [""] * len(answers), rollouts["texts"], {"answer": answers}))
    advantages, _ = group_advantages(rewards, G, grpo.scale_rewards)
    lengths = [len(c) for c in completions]
    mask = completion_mask(lengths, rollouts["truncated"], True)
    n_tokens = int(mask.sum())

    def run(parts: list[slice]) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for part in parts:
            p, c = prompts[part], completions[part]
            ref = reference_logps(model, p, c, 1024, grpo.temperature)
            logps = completion_logps(model, p, c, 1024, grpo.temperature)
            m = completion_mask(lengths[part], rollouts["truncated"][part], True)
            normalizer = loss_normalizer(grpo, len(completions), n_tokens, len(parts))
            part_loss, _ = grpo_loss(grpo, logps, None, ref, advantages[part], m, normalizer)
            part_loss.backward()
            total += part_loss.item()
        return total, {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}

    whole, whole_grads = run([slice(0, 12)])
    split, split_grads = run([slice(0, 5), slice(5, 10), slice(10, 12)])
    if loss == "bnpo":
        means = [run([part])[0] for part in (slice(0, 5), slice(5, 10), slice(10, 12))]
        assert split == pytest.approx(sum(means) / 3, rel=1e-12) and split != pytest.approx(whole, rel=1e-3)
    else:
        assert split == pytest.approx(whole, rel=1e-12)
        for name, grad in split_grads.items():
            assert_close(grad, whole_grads[name], name, rtol=1e-12)


# The script: a tiny model (conftest's, LLaMA's sentencepiece tokenizer, the Alpaca prompt), prompts prepared by
# prepare_prompts.py, a reward that random text earns about half the time (the letter "e"), a few steps
WORDS = ["apple", "river", "music", "garden", "stone", "cloud", "metal", "paper", "bread", "window"]
PROMPTS = [{"prompt": f"Say a word like {word}.", "answer": word} for word in WORDS]
RUN = dict(
    rewards=["format"],
    format_pattern="e",
    num_generations=4,
    max_new_tokens=6,
    temperature=1.0,
    lora_targets="all_linear",
    batch_size=2,
    micro_batch_size=4,
    max_steps=4,
    learning_rate=3e-2,
    warmup_steps=1,
    eval_interval=2,
    eval_batches=1,
    save_interval=2,
    max_seq_length=128,
)


def prepare_prompts(directory: Path, checkpoint_dir: Path) -> Path:
    """PROMPTS prepared by prepare_prompts.py in `directory`; returns the data directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "prompts.jsonl").write_text("".join(json.dumps(record) + "\n" for record in PROMPTS))
    prepare(
        destination_path=directory / "data",
        checkpoint_dir=checkpoint_dir,
        data_file_path=directory / "prompts.jsonl",
        test_split_fraction=0.2,
    )
    return directory / "data"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, checkpoint_dir) -> Path:
    return prepare_prompts(tmp_path_factory.mktemp("prompts"), checkpoint_dir)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, checkpoint_dir, prompts) -> Path:
    """4 steps, uninterrupted."""
    out_dir = tmp_path_factory.mktemp("unbroken")
    finetune(setup, data_dir=prompts, checkpoint_dir=checkpoint_dir, out_dir=out_dir, **RUN)
    return out_dir


def test_a_few_steps_write_the_adapter_the_logs_and_the_plots_and_the_rewards_are_those_of_the_completions(
    unbroken, checkpoint_dir
):
    """The adapter records the method; each step logs the reward (between 0 and 1, the share of completions with an
    "e": the format reward's mean), its spread, the share of groups that teach nothing, lengths, clip fractions and the
    split of the step's time; the test prompts' greedy reward at steps 0, 2 and 4; loss.png and reward.png."""
    with safe_open(unbroken / "lit_model_lora_finetuned.safetensors", framework="pt") as f:
        training = json.loads(f.metadata()["training"])
    assert training["method"] == "grpo" and training["loss"] == "dapo" and training["rewards"] == ["format"]
    rows = list(csv.DictReader(open(unbroken / "logs" / "version_0" / "metrics.csv")))
    steps = [row for row in rows if row.get("reward")]
    assert [int(row["step"]) for row in steps] == [1, 2, 3, 4]
    for row in steps:
        assert float(row["reward"]) == float(row["rewards/format/mean"])  # one reward, weight 1
        assert 0 <= float(row["reward"]) <= 1 and 0 <= float(row["frac_reward_zero_std"]) <= 1
        assert 1 <= float(row["completions/mean_length"]) <= 6 and float(row["clip_ratio/region_mean"]) == 0
        assert float(row["time/generation"]) > 0 and float(row["time/update"]) > 0
        assert "kl" not in row or row["kl"] == ""  # beta 0: no reference, no KL
    assert [int(row["step"]) for row in rows if row.get("eval_reward")] == [0, 2, 4]
    state = torch.load(unbroken / "train_state.pt", weights_only=True)
    assert [reward for _, reward in state["rewards"]["train"]] == [float(row["reward"]) for row in steps]
    for plot in ("loss.png", "reward.png"):
        assert (unbroken / plot).read_bytes().startswith(b"\x89PNG")


def test_a_stopped_run_resumes_to_the_losses_and_rewards_of_an_unbroken_one(
    unbroken, checkpoint_dir, prompts, tmp_path, monkeypatch
):
    """Stopped after the checkpoint of step 2 and resumed: the same completions (sampled from a generator seeded
    with the step), rewards and losses as the unbroken run, and the same adapter."""

    class Stop(Exception):
        pass

    saving = finetune_grpo.save

    def save_then_stop(fabric, model, optimizer, state, *args):
        saving(fabric, model, optimizer, state, *args)
        if state["step"] == 2:
            raise Stop

    flags = dict(data_dir=prompts, checkpoint_dir=checkpoint_dir, out_dir=tmp_path, **RUN)
    with monkeypatch.context() as patch:
        patch.setattr(finetune_grpo, "save", save_then_stop)
        with pytest.raises(Stop):
            finetune(setup, **flags)
    finetune(setup, resume="auto", **flags)
    expected = torch.load(unbroken / "train_state.pt", weights_only=True)
    resumed = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert [step for step, _ in resumed["history"]["train"]] == [1, 2, 3, 4]
    assert resumed["history"] == expected["history"] and resumed["rewards"] == expected["rewards"]
    losses = [loss for _, loss in expected["history"]["train"]]
    assert any(loss != 0 for loss in losses)  # it learned something
    adapter = "lit_model_lora_finetuned.safetensors"
    for name, tensor in load_file(unbroken / adapter).items():
        assert torch.equal(load_file(tmp_path / adapter)[name], tensor), name


def test_two_ddp_processes_give_the_losses_of_one(unbroken, checkpoint_dir, prompts, tmp_path):
    """Every process samples the whole batch's completions (the same ones: same weights, same generator), the
    micro-batches of the update are shared out (2 of 8 completions: 1 each)."""
    args = command("finetune_grpo.py", prompts, checkpoint_dir, tmp_path, devices=2, strategy="ddp", **RUN)
    result = run_command(args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = torch.load(unbroken / "train_state.pt", weights_only=True)
    two = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert two["rewards"] == expected["rewards"]  # the same completions
    assert [loss for _, loss in two["history"]["train"]] == pytest.approx(
        [loss for _, loss in expected["history"]["train"]], abs=1e-5
    )


RAISES = "def reward(prompts, completions, **fields):\n    raise KeyError('score')\n"
SHORT = "def reward(prompts, completions, **fields):\n    return [1.0] * (len(completions) - 1)\n"
NAN = "def reward(prompts, completions, **fields):\n    return [float('nan')] * len(completions)\n"


def test_bad_input_is_one_line_and_nothing_is_written(checkpoint_dir, llama3_checkpoint_dir, prompts, tmp_path):
    result = subprocess.run(
        command("finetune_grpo.py", prompts, checkpoint_dir, tmp_path / "out", num_generations=1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr.startswith("error: --num_generations 1: GRPO learns by comparing")
    assert result.stderr.count("\n") == 1
    for name, source in (("raises", RAISES), ("short", SHORT), ("nan", NAN)):
        (tmp_path / f"{name}.py").write_text(source)
    flags = dict(RUN, data_dir=prompts, checkpoint_dir=checkpoint_dir, out_dir=tmp_path / "out")
    for changes, message in [
        (dict(rewards=[f"{tmp_path}/missing.py:reward"]), "the reward file"),
        (dict(rewards=[f"{tmp_path}/nan.py:rewrd"]), "has no function 'rewrd' (it defines: reward)"),
        (dict(rewards=[f"{tmp_path}/raises.py:reward"]), "raised KeyError: 'score'"),
        (dict(rewards=[f"{tmp_path}/short.py:reward"]), "returned 1 values for 2 completions; return one each"),
        (dict(rewards=[f"{tmp_path}/nan.py:reward"]), "returned nan for completion 0; return a finite number"),
        (dict(max_new_tokens=120), "which with --max_new_tokens 120 is more than the 128 tokens of the context"),
        (dict(checkpoint_dir=llama3_checkpoint_dir), "was tokenized with another tokenizer"),
        (dict(num_generations=3), "completions must be a multiple of --train.micro_batch_size 4"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
            finetune(setup, **{**flags, **changes})
    assert not (tmp_path / "out").exists()
