"""multilora.py: MultiLoRALinear against the formula written out, a model whose projections AdapterStack wrapped against
each adapter's own lora.py model (unmerged and merged) for every variant lora.py writes (per-layer ranks and alphas,
rsLoRA, DoRA, the output head) with the rows of one batch on different adapters, and what the stack refuses."""

from pathlib import Path

import pytest
import torch

from conftest import make_adapter, make_adapters, make_checkpoint
from lora import load_lora_model
from multilora import AdapterStack, MultiLoRALinear, MultiLoRAProjections, Update, adapter_updates
from utils import load_model, pack_linears

# (name, r, alpha, targets, settings): every variant of lora.py, and adapters that adapt different projections
ADAPTERS = [
    ("qv2", 2, 4, ("query", "value"), {}),
    ("all4", 4, 8, ("all_linear",), {}),
    ("head8", 8, 16, ("mlp", "head"), {}),
    (
        "rs_ranks",
        4,
        4,
        ("key", "down"),
        dict(rslora=True, ranks={"blocks.1.mlp.down_proj": 6}, alphas={"blocks.0.attn.k_proj": 2}),
    ),
    ("dora", 3, 6, ("value", "projection", "head"), dict(dora=True)),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, checkpoint_dir) -> dict[str, Path]:
    return make_adapters(checkpoint_dir, tmp_path_factory.mktemp("adapters"), ADAPTERS)


def test_stacked_layer_pads_ranks_and_applies_a_per_row_factor():
    """Against the formula written out: out[b] = m_i * (W x_b + B_i A_i x_b * scaling_i), i = adapters[b], for adapters
    of ranks 3 and 5, one with a per-output-row factor (DoRA's magnitude over the row norms), the base (slot 0) zero."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(4, 6)
    model.proj = torch.nn.Linear(6, 5, bias=False)
    stack = AdapterStack(model)
    A1, B1, A2, B2 = torch.randn(3, 6), torch.randn(5, 3), torch.randn(5, 6), torch.randn(5, 5)
    factor = torch.rand(5) + 0.5
    stack.add("one", {"proj": Update(A1, B1, 2.0)})
    stack.add("two", {"proj": Update(A2, B2, 0.5, row_factor=factor)})
    x = torch.randn(3, 2, 6)  # (B, T, in)
    W = model.proj.base.weight
    expected = torch.stack(
        [factor * (x[0] @ W.T + x[0] @ A2.T @ B2.T * 0.5), x[1] @ W.T, x[2] @ W.T + x[2] @ A1.T @ B1.T * 2.0]
    )
    with stack.rows([2, 0, 1]):
        torch.testing.assert_close(model.proj(x), expected)
        torch.testing.assert_close(model.proj(x[:, -1]), expected[:, -1])  # one position per row, as logits_at
    torch.testing.assert_close(model.proj(x), x @ W.T)  # outside rows(): the plain base


def test_every_projection_is_wrapped_and_holds_slots_only_once_adapted():
    """AdapterStack wraps every projection (each reads the rows' adapters from the stack), but memory goes only to the
    projections some adapter adapts: a slot per adapter so far (zeros for those that leave it alone) from the first
    one on."""
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(4, 6)
    model.first, model.second = torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 6, bias=False)
    stack = AdapterStack(model)
    assert isinstance(model.first, MultiLoRALinear) and isinstance(model.second, MultiLoRALinear)
    stack.add("a", {"first": Update(torch.randn(2, 6), torch.randn(5, 2), 1.0)})
    assert (len(model.first.A), len(model.second.A)) == (2, 0)  # the base and "a"; nothing on `second`
    B = torch.randn(6, 4)
    stack.add("b", {"second": Update(torch.randn(4, 5), B, 1.0)})
    assert model.first.A.shape == (3, 4, 6) and model.second.B.shape == (3, 4, 6)  # padded to rank 4; B as (r, out)
    assert not model.second.B[:2].any() and torch.equal(model.second.B[2], B.T)


@pytest.mark.parametrize("packed", [False, True])
def test_rows_on_different_adapters_equal_each_adapter_alone_unmerged_and_merged(checkpoint_dir, adapters, packed):
    """One forward pass of a batch whose rows are on the base and the five adapters (each read by adapter_updates):
    each row's logits equal that adapter's lora.py model on that row alone, unmerged and merged into the weights. Also
    on serve.py's base on a CPU: its projections packed, q, k and v (gate and up) one product (MultiLoRAProjections)."""
    if packed and not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    model = load_model(checkpoint_dir).eval()
    if packed:
        pack_linears(model, fuse=True)
    stack = AdapterStack(model)
    assert isinstance(model.blocks[0].attn.qkv, MultiLoRAProjections) == packed
    for name, path in adapters.items():
        stack.add(name, adapter_updates(path, model))
    names = ["", *adapters]
    idx = torch.randint(0, model.config.vocab_size, (len(names), 7), generator=torch.Generator().manual_seed(0))
    adapter_slots = [stack.index(name) for name in names]
    with torch.no_grad():
        with stack.rows(adapter_slots):
            logits = model(idx)  # (rows, T, vocab_size)
            picked = torch.arange(len(names)) % 7
            logits_at = torch.arange(7) == picked[:, None]  # (rows, T): the head on one position per row, each its own
            at = model(idx, logits_at=logits_at)
        base = load_model(checkpoint_dir).eval()
        for row, name in enumerate(names):
            for merge in (False, True):
                alone = load_lora_model(checkpoint_dir, adapters[name], merge=merge).eval() if name else base
                expected = alone(idx[row : row + 1])[0]
                torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4, msg=f"{name} {merge=}")
            torch.testing.assert_close(at[row], logits[row, picked[row]])
        # and the adapters do change the logits: no two rows alike on the same tokens
        with stack.rows(adapter_slots):
            same = model(idx[:1].expand(len(names), -1))[:, -1]
    assert all(not torch.allclose(same[i], same[j]) for i in range(len(names)) for j in range(i))


def test_adapter_updates_reads_each_projections_scaling(checkpoint_dir, adapters):
    """Each projection's scaling as lora.py computes it: its own rank and alpha, rsLoRA's alpha / sqrt(r)."""
    model = load_model(checkpoint_dir)
    updates = adapter_updates(adapters["rs_ranks"], model)
    assert set(updates) == {f"blocks.{i}.attn.k_proj" for i in (0, 1)} | {f"blocks.{i}.mlp.down_proj" for i in (0, 1)}
    assert updates["blocks.1.mlp.down_proj"].A.shape[0] == 6 and updates["blocks.1.mlp.down_proj"].scaling == 4 / 6**0.5
    assert updates["blocks.0.attn.k_proj"].scaling == 2 / 4**0.5 and updates["blocks.1.attn.k_proj"].scaling == 4 / 2
    assert all(update.row_factor is None for update in updates.values())
    assert all(
        update.row_factor.shape == (update.B.size(0),) for update in adapter_updates(adapters["dora"], model).values()
    )


def test_what_the_stack_refuses(checkpoint_dir, adapters, tmp_path):
    model = load_model(checkpoint_dir)
    stack = AdapterStack(model)
    stack.add("qv2", adapter_updates(adapters["qv2"], model))
    with pytest.raises(ValueError, match="an adapter named 'qv2' is already loaded"):
        stack.add("qv2", adapter_updates(adapters["qv2"], model))
    with pytest.raises(ValueError, match="no adapter named 'nope' is loaded; loaded: qv2"):
        stack.index("nope")
    with pytest.raises(ValueError, match=r"blocks.0.attn.q_proj has shapes A \(2, 32\)"):
        stack.add("narrow", {"blocks.0.attn.q_proj": Update(torch.zeros(2, 32), torch.zeros(64, 2), 1.0)})
    with pytest.raises(ValueError, match="the model has no projection blocks.9.attn.q_proj"):
        stack.add("deep", {"blocks.9.attn.q_proj": Update(torch.zeros(2, 64), torch.zeros(64, 2), 1.0)})
    other = tmp_path / "other"
    make_checkpoint(other, num_hidden_layers=3)
    make_adapter(other, tmp_path / "other.safetensors", 2, 4, ("query",), 0)
    with pytest.raises(ValueError, match="was trained on another base model: n_layer=3"):
        adapter_updates(tmp_path / "other.safetensors", model)
    (tmp_path / "cut.safetensors").write_bytes(adapters["qv2"].read_bytes()[:-10])
    with pytest.raises(ValueError, match="cut.safetensors is not a safetensors file"):
        adapter_updates(tmp_path / "cut.safetensors", model)
