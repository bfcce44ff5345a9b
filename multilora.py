"""Many LoRA adapters on one base model at once: each row of a batch with its own adapter, or none.

One copy of the base weights serves every adapter. Each projection of the base becomes a `MultiLoRALinear` holding
the A and B of every loaded adapter stacked, slot 0 all zeros for the plain base:

    out[b] = m[i] * (W x[b] + B[i] A[i] x[b])      with i = adapters[b], the adapter of batch row b

The update is one gathered product per layer (A[adapters], B[adapters] and two `torch.bmm`), whatever mix of adapters
the batch holds: no Python loop over adapters. Adapters of different ranks stack because every A and B is padded with
zeros to the largest rank (zero rows of A and zero columns of B add nothing), and adapters that adapt different
projections because a projection an adapter leaves alone holds zeros in its slot. Each adapter's scaling (alpha / r)
is folded into its B. `m` is a per-output-row factor, ones unless an adapter brings one (DoRA's magnitude over the
norm of each row of W + ΔW). On a base packed for a CPU with q, k and v (gate and up) as one product
(utils.pack_linears(fuse=True), as serve.py loads it), a `MultiLoRAProjections` adds each part's updates to its share
of that product.

    stack = AdapterStack(model)  # wraps the model's projections
    stack.add("support", adapter_updates("adapters/support.safetensors", model))
    with stack.rows([0, stack.index("support")]):  # row 0 on the base, row 1 with the adapter
        logits = model(idx)

`adapter_updates` is the one place that reads an adapter file (lora.py's format); batched.py schedules the rows
and sets their adapters around every forward pass. The model itself does not know it runs many adapters.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora import base_weight, check_same_base, dora_norm, lora_scaling, read_lora_config
from model import LLaMA
from utils import PackedLinear, PackedPart, PackedProjections


@dataclass
class Update:
    """An adapter's change to one projection (out x in): ΔW = B @ A * scaling, and the output multiplied by
    `row_factor` (out,) when there is one."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float
    row_factor: Optional[torch.Tensor] = None  # (out,)


def adapter_updates(path: Path, model: LLaMA) -> dict[str, Update]:
    """The updates of a LoRA checkpoint written by lora.save_lora_checkpoint, by the module path of each projection
    in model.py ("blocks.3.attn.q_proj"), after checking that it was trained on a base of `model`'s shapes. Each
    projection's scaling as lora.py computes it (its own rank and alpha, rsLoRA or not); for DoRA the factor
    m / ‖W + ΔW‖ of each output row, with W the weight of `model`, the base the adapter will run on."""
    lora_config, base_config = read_lora_config(path)
    check_same_base(base_config, model.config, path)
    try:
        state_dict = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a complete safetensors file ({e})") from None
    updates = {}
    for name, A in state_dict.items():
        if not name.endswith(".lora.A"):
            continue
        module = name.removesuffix(".lora.A")
        B, magnitude = state_dict.get(f"{module}.lora.B"), state_dict.get(f"{module}.lora.magnitude")
        if B is None or A.dim() != 2 or B.shape != (B.size(0), A.size(0)):
            raise ValueError(f"{path}: {module} lacks a LoRA B of shape (out, {A.size(0)})")
        r, alpha = lora_config.rank_and_alpha(module)
        scaling = lora_scaling(r, alpha, lora_config.rslora)
        row_factor = None
        if magnitude is not None:  # DoRA, as lora.LoRALinear.dora_factor computes it
            try:
                layer = model.get_submodule(module)
            except AttributeError:
                raise ValueError(f"{path}: the model has no projection {module}") from None
            weight = base_weight(layer.base if isinstance(layer, MultiLoRALinear) else layer).detach().float()
            row_factor = magnitude.float() / dora_norm(weight, A.float(), B.float(), scaling)
        updates[module] = Update(A, B, scaling, row_factor)
    if not updates:
        raise ValueError(f"{path} holds no LoRA weights")
    return updates


class MultiLoRALinear(nn.Module):
    """A projection of the base (`base`: nn.Linear, a quantized subclass of it, a PackedLinear or a PackedPart) plus the
    updates of every adapter that adapts it, one slot each (none until the first: `append` then fills the slots before
    it with zeros)."""

    def __init__(self, base: nn.Linear | PackedLinear | PackedPart, stack: "AdapterStack", rank: int) -> None:
        super().__init__()
        self.base = base
        self.stack = stack  # whose `adapters` say each row's slot during a forward pass (AdapterStack.rows)
        # A: (slots, r, in), B: (slots, r, out), each as the batched product reads it (a transposed B: 1.6x slower)
        self.register_buffer("A", torch.zeros(0, rank, base.in_features, device=stack.device, dtype=stack.dtype))
        self.register_buffer("B", torch.zeros(0, rank, base.out_features, device=stack.device, dtype=stack.dtype))
        self.row_factor: Optional[torch.Tensor] = None  # (slots, out), None while every adapter's is ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, in), or (B, in) with one position per row (the output head under model.forward's `logits_at`)."""
        return self.update(x, self.base(x))

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The base's output y for input x, each row with its adapter's update."""
        adapters = self.stack.adapters  # (B,) each row's slot, or None for the plain base throughout
        if adapters is None or len(self.A) == 0:  # the plain base, or no adapter adapts this projection
            return y
        flat = x.dim() == 2
        if len(adapters) != len(x):
            raise ValueError(f"{len(adapters)} rows' adapters for {len(x)} rows (one position per row when flat)")
        x3 = x[:, None] if flat else x  # (B, T, in)
        # each row's A and B (index_select: faster than A[adapters] on CPU)
        A, B = self.A.index_select(0, adapters), self.B.index_select(0, adapters)  # (B, r, in), (B, r, out)
        h = torch.bmm(x3.to(A.dtype), A.transpose(1, 2))  # (B, T, r)
        delta = torch.bmm(h, B)  # (B, T, out)
        y = y + (delta[:, 0] if flat else delta).to(y.dtype)
        if self.row_factor is not None:
            factor = self.row_factor.index_select(0, adapters).to(y.dtype)  # (B, out)
            y = y * (factor if flat else factor[:, None])
        return y

    def grow(self, rank: int) -> None:
        """Pads every adapter's A and B with zeros to `rank`: the same products."""
        extra = rank - self.A.size(1)
        if extra > 0:
            self.A = torch.cat([self.A, self.A.new_zeros(self.A.size(0), extra, self.A.size(2))], dim=1)
            self.B = torch.cat([self.B, self.B.new_zeros(self.B.size(0), extra, self.B.size(2))], dim=1)

    def append(self, update: Optional[Update]) -> None:
        """Adds a slot for one more adapter: its update, or zeros where it leaves this projection alone."""
        A, B = self.A.new_zeros(1, *self.A.shape[1:]), self.B.new_zeros(1, *self.B.shape[1:])
        if update is not None:
            r = update.A.size(0)
            A[0, :r] = update.A
            B[0, :r] = (update.B * update.scaling).T
        if update is not None and update.row_factor is not None and self.row_factor is None:
            self.row_factor = self.B.new_ones(self.B.size(0), self.B.size(2))
        if self.row_factor is not None:
            factor = self.B.new_ones(1, self.B.size(2))
            if update is not None and update.row_factor is not None:
                factor[0] = update.row_factor
            self.row_factor = torch.cat([self.row_factor, factor])
        self.A, self.B = torch.cat([self.A, A]), torch.cat([self.B, B])


class MultiLoRAProjections(nn.Module):
    """A block's projections of one input computed as one product (utils.PackedProjections: q, k and v, or gate and
    up), then each with the updates of its MultiLoRALinear."""

    def __init__(self, fused: PackedProjections, parts: list[MultiLoRALinear]) -> None:
        super().__init__()
        self.fused = fused
        self.parts = parts  # a plain list: they are the block's modules already (q_proj, ...)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(part.update(x, y) for part, y in zip(self.parts, self.fused(x)))


class AdapterStack:
    """The adapters loaded onto one base model, by name, slot 0 being the base itself (the name ""), and the layers
    that apply them: every projection of the model, wrapped in a MultiLoRALinear when the stack is made. Which adapter
    each row of a batch uses is set for the span of a forward pass with `rows` (batched.py does at every step)."""

    def __init__(self, model: LLaMA) -> None:
        self.model = model
        self.device, self.dtype = model.embed.weight.device, model.embed.weight.dtype
        self.names: list[str] = [""]
        self.rank = 1
        self.adapters: Optional[torch.Tensor] = None  # (B,) each row's slot inside `rows`; None: the base throughout
        self.layers: dict[str, MultiLoRALinear] = {}  # by module path
        projections = (nn.Linear, PackedLinear, PackedPart)  # serve.py's base on a CPU: packed, q, k and v fused
        for path in [path for path, module in model.named_modules() if isinstance(module, projections)]:
            parent_path, _, attribute = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            self.layers[path] = MultiLoRALinear(getattr(parent, attribute), self, self.rank)
            setattr(parent, attribute, self.layers[path])
        wrapped = {id(layer.base): layer for layer in self.layers.values()}
        for path in [path for path, module in model.named_modules() if isinstance(module, PackedProjections)]:
            parent_path, _, attribute = path.rpartition(".")
            fused = model.get_submodule(path)
            parts = [wrapped[id(layer)] for layer in fused.projections]
            setattr(model.get_submodule(parent_path), attribute, MultiLoRAProjections(fused, parts))

    @contextmanager
    def rows(self, slots: list[int]) -> Iterator[None]:
        """The forward passes inside run batch row i on adapter slot slots[i] (0: the base), then it is restored."""
        before = self.adapters
        self.adapters = torch.tensor(slots, device=self.device) if any(slots) else None
        try:
            yield
        finally:
            self.adapters = before

    def index(self, name: str) -> int:
        """The slot of adapter `name` ("" for the base)."""
        if name not in self.names:
            raise ValueError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.names[1:]) or 'none'}")
        return self.names.index(name)

    def add(self, name: str, updates: dict[str, Update]) -> int:
        """Stacks an adapter's updates (`adapter_updates`) under `name`; returns its slot. Not while a forward pass
        runs: batched.BatchGenerator calls it between steps."""
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        for path, update in updates.items():
            layer = self.layers.get(path)
            if layer is None:
                raise ValueError(f"adapter {name!r}: the model has no projection {path}")
            if update.A.size(1) != layer.A.size(2) or update.B.size(0) != layer.B.size(2):
                raise ValueError(
                    f"adapter {name!r}: {path} has shapes A {tuple(update.A.shape)}, B "
                    f"{tuple(update.B.shape)}; the model's projection is {layer.B.size(2)} x {layer.A.size(2)}"
                )
        self.rank = max([self.rank, *(update.A.size(0) for update in updates.values())])
        for path, layer in self.layers.items():
            update = updates.get(path)
            if update is None and len(layer.A) == 0:
                continue  # still no adapter adapts this projection: it holds no slots
            layer.grow(self.rank)
            while len(layer.A) < len(self.names):  # zeros for the base and the adapters that leave it alone
                layer.append(None)
            if update is not None:
                update = Update(
                    update.A.to(self.device, self.dtype),
                    update.B.to(self.device, self.dtype),
                    update.scaling,
                    None if update.row_factor is None else update.row_factor.to(self.device, self.dtype),
                )
            layer.append(update)
        self.names.append(name)
        return len(self.names) - 1
