"""finetune_dpo.py against TRL: one batch of pairs (loss, each pair's rewards and log-probabilities, every gradient)
equal to TRL's DPOTrainer (dpo, ipo) and CPOTrainer (simpo), with a PEFT LoRA of the same weights, on a tiny model
and on the real SmolLM2-135M-Instruct; each answer's log-probability equal to transformers' on prompt + answer in
the Llama 3.1 and SmolLM2 chat templates; a step of the script itself from an SFT adapter equal to TRL's; resume
with precomputed reference log-probabilities; a preference learned from chance to >= 0.9 held-out reward accuracy;
the adapter in generate_lora.py, merge_lora.py and PEFT; one-line errors on bad input.

All fp32 on CPU, and on SmolLM2 in float64 too, where rounding cannot hide a difference. TRL's trainers run their own
loss code (compute_loss, get_batch_loss_metrics) on the batch their own collators make from the prepared ids; the
models are transformers' LlamaForCausalLM with PEFT."""

import csv
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import finetune_dpo
from conftest import ROOT, caught_models, finetune, make_checkpoint
from convert_hf_checkpoint import convert_hf_checkpoint
from data import generate_prompt
from export_peft import export_peft, peft_to_lit_name
from finetune_dpo import Preference, answer_logps, preference_loss, reference_logps, setup
from lora import LoRALinear, load_lora_model, lora, mark_only_lora_as_trainable, save_lora_checkpoint
from prepare_preferences import setup as prepare
from utils import load_model

CONVERSATIONS = [
    {
        "prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "I would rather not say."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "And a naïve fruit? 🍎"},
        ],
        "chosen": [{"role": "assistant", "content": "An apple, 🍎.\nCrisp."}],
        "rejected": [{"role": "assistant", "content": "A rock."}],
    },
    {
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "Five, I think."}],
    },
    {
        "prompt": [{"role": "user", "content": "Count to three."}],
        "chosen": [{"role": "assistant", "content": "One, two, three."}],
        "rejected": [{"role": "assistant", "content": "Three, two, one."}],
    },
    {
        "prompt": [{"role": "user", "content": "Say something kind."}],
        "chosen": [{"role": "assistant", "content": "You are doing well."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
    {
        "prompt": [{"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "London, of course."}],
    },
]
LOSS_TYPES = {"dpo": "sigmoid", "ipo": "ipo"}  # ours -> TRL DPOTrainer's loss_type; simpo is CPOTrainer's
QUICK = dict(eval_interval=1000, eval_batches=1, save_interval=1000, warmup_steps=1, max_seq_length=256)


def prepare_pairs(checkpoint_dir: Path, directory: Path, records: list, test_split_fraction: float = 1 / 3) -> Path:
    path = directory / "pairs.jsonl"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    prepare(
        destination_path=directory,
        checkpoint_dir=checkpoint_dir,
        data_file_path=path,
        test_split_fraction=test_split_fraction,
        max_seq_length=256,
        max_prompt_length=128,
    )
    return directory


@pytest.fixture(scope="module")
def llama3_pairs(tmp_path_factory, llama3_checkpoint_dir) -> Path:
    """CONVERSATIONS in the Llama 3.1 chat template, for the tiny model with its vocabulary: 4 to train, 2 to test."""
    return prepare_pairs(llama3_checkpoint_dir, tmp_path_factory.mktemp("llama3_pairs"), CONVERSATIONS)


def make_adapter(checkpoint_dir: Path, directory: Path, scale: float, seed: int = 0, **settings) -> tuple[Path, Path]:
    """An adapter as if trained (random A and B of about `scale`, DoRA's magnitudes off ‖W‖) and its PEFT export:
    (our file, PEFT's directory). `settings`: lora()'s targets, rslora, dora, ranks."""
    with lora(r=4, alpha=8, dropout=0.0, **settings):
        model = load_model(checkpoint_dir)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora.A.data = torch.randn(module.lora.A.shape, generator=generator) * scale
            module.lora.B.data = torch.randn(module.lora.B.shape, generator=generator) * scale
            if module.lora.magnitude is not None:
                module.lora.magnitude.data *= 1 + 0.2 * torch.rand(module.lora.magnitude.shape, generator=generator)
    directory.mkdir(parents=True, exist_ok=True)
    save_lora_checkpoint(model, directory / "adapter.safetensors")
    export_peft(lora_path=directory / "adapter.safetensors", out_dir=directory / "peft")
    return directory / "adapter.safetensors", directory / "peft"


def ours_on_one_batch(model, pairs: list[dict], preference: Preference) -> dict:
    """finetune_dpo.py's step on one micro-batch holding the whole batch: the reference, the forward pass, the loss,
    its mean's gradients."""
    model.zero_grad(set_to_none=True)
    reference = reference_logps(model, pairs, None, preference, 1024, -100)
    logps, n_tokens = answer_logps(model, pairs, 1024, -100)
    losses, rewards = preference_loss(preference, logps, reference, n_tokens)
    losses.mean().backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    return {"loss": losses.mean().item(), "rewards": rewards, "logps": logps.detach(), "grads": grads}


def trl_on_one_batch(
    checkpoint_dir: Path,
    peft_dir: Path,
    pairs: list[dict],
    preference: Preference,
    tmp_path: Path,
    pretrained: bool = False,
    per_pair: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """TRL's loss, logged figures (means over the batch), per-pair rewards and log-probabilities (with `per_pair`:
    a batch of one pair each) and gradients (by our names) on `pairs`, with transformers' model of `checkpoint_dir`
    and the PEFT adapter of `peft_dir`: as a new adapter whose weights are then set (the reference is the base: TRL
    disables the adapter), or, `pretrained`, loaded as a trained one (TRL keeps a copy of it as the reference). Also
    the trained PeftModel itself ("model")."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    peft_config = None
    if pretrained:
        model = PeftModel.from_pretrained(model, peft_dir, is_trainable=True)
    else:
        peft_config = LoraConfig.from_pretrained(peft_dir)
        peft_config.inference_mode = False
    common = dict(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, gradient_checkpointing=False)
    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # stands by: batches are ours
    if preference.method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.utils import DPODataCollatorWithPadding

        args = CPOConfig(
            beta=preference.beta,
            simpo_gamma=preference.gamma,
            loss_type="simpo",
            cpo_alpha=0.0,
            max_length=None,
            **common,
        )
        trainer = CPOTrainer(model, args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
        collate = DPODataCollatorWithPadding(pad_token_id=tokenizer.pad_token_id)

        def run(batch: list[dict]) -> tuple[torch.Tensor, dict]:
            loss, metrics = trainer.get_batch_loss_metrics(trainer.model, collate([cpo_features(p) for p in batch]))
            return loss, {**metrics, "loss": loss.item()}
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=preference.beta, loss_type=[LOSS_TYPES[preference.method]], max_length=None, **common)
        trainer = DPOTrainer(
            model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )

        def run(batch: list[dict]) -> tuple[torch.Tensor, dict]:
            loss = trainer.compute_loss(trainer.model, trainer.data_collator([dpo_features(p) for p in batch]))
            metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
            return loss, {**metrics, "loss": loss.item()}  # the trainer logs the loss itself, not in _metrics

    if not pretrained:
        set_peft_model_state_dict(trainer.model, load_file(peft_dir / "adapter_model.safetensors"))
    trainer.model.train()
    loss, metrics = run(pairs)
    loss.backward()
    grads = {lit_name(name): param.grad for name, param in trainer.model.named_parameters() if ".default." in name}
    rewards, logps = torch.zeros(2, len(pairs), dtype=torch.float64), torch.zeros(2, len(pairs), dtype=torch.float64)
    with torch.no_grad():
        for i, pair in enumerate(pairs if per_pair else []):  # TRL logs means: a batch of one gives each pair's
            _, metrics_i = run([pair])
            rewards[:, i] = torch.tensor(
                [metrics_i["rewards/chosen"], metrics_i["rewards/rejected"]], dtype=torch.float64
            )
            logps[:, i] = torch.tensor([metrics_i["logps/chosen"], metrics_i["logps/rejected"]], dtype=torch.float64)
    return {
        "loss": loss.item(),
        "rewards": rewards,
        "logps": logps,
        "grads": grads,
        "metrics": metrics,
        "model": trainer.model,
    }


def dpo_features(pair: dict) -> dict:
    return {key: pair[key].tolist() for key in ("prompt_ids", "chosen_ids", "rejected_ids")}


def cpo_features(pair: dict) -> dict:
    """A pair as CPOTrainer's tokenize_row leaves it."""
    prompt = pair["prompt_ids"].tolist()
    features = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for answer in ("chosen", "rejected"):
        ids = prompt + pair[f"{answer}_ids"].tolist()
        features |= {f"{answer}_input_ids": ids, f"{answer}_attention_mask": [1] * len(ids)}
        features[f"{answer}_labels"] = [-100] * len(prompt) + pair[f"{answer}_ids"].tolist()
    return features


def lit_name(peft_name: str) -> str:
    """Our name of a PEFT parameter of adapter "default" ("...q_proj.lora_A.default.weight")."""
    name = peft_name.replace(".default", "")
    return peft_to_lit_name(name.removesuffix(".weight") if "lora_magnitude_vector" in name else name)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "", atol: float = 1e-12
) -> None:
    """Within `rtol` of the expected tensor's largest magnitude (or `atol`, if more)."""
    error = (actual - expected).abs().max().item()
    bound = max(rtol * expected.abs().max().item(), atol)
    assert error <= bound, f"{what}: {error} vs {expected.abs().max().item()}"


def assert_same_as_trl(
    ours: dict, theirs: dict, preference: Preference, pairs: list[dict], logps_rtol: float, rtol: float = 1e-5
) -> None:
    """Loss, each pair's log-probabilities and every gradient within `rtol` relative; each pair's rewards within
    `rtol` relative or, if more, what `logps_rtol` leaves in them: a DPO or IPO reward is beta times the difference of
    two log-probabilities, sums over the answer (about -250 on the tiny model: 20 tokens at -12 each), and an error
    of `logps_rtol` in them is one of beta * logps_rtol * |logps| in the reward."""
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=rtol)
    accuracy = (ours["rewards"][0] > ours["rewards"][1]).float().mean().item()
    assert 0 < accuracy < 1 and accuracy == theirs["metrics"]["rewards/accuracies"]
    rounding = preference.beta * logps_rtol * ours["logps"].abs().max().item()
    assert_close(ours["rewards"], theirs["rewards"], rtol=rtol, what="rewards", atol=rounding)
    # DPOTrainer logs log-probabilities summed over the answer, CPOTrainer (simpo) their mean per token
    n_tokens = torch.tensor([[len(p["chosen_ids"]) for p in pairs], [len(p["rejected_ids"]) for p in pairs]])
    expected = theirs["logps"] * n_tokens if preference.method == "simpo" else theirs["logps"]
    assert_close(ours["logps"], expected, rtol=rtol, what="logps")
    assert set(ours["grads"]) == set(theirs["grads"]) and len(ours["grads"]) > 0
    for name, grad in ours["grads"].items():
        assert grad.abs().max() > 0, name
        assert_close(grad, theirs["grads"][name], rtol=rtol, what=name)


@pytest.mark.parametrize(
    "method, settings",
    [
        ("dpo", dict(targets=("query", "value"))),
        ("ipo", dict(targets=("query", "value"))),
        ("simpo", dict(targets=("query", "value"))),
        ("dpo", dict(targets=("all_linear",), rslora=True, dora=True, ranks={"blocks.1.mlp.down_proj": 2})),
    ],
    ids=["dpo", "ipo", "simpo", "dpo-dora-rslora-ranks"],
)
def test_one_batch_equals_trl_on_a_tiny_model(method, settings, llama3_checkpoint_dir, llama3_pairs, tmp_path):
    """The model with a trained adapter (the reference: the base), four pairs in one micro-batch. The tiny random
    model's log-probabilities are all near -log(128256), so its rewards (0.04) are tiny differences of large sums:
    they are held to the sums' fp32 rounding (2 ulps; on rewards of 0.04 that differ by 1.5e-6, a bound of 5.6e-6)."""
    adapter, peft_dir = make_adapter(llama3_checkpoint_dir, tmp_path, scale=0.2, **settings)
    pairs = torch.load(llama3_pairs / "train.pt", weights_only=True)
    preference = Preference(method, 2.0 if method == "simpo" else 0.1, 0.7 if method == "simpo" else None, "base")
    model = load_lora_model(llama3_checkpoint_dir, adapter)
    mark_only_lora_as_trainable(model)
    ours = ours_on_one_batch(model, pairs, preference)
    theirs = trl_on_one_batch(llama3_checkpoint_dir, peft_dir, pairs, preference, tmp_path)
    assert ours["rewards"][0].ne(ours["rewards"][1]).all() and ours["rewards"].abs().min() > 0  # a real test
    assert_same_as_trl(ours, theirs, preference, pairs, logps_rtol=2 * torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, tmp_path_factory):
    """The real SmolLM2-135M-Instruct converted, CONVERSATIONS prepared in its chat template, and a trained adapter
    on every projection of attention and MLP, with its PEFT export."""
    if not (smollm2_dir / "lit_model.safetensors").is_file():  # tests/test_smollm2.py may have converted it already
        convert_hf_checkpoint(smollm2_dir)
    directory = tmp_path_factory.mktemp("smollm2_dpo")
    data_dir = prepare_pairs(smollm2_dir, directory / "data", CONVERSATIONS)
    adapter, peft_dir = make_adapter(smollm2_dir, directory / "adapter", scale=0.02, targets=("all_linear",))
    return smollm2_dir, data_dir, adapter, peft_dir


def transformers_answer_logps(hf_model, tokenizer, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of CONVERSATIONS's answers through transformers alone, in the order of the prepared `pairs` (2, pairs):
    its tokenizer renders prompt + answer in the chat template, its model scores every token, and the answer is
    what follows the prompt rendered with the generation prompt; its log-probabilities summed, and their number."""
    by_prompt = {tuple(pair["prompt_ids"].tolist()): i for i, pair in enumerate(pairs)}
    logps, n_tokens = torch.zeros(2, len(pairs)), torch.zeros(2, len(pairs), dtype=torch.long)
    for record in CONVERSATIONS:
        prompt = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True)["input_ids"]
        if tuple(prompt) not in by_prompt:
            continue  # in the other split
        i = by_prompt[tuple(prompt)]
        for row, answer in enumerate(("chosen", "rejected")):
            ids = tokenizer.apply_chat_template(record["prompt"] + record[answer])["input_ids"]
            assert ids[: len(prompt)] == prompt
            with torch.no_grad():
                token_logps = hf_model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            token_logps = token_logps.gather(1, torch.tensor(ids[1:])[:, None])
            logps[row, i], n_tokens[row, i] = token_logps[len(prompt) - 1 :].sum(), len(ids) - len(prompt)
    return logps, n_tokens


def exact_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers and TRL in float64 throughout: they compute the norm, the rotary tables and (TRL's chunked kernel)
    the head's log-softmax in float32 whatever the model's dtype; here they compute them with the same formulas in
    the model's dtype. The rest, the model, PEFT's LoRA and TRL's DPO (collator, reference, loss), is theirs."""
    import transformers.models.llama.modeling_llama as hf
    import trl.trainer.utils

    def rms_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.rope_type == "default"  # SmolLM2's: no rope scaling
        size = 2 * self.inv_freq.numel()
        inv_freq = 1.0 / self.config.rope_parameters["rope_theta"] ** (torch.arange(0, size, 2, dtype=x.dtype) / size)
        angles = position_ids[..., None].to(x.dtype) * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    class LogProbs:  # what TRL's FusedCausalLMOutput reads: log_probs, entropy, -, mean_logits, is_top1
        @staticmethod
        def apply(hidden, weight, bias, labels, temperature, chunk_size, softcapping, scale, outputs) -> tuple:
            assert bias is None and temperature == 1 and softcapping is None and scale == 1
            logits = hidden @ weight.t()
            log_probs = logits.log_softmax(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            is_top1 = logits.argmax(-1) == labels
            return log_probs.gather(1, labels[:, None]).squeeze(1), entropy, None, logits.mean(-1), is_top1

    monkeypatch.setattr(hf.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(hf.LlamaRotaryEmbedding, "forward", rotary)
    monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", LogProbs)


PREFERENCES = {  # the settings of each loss in the checks against TRL
    "dpo": Preference("dpo", 0.1, None, "base"),
    "ipo": Preference("ipo", 0.1, None, "base"),
    "simpo": Preference("simpo", 2.0, 0.7, "base"),
}


@pytest.fixture(scope="module")
def smollm2_dpo(smollm2, tmp_path_factory) -> dict:
    """One batch (four pairs, one micro-batch) on the real model, by us and by TRL: DPO in fp32, and DPO, IPO and
    SimPO in float64 with each pair's rewards and log-probabilities from TRL. {("ours" or "trl", method, dtype):
    ours_on_one_batch's or trl_on_one_batch's result}."""
    checkpoint_dir, data_dir, adapter, peft_dir = smollm2
    pairs = torch.load(data_dir / "train.pt", weights_only=True)
    runs = {}
    for dtype, methods in ((torch.float32, ["dpo"]), (torch.float64, ["dpo", "ipo", "simpo"])):
        model = load_lora_model(checkpoint_dir, adapter, dtype=dtype)
        mark_only_lora_as_trainable(model)
        for method in methods:
            runs["ours", method, dtype] = ours_on_one_batch(model, pairs, PREFERENCES[method])
            with pytest.MonkeyPatch.context() as monkeypatch:
                if dtype == torch.float64:
                    exact_in_float64(monkeypatch)
                runs["trl", method, dtype] = trl_on_one_batch(
                    checkpoint_dir,
                    peft_dir,
                    pairs,
                    PREFERENCES[method],
                    tmp_path_factory.mktemp("trl"),
                    per_pair=dtype == torch.float64,
                    dtype=dtype,
                )
    return runs


def gradient_errors(ours: dict, theirs: dict) -> dict[str, float]:
    """Each gradient's largest difference relative to the largest magnitude of `theirs`."""
    assert set(ours["grads"]) == set(theirs["grads"]) and len(ours["grads"]) == 30 * 7 * 2
    return {
        name: ((grad - theirs["grads"][name]).abs().max() / theirs["grads"][name].abs().max()).item()
        for name, grad in ours["grads"].items()
    }


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo"])
def test_one_batch_on_smollm2_in_float64_equals_trl(method, smollm2, smollm2_dpo):
    """The real model, the one place its chat template, its 30 layers and real log-probabilities meet the losses, in
    float64, where rounding cannot hide a difference: the loss, each pair's rewards and log-probabilities, the reward
    accuracy and all 420 LoRA gradients equal TRL's DPOTrainer's (dpo, ipo) and CPOTrainer's (simpo) within 1e-10
    relative (measured: 5e-14)."""
    ours, theirs = smollm2_dpo["ours", method, torch.float64], smollm2_dpo["trl", method, torch.float64]
    pairs = torch.load(smollm2[1] / "train.pt", weights_only=True)
    assert all(grad.dtype == torch.float64 for grad in ours["grads"].values())
    assert_same_as_trl(ours, theirs, PREFERENCES[method], pairs, logps_rtol=1e-12, rtol=1e-10)
    assert len(ours["grads"]) == 30 * 7 * 2


def test_dpo_on_smollm2_in_fp32_rounds_no_worse_than_trl_and_each_answer_is_transformers(smollm2_dpo, smollm2):
    """The same batch in fp32. Two implementations of 30 fp32 layers (ours packed, TRL's padded, its head in chunks)
    round differently: the LoRA gradients differ from the exact (float64, as above) ones by up to 2.3e-5 of their
    largest magnitude for ours and 2.5e-5 for TRL's, so by 3.0e-5 from each other (measured on an Intel Xeon). Here
    ours must be no further from the exact ones than twice TRL's distance; the loss and the logged means equal TRL's
    within 1e-5. And each answer's log-probability under the base (our reference) equals transformers' on prompt +
    answer rendered by its tokenizer's chat template."""
    from transformers import AutoTokenizer

    checkpoint_dir, data_dir, adapter, _ = smollm2
    ours, theirs = smollm2_dpo["ours", "dpo", torch.float32], smollm2_dpo["trl", "dpo", torch.float32]
    exact = smollm2_dpo["trl", "dpo", torch.float64]
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    rewards = ours["rewards"].mean(1)
    logps = ours["logps"].mean(1)
    assert ours["rewards"].abs().min() > 0
    # the rewards (0.03) are differences of log-probabilities of about -50 that two implementations of 30 fp32 layers
    # give to ~1e-6 relative: they are held to 1e-5 relative of those
    bound = 0.1 * 1e-5 * ours["logps"].abs().max().item()
    assert rewards[0].item() == pytest.approx(theirs["metrics"]["rewards/chosen"], abs=bound)
    assert rewards[1].item() == pytest.approx(theirs["metrics"]["rewards/rejected"], abs=bound)
    assert logps[0].item() == pytest.approx(theirs["metrics"]["logps/chosen"], rel=1e-5)
    assert logps[1].item() == pytest.approx(theirs["metrics"]["logps/rejected"], rel=1e-5)
    ours_rounding, trl_rounding = gradient_errors(ours, exact), gradient_errors(theirs, exact)
    assert max(trl_rounding.values()) > 1e-6  # fp32 did round: the comparison means something
    assert max(ours_rounding.values()) <= 2 * max(trl_rounding.values()), max(ours_rounding, key=ours_rounding.get)

    pairs = torch.load(data_dir / "train.pt", weights_only=True)
    model = load_lora_model(checkpoint_dir, adapter)
    with torch.no_grad():
        base = reference_logps(model, pairs, None, Preference("dpo", 0.1, None, "base"), 1024, -100)
    with theirs["model"].disable_adapter():
        expected, n_tokens = transformers_answer_logps(
            theirs["model"], AutoTokenizer.from_pretrained(checkpoint_dir), pairs
        )
    assert torch.equal(
        n_tokens, torch.tensor([[len(p["chosen_ids"]) for p in pairs], [len(p["rejected_ids"]) for p in pairs]])
    )
    assert_close(base, expected, what="base log-probabilities")


def test_each_answer_log_probability_is_transformers_sum_over_the_answer_tokens_in_llama_3_1(
    llama3_checkpoint_dir, llama3_pairs
):
    """Each record through transformers alone, in the Llama 3.1 chat template (SmolLM2's: in the test above)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    pairs = torch.load(llama3_pairs / "train.pt", weights_only=True)
    pairs += torch.load(llama3_pairs / "test.pt", weights_only=True)
    with torch.no_grad():
        logps, n_tokens = answer_logps(load_model(llama3_checkpoint_dir), pairs, 1024, -100)
    hf = LlamaForCausalLM.from_pretrained(llama3_checkpoint_dir, dtype=torch.float32)
    expected, expected_n_tokens = transformers_answer_logps(
        hf, AutoTokenizer.from_pretrained(llama3_checkpoint_dir), pairs
    )
    assert torch.equal(n_tokens, expected_n_tokens)
    assert_close(logps, expected, what="log-probabilities")


def test_a_step_of_the_script_from_an_sft_adapter_equals_trl(
    llama3_checkpoint_dir, llama3_pairs, tmp_path, monkeypatch
):
    """--lora_path: the adapter trains on and, as it starts, is the reference (precomputed); TRL keeps a copy of a
    pretrained PEFT adapter as its reference. One step of 4 pairs in micro-batches of 2: the loss, the logged figures
    and the gradients (before clipping, which a huge grad_clip leaves out) of the script itself."""
    adapter, peft_dir = make_adapter(llama3_checkpoint_dir, tmp_path / "sft", scale=0.2, targets=("query", "value"))
    grads = {}

    def capture(loss, grad_norm, state, saved):
        model = models[0]
        grads.update({name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad})

    with caught_models(monkeypatch, finetune_dpo) as models:
        monkeypatch.setattr(finetune_dpo, "stop_if_diverged", capture)
        finetune(
            setup,
            data_dir=llama3_pairs,
            checkpoint_dir=llama3_checkpoint_dir,
            out_dir=tmp_path / "out",
            lora_path=adapter,
            **{**QUICK, "batch_size": 4, "micro_batch_size": 2, "max_steps": 1, "grad_clip": 1e9, "eval_interval": 1},
        )
    pairs = torch.load(llama3_pairs / "train.pt", weights_only=True)
    preference = Preference("dpo", 0.1, None, "precomputed")
    theirs = trl_on_one_batch(
        llama3_checkpoint_dir, peft_dir, pairs, preference, tmp_path, pretrained=True, per_pair=False
    )
    assert theirs["loss"] == pytest.approx(math.log(2), rel=1e-6)  # the model is its reference: no margin yet

    rows = list(csv.DictReader(open(tmp_path / "out" / "logs" / "version_0" / "metrics.csv")))
    logged = {key: float(value) for row in rows for key, value in row.items() if value != ""}
    # The model is its reference: TRL's rewards are 0 exactly; ours are 0 up to the fp32 rounding of log-probabilities
    # of about -250 (the step packs its pairs in another order than the precomputation did), times beta; and which of
    # two such zeros is larger is noise, so rewards/accuracies is compared in the tests of one batch above
    assert logged["loss"] == pytest.approx(theirs["metrics"]["loss"], rel=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert logged[name] == pytest.approx(theirs["metrics"][name], abs=1e-5), name
    assert logged["logps/chosen"] == pytest.approx(theirs["metrics"]["logps/chosen"], rel=1e-5)
    assert logged["logps/rejected"] == pytest.approx(theirs["metrics"]["logps/rejected"], rel=1e-5)
    assert {f"eval_{name}" for name in finetune_dpo.METRICS} <= set(logged)
    assert set(grads) == set(theirs["grads"])
    for name, grad in grads.items():
        assert_close(grad, theirs["grads"][name], what=name)

    state = torch.load(tmp_path / "out" / "train_state.pt", weights_only=True)
    assert state["reference"]["train"].shape == (2, 4) and state["reference"]["val"].shape == (2, 2)
    assert_close(
        state["reference"]["train"].sum(1) / 4, torch.tensor([logged["logps/chosen"], logged["logps/rejected"]])
    )
    with safe_open(tmp_path / "out" / "lit_model_lora_finetuned.safetensors", framework="pt") as f:
        training = json.loads(f.metadata()["training"])
    assert training == {**asdict(preference), "start_adapter": str(adapter)}


def test_a_stopped_run_resumes_to_the_losses_of_an_unbroken_one_with_the_reference_it_precomputed(
    llama3_checkpoint_dir, llama3_pairs, tmp_path, monkeypatch
):
    """From an SFT adapter, 4 steps at a high learning rate: stopped after the checkpoint of step 2 and resumed, the
    run has the losses of an unbroken one; a reference computed anew at step 2, from the moved adapter, would not."""
    adapter, _ = make_adapter(llama3_checkpoint_dir, tmp_path / "sft", scale=0.2, targets=("query", "value"))
    flags = dict(
        data_dir=llama3_pairs,
        checkpoint_dir=llama3_checkpoint_dir,
        lora_path=adapter,
        **{**QUICK, "batch_size": 2, "micro_batch_size": 1, "max_steps": 4, "learning_rate": 3e-2, "save_interval": 2},
    )
    finetune(setup, out_dir=tmp_path / "unbroken", **flags)

    class Stop(Exception):
        pass

    saving = finetune_dpo.save

    def save_then_stop(fabric, model, optimizer, state, *args):
        saving(fabric, model, optimizer, state, *args)
        if state["step"] == 2:
            raise Stop

    with monkeypatch.context() as patch:
        patch.setattr(finetune_dpo, "save", save_then_stop)
        with pytest.raises(Stop):
            finetune(setup, out_dir=tmp_path / "resumed", **flags)
    finetune(setup, out_dir=tmp_path / "resumed", resume="auto", **flags)
    unbroken = torch.load(tmp_path / "unbroken" / "train_state.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert [step for step, _ in resumed["history"]["train"]] == [1, 2, 3, 4]
    assert [loss for _, loss in resumed["history"]["train"]] == pytest.approx(
        [loss for _, loss in unbroken["history"]["train"]], abs=1e-6
    )
    assert torch.equal(resumed["reference"]["train"], unbroken["reference"]["train"])
    losses = [loss for _, loss in unbroken["history"]["train"]]
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6) and losses[-1] < losses[0] - 0.01  # it moved


GOOD = ["apple", "river", "music", "garden", "sunny", "bread", "friend", "gentle"]
BAD = ["stone", "cloud", "metal", "paper", "window", "engine", "carpet", "bottle"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory, checkpoint_dir):
    """A preference the tiny random model can learn: the chosen answer is a word of GOOD, the rejected one a word of
    BAD, in every combination, the prompts numbered; a quarter of the pairs held out. DPO, from a new adapter."""
    directory = tmp_path_factory.mktemp("learned")
    records = [
        {"prompt": f"Say a word, please ({i}).", "chosen": f"{good}", "rejected": f"{bad}"}
        for i, (good, bad) in enumerate((good, bad) for good in GOOD for bad in BAD)
    ]
    prepare_pairs(checkpoint_dir, directory / "data", records, test_split_fraction=0.25)
    finetune(
        setup,
        data_dir=directory / "data",
        checkpoint_dir=checkpoint_dir,
        out_dir=directory / "out",
        lora_targets=["query", "value"],
        **{
            **QUICK,
            "batch_size": 16,
            "micro_batch_size": 16,
            "max_steps": 30,
            "learning_rate": 1e-2,
            "eval_interval": 10,
            "eval_batches": 1,
        },
    )
    return directory


def test_a_learnable_preference_goes_from_chance_to_at_least_90_percent_held_out_accuracy(learned, checkpoint_dir):
    test = torch.load(learned / "data" / "test.pt", weights_only=True)
    with torch.no_grad():
        logps, _ = answer_logps(load_model(checkpoint_dir), test, 256, -100)
    base_accuracy = (logps[0] > logps[1]).float().mean().item()  # the base model's preference between the answers
    rows = list(csv.DictReader(open(learned / "out" / "logs" / "version_0" / "metrics.csv")))
    accuracy = [float(row["eval_rewards/accuracies"]) for row in rows if row.get("eval_rewards/accuracies")]
    assert 0.25 <= base_accuracy <= 0.75 and len(test) == 16
    assert accuracy[-1] >= 0.9, accuracy
    losses = [float(row["eval_loss"]) for row in rows if row.get("eval_loss")]
    assert losses[-1] < math.log(2) - 0.05
    assert (learned / "out" / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_the_adapter_is_an_ordinary_one_for_generate_lora_merge_lora_and_peft(
    learned, checkpoint_dir, tmp_path, capsys
):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    import generate
    from generate_lora import main as generate_lora
    from merge_lora import merge_lora

    adapter = learned / "out" / "lit_model_lora_finetuned.safetensors"
    with safe_open(adapter, framework="pt") as f:
        assert json.loads(f.metadata()["training"])["method"] == "dpo"
    answers = []
    for merge in (True, False):
        generate_lora(
            checkpoint_dir=checkpoint_dir,
            lora_path=adapter,
            prompt="Say a word, please (3).",
            merge=merge,
            temperature=0.0,
            max_new_tokens=8,
        )
        answers.append(capsys.readouterr().out)
    merge_lora(checkpoint_dir=checkpoint_dir, lora_path=adapter, out_dir=tmp_path / "merged")
    prompt = generate_prompt({"instruction": "Say a word, please (3).", "input": ""})
    generate.main(checkpoint_dir=tmp_path / "merged", prompt=prompt, temperature=0.0, max_new_tokens=8)
    assert answers[0] == answers[1] and capsys.readouterr().out.startswith(prompt + " " + answers[0].strip())

    export_peft(lora_path=adapter, out_dir=tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32), tmp_path / "peft"
    ).eval()
    ours = load_lora_model(checkpoint_dir, adapter).eval()
    idx = torch.tensor([[1, 450, 1234, 29871, 13, 2277]])
    with torch.no_grad():
        assert_close(ours(idx), peft_model(idx).logits, what="logits")


def test_bad_input_is_one_line_and_nothing_is_written(
    checkpoint_dir, llama3_checkpoint_dir, llama3_pairs, eight_records, tmp_path
):
    result = subprocess.run(
        [
            sys.executable,
            "finetune_dpo.py",
            "--data_dir",
            str(llama3_pairs),
            "--checkpoint_dir",
            str(llama3_checkpoint_dir),
            "--out_dir",
            str(tmp_path / "out"),
            "--loss",
            "kto",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr == "error: --loss kto is not one of dpo, ipo, simpo\n"
    other = tmp_path / "other"
    make_checkpoint(other, hidden_size=32)
    foreign, _ = make_adapter(other, tmp_path / "foreign", scale=0.1, targets=("query", "value"))
    sft, _ = make_adapter(llama3_checkpoint_dir, tmp_path / "sft", scale=0.1, targets=("query", "value"))
    flags = dict(data_dir=llama3_pairs, checkpoint_dir=llama3_checkpoint_dir, out_dir=tmp_path / "out")
    for changes, message in [
        (dict(beta=0.0), "--beta must be above 0, not 0.0"),
        (dict(lora_path=foreign), "was trained on another base model: vocab_size=32000 (model: 128256), n_embd=32"),
        (dict(lora_path=sft, lora_r=8), "--lora_r 8 (the adapter's: 4); leave those flags out"),
        (dict(lora_path=sft, precompute_reference=False), "--lora_path needs --precompute_reference true"),
        (dict(data_dir=eight_records, checkpoint_dir=checkpoint_dir), "preference pairs from prepare_preferences.py"),
        (dict(max_seq_length=16), "holds a prompt and answer of"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            finetune(setup, **{**flags, **changes})
    assert not (tmp_path / "out").exists()
