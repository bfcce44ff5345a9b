"""What only a CUDA GPU exercises: bf16 kernels, packed records in one varlen flash-attention call, compiled training
steps and compiled decoding on the GPU, QLoRA's bitsandbytes kernels, and the fine-tuning script's defaults there
(bf16-mixed, --train.compile). Skipped without CUDA. The rest of
the suite checks the CPU path, also on a GPU machine (conftest.cpu_only hides the GPU from it)."""

import argparse
import copy

import pytest
import torch

import model as model_module
from conftest import REAL_CUDA, finetune, make_checkpoint
from decode import compile_step, generate
from lora import LoRALinear, lora, mark_only_lora_as_trainable
from losses import cross_entropy_sum, pack_batch
from model import varlen_attn
from training import TrainArgs, compile_blocks
from utils import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GQA = dict(num_attention_heads=8, num_key_value_heads=2)


@pytest.fixture(autouse=True)
def gpu_visible(monkeypatch):
    """Undoes conftest.cpu_only for these tests."""
    for name, function in REAL_CUDA.items():
        monkeypatch.setattr(torch.cuda, name, function)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float().cpu() - expected).norm() / expected.norm())


def test_logits_match_transformers_on_cuda_in_fp32_and_bf16(tmp_path):
    """fp32 on the GPU equals transformers' fp32 logits; in bf16 ours strays from them no more than transformers'
    bf16."""
    hf = make_checkpoint(tmp_path, **GQA)
    idx = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        ours = load_model(tmp_path, device="cuda").eval()
        assert (ours(idx.cuda()).cpu() - expected).abs().max() <= 1e-4
        ours = load_model(tmp_path, device="cuda", dtype=torch.bfloat16).eval()
        ours_error = relative_error(ours(idx.cuda()), expected)
        hf_error = relative_error(hf.to("cuda", torch.bfloat16)(idx.cuda()).logits, expected)
    assert ours_error <= max(1.5 * hf_error, 1e-3), (ours_error, hf_error)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_packed_records_give_each_records_own_logits_and_gradients_on_cuda(tmp_path, monkeypatch, dtype, tolerance):
    """Packed records: in bf16 one varlen flash-attention call per layer (model.packed_attention), in fp32 one
    scaled_dot_product_attention call per record; either way each record's own logits and LoRA gradients."""
    calls = []
    monkeypatch.setattr(
        model_module, "varlen_attn", lambda *args, **kwargs: calls.append(1) or varlen_attn(*args, **kwargs)
    )
    make_checkpoint(tmp_path, **GQA)
    with lora(r=4, alpha=8, dropout=0.0, targets=("query", "value")):
        model = load_model(tmp_path, device="cuda", dtype=dtype)
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora.B"):
                param.normal_(std=0.1)
    generator = torch.Generator().manual_seed(0)
    records = [
        {"input_ids": torch.randint(0, 32000, (n,), generator=generator), "labels": torch.zeros(n, dtype=torch.long)}
        for n in (37, 5, 64)
    ]
    input_ids, _, lengths = pack_batch(records, max_seq_length=128)
    packed = model(input_ids.cuda(), lengths=lengths)[0].float()
    packed.square().mean().backward()
    packed_grads = [p.grad.float().cpu() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    assert len(calls) == (model.config.n_layer if dtype == torch.bfloat16 else 0)
    alone = torch.cat([model(record["input_ids"][None, :-1].cuda())[0].float() for record in records])
    alone.square().mean().backward()
    assert relative_error(packed.detach(), alone.detach().cpu()) <= tolerance
    for packed_grad, p in zip(packed_grads, [p for p in model.parameters() if p.requires_grad]):
        assert relative_error(packed_grad, p.grad.float().cpu()) <= 3 * tolerance


def test_compiled_blocks_give_the_eager_loss_and_gradients_in_bf16_mixed_on_cuda(tmp_path):
    """--train.compile on CUDA (its default there): Blocks compiled by inductor, with gradient checkpointing, packed
    micro-batches of other lengths, bf16 autocast over a bf16 base and fp32 LoRA, give the eager losses and
    gradients."""
    make_checkpoint(tmp_path, **GQA)
    with lora(r=8, alpha=16, dropout=0.0, targets=("all_linear",)):
        eager = load_model(tmp_path, device="cuda", dtype=torch.bfloat16)
    mark_only_lora_as_trainable(eager)
    for param in eager.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    with torch.no_grad():
        for name, param in eager.named_parameters():
            if name.endswith("lora.B"):
                param.normal_(std=0.02)
    compiled = copy.deepcopy(eager)
    compiled.gradient_checkpointing = True
    fabric = argparse.Namespace(device=torch.device("cuda"), strategy=None, print=print)
    assert compile_blocks(fabric, compiled, TrainArgs())  # on by default on CUDA
    generator = torch.Generator().manual_seed(0)
    for lengths in ((37, 5, 64), (100, 20), (7, 90, 11, 30)):
        records = [
            {"input_ids": (ids := torch.randint(3, 32000, (n,), generator=generator)), "labels": ids} for n in lengths
        ]
        input_ids, targets, packed = pack_batch(records, max_seq_length=128)
        losses, grads = [], []
        for model in (eager, compiled):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = cross_entropy_sum(model(input_ids.cuda(), lengths=packed), targets.cuda()) / targets.numel()
            loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).cpu())
            model.zero_grad()
        assert abs(losses[0] - losses[1]) <= 1e-2 * abs(losses[0]), losses
        assert relative_error(grads[1], grads[0]) <= 5e-2


def test_kv_cache_decoding_and_compiled_decoding_on_cuda(tmp_path):
    """Decoding with the KV cache equals recomputing every position, and a compiled step gives the eager tokens."""
    make_checkpoint(tmp_path, **GQA)
    model = load_model(tmp_path, device="cuda").eval()
    idx = torch.randint(0, 32000, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=1, max_seq_length=16)
        steps = [model(idx[:, :5], torch.arange(5, device="cuda"))]
        steps += [model(idx[:, t : t + 1], torch.tensor([t], device="cuda")) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)

    eager = generate(model, idx[0], max_new_tokens=20, temperature=0.0)
    step = compile_step(model)  # as generate.py --compile does
    assert generate(model, idx[0], max_new_tokens=20, temperature=0.0, step_model=step).tolist() == eager.tolist()


def test_qlora_step_on_cuda_trains_lora_and_leaves_the_4bit_base_alone(checkpoint_dir):
    with lora(r=8, alpha=16, dropout=0.0):
        model = load_model(checkpoint_dir, device="cuda", dtype=torch.bfloat16, quantize="bnb.nf4-dq")
    mark_only_lora_as_trainable(model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    base_codes = model.blocks[0].attn.q_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 32000, (1, 33), generator=torch.Generator().manual_seed(0)).cuda()
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cross_entropy_sum(model(idx[:, :-1]), idx[:, 1:]) / 32
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    q_proj = model.blocks[0].attn.q_proj
    assert isinstance(q_proj, LoRALinear) and q_proj.weight.dtype == torch.uint8
    assert torch.equal(q_proj.weight, base_codes)
    assert q_proj.lora.B.abs().sum() > 0 and q_proj.lora.B.dtype == torch.float32
    assert losses[-1] < losses[0]


def test_finetune_lora_trains_in_bf16_mixed_on_cuda_by_default(checkpoint_dir, eight_records, tmp_path, capsys):
    from safetensors.torch import load_file

    from finetune_lora import ADAPTER_NAME, setup

    finetune(
        setup,
        data_dir=eight_records,
        checkpoint_dir=checkpoint_dir,
        out_dir=tmp_path,
        batch_size=4,
        micro_batch_size=2,
        max_steps=3,
        eval_interval=3,
        eval_batches=1,
        save_interval=3,
        warmup_steps=1,
        max_seq_length=64,
    )
    out = capsys.readouterr().out
    assert "1 device(s), bf16-mixed" in out
    assert "Compiling each Block with torch.compile" in out and "First step:" in out  # --train.compile's default
    adapter = load_file(tmp_path / ADAPTER_NAME)
    assert adapter and all(t.dtype == torch.float32 and t.isfinite().all() for t in adapter.values())
