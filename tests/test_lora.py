import json
import math
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import model as llama
from lora import (
    TARGETS,
    LoRAConfig,
    LoRALinear,
    get_lora_config,
    load_lora_checkpoint,
    load_lora_model,
    lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora_weights,
    read_lora_config,
    save_lora_checkpoint,
)
from model import Config, LLaMA
from utils import load_model

TINY = dict(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48)


def randomize_lora(model: LLaMA, seed: int = 1) -> None:
    """Non-zero B (a fresh one is zero), so that the update actually changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora.A.copy_(torch.randn(module.lora.A.shape, generator=generator) * 0.1)
                module.lora.B.copy_(torch.randn(module.lora.B.shape, generator=generator) * 0.1)
                if module.lora.magnitude is not None:  # DoRA: each row's length moved by up to 20 %
                    module.lora.magnitude.mul_(torch.rand(module.lora.magnitude.shape, generator=generator) * 0.4 + 0.8)


def tiny_pair(seed: int = 0, lora_kwargs: dict = None, **config):
    """A plain model and a LoRA model holding the same base weights."""
    config = Config(**{**TINY, **config})
    torch.manual_seed(seed)
    base = LLaMA(config).eval()
    with lora(**(lora_kwargs or dict(r=4, alpha=8, dropout=0.0))):
        adapted = LLaMA(config).eval()
    adapted.load_state_dict(base.state_dict(), strict=False)
    return base, adapted


def tokens(n: int = 10, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))


def rounding_tolerance(model: torch.nn.Module, output: torch.Tensor) -> dict:
    """assert_close's tolerance for two outputs of `model` that differ only in rounding, such as merged and unmerged
    LoRA (x @ (W + s·BA)ᵀ against x @ Wᵀ + s·(x @ Aᵀ) @ Bᵀ): each product's sum over fan-in terms rounds with errors
    that add like a random walk, about eps·sqrt(fan_in) of the output's size. 4 of those, against the largest output
    (measured: 1.5 to 3 eps·max|output|), follows from fp32 and the model's shapes rather than from one machine's
    BLAS."""
    eps = torch.finfo(output.dtype).eps
    fan_in = max(layer.in_features for layer in model.modules() if isinstance(layer, torch.nn.Linear))
    return dict(rtol=0, atol=4 * eps * math.sqrt(fan_in) * output.abs().max().item())


def test_layer_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    layer = LoRALinear(6, 5, r=2, alpha=3, dropout=0.0)
    with torch.no_grad():
        layer.lora.B.normal_()
    x = torch.randn(3, 6)
    W, A, B = layer.weight, layer.lora.A, layer.lora.B
    expected = x @ W.T + x @ (B @ A).T * (3 / 2)  # the definition, with ΔW built explicitly
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_init_is_kaiming_uniform_a_and_zero_b():
    torch.manual_seed(0)
    layer = LoRALinear(400, 30, r=16, alpha=16, dropout=0.0)
    bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear
    assert layer.lora.A.abs().max() <= bound and layer.lora.A.abs().max() > 0.9 * bound
    assert layer.lora.A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(layer.lora.B) == 0


def test_fresh_lora_model_gives_the_base_models_output():
    base, adapted = tiny_pair(lora_kwargs=dict(r=4, alpha=8, dropout=0.1, targets=("all_linear", "head")))
    x = tokens()
    assert torch.equal(adapted(x), base(x))


def test_merged_equals_unmerged_and_unmerge_restores_the_weight():
    _, adapted = tiny_pair(lora_kwargs=dict(r=4, alpha=8, dropout=0.0, targets=("all_linear", "head")))
    randomize_lora(adapted)
    x = tokens()
    weights = {name: t.clone() for name, t in adapted.state_dict().items()}
    unmerged = adapted(x)
    merge_lora_weights(adapted)
    assert all(m.merged for m in adapted.modules() if isinstance(m, LoRALinear))
    assert not torch.equal(adapted.blocks[0].attn.q_proj.weight, weights["blocks.0.attn.q_proj.weight"])
    torch.testing.assert_close(adapted(x), unmerged, **rounding_tolerance(adapted, unmerged))
    for module in adapted.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()
    for name, t in adapted.state_dict().items():
        torch.testing.assert_close(t, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(adapted(x), unmerged, **rounding_tolerance(adapted, unmerged))


def test_dora_layer_is_magnitude_times_normalised_weight_plus_update():
    """DoRA's definition (Liu et al. 2024, eq. 5): m ⊙ (W + ΔW)·x / ‖W + ΔW‖ per output row, ΔW = B·A·alpha/r."""
    torch.manual_seed(0)
    layer = LoRALinear(6, 5, r=2, alpha=3, dropout=0.0, dora=True)
    W = layer.weight
    torch.testing.assert_close(layer.lora.magnitude, W.norm(dim=1))  # it starts from the base layer
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ W.T, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        layer.lora.B.normal_()
        layer.lora.magnitude.uniform_(0.5, 2)
    V = W + layer.lora.B @ layer.lora.A * (3 / 2)
    expected = x @ (layer.lora.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_dora_norm_is_detached_and_its_parameters_get_gradients():
    torch.manual_seed(0)
    layer = LoRALinear(6, 5, r=2, alpha=3, dropout=0.0, dora=True)
    with torch.no_grad():
        layer.lora.B.normal_()
    layer.weight.requires_grad = False
    layer(torch.randn(3, 6)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.lora.parameters())
    assert not layer.weight_norm().requires_grad


def test_dora_merged_equals_unmerged_and_unmerge_restores_the_weight():
    _, adapted = tiny_pair(lora_kwargs=dict(r=4, alpha=8, dropout=0.0, targets=("all_linear", "head"), dora=True))
    randomize_lora(adapted)
    x = tokens()
    weights = {name: t.clone() for name, t in adapted.state_dict().items()}
    unmerged = adapted(x)
    merge_lora_weights(adapted)
    torch.testing.assert_close(adapted(x), unmerged, **rounding_tolerance(adapted, unmerged))
    for module in adapted.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()
    for name, t in adapted.state_dict().items():
        torch.testing.assert_close(t, weights[name], rtol=0, atol=1e-6)


def test_merging_a_tied_head_leaves_the_embedding_alone():
    _, adapted = tiny_pair(
        lora_kwargs=dict(r=2, alpha=4, dropout=0.0, targets=("query", "value", "head")), tie_embeddings=True
    )
    randomize_lora(adapted)
    embedding = adapted.embed.weight.clone()
    x = tokens()
    unmerged = adapted(x)
    merge_lora_weights(adapted)
    assert torch.equal(adapted.embed.weight, embedding)
    assert adapted.config.tie_embeddings is False
    # the logits here are tens (the head is the N(0, 1) embedding), so a fixed atol of 1e-5 was 3 of their ulps
    torch.testing.assert_close(adapted(x), unmerged, **rounding_tolerance(adapted, unmerged))


def test_targets_per_projection_and_shorthands():
    config = Config(**TINY)
    for targets, wanted in [
        (("query", "value"), {"q_proj", "v_proj"}),
        (("value", "down"), {"v_proj", "down_proj"}),
        (("key", "mlp"), {"k_proj", "gate_proj", "up_proj", "down_proj"}),
        (("attention", "up"), {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj"}),
        (("all_linear",), {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        (("head",), {"lm_head"}),
    ]:
        with lora(r=2, alpha=2, dropout=0.0, targets=targets):
            model = LLaMA(config)
        adapted = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, LoRALinear)}
        assert adapted == wanted, targets
        expected = [
            t for t in ("query", "key", "value", "projection", "gate", "up", "down", "head") if TARGETS[t] in wanted
        ]
        assert list(get_lora_config(model).targets) == expected


def test_lora_settings_are_checked_with_a_value_error():
    for kwargs, message in [
        (dict(r=0), "rank r must be a whole number of at least 1, not 0"),
        (dict(ranks={"blocks.0.attn.q_proj": 0}), "at least 1, not 0"),
        (dict(dropout=1.0), "dropout must be in"),
        (
            dict(targets=("query", "gates")),
            "must be some of query, key, value, projection, gate, up, down, head, attention, mlp, all_linear",
        ),
        (dict(targets=()), "must be some of"),
    ]:
        with pytest.raises(ValueError, match=message):
            LoRAConfig(**kwargs)
    assert LoRAConfig(targets="mlp").targets == ("gate", "up", "down")  # a single name, as a YAML string
    assert LoRAConfig(targets=("value", "query", "query")).targets == ("query", "value")  # one spelling


def test_rslora_scales_by_alpha_over_sqrt_r():
    assert LoRALinear(8, 8, r=4, alpha=8, dropout=0.0).lora.scaling == 2.0
    assert LoRALinear(8, 8, r=4, alpha=8, dropout=0.0, rslora=True).lora.scaling == 4.0


def test_per_module_ranks_and_alphas_build_and_read_back():
    ranks, alphas = {"blocks.1.attn.q_proj": 6, "blocks.0.mlp.down_proj": 2}, {"blocks.1.attn.q_proj": 3.0}
    with lora(r=4, alpha=8, dropout=0.0, targets=("query", "down"), ranks=ranks, alphas=alphas):
        model = LLaMA(Config(**TINY))
    assert model.blocks[1].attn.q_proj.lora.A.shape == (6, 32) and model.blocks[0].attn.q_proj.lora.A.shape == (4, 32)
    assert model.blocks[1].attn.q_proj.lora.scaling == 0.5 and model.blocks[0].mlp.down_proj.lora.scaling == 4.0
    config = get_lora_config(model)
    assert (config.r, config.alpha, config.ranks, config.alphas) == (4, 8, ranks, alphas)


def test_adapters_written_with_a_flag_per_target_still_load(tmp_path):
    """Adapters from before `targets` recorded {"query": true, "value": true, ...} in their metadata."""
    trained = save_adapter(tmp_path, lora_kwargs=dict(r=4, alpha=8, dropout=0.05, targets=("query", "value", "mlp")))
    path = tmp_path / "adapter.safetensors"
    old_style = {
        "r": 4,
        "alpha": 8,
        "dropout": 0.05,
        "query": True,
        "key": False,
        "value": True,
        "projection": False,
        "mlp": True,
        "head": False,
    }
    metadata = {"format": "pt", "lora": json.dumps(old_style), "model_config": json.dumps(asdict(trained.config))}
    save_file(load_file(path), tmp_path / "old.safetensors", metadata=metadata)
    assert read_lora_config(tmp_path / "old.safetensors")[0] == read_lora_config(path)[0]
    loaded = load_lora_model(tmp_path, tmp_path / "old.safetensors")
    x = tokens()
    assert torch.equal(loaded.eval()(x), trained(x))


def test_adapters_written_before_per_projection_targets_still_load(tmp_path):
    """Adapters from before rslora, dora, ranks and the per-projection targets recorded "mlp" for gate, up and down."""
    trained = save_adapter(tmp_path, lora_kwargs=dict(r=4, alpha=8, dropout=0.05, targets=("key", "mlp", "head")))
    path = tmp_path / "adapter.safetensors"
    old_style = {"r": 4, "alpha": 8, "dropout": 0.05, "targets": ["key", "mlp", "head"]}
    metadata = {"format": "pt", "lora": json.dumps(old_style), "model_config": json.dumps(asdict(trained.config))}
    save_file(load_file(path), tmp_path / "old.safetensors", metadata=metadata)
    assert read_lora_config(tmp_path / "old.safetensors")[0].targets == ("key", "gate", "up", "down", "head")
    x = tokens()
    assert torch.equal(load_lora_model(tmp_path, tmp_path / "old.safetensors").eval()(x), trained(x))


@pytest.mark.parametrize(
    "settings",
    [
        dict(rslora=True),
        dict(dora=True),
        dict(ranks={"blocks.1.attn.q_proj": 6}, alphas={"blocks.0.mlp.gate_proj": 3.0}),
    ],
)
def test_variants_save_and_load_with_their_settings(tmp_path, settings):
    lora_kwargs = dict(r=4, alpha=8, dropout=0.05, targets=("query", "mlp"), **settings)
    trained = save_adapter(tmp_path, lora_kwargs=lora_kwargs)
    if settings.get("dora"):
        assert "blocks.0.mlp.up_proj.lora.magnitude" in load_file(tmp_path / "adapter.safetensors")
    assert read_lora_config(tmp_path / "adapter.safetensors")[0] == LoRAConfig(**lora_kwargs)
    x = tokens()
    loaded = load_lora_model(tmp_path, tmp_path / "adapter.safetensors").eval()
    assert torch.equal(loaded(x), trained(x))
    merged = load_lora_model(tmp_path, tmp_path / "adapter.safetensors", merge=True).eval()
    torch.testing.assert_close(merged(x), trained(x), **rounding_tolerance(merged, trained(x)))


def test_context_manager_restores_model_py_after_an_exception():
    plain_linear = llama.linear
    with pytest.raises(RuntimeError, match="boom"):
        with lora(r=2, alpha=2, dropout=0.0, targets=("all_linear",)):
            assert llama.linear is not plain_linear
            raise RuntimeError("boom")
    assert llama.linear is plain_linear
    assert not any(isinstance(m, LoRALinear) for m in LLaMA(Config(**TINY)).modules())


def test_only_lora_parameters_require_and_receive_gradients():
    _, adapted = tiny_pair(lora_kwargs=dict(r=4, alpha=8, dropout=0.0, targets=("query", "value", "mlp")))
    adapted.train()
    mark_only_lora_as_trainable(adapted)
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in name for name in trainable)
    assert trainable == set(lora_state_dict(adapted))

    # first step from B = 0: dL/dA = Bᵀ·(…) = 0, so only B moves, as in the paper
    adapted(tokens()).logsumexp(-1).mean().backward()
    for name, p in adapted.named_parameters():
        if name in trainable:
            assert p.grad is not None and (p.grad.abs().sum() > 0) == name.endswith(".B"), name
        else:
            assert p.grad is None, name
    adapted.zero_grad()
    randomize_lora(adapted)
    adapted(tokens()).logsumexp(-1).mean().backward()
    assert all(adapted.get_parameter(name).grad.abs().sum() > 0 for name in trainable)


def test_trainable_count_is_r_times_in_plus_out_per_adapted_layer():
    config = Config(**TINY)
    r, kv = 4, config.n_query_groups * config.head_size
    with lora(r=r, alpha=8, dropout=0.0, targets=("all_linear", "head")):
        model = LLaMA(config)
    mark_only_lora_as_trainable(model)
    C, hidden = config.n_embd, config.intermediate_size
    per_layer = r * ((C + C) + (C + kv) + (C + kv) + (C + C) + (C + hidden) + (C + hidden) + (hidden + C))
    expected = config.n_layer * per_layer + r * (C + config.vocab_size)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_llama_2_7b_query_value_r8_has_4_194_304_trainable_parameters():
    with torch.device("meta"), lora(r=8, alpha=16, dropout=0.05, targets=("query", "value")):
        model = LLaMA(Config.from_name("Llama-2-7b-hf"))
    mark_only_lora_as_trainable(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4_194_304  # 32 x 2 x 8 x (4096 + 4096)


def test_load_model_inside_lora_initialises_lora_on_the_weights_device(tmp_path):
    torch.manual_seed(0)
    config = Config(**TINY)
    base = LLaMA(config)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "lit_model.safetensors")
    config.to_file(tmp_path / "model_config.json")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with lora(r=4, alpha=8, dropout=0.0, targets=("all_linear", "head")):
        model = load_model(tmp_path, dtype=torch.float64)
    assert all(not p.is_meta and p.dtype == torch.float64 for p in model.parameters())
    for module in model.modules():
        if isinstance(module, LoRALinear):
            assert torch.count_nonzero(module.lora.B) == 0
            assert 0 < module.lora.A.abs().max() <= 1 / math.sqrt(module.in_features)
    assert torch.equal(model(tokens()), base.double()(tokens()))


def save_adapter(tmp_path, lora_kwargs=None, **config):
    """A converted-format base checkpoint directory and a trained-looking adapter for it."""
    torch.manual_seed(0)
    config = Config(**{**TINY, **config})
    base = LLaMA(config)
    save_file(
        {
            k: v.contiguous()
            for k, v in base.state_dict().items()
            if not (config.tie_embeddings and k == "lm_head.weight")
        },
        tmp_path / "lit_model.safetensors",
    )
    config.to_file(tmp_path / "model_config.json")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with lora(**(lora_kwargs or dict(r=4, alpha=8, dropout=0.05, targets=("query", "value", "mlp")))):
        model = load_model(tmp_path)
    randomize_lora(model)
    save_lora_checkpoint(model, tmp_path / "adapter.safetensors")
    return model.eval()


def test_save_load_round_trip(tmp_path):
    trained = save_adapter(tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    assert set(saved) == set(lora_state_dict(trained)) and all(".lora." in name for name in saved)
    lora_config, base_config = read_lora_config(tmp_path / "adapter.safetensors")
    assert lora_config == LoRAConfig(r=4, alpha=8, dropout=0.05, targets=("query", "value", "mlp"))
    assert base_config == trained.config

    with lora(**asdict(lora_config)):
        fresh = load_model(tmp_path)
    load_lora_checkpoint(fresh, tmp_path / "adapter.safetensors")
    for name, t in lora_state_dict(fresh).items():
        assert torch.equal(t, saved[name])
    x = tokens()
    assert torch.equal(fresh.eval()(x), trained(x))
    merged = load_lora_model(tmp_path, tmp_path / "adapter.safetensors", merge=True)
    torch.testing.assert_close(merged.eval()(x), trained(x), **rounding_tolerance(trained, trained(x)))
    double = load_lora_model(
        tmp_path, tmp_path / "adapter.safetensors", dtype=torch.float64
    )  # cast to the model's dtype
    assert all(torch.equal(t, saved[name].double()) for name, t in lora_state_dict(double).items())


def error_of(fn, *args) -> str:
    with pytest.raises((ValueError, OSError)) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_mismatched_base_is_named(tmp_path):
    save_adapter(tmp_path)
    path = tmp_path / "adapter.safetensors"
    lora_config, _ = read_lora_config(path)
    with lora(**asdict(lora_config)):
        other = LLaMA(Config(**{**TINY, "n_layer": 3, "n_embd": 64}))
    message = error_of(load_lora_checkpoint, other, path)
    assert "another base model" in message and "n_layer=2 (model: 3)" in message and "n_embd=32 (model: 64)" in message
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    Config(**{**TINY, "intermediate_size": 64}).to_file(other_dir / "model_config.json")
    for name in ("lit_model.safetensors", "tokenizer.model"):
        (other_dir / name).write_bytes(b"")
    assert "intermediate_size=48 (model: 64)" in error_of(load_lora_model, other_dir, path)


def test_mismatched_targets_and_rank_are_named(tmp_path):
    save_adapter(tmp_path)
    path = tmp_path / "adapter.safetensors"
    with lora(r=8, alpha=8, dropout=0.0, targets=("query", "mlp")):
        model = LLaMA(Config(**TINY))
    message = error_of(load_lora_checkpoint, model, path)
    assert "r=4 (model: 8)" in message
    assert "targets=('query', 'value', 'gate', 'up', 'down') (model: ('query', 'gate', 'up', 'down'))" in message
    assert "without LoRA" not in message
    assert "no LoRA layers" in error_of(load_lora_checkpoint, LLaMA(Config(**TINY)), path)


def test_files_that_are_not_lora_checkpoints_are_refused(tmp_path):
    assert "not found" in error_of(read_lora_config, tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    assert "import_peft.py" in error_of(read_lora_config, tmp_path / "plain.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    assert "not a safetensors file" in error_of(read_lora_config, tmp_path / "text.safetensors")


def test_tampered_tensors_are_named(tmp_path):
    save_adapter(tmp_path)
    path = tmp_path / "adapter.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["blocks.0.attn.q_proj.lora.A"] = torch.zeros(5, 32)
    save_file(tensors, tmp_path / "bad_shape.safetensors", metadata=metadata)
    assert "blocks.0.attn.q_proj.lora.A has shape (5, 32), the model's is (4, 32)" in error_of(
        load_lora_model, tmp_path, tmp_path / "bad_shape.safetensors"
    )
    del tensors["blocks.1.mlp.up_proj.lora.B"]
    save_file(tensors, tmp_path / "missing.safetensors", metadata=metadata)
    assert "missing: ['blocks.1.mlp.up_proj.lora.B']" in error_of(
        load_lora_model, tmp_path, tmp_path / "missing.safetensors"
    )


def test_invalid_settings_are_refused():
    assert "rank" in error_of(LoRAConfig, 0)
    assert "dropout" in error_of(LoRAConfig, 8, 16, 1.5)


def test_a_fabric_wrapped_model_saves_the_same_adapter(tmp_path):
    from lightning.fabric import Fabric

    model = save_adapter(tmp_path)
    wrapped = Fabric(accelerator="cpu", devices=1).setup(model)
    mark_only_lora_as_trainable(wrapped)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    save_lora_checkpoint(wrapped, tmp_path / "wrapped.safetensors")
    saved, direct = load_file(tmp_path / "wrapped.safetensors"), load_file(tmp_path / "adapter.safetensors")
    assert saved.keys() == direct.keys() and all(torch.equal(saved[name], direct[name]) for name in saved)
