"""What only a CUDA GPU exercises: bf16 kernels, flash attention on packed records, compiled decoding on the GPU,
QLoRA's bitsandbytes kernels, and the fine-tuning script's default precision there. Skipped without CUDA. The rest of
the suite checks the CPU path, also on a GPU machine (conftest.cpu_only hides the GPU from it)."""

import pytest
import torch
from conftest import REAL_CUDA, finetune, make_checkpoint

from generate import generate
from lora import LoRALinear, lora, mark_only_lora_as_trainable
from training import cross_entropy_sum, pack_batch
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
    """fp32 on the GPU equals transformers' fp32 logits; in bf16 ours strays from them no more than transformers' bf16."""
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
def test_packed_records_give_each_records_own_logits_on_cuda(tmp_path, dtype, tolerance):
    make_checkpoint(tmp_path, **GQA)
    model = load_model(tmp_path, device="cuda", dtype=dtype).eval()
    generator = torch.Generator().manual_seed(0)
    records = [{"input_ids": torch.randint(0, 32000, (n,), generator=generator), "labels": torch.zeros(n, dtype=torch.long)}
               for n in (37, 5, 64)]
    input_ids, _, lengths = pack_batch(records, max_seq_length=128)
    with torch.no_grad():
        packed = model(input_ids.cuda(), lengths=lengths)[0].float()
        alone = torch.cat([model(record["input_ids"][None, :-1].cuda())[0].float() for record in records])
    assert relative_error(packed, alone.cpu()) <= tolerance


def test_kv_cache_decoding_and_compiled_decoding_on_cuda(tmp_path):
    """Decoding with the KV cache equals recomputing every position, and generate() compiled gives the eager tokens."""
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
    model.rope(idx.device)  # as generate.py --compile does: the rotary tables exist before tracing
    compiled = torch.compile(model)
    assert generate(compiled, idx[0], max_new_tokens=20, temperature=0.0).tolist() == eager.tolist()


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
            loss = cross_entropy_sum(model, idx[:, :-1], idx[:, 1:]) / 32
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

    finetune(setup, data_dir=eight_records, checkpoint_dir=checkpoint_dir, out_dir=tmp_path, batch_size=4, micro_batch_size=2,
          max_steps=3, eval_interval=3, eval_batches=1, save_interval=3, warmup_steps=1, max_seq_length=64)
    assert "1 device(s), bf16-mixed" in capsys.readouterr().out
    adapter = load_file(tmp_path / ADAPTER_NAME)
    assert adapter and all(t.dtype == torch.float32 and t.isfinite().all() for t in adapter.values())
