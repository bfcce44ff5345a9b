"""model.py against Hugging Face's LlamaForCausalLM and against a real pretrained model (stories260K)."""

import io
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_checkpoint, shared_file
from convert_hf_checkpoint import convert_hf_checkpoint
from decode import generate
from model import Config, LLaMA, build_rope_cache
from utils import load_model

LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)

# Small random LlamaForCausalLM configs, each exercising one feature of model.py
PARITY_CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
    "rope_theta_500000": dict(rope_theta=500000.0),
    "odd_sizes": dict(
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=90,
        num_hidden_layers=3,
        vocab_size=1000,
    ),
    # Llama 3.1's rope scaling, trained on 32 positions and stretched to 256: with head_size 16 and base 10000 the
    # wavelengths (6.3, 19.9, 62.8, ...) fall in all three of its ranges (kept, interpolated, divided by `factor`)
    "llama3_rope": dict(rope_parameters=dict(LLAMA3_ROPE, rope_theta=10000.0)),
    "llama3_rope_tied": dict(rope_parameters=dict(LLAMA3_ROPE, rope_theta=10000.0), tie_word_embeddings=True),
    # biases on every projection of the blocks (as a merged LLaMA-Adapter v2 has them), random: make_hf_checkpoint
    "biases": dict(attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_matches_transformers(tmp_path, name):
    """Same logits, and the same greedy tokens from generate.py as from transformers' generate."""
    hf = make_checkpoint(tmp_path, **PARITY_CONFIGS[name])  # saved in Hub format, converted by the script
    ours = load_model(tmp_path).eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        actual = ours(idx)
    assert actual.shape == expected.shape == (2, 19, hf.config.vocab_size)
    assert (actual - expected).abs().max() <= 1e-4

    hf.generation_config.eos_token_id = None  # both generate all 32 tokens
    hf.generation_config.pad_token_id = 0
    expected = hf.generate(idx[:1], attention_mask=torch.ones_like(idx[:1]), max_new_tokens=32, do_sample=False)[0]
    assert generate(ours, idx[0], max_new_tokens=32, temperature=0.0).tolist() == expected.tolist()


@pytest.mark.parametrize("tied", [False, True])
def test_llama3_rope_scaling_matches_transformers_beyond_the_original_context(tmp_path, tied):
    """200 positions, of which the first 32 are within original_max_position_embeddings: the same logits in one pass,
    and the same greedy tokens through the KV cache from a 150-token prompt (positions 150..199)."""
    hf = make_checkpoint(tmp_path, rope_parameters=dict(LLAMA3_ROPE, rope_theta=10000.0), tie_word_embeddings=tied)
    ours = load_model(tmp_path).eval()
    assert ours.config.rope_scaling == {key: value for key, value in LLAMA3_ROPE.items() if key != "rope_type"}
    idx = torch.randint(0, hf.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        actual = ours(idx)
    assert (actual - expected).abs().max() <= 1e-4

    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = idx[:, :150]
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=50, do_sample=False)[0]
    assert generate(ours, prompt[0], max_new_tokens=50, temperature=0.0).tolist() == expected.tolist()


def test_llama3_rope_tables_equal_transformers():
    """The inverse frequencies of Llama-3.1-8B's scaling, through transformers' own rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = Config.from_name("Llama-3.1-8B")
    hf = LlamaRotaryEmbedding(
        LlamaConfig(
            hidden_size=config.n_embd,
            num_attention_heads=config.n_head,
            max_position_embeddings=config.block_size,
            rope_parameters=dict(config.rope_scaling, rope_type="llama3", rope_theta=config.rope_base),
        )
    )
    positions = torch.tensor([[0, 1, 100, 8191, 8192, 20000]])
    expected_cos, expected_sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = build_rope_cache(20001, config.head_size, config.rope_base, torch.device("cpu"), config.rope_scaling)
    assert torch.equal(cos[positions[0]], expected_cos[0]) and torch.equal(sin[positions[0]], expected_sin[0])
    plain_cos, _ = build_rope_cache(20001, config.head_size, config.rope_base, torch.device("cpu"))
    assert not torch.equal(cos[100], plain_cos[100])  # the scaling changed something


def test_kv_cache_equals_full_recomputation(tmp_path):
    make_checkpoint(tmp_path)
    model = load_model(tmp_path).eval()
    idx = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=16)
        chunks = [model(idx[:, :5], torch.arange(0, 5))]  # a prompt
        chunks += [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(5, 9)]  # single tokens
        chunks.append(model(idx[:, 9:], torch.arange(9, 12)))  # a chunk after cached tokens
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_decoding_with_the_kv_cache_traces_into_one_graph():
    """generate.py --compile: no shape depends on how full the cache is, so torch.compile has no graph break."""
    model = LLaMA(Config.from_name("tiny")).eval()
    model.set_kv_cache(batch_size=1, max_seq_length=8)
    with torch.no_grad():
        for idx, input_pos in ((torch.tensor([[1, 5, 9]]), torch.arange(3)), (torch.tensor([[4]]), torch.tensor([3]))):
            explanation = torch._dynamo.explain(model)(idx, input_pos)
            assert explanation.graph_break_count == 0, explanation.break_reasons


# Greedy decoding from BOS with the reference C implementation (llama2.c), from ../shared/data/README.md
STORIES_REFERENCE_IDS = [
    461,
    461,
    401,
    401,
    401,
    461,
    378,
    455,
    473,
    456,
    435,
    299,
    362,
    409,
    283,
    264,
    283,
    452,
    288,
    13,
]


def test_stories260K_greedy_decoding_matches_llama2c(tmp_path):
    write_stories260K_hub_checkpoint(shared_file("stories260K.bin"), tmp_path)
    convert_hf_checkpoint(tmp_path)
    model = load_model(tmp_path).eval()
    assert model.config == Config.from_name("stories260K")
    out = generate(model, torch.tensor([1]), max_new_tokens=20, temperature=0.0)
    assert out.tolist() == [1] + STORIES_REFERENCE_IDS


def write_stories260K_hub_checkpoint(path: Path, directory: Path) -> None:
    """Writes a llama2.c checkpoint as the Hub would hold it: config.json, model.safetensors and a
    tokenizer.model (a 512-piece sentencepiece model trained here: the original is not available)."""
    data = path.read_bytes()
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack("<7i", data[:28])
    tied = vocab_size > 0
    vocab_size, head_dim = abs(vocab_size), dim // n_heads
    weights = torch.frombuffer(bytearray(data[28:]), dtype=torch.float32)
    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        n = torch.Size(shape).numel()
        offset += n
        return weights[offset - n : offset].view(shape)

    def meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
        # Meta rotates interleaved pairs (2i, 2i+1), the Hub halves (i, i + head_dim/2): reorder each
        # head's rows, exactly as transformers' convert_llama_weights_to_hf.permute does
        return w.view(n_heads, w.size(0) // n_heads // 2, 2, w.size(1)).transpose(1, 2).reshape(w.shape)

    embed = take(vocab_size, dim)
    attn_norm = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, n_kv_heads * head_dim, dim)
    wv = take(n_layers, n_kv_heads * head_dim, dim)
    wo = take(n_layers, dim, dim)
    mlp_norm = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden_dim, dim), take(n_layers, dim, hidden_dim), take(n_layers, hidden_dim, dim)
    norm = take(dim)
    take(seq_len, head_dim // 2), take(seq_len, head_dim // 2)  # precomputed RoPE tables: not needed
    state_dict = {"model.embed_tokens.weight": embed, "model.norm.weight": norm}
    if not tied:
        state_dict["lm_head.weight"] = take(vocab_size, dim)
    assert offset == weights.numel()
    for i in range(n_layers):
        layer = f"model.layers.{i}."
        state_dict |= {
            layer + "input_layernorm.weight": attn_norm[i],
            layer + "self_attn.q_proj.weight": meta_to_hf(wq[i], n_heads),
            layer + "self_attn.k_proj.weight": meta_to_hf(wk[i], n_kv_heads),
            layer + "self_attn.v_proj.weight": wv[i],
            layer + "self_attn.o_proj.weight": wo[i],
            layer + "post_attention_layernorm.weight": mlp_norm[i],
            layer + "mlp.gate_proj.weight": w1[i],
            layer + "mlp.up_proj.weight": w3[i],
            layer + "mlp.down_proj.weight": w2[i],
        }
    save_file({k: v.contiguous() for k, v in state_dict.items()}, directory / "model.safetensors")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden_dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    }
    (directory / "config.json").write_text(json.dumps(config))
    write_sentencepiece_model(directory / "tokenizer.model", vocab_size)


def write_sentencepiece_model(path: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    texts = [record["output"] for record in json.loads(shared_file("alpaca_en_demo.json").read_text())]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, minloglevel=2
    )
    path.write_bytes(model.getvalue())


def test_meta_device_construction_allocates_nothing():
    # utils.load_model relies on it to keep peak memory near the checkpoint's size
    with torch.device("meta"):
        model = LLaMA(Config.from_name("Llama-2-7b-hf"))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616  # Llama-2-7b's published parameter count


# Published parameter counts, checked against transformers' LlamaForCausalLM / MistralForCausalLM built on the meta
# device
PUBLISHED_PARAMETERS = {
    "Meta-Llama-3-8B": 8_030_261_248,
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Mistral-7B-v0.3": 7_248_023_552,
    "SmolLM2-135M": 134_515_008,
    "SmolLM2-360M": 361_821_120,
    "SmolLM2-1.7B": 1_711_376_384,
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_presets_have_the_published_parameter_count(name):
    with torch.device("meta"):
        model = LLaMA(Config.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]  # a tied head counts once


def test_logits_at_computes_the_head_only_at_the_chosen_positions():
    torch.manual_seed(0)
    model = LLaMA(
        Config(block_size=32, vocab_size=100, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=64)
    )
    idx = torch.randint(0, 100, (2, 10))
    where = torch.rand(2, 10) < 0.5
    head_rows = []
    model.lm_head.register_forward_hook(lambda head, args, out: head_rows.append(args[0].shape[0]))
    chosen = model(idx, logits_at=where)
    full = model(idx)
    assert chosen.shape == (int(where.sum()), 100) and head_rows == [int(where.sum()), 2]
    torch.testing.assert_close(chosen, full[where], rtol=0, atol=1e-6)
    packed = model(idx[:1], lengths=[4, 6], logits_at=where[:1])  # with packed records too
    torch.testing.assert_close(
        packed, torch.cat([model(idx[:1, :4]), model(idx[:1, 4:])], dim=1)[where[:1]], rtol=0, atol=1e-5
    )


def test_a_prompt_packed_once_with_its_continuations_gives_the_logits_of_each_continuation_after_it_alone():
    """lengths (prompt, n1, n2, ...): the prompt computed once, each continuation attending to it and to itself,
    at positions going on from the prompt's end; beside it a sequence of its own. Values and gradients equal those of
    every prompt + continuation packed separately (float64: only the order of the sums differs)."""
    torch.manual_seed(0)
    config = Config(
        block_size=64, vocab_size=100, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=64
    )
    model = LLaMA(config).double()
    prompt, alone = torch.randint(0, 100, (7,)), torch.randint(0, 100, (4,))
    continuations = [torch.randint(0, 100, (n,)) for n in (3, 5, 1)]

    shared = model(torch.cat([prompt, *continuations, alone])[None], lengths=[(7, 3, 5, 1), 4])[0]
    sequences = [torch.cat([prompt, c]) for c in continuations] + [alone]
    separate = model(torch.cat(sequences)[None], lengths=[len(s) for s in sequences])[0]
    # the rows of `separate` that `shared` holds: the first prompt, every continuation, the sequence alone
    rows = list(range(7))
    for i, c in enumerate(continuations):
        start = sum(len(s) for s in sequences[:i]) + 7
        rows += range(start, start + len(c))
    rows += range(len(separate) - 4, len(separate))
    torch.testing.assert_close(shared, separate[rows], rtol=0, atol=1e-12)
    # the gradient of the prompt's copies add up: weight each continuation's rows alike on both sides, the prompt once
    weights = torch.rand(len(shared), 100, dtype=torch.float64)
    model.zero_grad()
    (shared * weights).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (separate[rows] * weights).sum().backward()
    for got, want in zip(expected, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="must add up"):
        model(torch.cat([prompt, *continuations])[None], lengths=[(7, 3, 5)])
