import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapter import AdapterConfig
from conftest import make_checkpoint
from export_peft import export_peft, lit_to_peft_name, peft_to_lit_name
from import_peft import import_peft
from lora import LoRALinear, load_lora_model, lora, mark_only_lora_as_trainable, read_lora_config, save_lora_checkpoint
from utils import load_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A converted checkpoint, the transformers model it came from, and a LoRA checkpoint with random
    non-zero A and B on every projection and the head."""
    directory = tmp_path_factory.mktemp("base")
    hf_model = make_checkpoint(directory)
    with lora(r=4, alpha=8, dropout=0.05, targets=("all_linear", "head")):
        model = load_model(directory)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora.A.copy_(torch.randn(module.lora.A.shape, generator=generator) * 0.05)
                module.lora.B.copy_(torch.randn(module.lora.B.shape, generator=generator) * 0.05)
    save_lora_checkpoint(model, directory / "adapter.safetensors")
    return directory, hf_model, model.eval()


def test_names_map_both_ways():
    assert (
        lit_to_peft_name("blocks.3.attn.q_proj.lora.A")
        == "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    )
    assert (
        lit_to_peft_name("blocks.0.mlp.down_proj.lora.B")
        == "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    )
    assert lit_to_peft_name("lm_head.lora.A") == "base_model.model.lm_head.lora_A.weight"
    for name in ("blocks.3.attn.q_proj.lora.A", "blocks.11.mlp.gate_proj.lora.B", "lm_head.lora.B"):
        assert peft_to_lit_name(lit_to_peft_name(name)) == name
    assert peft_to_lit_name("base_model.model.model.layers.0.self_attn.rotary.lora_A.weight") is None
    assert (
        lit_to_peft_name("blocks.1.mlp.up_proj.lora.magnitude")
        == "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"
    )
    assert (
        peft_to_lit_name("base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector")
        == "blocks.1.mlp.up_proj.lora.magnitude"
    )
    assert peft_to_lit_name("base_model.model.model.embed_tokens.lora_embedding_A") is None


def test_exported_adapter_gives_peft_the_same_logits_and_imports_back_identically(trained, tmp_path):
    from peft import PeftModel

    directory, hf_model, model = trained
    export_peft(
        lora_path=directory / "adapter.safetensors", out_dir=tmp_path / "peft", base_model_name_or_path="tiny/llama"
    )
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8 and adapter_config["lora_dropout"] == 0.05
    assert adapter_config["base_model_name_or_path"] == "tiny/llama"
    assert sorted(adapter_config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )

    idx = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "peft").eval()
    with torch.no_grad():
        expected, base_logits, ours = peft_model(input_ids=idx).logits, hf_model(input_ids=idx).logits, model(idx)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)

    import_peft(adapter_dir=tmp_path / "peft", out_path=tmp_path / "imported.safetensors", checkpoint_dir=directory)
    original, imported = load_file(directory / "adapter.safetensors"), load_file(tmp_path / "imported.safetensors")
    assert original.keys() == imported.keys()
    assert all(torch.equal(original[name], imported[name]) for name in original)
    with (
        safe_open(directory / "adapter.safetensors", "pt") as a,
        safe_open(tmp_path / "imported.safetensors", "pt") as b,
    ):
        assert json.loads(a.metadata()["lora"]) == json.loads(b.metadata()["lora"])
        assert json.loads(a.metadata()["model_config"]) == json.loads(b.metadata()["model_config"])


def test_adapter_trained_with_peft_imports_and_matches_peft(trained, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    directory, _, _ = trained
    hf_model = LlamaForCausalLM.from_pretrained(directory).eval()
    peft_model = get_peft_model(
        hf_model, LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "o_proj"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # as if trained
    peft_model.save_pretrained(tmp_path / "peft")
    import_peft(adapter_dir=tmp_path / "peft", out_path=tmp_path / "imported.safetensors", checkpoint_dir=directory)

    model = load_lora_model(directory, tmp_path / "imported.safetensors").eval()
    idx = torch.randint(0, 32000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), peft_model.eval()(input_ids=idx).logits, rtol=0, atol=1e-4)


def peft_dir(tmp_path, trained, **changes):
    """The exported adapter with changed adapter_config.json entries (or tensors, via `tensors`)."""
    directory, _, _ = trained
    export_peft(lora_path=directory / "adapter.safetensors", out_dir=tmp_path / "peft")
    tensors = changes.pop("tensors", None)
    if tensors is not None:
        save_file(
            tensors(load_file(tmp_path / "peft" / "adapter_model.safetensors")),
            tmp_path / "peft" / "adapter_model.safetensors",
        )
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **changes}))
    return tmp_path / "peft"


def import_error(tmp_path, trained, **changes) -> str:
    directory, _, _ = trained
    adapter = peft_dir(tmp_path, trained, **changes)
    with pytest.raises(ValueError) as e:
        import_peft(adapter_dir=adapter, out_path=tmp_path / "out.safetensors", checkpoint_dir=directory)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()
    return str(e.value)


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="all"), "biases"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
        (dict(trainable_token_indices=[3]), "trained token embeddings"),
        (dict(init_lora_weights="pissa"), "base weights"),
        (dict(peft_type="IA3"), "only LoRA"),
    ],
)
def test_import_refuses_what_lora_py_cannot_represent(trained, tmp_path, changes, reason):
    assert reason in import_error(tmp_path, trained, **changes)


def test_import_refuses_some_layers_only_a_trained_head_and_foreign_tensors(trained, tmp_path):
    def drop_layer_1_down_proj(tensors):
        return {k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k}

    assert "adapts down_proj in layers [0] of 2 only; lora.py adapts a projection in every layer" in import_error(
        tmp_path, trained, tensors=drop_layer_1_down_proj
    )

    def add_embedding_lora(tensors):
        return {**tensors, "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 32000)}

    assert "embed_tokens.lora_embedding_A" in import_error(tmp_path / "e", trained, tensors=add_embedding_lora)

    def add_trained_head(tensors):
        return {**tensors, "base_model.model.lm_head.base_layer.weight": torch.zeros(32000, 64)}

    assert "holds a trained lm_head" in import_error(tmp_path / "h", trained, tensors=add_trained_head)


def test_import_refuses_a_truncated_adapter_file(trained, tmp_path):
    adapter = peft_dir(tmp_path, trained)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"^{weights} is not a complete weight file .*; download it again$"):
        import_peft(adapter_dir=adapter, out_path=tmp_path / "out.safetensors", checkpoint_dir=trained[0])
    assert not (tmp_path / "out.safetensors").exists()


# Each LoRA variant PEFT makes for a LLaMA model, made with PEFT on transformers' model: (LoraConfig settings, the
# base's transformers settings, our --quantize)
VOCAB = 1000
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "q+v+down": (dict(target_modules=["q_proj", "v_proj", "down_proj"]), {}, None),
    "all-linear+head": (dict(target_modules=[*ALL_LINEAR, "lm_head"]), {}, None),
    "all-linear+tied head": (dict(target_modules=[*ALL_LINEAR, "lm_head"]), dict(tie_word_embeddings=True), None),
    "rslora": (dict(target_modules=ALL_LINEAR, use_rslora=True), {}, None),
    "dora": (dict(target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "lm_head"], use_dora=True), {}, None),
    # transformers keeps a tied head unquantized, as we do (an untied one it keeps in full precision, we do not)
    "dora on nf4": (
        dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
        dict(tie_word_embeddings=True),
        "bnb.nf4",
    ),
    "per-module ranks": (
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"model.layers.1.self_attn.q_proj": 6, "down_proj": 2},
            alpha_pattern={"layers.0.mlp.down_proj": 3, "v_proj": 5},
        ),
        {},
        None,
    ),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Converted checkpoints of the tiny shapes with a vocabulary of 1000 (fast), an untied and a tied head, by
    tie_word_embeddings."""
    directories = {}
    for tied in (False, True):
        directories[tied] = tmp_path_factory.mktemp(f"tied{tied}")
        make_checkpoint(directories[tied], seed=3, tie_word_embeddings=tied, vocab_size=VOCAB)
    return directories


def hf_base(directory, quantize):
    """transformers' model of the checkpoint, in fp32 or with its projections in nf4 (bitsandbytes, as ours)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if quantize is None:
        return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, quantization_config=bnb_config)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # as quantize.swap_in_layers does: exact on every CPU
    return model


def peft_variant(directory, variant, dropout=0.0, seed=0):
    """PEFT's LoRA model of `variant` with random non-zero A, B and DoRA magnitudes, as if trained."""
    from peft import LoraConfig, get_peft_model

    settings, _, quantize = VARIANTS[variant]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM", **settings)
    peft_model = get_peft_model(hf_base(directory, quantize), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(torch.rand(param.shape, generator=generator) * 0.4 + 0.8)
    return peft_model


def greedy(logits_of, idx, steps=6):
    """The tokens greedy decoding appends to `idx`, without a cache (so any model's plain forward will do)."""
    for _ in range(steps):
        idx = torch.cat([idx, logits_of(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_variants_import_and_export_with_the_same_logits_and_tokens(bases, tmp_path, variant):
    from peft import PeftModel

    _, hf_settings, quantize = VARIANTS[variant]
    directory = bases[hf_settings.get("tie_word_embeddings", False)]
    peft_model = peft_variant(directory, variant).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    import_peft(adapter_dir=tmp_path / "peft", out_path=tmp_path / "ours.safetensors", checkpoint_dir=directory)
    ours = load_lora_model(directory, tmp_path / "ours.safetensors", quantize=quantize).eval()

    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=idx).logits
        with peft_model.disable_adapter():
            assert (expected - peft_model(input_ids=idx).logits).abs().max() > 1e-2  # the adapter changes the output
        torch.testing.assert_close(ours(idx), expected, rtol=0, atol=1e-4)
        expected_tokens = greedy(lambda i: peft_model(input_ids=i).logits, idx[:1])
        assert torch.equal(greedy(ours, idx[:1]), expected_tokens)

        # ours exported: PEFT loads it onto a fresh base and computes the same; imported back, it is the same file
        export_peft(lora_path=tmp_path / "ours.safetensors", out_dir=tmp_path / "exported")
        reloaded = PeftModel.from_pretrained(hf_base(directory, quantize), tmp_path / "exported").eval()
        torch.testing.assert_close(reloaded(input_ids=idx).logits, expected, rtol=0, atol=1e-4)
        assert torch.equal(greedy(lambda i: reloaded(input_ids=i).logits, idx[:1]), expected_tokens)
    import_peft(adapter_dir=tmp_path / "exported", out_path=tmp_path / "again.safetensors", checkpoint_dir=directory)
    first, again = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "again.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[name], again[name]) for name in first)
    with safe_open(tmp_path / "ours.safetensors", "pt") as a, safe_open(tmp_path / "again.safetensors", "pt") as b:
        assert a.metadata()["lora"] == b.metadata()["lora"]

    if (
        quantize is None
    ):  # merged equals unmerged (a quantized base cannot be merged into: refused, tests/test_quantize.py)
        merged = load_lora_model(directory, tmp_path / "ours.safetensors", merge=True).eval()
        assert not any(isinstance(m, LoRALinear) and not m.merged for m in merged.modules())
        with torch.no_grad():
            torch.testing.assert_close(merged(idx), expected, rtol=0, atol=1e-4)


def test_imported_variants_record_what_peft_set(bases, tmp_path):
    peft_variant(bases[False], "per-module ranks").save_pretrained(tmp_path / "ranks")
    import_peft(adapter_dir=tmp_path / "ranks", out_path=tmp_path / "ranks.safetensors", checkpoint_dir=bases[False])
    config, _ = read_lora_config(tmp_path / "ranks.safetensors")
    assert (config.r, config.alpha, config.targets) == (4, 8, ("query", "value", "down"))
    assert config.ranks == {"blocks.1.attn.q_proj": 6, "blocks.0.mlp.down_proj": 2, "blocks.1.mlp.down_proj": 2}
    assert config.alphas == {"blocks.0.mlp.down_proj": 3, "blocks.0.attn.v_proj": 5, "blocks.1.attn.v_proj": 5}
    peft_variant(bases[False], "dora").save_pretrained(tmp_path / "dora")
    import_peft(adapter_dir=tmp_path / "dora", out_path=tmp_path / "dora.safetensors", checkpoint_dir=bases[False])
    config, _ = read_lora_config(tmp_path / "dora.safetensors")
    assert config.dora and not config.rslora and config.targets == ("query", "key", "projection", "up", "head")


@pytest.mark.parametrize("variant, dropout", [("dora", 0.1), ("dora", 0.0), ("dora on nf4", 0.1)])
def test_a_dora_training_step_gives_peft_s_loss_and_gradients(bases, tmp_path, variant, dropout):
    """One forward and backward in training mode, with dropout (the same masks: the same random draws in the same
    order, one per adapted layer) and without: the same loss, and the same gradients of A, B and the magnitudes."""
    _, hf_settings, quantize = VARIANTS[variant]
    directory = bases[hf_settings.get("tie_word_embeddings", False)]
    peft_model = peft_variant(directory, variant, dropout=dropout)
    peft_model.save_pretrained(tmp_path / "peft")
    import_peft(adapter_dir=tmp_path / "peft", out_path=tmp_path / "ours.safetensors", checkpoint_dir=directory)
    ours = load_lora_model(directory, tmp_path / "ours.safetensors", quantize=quantize)
    mark_only_lora_as_trainable(ours)
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())

    torch.manual_seed(7)
    expected = loss_of(peft_model.train()(input_ids=idx).logits)
    expected.backward()
    torch.manual_seed(7)
    loss = loss_of(ours.train()(idx))
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)

    ours_grads = {name: p.grad for name, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {
        peft_to_lit_name(
            name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
        ): p.grad
        for name, p in peft_model.named_parameters()
        if p.requires_grad
    }
    assert ours_grads.keys() == peft_grads.keys() and any(".magnitude" in name for name in ours_grads)
    for name, grad in ours_grads.items():
        assert peft_grads[name].abs().max() > 0
        assert (grad - peft_grads[name]).norm() <= 1e-5 * peft_grads[name].norm(), name


# LLaMA-Adapter v1 and PEFT's adaption prompt (adapter.py): the same prompts and gates in the top 2 of 3 layers
ADAPTION_PROMPT = dict(adapter_len=6, adapter_layers=2)


@pytest.fixture(scope="module")
def prompt_bases(tmp_path_factory):
    """Converted 3-layer checkpoints with grouped-query attention, an untied and a tied head, by tie_word_embeddings."""
    directories = {}
    for tied in (False, True):
        directories[tied] = tmp_path_factory.mktemp(f"prompt_tied{tied}")
        make_checkpoint(directories[tied], seed=4, tie_word_embeddings=tied, vocab_size=VOCAB, num_hidden_layers=3)
    return directories


def peft_adaption_prompt(directory, seed=0):
    """PEFT's adaption prompt on transformers' model of `directory`, with random prompts and non-zero gates, as if
    trained."""
    from peft import AdaptionPromptConfig, get_peft_model

    peft_model = get_peft_model(
        hf_base(directory, None), AdaptionPromptConfig(task_type="CAUSAL_LM", **ADAPTION_PROMPT)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name.endswith("adaption_gate"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif name.endswith("adaption_prompt"):
                param.copy_(torch.randn(param.shape, generator=generator))
    return peft_model


@pytest.mark.parametrize("tied", [False, True])
def test_an_adaption_prompt_imports_exactly_and_exports_back_with_the_same_logits(prompt_bases, tmp_path, tied):
    from peft import PeftModel

    from adapter import load_adapter_model, read_adapter_config

    directory = prompt_bases[tied]
    peft_model = peft_adaption_prompt(directory).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    import_peft(adapter_dir=tmp_path / "peft", out_path=tmp_path / "ours.safetensors", checkpoint_dir=directory)
    assert read_adapter_config(tmp_path / "ours.safetensors")[0] == AdapterConfig(version=1, **ADAPTION_PROMPT)
    theirs = {name: p for name, p in peft_model.named_parameters() if "adaption_" in name}
    ours = load_file(tmp_path / "ours.safetensors")
    assert {lit_to_peft_name(name) for name in ours} == theirs.keys()
    for name, tensor in ours.items():  # the same numbers, PEFT's prompt (1, adapter_len, n_embd) ours (adapter_len, n)
        assert torch.equal(tensor.reshape(theirs[lit_to_peft_name(name)].shape), theirs[lit_to_peft_name(name)])

    model = load_adapter_model(directory, tmp_path / "ours.safetensors").eval()
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=idx).logits
        with peft_model.disable_adapter():
            assert (expected - peft_model(input_ids=idx).logits).abs().max() > 1e-2  # the adapter changes the output
        torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-4)
        expected_tokens = greedy(lambda i: peft_model(input_ids=i).logits, idx[:1])
        assert torch.equal(greedy(model, idx[:1]), expected_tokens)

        # ours exported: PEFT loads it onto a fresh base and computes the same; imported back, it is the same file
        export_peft(adapter_path=tmp_path / "ours.safetensors", out_dir=tmp_path / "exported")
        reloaded = PeftModel.from_pretrained(hf_base(directory, None), tmp_path / "exported").eval()
        torch.testing.assert_close(reloaded(input_ids=idx).logits, expected, rtol=0, atol=1e-4)
    import_peft(adapter_dir=tmp_path / "exported", out_path=tmp_path / "again.safetensors", checkpoint_dir=directory)
    again = load_file(tmp_path / "again.safetensors")
    assert ours.keys() == again.keys() and all(torch.equal(ours[name], again[name]) for name in ours)


def test_an_adaption_prompt_training_step_gives_peft_s_loss_and_gradients(prompt_bases, tmp_path):
    from adapter import load_adapter_model, mark_only_adapter_as_trainable

    directory = prompt_bases[False]
    peft_model = peft_adaption_prompt(directory)
    peft_model.save_pretrained(tmp_path / "peft")
    import_peft(adapter_dir=tmp_path / "peft", out_path=tmp_path / "ours.safetensors", checkpoint_dir=directory)
    ours = load_adapter_model(directory, tmp_path / "ours.safetensors")
    mark_only_adapter_as_trainable(ours)
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())

    expected = loss_of(peft_model.train()(input_ids=idx).logits)
    expected.backward()
    loss = loss_of(ours.train()(idx))
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    ours_grads = {name: p.grad for name, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {peft_to_lit_name(name): p.grad for name, p in peft_model.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == peft_grads.keys() and len(ours_grads) == 4
    for name, grad in ours_grads.items():
        assert peft_grads[name].abs().max() > 0
        assert (grad.reshape(peft_grads[name].shape) - peft_grads[name]).norm() <= 1e-5 * peft_grads[name].norm(), name


def test_adaption_prompt_names_map_both_ways():
    assert lit_to_peft_name("blocks.3.attn.adaption_prompt.prompt") == (
        "base_model.model.model.layers.3.self_attn.adaption_prompt"
    )
    assert lit_to_peft_name("blocks.12.attn.adaption_prompt.gate") == (
        "base_model.model.model.layers.12.self_attn.adaption_gate"
    )
    for name in ("blocks.3.attn.adaption_prompt.prompt", "blocks.12.attn.adaption_prompt.gate"):
        assert peft_to_lit_name(lit_to_peft_name(name)) == name


def test_adapters_that_cannot_cross_are_refused_in_one_line(prompt_bases, tmp_path):
    """A v2 adapter has no PEFT counterpart; an adaption prompt in other modules or more layers than the base has, or
    the other kind's flag, is named; nothing is written."""
    from adapter import adapter, save_adapter_checkpoint

    directory = prompt_bases[False]
    with adapter(version=2, adapter_len=4, adapter_layers=1):
        model = load_model(directory)
    save_adapter_checkpoint(model, tmp_path / "v2.safetensors")
    with pytest.raises(ValueError, match="is a LLaMA-Adapter v2, whose learned biases, scales and norms PEFT has no "):
        export_peft(adapter_path=tmp_path / "v2.safetensors", out_dir=tmp_path / "v2")
    with pytest.raises(ValueError, match="is a LLaMA-Adapter checkpoint .*; LLaMA-Adapter files go to --adapter_path"):
        export_peft(lora_path=tmp_path / "v2.safetensors", out_dir=tmp_path / "v2")
    with pytest.raises(ValueError, match="^pass either --lora_path .* or --adapter_path"):
        export_peft(out_dir=tmp_path / "v2")
    assert not (tmp_path / "v2").exists()

    peft_adaption_prompt(directory).save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    original = json.loads(config_path.read_text())
    for change, message in (
        (
            dict(target_modules="mlp"),
            "puts its prompts into 'mlp' modules; adapter.py puts them into LLaMA's self_attn",
        ),
        (dict(adapter_layers=4), "adapter_layers 4 is more than the model's 3 layers; pass 3 or fewer"),
        (dict(adapter_len=7), "has shape (6, 64), the model's is (7, 64)"),
    ):
        config_path.write_text(json.dumps({**original, **change}))
        with pytest.raises(ValueError) as e:
            import_peft(adapter_dir=tmp_path / "peft", out_path=tmp_path / "out.safetensors", checkpoint_dir=directory)
        assert message in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "out.safetensors").exists()
