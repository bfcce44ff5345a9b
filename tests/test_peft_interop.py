import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_checkpoint
from export_peft import export_peft, lit_to_peft_name, peft_to_lit_name
from import_peft import import_peft
from lora import LoRALinear, load_lora_model, lora, save_lora_checkpoint
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
    assert lit_to_peft_name("blocks.3.attn.q_proj.lora.A") == "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert lit_to_peft_name("blocks.0.mlp.down_proj.lora.B") == "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    assert lit_to_peft_name("lm_head.lora.A") == "base_model.model.lm_head.lora_A.weight"
    for name in ("blocks.3.attn.q_proj.lora.A", "blocks.11.mlp.gate_proj.lora.B", "lm_head.lora.B"):
        assert peft_to_lit_name(lit_to_peft_name(name)) == name
    assert peft_to_lit_name("base_model.model.model.layers.0.self_attn.rotary.lora_A.weight") is None
    assert peft_to_lit_name("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector") is None


def test_exported_adapter_gives_peft_the_same_logits_and_imports_back_identically(trained, tmp_path):
    from peft import PeftModel

    directory, hf_model, model = trained
    export_peft(lora_path=directory / "adapter.safetensors", out_dir=tmp_path / "peft", base_model_name_or_path="tiny/llama")
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
    with safe_open(directory / "adapter.safetensors", "pt") as a, safe_open(tmp_path / "imported.safetensors", "pt") as b:
        assert json.loads(a.metadata()["lora"]) == json.loads(b.metadata()["lora"])
        assert json.loads(a.metadata()["model_config"]) == json.loads(b.metadata()["model_config"])


def test_adapter_trained_with_peft_imports_and_matches_peft(trained, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    directory, _, _ = trained
    hf_model = LlamaForCausalLM.from_pretrained(directory).eval()
    peft_model = get_peft_model(hf_model, LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "o_proj"], task_type="CAUSAL_LM"))
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
        save_file(tensors(load_file(tmp_path / "peft" / "adapter_model.safetensors")), tmp_path / "peft" / "adapter_model.safetensors")
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
        (dict(use_dora=True), "DoRA"),
        (dict(use_rslora=True), "rslora"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (dict(alpha_pattern={"v_proj": 32}), "alpha_pattern"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="all"), "biases"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
        (dict(init_lora_weights="pissa"), "base weights"),
        (dict(peft_type="IA3"), "only LoRA"),
    ],
)
def test_import_refuses_what_lora_py_cannot_represent(trained, tmp_path, changes, reason):
    assert reason in import_error(tmp_path, trained, **changes)


def test_import_refuses_partial_mlp_and_foreign_tensors(trained, tmp_path):
    def drop_down_proj(tensors):
        return {k: v for k, v in tensors.items() if "down_proj" not in k}

    assert "adapts gate_proj, up_proj but not all of gate_proj, up_proj, down_proj" in import_error(
        tmp_path, trained, tensors=drop_down_proj
    )

    def add_magnitude(tensors):
        return {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}

    assert "lora_magnitude_vector" in import_error(tmp_path / "m", trained, tensors=add_magnitude)


def test_import_refuses_a_truncated_adapter_file(trained, tmp_path):
    adapter = peft_dir(tmp_path, trained)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"^{weights} is not a complete weight file .*; download it again$"):
        import_peft(adapter_dir=adapter, out_path=tmp_path / "out.safetensors", checkpoint_dir=trained[0])
    assert not (tmp_path / "out.safetensors").exists()
