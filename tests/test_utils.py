"""utils.py: the command line's one-line errors, one_line, atomic writes, precision by device, loading a checkpoint
directory (the weights as safetensors reads them, in the dtype asked for; a mismatch named), the CPU decoding layout
(strides change, results do not) and peak memory against the kernel's own count."""

import dataclasses
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
from conftest import make_checkpoint
from decode import Completion, decode_all
from model import Config, LLaMA
from utils import (
    PackedLinear,
    PackedPart,
    PackedProjections,
    SplitLinear,
    atomic_path,
    cli,
    default_precision,
    load_model,
    one_line,
    pack_linears,
    packed_linears,
    peak_memory_gb,
    precision_to_dtype,
    split_linears,
)


def run_cli(function, monkeypatch, capsys) -> tuple[int, str]:
    """Runs `function` through utils.cli with no flags; returns the exit status and stderr."""
    monkeypatch.setattr(sys, "argv", ["script.py"])
    with pytest.raises(SystemExit) as raised:
        cli(function)
    return raised.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "error, line",
    [
        (ValueError("--lora_r must be positive\nmore detail"), "error: --lora_r must be positive\n"),
        (
            FileNotFoundError(2, "No such file or directory", "data/x.json"),
            "error: data/x.json: No such file or directory\n",
        ),
        (ImportError("No module named 'bitsandbytes'"), "error: No module named 'bitsandbytes'\n"),
        (FloatingPointError("the loss (nan) is not finite"), "error: the loss (nan) is not finite\n"),
        (ValueError(), "error: ValueError\n"),
    ],
)
def test_cli_turns_a_users_mistake_into_one_line_on_stderr_and_exit_status_1(monkeypatch, capsys, error, line):
    def main() -> None:
        raise error

    assert run_cli(main, monkeypatch, capsys) == (1, line)


def test_cli_keeps_the_traceback_of_anything_else(monkeypatch):
    def main() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sys, "argv", ["script.py"])
    with pytest.raises(RuntimeError, match="a bug"):
        cli(main)


def test_one_line_is_the_first_line_of_the_message_or_the_type():
    assert one_line(ValueError("  first\nsecond  ")) == "first"
    assert one_line(PermissionError(13, "Permission denied", "/root/x")) == "/root/x: Permission denied"
    assert one_line(OSError("disk full")) == "disk full"
    assert one_line(KeyError()) == "KeyError"


def test_atomic_path_renames_a_complete_file_and_leaves_the_old_one_after_a_failure(tmp_path):
    path = tmp_path / "out.txt"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_text("first")
        assert not path.exists()  # not there until written completely
    assert path.read_text() == "first"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_precision_is_fp32_on_cpu_and_names_map_to_dtypes():
    assert default_precision() == default_precision(training=True) == "32-true"  # conftest hides any GPU
    assert precision_to_dtype("bf16-true") == torch.bfloat16
    assert precision_to_dtype("16-true") == torch.float16
    assert precision_to_dtype("32-true") == torch.float32
    with pytest.raises(ValueError, match="precision 'bf16-mixed' is not one of bf16-true, 16-true, 32-true"):
        precision_to_dtype("bf16-mixed")


def test_load_model_gives_the_files_tensors_in_the_dtype_asked_and_names_a_mismatch(tmp_path):
    make_checkpoint(tmp_path, vocab_size=1000, tie_word_embeddings=True)
    expected = load_file(tmp_path / "lit_model.safetensors")
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.embed.weight  # tied: stored once, shared again
    state = model.state_dict()
    assert set(state) == set(expected) | {"lm_head.weight"}
    for name, tensor in expected.items():
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], tensor.to(torch.bfloat16)), name

    save_file({**expected, "extra.weight": torch.zeros(2)}, tmp_path / "lit_model.safetensors")
    del expected["norm.weight"]
    with pytest.raises(ValueError, match=r"does not match model_config.json \(missing: \[\], unexpected: \['extra"):
        load_model(tmp_path)
    save_file(expected, tmp_path / "lit_model.safetensors")
    with pytest.raises(
        ValueError, match=r"does not match model_config.json \(missing: \['norm.weight'\], unexpected: \[\]"
    ):
        load_model(tmp_path)


def status_gb(key: str) -> float:
    """A figure of /proc/self/status (VmRSS, VmHWM: the kernel's own count of resident memory and its peak), in GB."""
    line = next(line for line in open("/proc/self/status") if line.startswith(key + ":"))
    return int(line.split()[1]) / 1e6


def test_peak_memory_on_cpu_is_the_processs_peak_resident_memory():
    """Against the kernel's VmHWM, before and after resident memory rises 500 MB above its peak so far."""
    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM is Linux's")
    cpu = torch.device("cpu")
    assert peak_memory_gb(cpu) == pytest.approx(status_gb("VmHWM"), abs=0.005)
    before = peak_memory_gb(cpu)
    x = torch.ones(int((before - status_gb("VmRSS") + 0.5) * 1e9) // 4)  # written, so resident
    assert peak_memory_gb(cpu) == pytest.approx(status_gb("VmHWM"), abs=0.005)
    # a new peak; what else the process frees meanwhile varies (in the whole suite, once 150 MB)
    assert peak_memory_gb(cpu) > before + 0.25
    del x


def small_config(tied: bool) -> Config:
    return Config(
        block_size=64,
        vocab_size=100,
        n_layer=2,
        n_head=4,
        n_query_groups=2,
        n_embd=32,
        intermediate_size=86,
        tie_embeddings=tied,
    )


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_linears_keep_the_parameters_and_the_results(tied, threads):
    """split_linears: one row's product in one part per thread (1 thread, and 3 parts, which do not divide 32
    outputs, go to F.linear as they are), the same Parameters under the same names, the head still tied, the
    results of one row and of many those of the plain layers."""
    torch.manual_seed(0)
    config = small_config(tied)
    model = LLaMA(config).eval()
    idx = torch.randint(0, 100, (4, 10))
    with torch.no_grad():
        expected = model(idx)
        last = model(idx[:1, -1:], logits_at=torch.ones(1, 1, dtype=torch.bool))  # one row, one position
    parameters = dict(model.named_parameters())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split_linears(model)
    finally:
        torch.set_num_threads(before)
    assert dict(model.named_parameters()).keys() == parameters.keys()
    assert all(p is parameters[name] for name, p in model.named_parameters())  # no copy
    q = model.blocks[0].attn.q_proj
    assert isinstance(q, SplitLinear) and q.parts == threads
    assert (model.lm_head.weight is model.embed.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)
        one = model(idx[:1, -1:], logits_at=torch.ones(1, 1, dtype=torch.bool))
        torch.testing.assert_close(one, last, atol=1e-5, rtol=1e-5)


def test_split_linears_leave_bfloat16_and_lora_applying_its_update_alone(tmp_path):
    config = Config(
        block_size=64, vocab_size=100, n_layer=1, n_head=4, n_query_groups=4, n_embd=32, intermediate_size=86
    )
    model = LLaMA(config).to(torch.bfloat16)
    split_linears(model)
    assert not any(isinstance(m, SplitLinear) for m in model.modules())
    make_checkpoint(tmp_path, vocab_size=1000)
    with lora.lora(r=4, alpha=8, dropout=0.0, targets=("query",)):
        model = load_model(tmp_path).eval()
    for module in model.modules():
        if isinstance(module, lora.LoRA):
            torch.nn.init.normal_(module.B, std=0.1)  # a trained-looking update, not B = 0
    idx = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        expected = model(idx)[:, -1]
        split_linears(model)
        assert isinstance(model.blocks[0].attn.q_proj, lora.LoRALinear)
        assert isinstance(model.blocks[0].attn.k_proj, SplitLinear)
        torch.testing.assert_close(model(idx)[:, -1], expected, atol=1e-5, rtol=1e-5)
        lora.merge_lora_weights(model)
        split_linears(model)  # merged: a plain product
        assert isinstance(model.blocks[0].attn.q_proj, SplitLinear)
        torch.testing.assert_close(model(idx)[:, -1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("tied", [False, True])
def test_packed_linears_give_the_products_of_the_layers_they_replace(tied, tmp_path):
    """pack_linears: every plain projection becomes a PackedLinear with the same products (fp32 rounding) for one row
    and many, its plain weight readable, a head sharing the embedding's weight too (a copy: the embedding keeps its
    own); LoRA layers applying their update stay LoRA layers."""
    torch.manual_seed(0)
    config = small_config(tied)
    model = LLaMA(config).eval()
    with lora.lora(r=4, alpha=8, dropout=0.0, targets=("query",)):
        adapted = LLaMA(config).eval()
    adapted.load_state_dict(model.state_dict(), strict=False)  # the same base
    weight = model.blocks[0].mlp.down_proj.weight.detach().clone()
    idx = torch.randint(0, 100, (16, 10))
    with torch.no_grad():
        expected = model(idx)
        pack_linears(model)
        pack_linears(adapted)
        torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(idx[:1]), expected[:1], atol=1e-5, rtol=1e-5)
    down = model.blocks[0].mlp.down_proj
    assert isinstance(down, PackedLinear) and torch.equal(down.weight, weight)
    assert isinstance(model.lm_head, PackedLinear) and torch.equal(model.lm_head.weight, model.embed.weight) == tied
    assert isinstance(adapted.blocks[0].attn.q_proj, lora.LoRALinear)  # applying its update: not packed
    assert isinstance(adapted.blocks[0].attn.k_proj, PackedLinear)
    lora.merge_lora_weights(adapted)
    pack_linears(adapted)
    assert isinstance(adapted.blocks[0].attn.q_proj, PackedLinear)  # merged: a plain product
    with torch.no_grad():  # B = 0: the base's products
        torch.testing.assert_close(adapted(idx), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_fused_projections_give_the_products_of_each_with_its_bias():
    """pack_linears(fuse=True): q, k and v (with biases, as Qwen-style attention has; GQA: k and v narrower than q;
    q a LoRA layer whose update is merged, counted once) and gate and up in one product each give each projection's
    own; each plain projection in its place a PackedPart of the product, without weights of its own, that computes
    alone and gives its weight and bias; recording gradients is refused (oneDNN's product has no backward)."""
    torch.manual_seed(0)
    config = dataclasses.replace(small_config(False), attention_bias=True)
    with lora.lora(r=4, alpha=8, dropout=0.0, targets=("query",)):
        model = LLaMA(config).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.k_proj.bias)
        torch.nn.init.normal_(block.attn.q_proj.lora.B, std=0.5)
    lora.merge_lora_weights(model)
    k_proj = model.blocks[0].attn.k_proj
    idx, x = torch.randint(0, 100, (8, 10)), torch.randn(3, 32)
    with torch.no_grad():
        expected, expected_k = model(idx), k_proj(x)
    pack_linears(model, fuse=True)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert isinstance(attn.qkv, PackedProjections) and isinstance(mlp.gate_up, PackedProjections)
    assert isinstance(attn.k_proj, PackedPart) and isinstance(mlp.up_proj, PackedPart)
    assert not list(attn.k_proj.parameters()) and attn.k_proj.packed is attn.qkv.packed
    assert [y.shape[-1] for y in attn.qkv(x)] == [32, 16, 16]
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn.qkv(x)[1], expected_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn.k_proj(x), expected_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(attn.k_proj.weight, k_proj.weight) and torch.equal(attn.k_proj.bias, k_proj.bias)
    with pytest.raises(RuntimeError, match="for inference"):
        attn.qkv(x.requires_grad_())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_packed_linears_decode_an_unmerged_lora_as_before_then_give_the_model_back(tmp_path):
    """packed_linears (GRPO's rollouts): inside, each block's q, k and v (gate and up) are one packed product, the
    other plain projections and the tied head PackedLinear, and a LoRA layer outside those holds its weight with the
    update merged, packed: the same greedy tokens and logits (fp32 rounding: the merged product sums in another
    order); recording gradients, a LoRA layer among q, k and v computes alone, but a forward that records gradients is
    refused (the packed product has no backward), within lora_disabled the base's logits; on leaving, the same modules
    as before, no packed copy kept and the model's own weights unmerged."""
    torch.manual_seed(0)
    make_checkpoint(tmp_path, vocab_size=1000)
    with lora.lora(r=4, alpha=8, dropout=0.0, targets=("query", "value", "mlp")):
        model = load_model(tmp_path).eval()
    for module in model.modules():
        if isinstance(module, lora.LoRA):
            torch.nn.init.normal_(module.B, std=0.1)  # a trained-looking update, not B = 0
    modules = dict(model.named_modules())
    prompts = [torch.randint(0, 1000, (n,)).tolist() for n in (5, 9, 9, 3)]
    idx = torch.randint(0, 1000, (4, 12))

    def greedy() -> list[list[int]]:
        return [c.tokens for c in decode_all(model, [Completion(p, max_new_tokens=12) for p in prompts])]

    with torch.no_grad():
        expected_logits = model(idx)
        with lora.lora_disabled(model):
            base_logits = model(idx)
    expected_tokens = greedy()
    weights = {name: p.clone() for name, p in model.state_dict().items()}
    with packed_linears(model):
        block = model.blocks[0]
        assert isinstance(block.attn.qkv, PackedProjections) and isinstance(block.mlp.gate_up, PackedProjections)
        assert isinstance(block.attn.o_proj, PackedLinear) and isinstance(model.lm_head, PackedLinear)
        assert isinstance(block.mlp.down_proj, lora.LoRALinear) and block.mlp.down_proj.packed is not None
        with torch.no_grad():
            torch.testing.assert_close(model(idx), expected_logits, atol=1e-4, rtol=1e-4)
            with lora.lora_disabled(model):
                torch.testing.assert_close(model(idx), base_logits, atol=1e-4, rtol=1e-4)
        assert greedy() == expected_tokens
        x = torch.randn(2, 3, model.config.n_embd)
        q, k, v = block.attn.qkv(x)  # recording gradients: each LoRA layer computes alone, with its autograd
        assert q.grad_fn is not None and v.grad_fn is not None and k.grad_fn is None
        with torch.no_grad():
            torch.testing.assert_close(q, block.attn.qkv(x)[0], atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="for inference"):  # oneDNN's product has no backward
            model(idx).sum().backward()
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(module is modules[name] for name, module in model.named_modules())
    assert all(getattr(module, "packed", None) is None for module in model.modules())
    assert all(torch.equal(p, weights[name]) for name, p in model.state_dict().items())
