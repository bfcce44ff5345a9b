"""adapter.py (LLaMA-Adapter v1 and v2) against PEFT's adaption_prompt on transformers' LLaMA, and against the base
model it starts from."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import model as llama
from adapter import (
    AdapterConfig,
    AdapterV2Linear,
    AdaptionPrompt,
    adapter,
    adapter_state_dict,
    get_adapter_config,
    load_adapter_checkpoint,
    load_adapter_model,
    mark_only_adapter_as_trainable,
    merge_adapter_v2,
    read_adapter_chat_template,
    read_adapter_config,
    save_adapter_checkpoint,
)
from conftest import make_adapter, make_checkpoint, randomize_adapter
from decode import generate
from lora import read_lora_config
from model import Config, LLaMA
from utils import load_model

TINY = dict(block_size=64, vocab_size=100, n_layer=3, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48)


def tiny_pair(settings: dict, seed: int = 0, **config) -> tuple[LLaMA, LLaMA]:
    """A plain model and an adapter model holding the same base weights."""
    config = Config(**{**TINY, **config})
    torch.manual_seed(seed)
    base = LLaMA(config).eval()
    with adapter(**settings):
        adapted = LLaMA(config).eval()
    adapted.load_state_dict(base.state_dict(), strict=False)
    return base, adapted


def tokens(n: int = 10, vocab: int = 100, rows: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, n), generator=torch.Generator().manual_seed(0))


V1 = dict(version=1, adapter_len=5, adapter_layers=2)
V2 = dict(version=2, adapter_len=5, adapter_layers=2)
V2_ALONE = dict(version=2, adapter_layers=0)


@pytest.mark.parametrize("settings", [V1, V2, V2_ALONE], ids=["v1", "v2", "v2 without prompts"])
def test_a_fresh_adapter_gives_the_base_models_logits_exactly(tmp_path, settings):
    """Zero gates (and v2's scale 1, bias 0, untouched norms): the base model's logits bit for bit, loaded from a
    checkpoint as the scripts do. The prompt's attention is computed, times zero, and adds exactly nothing."""
    make_checkpoint(tmp_path, vocab_size=1000, num_hidden_layers=3)
    base = load_model(tmp_path).eval()
    with adapter(**settings):
        adapted = load_model(tmp_path).eval()
    prompts = [m for m in adapted.modules() if isinstance(m, AdaptionPrompt)]
    assert len(prompts) == settings["adapter_layers"]
    assert all(m.prompt.abs().sum() > 0 and m.gate.item() == 0 for m in prompts)  # a real prompt, a zero gate
    idx = tokens(vocab=1000)
    with torch.no_grad():
        assert torch.equal(adapted(idx), base(idx))


def test_prompts_go_into_the_top_layers_and_v2_layers_into_every_projection_but_the_head():
    with adapter(version=2, adapter_len=4, adapter_layers=2):
        model = LLaMA(Config(**TINY))
    assert [block.attn.adaption_prompt is None for block in model.blocks] == [True, False, False]
    assert model.blocks[2].attn.adaption_prompt.prompt.shape == (4, 32)
    assert model.blocks[2].attn.adaption_prompt.gate.shape == (1,)  # one gate per layer, as PEFT's
    v2 = {name for name, module in model.named_modules() if isinstance(module, AdapterV2Linear)}
    assert len(v2) == 3 * 7 and "lm_head" not in v2
    assert get_adapter_config(model) == AdapterConfig(version=2, adapter_len=4, adapter_layers=2)
    assert get_adapter_config(LLaMA(Config(**TINY))) is None


def test_context_manager_restores_model_py_after_an_exception():
    linear, prompt = llama.linear, llama.adaption_prompt
    with pytest.raises(ValueError, match="adapter_layers 4 is more than the model's 3 layers; pass 3 or fewer"):
        with adapter(version=1, adapter_len=3, adapter_layers=4):
            LLaMA(Config(**TINY))
    assert (llama.linear, llama.adaption_prompt) == (linear, prompt)
    assert all(block.attn.adaption_prompt is None for block in LLaMA(Config(**TINY)).blocks)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(adapter_len=0), "adapter_len, the prompt's length, must be a whole number of at least 1, not 0"),
        (dict(adapter_layers=0), "adapter_layers must be a whole number of at least 1 (v1 learns nothing else), not 0"),
        (dict(version=2, adapter_layers=-1), "adapter_layers must be a whole number of at least 0, not -1"),
        (dict(version=3), "the LLaMA-Adapter version must be 1 or 2, not 3"),
    ],
)
def test_invalid_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError) as e:
        AdapterConfig(**settings)
    assert str(e.value) == message


@pytest.mark.parametrize("settings", [V1, V2], ids=["v1", "v2"])
def test_kv_cache_decoding_equals_a_full_recompute(settings):
    """The prompt has no position: every query attends to all of it, in one pass or token by token through the
    cache."""
    _, model = tiny_pair(settings)
    randomize_adapter(model)
    idx = tokens(12)
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=16)
        chunks = [model(idx[:, :5], torch.arange(0, 5))]  # a prompt
        chunks += [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(5, 9)]  # single tokens
        chunks.append(model(idx[:, 9:], torch.arange(9, 12)))  # a chunk after cached tokens
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_packed_sequences_each_see_the_prompt_as_if_alone():
    """Training packs records into one row (`lengths`): each record attends to itself and to the prompt."""
    _, model = tiny_pair(V2)
    randomize_adapter(model)
    a, b = tokens(5)[0], tokens(7)[1]
    with torch.no_grad():
        packed = model(torch.cat([a, b])[None], lengths=[5, 7])[0]
        alone = torch.cat([model(a[None])[0], model(b[None])[0]])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings", [V1, V2], ids=["v1", "v2"])
def test_only_the_adapter_learns_and_a_zero_gate_passes_no_gradient_to_its_prompt(settings):
    _, model = tiny_pair(settings)
    mark_only_adapter_as_trainable(model)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    expected = {f"blocks.{i}.attn.adaption_prompt.{p}" for i in (1, 2) for p in ("prompt", "gate")}
    if settings["version"] == 2:
        projections = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj")
        projections += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        expected |= {f"blocks.{i}.{p}.bias_scale.{t}" for i in range(3) for p in projections for t in ("bias", "scale")}
        expected |= {f"blocks.{i}.{norm}_norm.weight" for i in range(3) for norm in ("attn", "mlp")} | {"norm.weight"}
    assert trainable == expected == set(adapter_state_dict(model))

    model.train()
    logits = model(tokens())
    logits.logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        if name.endswith(".prompt"):
            assert torch.equal(param.grad, torch.zeros_like(param))  # d(gate · attention)/d(prompt) = 0 at gate 0
        elif param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_a_fabric_wrapped_model_marks_and_saves_the_same_adapter(tmp_path):
    from lightning.fabric import Fabric

    _, model = tiny_pair(V2)
    randomize_adapter(model)
    save_adapter_checkpoint(model, tmp_path / "adapter.safetensors")
    wrapped = Fabric(accelerator="cpu", devices=1).setup(model)
    mark_only_adapter_as_trainable(wrapped)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))
    save_adapter_checkpoint(wrapped, tmp_path / "wrapped.safetensors")
    saved, direct = load_file(tmp_path / "wrapped.safetensors"), load_file(tmp_path / "adapter.safetensors")
    assert saved.keys() == direct.keys() and all(torch.equal(saved[name], direct[name]) for name in saved)


def test_the_adapters_size_is_two_tensors_per_adapted_layer():
    """The paper's v1 on LLaMA 7B: 10 prompt vectors of 4096 in the top 30 layers, and a gate each: 1.2M parameters."""
    with adapter(version=1, adapter_len=10, adapter_layers=30), torch.device("meta"):
        model = LLaMA(Config.from_name("Llama-2-7b-hf"))
    assert sum(param.numel() for param in adapter_state_dict(model).values()) == 30 * (10 * 4096 + 1)


def test_save_load_round_trip_with_settings_and_base_in_the_metadata(tmp_path):
    make_checkpoint(tmp_path, vocab_size=1000, num_hidden_layers=3)
    with adapter(**V2):
        model = load_model(tmp_path).eval()
    randomize_adapter(model)
    save_adapter_checkpoint(model, tmp_path / "adapter.safetensors", chat_template="{{ messages }}")
    with safe_open(tmp_path / "adapter.safetensors", "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["adapter"]) == V2
    assert Config(**json.loads(metadata["model_config"])) == model.config
    assert read_adapter_config(tmp_path / "adapter.safetensors") == (AdapterConfig(**V2), model.config)
    assert read_adapter_chat_template(tmp_path / "adapter.safetensors") == "{{ messages }}"
    assert load_file(tmp_path / "adapter.safetensors").keys() == adapter_state_dict(model).keys()

    loaded = load_adapter_model(tmp_path, tmp_path / "adapter.safetensors").eval()
    idx = tokens(vocab=1000)
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def error_of(function, *args) -> str:
    with pytest.raises(ValueError) as e:
        function(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_files_of_another_kind_or_base_or_settings_are_refused_in_one_line(tmp_path):
    make_checkpoint(tmp_path / "base", vocab_size=1000, num_hidden_layers=3)
    make_checkpoint(tmp_path / "other", vocab_size=1000, num_hidden_layers=2)
    with adapter(**V1):
        model = load_model(tmp_path / "base")
    save_adapter_checkpoint(model, tmp_path / "adapter.safetensors")
    make_adapter(tmp_path / "base", tmp_path / "lora.safetensors", r=2, alpha=4, targets=("query",), seed=0)

    assert error_of(read_adapter_config, tmp_path / "lora.safetensors") == (
        f"{tmp_path / 'lora.safetensors'} is a LoRA checkpoint (lora.py), not a LLaMA-Adapter one; LoRA files go "
        "to --lora_path (generate with generate_lora.py)"
    )
    assert error_of(read_lora_config, tmp_path / "adapter.safetensors") == (
        f"{tmp_path / 'adapter.safetensors'} is a LLaMA-Adapter checkpoint (adapter.py), not a LoRA one; "
        "LLaMA-Adapter files go to --adapter_path (generate with generate_adapter.py)"
    )
    assert "trained on another base model: n_layer=3 (model: 2)" in error_of(
        load_adapter_model, tmp_path / "other", tmp_path / "adapter.safetensors"
    )
    with adapter(version=1, adapter_len=3, adapter_layers=2):
        other_settings = LLaMA(model.config)
    assert "other settings (AdapterConfig(version=1, adapter_len=5" in error_of(
        load_adapter_checkpoint, other_settings, tmp_path / "adapter.safetensors"
    )
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    assert "import_peft.py" in error_of(read_adapter_config, tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="LLaMA-Adapter checkpoint .* not found"):
        read_adapter_config(tmp_path / "missing.safetensors")

    tensors = load_file(tmp_path / "adapter.safetensors")
    tensors["blocks.2.attn.adaption_prompt.prompt"] = torch.zeros(4, 64)
    with safe_open(tmp_path / "adapter.safetensors", "pt") as f:
        save_file(tensors, tmp_path / "tampered.safetensors", metadata=f.metadata())
    assert "blocks.2.attn.adaption_prompt.prompt has shape (4, 64), the model's is (5, 64)" in error_of(
        load_adapter_model, tmp_path / "base", tmp_path / "tampered.safetensors"
    )


@pytest.mark.parametrize("tied", [False, True])
def test_v2_merges_into_a_plain_model_with_biases(tied):
    """scale ⊙ (W·x + bias) = (scale ⊙ W)·x + scale ⊙ bias: the merged plain model gives the adapter's logits, within
    fp32 rounding of the products (a scaled weight rounds once more)."""
    _, model = tiny_pair(V2_ALONE, tie_embeddings=tied)
    randomize_adapter(model)
    idx = tokens()
    with torch.no_grad():
        expected = model(idx)
        merged = merge_adapter_v2(model)
        actual = merged(idx)
    assert merged.config == Config(**{**TINY, "tie_embeddings": tied, "attention_bias": True, "mlp_bias": True})
    assert not any(isinstance(m, (AdapterV2Linear, AdaptionPrompt)) for m in merged.modules())
    assert (merged.lm_head.weight is merged.embed.weight) == tied
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("settings", [V1, V2], ids=["v1", "v2"])
def test_a_prompt_cannot_merge(settings):
    _, model = tiny_pair(settings)
    assert error_of(merge_adapter_v2, model) == (
        "the model has a prompt in 2 layers, which cannot merge into weights: only v2's bias, scale and norms do (a "
        "v2 adapter trained with adapter_layers 0); generate with the adapter unmerged (generate_adapter.py)"
    )


# transformers LLaMA configs to check v1 against PEFT on: multi-head, grouped-query and a head tied to the embedding
PEFT_CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
}


def peft_adaption_prompt(hf_model, model: LLaMA, adapter_len: int, adapter_layers: int):
    """PEFT's adaption prompt model on `hf_model` with the prompts and gates of our `model`, copied layer by layer."""
    from peft import AdaptionPromptConfig, get_peft_model

    config = AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(hf_model), config).eval()
    with torch.no_grad():
        for ours, theirs in zip(model.blocks, peft_model.base_model.model.model.layers):
            if ours.attn.adaption_prompt is not None:
                theirs.self_attn.adaption_prompt.copy_(ours.attn.adaption_prompt.prompt[None])  # (1, len, n_embd)
                theirs.self_attn.adaption_gate.copy_(ours.attn.adaption_prompt.gate)
            else:
                assert not hasattr(theirs.self_attn, "adaption_prompt")  # the same layers are adapted
    return peft_model


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_v1_matches_peft_adaption_prompt(tmp_path, name):
    """The same prompts and gates in the top 2 of 3 layers: logits within 1e-4 and the same greedy tokens (ours
    through the KV cache, PEFT's through transformers' cache)."""
    hf_model = make_checkpoint(tmp_path, vocab_size=1000, num_hidden_layers=3, **PEFT_CONFIGS[name])
    with adapter(version=1, adapter_len=6, adapter_layers=2):
        model = load_model(tmp_path).eval()
    randomize_adapter(model)
    peft_model = peft_adaption_prompt(hf_model, model, adapter_len=6, adapter_layers=2)

    idx = tokens(11, vocab=1000)
    with torch.no_grad():
        expected, base = peft_model(input_ids=idx).logits, hf_model(input_ids=idx).logits
        actual = model(idx)
    assert (expected - base).abs().max() > 1e-2  # the prompts really change the output
    assert (actual - expected).abs().max() <= 1e-4

    peft_model.generation_config.eos_token_id = None  # both generate all 20 tokens
    peft_model.generation_config.pad_token_id = 0
    prompt = idx[:1]
    expected = peft_model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False
    )[0]
    assert generate(model, prompt[0], max_new_tokens=20, temperature=0.0).tolist() == expected.tolist()


def test_v2_layers_on_a_quantized_base_are_refused_not_dropped(tmp_path):
    """bitsandbytes' layers would replace AdapterV2Linear and lose its bias and scale without a word."""
    make_checkpoint(tmp_path, vocab_size=1000)
    with pytest.raises(ValueError, match="^LLaMA-Adapter v2 .* on a quantized base is not implemented"):
        with adapter(**{**V2, "adapter_layers": 1}):
            load_model(tmp_path, quantize="bnb.nf4")
