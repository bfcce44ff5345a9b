"""--quantize (a bitsandbytes NF4, FP4 or int8 frozen base; QLoRA) and --optimizer (bitsandbytes' 8-bit and paged
AdamW), on CPU: what the quantized model computes and how far that is from fp32, loading one layer at a time,
weight memory, a QLoRA fine-tune through finetune_lora.py, adapters across quantized and full-precision bases and
scripts/merge_lora.py, the optimizers against torch's AdamW, the scripts' flags, and one-line errors.

All on the tiny config of conftest.make_checkpoint (2 layers, n_embd 64, the real 32000-token tokenizer), fp32, with an
MLP 192 wide instead of 172 (see the checkpoint_dir fixture below)."""

import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

import finetune_lora
import generate as generate_py
import utils
from conftest import ROOT, caught_models, finetune, make_checkpoint
from data import generate_prompt
from decode import generate
from finetune_full import setup as finetune_full
from generate_lora import main as generate_lora
from lora import LoRALinear, load_lora_model, lora, lora_state_dict, save_lora_checkpoint
from merge_lora import merge_lora
from model import LLaMA
from quantize import QUANTIZE_MODES, make_optimizer
from tokenizer import Tokenizer
from utils import load_model

RECORD = {"instruction": "Sum up the numbers.", "input": "3, 2, 5"}
QUANTIZED = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """conftest's tiny checkpoint, but with the MLP 192 wide (LLaMA's 8/3·n_embd rounded up to a multiple of 64, as
    real models' widths such as 11008 or 14336 are) instead of 172, for this module and the fixtures it uses
    (eight_records). On a CPU with AVX512-BF16, bitsandbytes (0.50.2) repacks a Linear4bit's weight at its first
    inference-mode call and needs out_features divisible by 32 and in_features by the 64-weight block."""
    directory = tmp_path_factory.mktemp("checkpoint")
    make_checkpoint(directory, intermediate_size=192)
    return directory


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, checkpoint_dir, eight_records):
    """finetune_lora.py with --quantize bnb.nf4 --optimizer AdamW8bit, 8 steps on the 8 records; returns the output
    directory and the model it trained (caught where finetune_lora.py loads it)."""
    out_dir = tmp_path_factory.mktemp("qlora")
    with pytest.MonkeyPatch.context() as monkeypatch, caught_models(monkeypatch, finetune_lora) as models:
        finetune(
            finetune_lora.setup,
            data_dir=eight_records,
            checkpoint_dir=checkpoint_dir,
            out_dir=out_dir,
            quantize="bnb.nf4",
            optimizer="AdamW8bit",
            batch_size=8,
            micro_batch_size=8,
            max_steps=8,
            warmup_steps=2,
            learning_rate=3e-2,
            lora_dropout=0.0,
            lora_targets=["query", "value", "head"],
            eval_interval=1000,
            eval_batches=1,
            save_interval=1000,
            max_seq_length=128,
        )
    return out_dir, models[0].eval()


def tokens(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 32000, (2, n), generator=torch.Generator().manual_seed(0))


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x - reference).detach().norm() / reference.detach().norm())


def dequantized_copy(quantized: torch.nn.Module, checkpoint_dir: Path) -> torch.nn.Module:
    """The fp32 model with each projection's weight replaced by bitsandbytes' own dequantization of the quantized
    one."""
    model = load_model(checkpoint_dir).eval()
    for name, layer in quantized.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            model.get_submodule(name).weight.data = bnb.functional.dequantize_4bit(
                layer.weight.data, layer.weight.quant_state
            )
    return model


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4"])
def test_a_4bit_model_computes_exactly_with_its_dequantized_weights(checkpoint_dir, mode):
    """Every projection (the head too) is a Linear4bit holding 4-bit codes; the embedding and norms stay fp32; the
    logits are those of the fp32 model with bitsandbytes' dequantized weights: nothing else changes."""
    model = load_model(checkpoint_dir, quantize=mode).eval()
    layers = [layer for layer in model.modules() if isinstance(layer, torch.nn.Linear)]
    assert len(layers) == 2 * 7 + 1 and all(isinstance(layer, bnb.nn.Linear4bit) for layer in layers)
    assert all(
        layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == mode[4:7] for layer in layers
    )
    assert all(bool(layer.weight.quant_state.nested) == mode.endswith("-dq") for layer in layers)
    assert model.embed.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    reference = dequantized_copy(model, checkpoint_dir)  # before the model runs, which must not change its layers
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), reference(tokens()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_dora_on_a_quantized_base_takes_its_norms_from_the_dequantized_weights(checkpoint_dir, mode):
    """DoRA's magnitude starts as ‖W‖ of the weight the layer computes with (bitsandbytes' dequantization, as PEFT takes
    it), so a fresh DoRA model computes as its quantized base; on nf4 a non-zero update is what it is on those weights
    in fp32 (LLM.int8() also rounds the input to 8 bits, so an int8 layer's output is not x·Wᵀ of its weight)."""
    with lora(r=4, alpha=8, dropout=0.0, targets=("query", "down"), dora=True):
        model = load_model(checkpoint_dir, quantize=mode).eval()
    plain = load_model(checkpoint_dir, quantize=mode).eval()
    layer = model.blocks[1].mlp.down_proj
    if mode == "bnb.nf4":
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    else:
        weight = layer.weight.data.float() * layer.weight.SCB[:, None] / 127
    torch.testing.assert_close(layer.lora.magnitude, weight.norm(dim=1), rtol=1e-6, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), plain(tokens()), rtol=0, atol=1e-5)
        if mode == "bnb.nf4":
            layer.lora.B.normal_(std=0.1)
            x = torch.randn(3, layer.in_features)
            V = weight + layer.lora.B @ layer.lora.A * layer.lora.scaling
            expected = x @ (layer.lora.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)).T
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_a_4bit_layer_stays_exact_and_differentiable_after_validation_and_a_checkpoint(checkpoint_dir):
    """Fine-tuning alternates training steps with validation and sampling (eval mode, no gradients) and saves
    checkpoints (state_dict()); neither may change what a 4-bit layer computes nor stop the gradient through it, which
    LoRA layers before it need. (bitsandbytes 0.50.2, on a CPU with AVX512-BF16, repacks a Linear4bit at its first
    inference call to compute in bf16 with no backward, and state_dict() unpacks it with its scales left in bf16 and
    transposed: the down projection, 3 blocks per row, then dequantizes 23% off.)"""
    model = load_model(checkpoint_dir, quantize="bnb.nf4")
    weight = dequantized_copy(model, checkpoint_dir).blocks[0].mlp.down_proj.weight
    with torch.no_grad():
        model.eval()(tokens())
    model.state_dict()
    model.train()
    x = torch.randn(3, weight.shape[1], requires_grad=True)
    y = model.blocks[0].mlp.down_proj(x)
    torch.testing.assert_close(y, x @ weight.T, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert x.grad is not None, "no gradient through the 4-bit layer"
    torch.testing.assert_close(x.grad, weight.sum(0).expand_as(x), rtol=1e-5, atol=1e-6)


def test_nf4_logits_stay_within_the_error_band_of_fp32(checkpoint_dir):
    """The band, from the weights: NF4 stores each N(0, σ) weight as one of 16 levels times its block's absmax, a
    relative error e = |W_nf4 - W| / |W| of about 0.09 per projection (measured from bitsandbytes' dequantization).
    The logits' relative error is at least about e: the head alone adds e·|logits| of error, independent of the error
    its input already carries, so the two add in quadrature. Through 2 residual blocks it stays below 2e (1.45e here):
    0 would mean a projection was not quantized, far more a broken path (a KV cache or scale in the wrong dtype).
    FP4 has evenly spread levels that fit normal weights worse: more error than NF4, as the QLoRA paper reports;
    int8 (LLM.int8(): 8-bit weights per row and 8-bit inputs) far less."""
    reference = load_model(checkpoint_dir).eval()
    with torch.no_grad():
        expected = reference(tokens())
        errors = {}
        for mode in ("bnb.nf4", "bnb.fp4", "bnb.int8"):
            errors[mode] = relative_error(load_model(checkpoint_dir, quantize=mode).eval()(tokens()), expected)
    dequantized = dequantized_copy(load_model(checkpoint_dir, quantize="bnb.nf4"), checkpoint_dir)
    e = [
        relative_error(dequantized.get_submodule(name).weight, layer.weight)
        for name, layer in reference.named_modules()
        if isinstance(layer, torch.nn.Linear)
    ]
    e = sum(e) / len(e)
    assert 0.08 < e < 0.10
    assert e < errors["bnb.nf4"] < 2 * e
    assert errors["bnb.nf4"] < errors["bnb.fp4"] < 2.5 * e
    assert 0 < errors["bnb.int8"] < 0.03


def test_weights_are_quantized_one_layer_at_a_time_while_loading(checkpoint_dir, monkeypatch):
    """Whenever bitsandbytes quantizes a weight, every other projection is still empty (meta) or already 4-bit:
    the full-precision model never exists on the device."""
    built, seen = [], []
    swap_in_layers, quantize = utils.swap_in_layers, bnb.nn.Params4bit._quantize
    monkeypatch.setattr(
        utils, "swap_in_layers", lambda model, *args: built.append(model) or swap_in_layers(model, *args)
    )

    def checked_quantize(param, device):
        others = [
            layer.weight
            for layer in built[0].modules()
            if isinstance(layer, bnb.nn.Linear4bit) and layer.weight is not param
        ]
        seen.append(sum(w.is_floating_point() and not w.is_meta for w in others))
        return quantize(param, device)

    monkeypatch.setattr(bnb.nn.Params4bit, "_quantize", checked_quantize)
    load_model(checkpoint_dir, quantize="bnb.nf4")
    assert seen == [0] * 15


def test_4bit_projections_take_a_seventh_of_fp32s_memory_and_int8_a_quarter(checkpoint_dir):
    """Bytes of the projections' state (codes, scales, double-quantized scales), against 4 bytes per fp32 weight:
    NF4 is 4 bits + one fp32 scale per 64 weights = 0.5625 of 4 bytes (0.14x); -dq stores the scales in 8 bits, with
    an fp32 scale per 256 of those (0.5159 bytes: 0.13x, plus a table of 256 values per layer); int8 is 1 byte + one
    fp32 scale per row of 64 inputs (0.27x)."""

    def projection_bytes(model) -> int:
        return sum(
            t.numel() * t.element_size()
            for name, t in model.state_dict().items()
            if not name.startswith(("embed", "norm")) and "_norm" not in name
        )

    fp32 = projection_bytes(load_model(checkpoint_dir))
    ratios = {mode: projection_bytes(load_model(checkpoint_dir, quantize=mode)) / fp32 for mode in QUANTIZE_MODES}
    assert ratios["bnb.nf4"] == pytest.approx(0.5625 / 4, rel=0.01) and ratios["bnb.fp4"] == ratios["bnb.nf4"]
    assert ratios["bnb.nf4-dq"] == ratios["bnb.fp4-dq"] == pytest.approx(0.5159 / 4, rel=0.03)
    assert ratios["bnb.int8"] == pytest.approx(1.0625 / 4, rel=0.01)


def test_qlora_fine_tune_lowers_the_loss_with_lora_in_fp32_on_an_unchanged_4bit_base(qlora, checkpoint_dir):
    out_dir, model = qlora
    losses = [loss for _, loss in torch.load(out_dir / "train_state.pt", weights_only=True)["history"]["train"]]
    assert len(losses) == 8 and losses[0] > 10 and losses[-1] < 0.5 * losses[0]

    layers = [layer for layer in model.modules() if isinstance(layer, LoRALinear)]
    assert len(layers) == 2 * 2 + 1 and all(
        isinstance(layer, bnb.nn.Linear4bit) for layer in layers
    )  # query, value, head
    assert all(layer.lora.A.dtype == torch.float32 and layer.lora.A.requires_grad for layer in layers)
    fresh = load_model(checkpoint_dir, quantize="bnb.nf4")  # the trained model's 4-bit codes are those it loaded
    assert all(
        torch.equal(layer.weight, fresh.get_submodule(name).weight)
        for name, layer in model.named_modules()
        if isinstance(layer, bnb.nn.Linear4bit)
    )

    # the adapter is the one an unquantized run writes: the same LoRA tensors, in fp32, nothing of the 4-bit base
    adapter = load_file(out_dir / "lit_model_lora_finetuned.safetensors")
    with torch.device("meta"), lora(r=8, alpha=16, dropout=0.0, targets=("query", "value", "head")):
        plain = lora_state_dict(LLaMA(model.config))
    assert {name: t.shape for name, t in adapter.items()} == {name: t.shape for name, t in plain.items()}
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert all(torch.equal(t, model.state_dict()[name]) for name, t in adapter.items())


def test_an_adapter_trained_on_nf4_loads_into_both_bases_and_merges_into_the_full_precision_one(
    qlora, checkpoint_dir, tmp_path
):
    out_dir, trained = qlora
    adapter = out_dir / "lit_model_lora_finetuned.safetensors"
    x = tokens()
    with torch.no_grad():
        # on an nf4 base again: exactly the model that was trained
        torch.testing.assert_close(
            load_lora_model(checkpoint_dir, adapter, quantize="bnb.nf4").eval()(x), trained(x), rtol=0, atol=0
        )
        # on the full-precision base: the same LoRA, so the output moves from the base's the way the trained model's did
        full = load_lora_model(checkpoint_dir, adapter).eval()
        base = load_model(checkpoint_dir).eval()
        assert relative_error(full(x), trained(x)) < 0.2 * relative_error(base(x), trained(x))
        # scripts/merge_lora.py folds it into the full-precision weights: the merged checkpoint computes as base + LoRA
        merge_lora(checkpoint_dir=checkpoint_dir, lora_path=adapter, out_dir=tmp_path / "merged")
        torch.testing.assert_close(load_model(tmp_path / "merged").eval()(x), full(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.int8"])
def test_an_adapter_trained_in_full_precision_loads_into_a_quantized_base(checkpoint_dir, tmp_path, mode):
    """Each quantized LoRA layer is its quantized product plus the LoRA update; the model stays within the mode's
    band of the full-precision base with the same adapter."""
    torch.manual_seed(0)
    with lora(r=4, alpha=8, dropout=0.0, targets=("all_linear",)):
        model = load_model(checkpoint_dir).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora.B.normal_(std=0.02)
    save_lora_checkpoint(model, tmp_path / "adapter.safetensors")

    quantized = load_lora_model(checkpoint_dir, tmp_path / "adapter.safetensors", quantize=mode).eval()
    for name, tensor in load_file(tmp_path / "adapter.safetensors").items():
        assert torch.equal(quantized.state_dict()[name], tensor)
    layer = quantized.blocks[0].mlp.up_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer, QUANTIZED)
    x = torch.randn(3, 64)
    with torch.no_grad():
        base_class = type(layer).__mro__[2]  # LoRALinear_Linear4bit -> LoRALinear -> the bitsandbytes layer
        torch.testing.assert_close(layer(x), base_class.forward(layer, x) + layer.lora(x), rtol=1e-5, atol=1e-6)
        full, ours = model(tokens()), quantized(tokens())
        plain = load_model(checkpoint_dir, quantize=mode).eval()(tokens())
    assert relative_error(ours, full) < (0.2 if mode == "bnb.nf4-dq" else 0.03)
    assert relative_error(ours, plain) > 0.1  # the adapter does act


def test_kv_cache_decoding_on_a_quantized_base_equals_recomputing_every_position(checkpoint_dir):
    """The cache holds the activations' dtype, not the 4-bit codes' (model.set_kv_cache takes the embedding's)."""
    model = load_model(checkpoint_dir, quantize="bnb.nf4").eval()
    prompt = tokens(6)[0]
    cached = generate(model, prompt, 8, temperature=0.0)
    sequence = prompt
    with torch.no_grad():
        for _ in range(8):
            sequence = torch.cat([sequence, model(sequence[None])[0, -1].argmax()[None]])
    assert torch.equal(cached, sequence)


def test_generate_scripts_take_quantize(checkpoint_dir, qlora, capsys):
    """generate.py --quantize prints what the quantized model generates; generate_lora.py --quantize --merge false (the
    command line, in its own process) answers as the nf4 base with the adapter on top does."""
    tokenizer = Tokenizer(checkpoint_dir)
    generate_py.main(
        checkpoint_dir=checkpoint_dir, prompt="Hello", max_new_tokens=10, temperature=0.0, quantize="bnb.int8"
    )
    model = load_model(checkpoint_dir, quantize="bnb.int8").eval()
    assert (
        capsys.readouterr().out
        == tokenizer.decode(
            generate(model, tokenizer.encode("Hello", bos=True), 10, temperature=0.0, stop_ids=tokenizer.stop_ids)
        )
        + "\n"
    )

    adapter = qlora[0] / "lit_model_lora_finetuned.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "generate_lora.py",
            "--checkpoint_dir",
            str(checkpoint_dir),
            "--lora_path",
            str(adapter),
            "--prompt",
            RECORD["instruction"],
            "--input",
            RECORD["input"],
            "--quantize",
            "bnb.nf4",
            "--merge",
            "false",
            "--temperature",
            "0",
            "--max_new_tokens",
            "10",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "bnb.nf4" in result.stderr
    model = load_lora_model(checkpoint_dir, adapter, quantize="bnb.nf4").eval()
    prompt = tokenizer.encode(generate_prompt(RECORD), bos=True)
    answer = generate(model, prompt, 10, temperature=0.0, stop_ids=tokenizer.stop_ids)[len(prompt) :]
    assert result.stdout == tokenizer.decode(answer[:-1] if answer[-1].item() in tokenizer.stop_ids else answer) + "\n"


def test_8bit_and_paged_optimizers_follow_adamw(capsys):
    """On a least-squares problem: AdamW8bit's update is within 5% of torch's AdamW with its moments in one byte
    each; on CPU the paged variants run unpaged (a one-line note says so): PagedAdamW8bit is AdamW8bit, PagedAdamW
    is AdamW."""

    def train(name: str):
        torch.manual_seed(0)
        w, b = torch.nn.Parameter(torch.randn(64, 128) * 0.1), torch.nn.Parameter(torch.zeros(64))
        x = torch.randn(256, 128)
        y = x @ torch.randn(128, 64) * 0.1
        optimizer = make_optimizer(name, [w, b], lr=1e-2, weight_decay=0.01)
        start = w.detach().clone()
        for _ in range(20):
            ((x @ w.T + b - y) ** 2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return w.detach() - start, optimizer.state[w]

    adamw, state = train("AdamW")
    assert isinstance(state["exp_avg"], torch.Tensor)
    assert capsys.readouterr().err == ""
    update, state = train("AdamW8bit")
    assert relative_error(update, adamw) < 0.05 and state["state1"].dtype == state["state2"].dtype == torch.uint8
    paged, _ = train("PagedAdamW8bit")
    assert torch.equal(paged, update)
    assert (
        capsys.readouterr().err
        == "note: --train.optimizer PagedAdamW8bit pages its state only on CUDA; on cpu it runs unpaged\n"
    )
    paged, _ = train("PagedAdamW")
    torch.testing.assert_close(paged, adamw, rtol=1e-5, atol=1e-7)


def test_finetune_full_trains_with_adamw8bit(checkpoint_dir, eight_records, tmp_path):
    """The optimizer state it saves takes about 2 bytes per parameter (two 8-bit moments, and a scale per 256
    values) instead of AdamW's 8."""
    out_dir = tmp_path / "full"
    finetune(
        finetune_full,
        data_dir=eight_records,
        checkpoint_dir=checkpoint_dir,
        out_dir=out_dir,
        optimizer="AdamW8bit",
        batch_size=8,
        micro_batch_size=8,
        max_steps=2,
        warmup_steps=1,
        learning_rate=1e-2,
        eval_interval=1000,
        eval_batches=1,
        save_interval=1000,
        max_seq_length=128,
        gradient_checkpointing=False,
    )
    state = torch.load(out_dir / "train_state.pt", weights_only=True)
    losses = [loss for _, loss in state["history"]["train"]]
    assert losses[-1] < losses[0] and state["settings"]["optimizer"] == "AdamW8bit"

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (dict, list, tuple)):
            for item in value.values() if isinstance(value, dict) else value:
                yield from tensors(item)

    n_params = sum(t.numel() for t in state["model"].values())
    assert (
        2 * n_params < sum(t.numel() * t.element_size() for t in tensors(state["optimizer"]["state"])) < 2.1 * n_params
    )


def test_bad_input_and_impossible_combinations_stop_with_one_line(
    checkpoint_dir, eight_records, qlora, tmp_path, monkeypatch
):
    def error(function, *args, **kwargs) -> str:
        with pytest.raises((ValueError, ImportError)) as exit_info:
            function(*args, **kwargs)
        message = str(exit_info.value)
        assert "\n" not in message
        return message

    modes = "bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8"
    assert error(load_model, checkpoint_dir, quantize="nf4") == f"--quantize 'nf4' is not one of {modes}"
    assert error(make_optimizer, "SGD", [torch.nn.Parameter(torch.ones(1))], 1e-3, 0.0) == (
        "--train.optimizer 'SGD' is not one of AdamW, AdamW8bit, PagedAdamW8bit, PagedAdamW"
    )

    adapter = qlora[0] / "lit_model_lora_finetuned.safetensors"
    # merging into 4-bit weights would round the update away: refused, by generate_lora.py before loading anything
    assert error(generate_lora, checkpoint_dir=checkpoint_dir, lora_path=adapter, quantize="bnb.nf4") == (
        "--quantize bnb.nf4 holds the base in 4 or 8 bits, which would round the merged adapter's small update "
        "away; pass --merge false to apply LoRA on top of the quantized base"
    )
    assert error(load_lora_model, checkpoint_dir, adapter, merge=True, quantize="bnb.int8").startswith(
        "cannot merge LoRA into a quantized base (--quantize)"
    )
    assert error(
        finetune_lora.setup,
        data_dir=eight_records,
        checkpoint_dir=checkpoint_dir,
        out_dir=tmp_path / "out",
        quantize="bnb.nf4",
        strategy="fsdp",
    ) == (
        "--quantize does not work with --strategy fsdp, which shards floating-point weights; "
        "use --strategy ddp or one device"
    )
    assert not (tmp_path / "out").exists()

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    assert error(load_model, checkpoint_dir, quantize="bnb.nf4").startswith(
        "--quantize and the 8-bit optimizers need bitsandbytes ("
    )
