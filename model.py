"""A readable LLaMA: RMSNorm, rotary embeddings (with Llama 3.1's "llama3" scaling), SwiGLU, grouped-query attention
and a KV cache. Numerically equal to Hugging Face's `LlamaForCausalLM` (tests/test_model.py checks it). Weight names
are our own; scripts/convert_hf_checkpoint.py maps the Hub's names onto them."""

import itertools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

try:  # flash attention over variable-length sequences, for packed records on GPUs: torch 2.10 and later
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class Config:
    block_size: int = 4096  # longest sequence the model attends over
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_query_groups: int = 32  # key/value heads: n_head for multi-head, fewer for grouped-query attention
    n_embd: int = 4096
    intermediate_size: int = 11008
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # the output head shares the token embedding's weight
    # "llama3" rope scaling (Llama 3.1/3.2): the keys of ROPE_SCALING_KEYS, as config.json names them; None: plain
    rope_scaling: dict | None = None
    # biases on the attention's and the MLP's projections: LLaMA has none, a merged LLaMA-Adapter v2 has both
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_query_groups ({self.n_query_groups})")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict) or set(self.rope_scaling) != set(ROPE_SCALING_KEYS):
                raise ValueError(
                    f"rope_scaling must be None or a dict with exactly the keys {', '.join(ROPE_SCALING_KEYS)}, "
                    f"not {self.rope_scaling!r}"
                )
            self.rope_scaling = dict(self.rope_scaling)  # a copy: the presets' dicts stay as they are

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str) -> "Config":
        if name not in configs:
            raise ValueError(f"unknown model name {name!r}; known names: {', '.join(configs)}")
        return replace(configs[name])  # a copy

    @classmethod
    def from_file(cls, path: Path) -> "Config":
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); convert the checkpoint again") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object of Config fields; convert the checkpoint again")
        if unknown := sorted(set(values) - {field.name for field in fields(cls)}):
            raise ValueError(
                f"{path} has keys model.Config does not know: {', '.join(unknown)}; convert the checkpoint again"
            )
        return cls(**values)

    def to_file(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


LLAMA3_1_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
LLAMA3_2_ROPE = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
# Presets named after their Hub repositories; each -Instruct variant has its base model's shapes
# fmt: off
# Config's fields in order: block_size, vocab_size, n_layer, n_head, n_query_groups, n_embd, intermediate_size,
# rope_base, norm_eps, tie_embeddings, rope_scaling
configs = {
    "Llama-2-7b-hf": Config(4096, 32000, 32, 32, 32, 4096, 11008),
    "Llama-2-13b-hf": Config(4096, 32000, 40, 40, 40, 5120, 13824),
    "Llama-2-70b-hf": Config(4096, 32000, 80, 64, 8, 8192, 28672),
    "llama-7b": Config(2048, 32000, 32, 32, 32, 4096, 11008, norm_eps=1e-6),
    "llama-13b": Config(2048, 32000, 40, 40, 40, 5120, 13824, norm_eps=1e-6),
    "llama-30b": Config(2048, 32000, 60, 52, 52, 6656, 17920, norm_eps=1e-6),
    "llama-65b": Config(2048, 32000, 80, 64, 64, 8192, 22016, norm_eps=1e-6),
    "TinyLlama-1.1B-intermediate-step-1431k-3T": Config(2048, 32000, 22, 32, 4, 2048, 5632),
    "open_llama_3b": Config(2048, 32000, 26, 32, 32, 3200, 8640, norm_eps=1e-6),
    "open_llama_7b": Config(2048, 32000, 32, 32, 32, 4096, 11008, norm_eps=1e-6),
    "Mistral-7B-v0.1": Config(4096, 32000, 32, 32, 8, 4096, 14336),  # block_size: its 4096 sliding window
    "Mistral-7B-v0.3": Config(32768, 32768, 32, 32, 8, 4096, 14336, 1000000.0),
    "Meta-Llama-3-8B": Config(8192, 128256, 32, 32, 8, 4096, 14336, 500000.0),
    "Llama-3.1-8B": Config(131072, 128256, 32, 32, 8, 4096, 14336, 500000.0, rope_scaling=LLAMA3_1_ROPE),
    "Llama-3.2-1B": Config(131072, 128256, 16, 32, 8, 2048, 8192, 500000.0, 1e-5, True, LLAMA3_2_ROPE),
    "Llama-3.2-3B": Config(131072, 128256, 28, 24, 8, 3072, 8192, 500000.0, 1e-5, True, LLAMA3_2_ROPE),
    "SmolLM2-135M": Config(8192, 49152, 30, 9, 3, 576, 1536, 100000.0, tie_embeddings=True),
    "SmolLM2-360M": Config(8192, 49152, 32, 15, 5, 960, 2560, 100000.0, tie_embeddings=True),
    "SmolLM2-1.7B": Config(8192, 49152, 24, 32, 32, 2048, 8192, 130000.0, tie_embeddings=True),
    # small shapes for tests and benchmarks
    "stories260K": Config(512, 512, 5, 8, 4, 64, 172, tie_embeddings=True),
    "tiny": Config(256, 32000, 2, 4, 2, 64, 172),
    "134M": Config(2048, 32000, 12, 12, 12, 768, 2048),
}
# fmt: on


def linear(in_features: int, out_features: int, name: str, bias: bool = False) -> nn.Linear:
    """Builds every projection of the model. `name` is the module's path in the model ("blocks.0.attn.q_proj", ...,
    "lm_head"), so that lora.lora() can swap in LoRA layers where it is asked to, with the rank asked for that module,
    and adapter.adapter() its LLaMA-Adapter v2 layers."""
    return nn.Linear(in_features, out_features, bias=bias)


def adaption_prompt(config: Config, path: str) -> nn.Module | None:
    """What the attention layer at `path` ("blocks.0.attn") attends to besides the sequence: nothing in a plain model;
    inside adapter.adapter() a LLaMA-Adapter prompt, whose forward(q, k_proj, v_proj) is added to its output."""
    return None


class LLaMA(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, f"blocks.{i}") for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = linear(config.n_embd, config.vocab_size, "lm_head")
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope_cache: tuple[Tensor, Tensor] | None = None  # built on first use, on the input's device
        # --train.gradient_checkpointing: keep each block's input only, recompute its activations during backward
        self.gradient_checkpointing = False

    def forward(
        self,
        idx: Tensor,
        input_pos: Tensor | None = None,
        lengths: list[int | tuple[int, ...]] | None = None,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """idx: (B, T) token ids. input_pos: their positions, written into the KV cache (set_kv_cache) and attending
        over what it holds: (T,) the same in every row, or (B, T) each row its own; None for a causal pass over 0..T-1
        without a cache. lengths: several sequences packed into one row without padding (B = 1, T = their sum), each
        attending only to itself from position 0; an entry (prompt, n1, n2, ...) is a prompt followed by continuations
        that each attend to it and to themselves (GRPO's completions of one prompt: the prompt computed once).
        logits_at: a (B, T) boolean mask of the positions whose logits are wanted; the head, the largest product at a
        large vocabulary, runs on those only (where the loss has a target, at each prompt's last token).
        Returns logits (B, T, vocab_size), or (n, vocab_size) with logits_at."""
        B, T = idx.shape
        cos, sin = self.rope(idx.device)
        mask = None  # without a KV cache: causal attention
        if lengths is not None:
            groups = [(n,) if isinstance(n, int) else tuple(n) for n in lengths]  # (prompt, continuations...)
            longest = max(group[0] + max(group[1:], default=0) for group in groups)
            if input_pos is not None or B != 1 or sum(map(sum, groups)) != T or longest > self.config.block_size:
                limit = self.config.block_size
                raise ValueError(
                    f"lengths {lengths} must add up to one row's {T} tokens, each <= {limit}, no input_pos"
                )
            # each from 0, a continuation from its prompt's end
            positions = [torch.arange(n) + (i > 0) * g[0] for g in groups for i, n in enumerate(g)]
            positions = torch.cat(positions).to(idx.device)
            cos, sin = cos[positions], sin[positions]
        elif input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
            cos, sin = cos[:T], sin[:T]
        else:
            cache = self.blocks[0].attn.kv_cache
            if cache is None:
                raise RuntimeError("call model.set_kv_cache(batch_size) before passing input_pos")
            cos, sin = cos[input_pos], sin[input_pos]  # (T, head_size), or (B, T, head_size) for per-row positions
            mask = cache.mask(input_pos)  # once for every layer

        x = self.embed(idx)  # (B, T, n_embd)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, input_pos, lengths, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos, lengths)
        if logits_at is not None:
            x = x[logits_at]  # (n, n_embd): RMSNorm and the head work position by position
        return self.lm_head(self.norm(x))  # (B, T, vocab_size), or (n, vocab_size)

    def rope(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The rotary cos and sin tables, built on first use on `device` (a model built on the meta device and then
        loaded, as utils.load_model does, has no device for them in __init__)."""
        dtype = torch.promote_types(self.embed.weight.dtype, torch.float32)  # float32, or float64 for such a model
        if self.rope_cache is None or self.rope_cache[0].device != device or self.rope_cache[0].dtype != dtype:
            c = self.config
            self.rope_cache = build_rope_cache(c.block_size, c.head_size, c.rope_base, device, c.rope_scaling, dtype)
        return self.rope_cache

    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None) -> None:
        """Gives every attention layer a KVCache for `forward(idx, input_pos)`, in the activations' dtype, the
        embedding's (the projections' weights may be integer codes: utils.load_model's `quantize`)."""
        max_seq_length = max_seq_length or self.config.block_size
        device, dtype = self.embed.weight.device, self.embed.weight.dtype
        for block in self.blocks:
            shape = (batch_size, block.attn.n_query_groups, max_seq_length, block.attn.head_size)
            block.attn.kv_cache = KVCache(shape, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None


class KVCache(nn.Module):
    """The keys and values of the positions fed so far, `shape` (batch_size, n_query_groups, max_seq_length, head_size)
    each, for decoding one token at a time (gpt-fast's KVCache). A forward pass of B rows uses rows 0..B-1 and attends
    over every position, masked, so that no shape depends on how full it is (torch.compile needs no recompilation), or
    over the first `length` only. batched.SlotCache is the serving variant: rows chosen per pass."""

    def __init__(self, shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        # how many positions a pass attends over (decode.attending sets it for eager passes: the keys and values read,
        # for many rows as many bytes as the weights, stop at the longest row); None: all, shapes that never change
        self.length: int | None = None

    def mask(self, input_pos: Tensor) -> Tensor:
        return cache_mask(input_pos, self.length or self.k.size(2), self.k.dtype)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes this pass's keys and values (B, n_query_groups, T, head_size) at input_pos into rows 0..B-1, and
        returns those rows' keys and values at every position attended (B, n_query_groups, length, head_size)."""
        # under autocast (bf16-mixed: fp32 weights, bf16 activations) k and v come in a dtype other than the cache's
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        B = k.size(0)
        if input_pos.dim() == 1:  # the same positions in every row
            self.k[:B].index_copy_(2, input_pos, k)
            self.v[:B].index_copy_(2, input_pos, v)
        else:  # each row at its own positions
            rows = torch.arange(B, device=k.device)[:, None]
            self.k[rows, :, input_pos] = k.transpose(1, 2)  # (B, T, n_query_groups, head_size) written
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        if self.length is not None:
            return self.k[:B, :, : self.length], self.v[:B, :, : self.length]
        return self.k[:B], self.v[:B]

    def repeat_rows(self, index: Tensor, length: int) -> None:
        """Row i's first `length` positions become a copy of row index[i]'s (decode.py prefills a prompt that several
        rows share once)."""
        self.k[:, :, :length] = self.k[index, :, :length]
        self.v[:, :, :length] = self.v[index, :, :length]


def cache_mask(input_pos: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """What each query at input_pos adds to its attention scores over the first `length` cached positions (0 where it
    attends, -inf after it), computed once per forward pass: (T, length) for positions (T,), (B, 1, T, length) for
    per-row positions (B, T). Added rather than a boolean mask, which scaled_dot_product_attention would turn into this
    in every layer."""
    keep = input_pos[..., None] >= torch.arange(length, device=input_pos.device)
    mask = torch.zeros(keep.shape, device=keep.device, dtype=dtype).masked_fill_(~keep, float("-inf"))
    return mask if input_pos.dim() == 1 else mask[:, None]


class Block(nn.Module):
    def __init__(self, config: Config, path: str) -> None:  # path: "blocks.0", ... (for `linear`)
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config, f"{path}.attn")
        self.mlp_norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config, f"{path}.mlp")

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, pos: Tensor | None, lengths: list | None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, pos, lengths)
        return x + self.mlp(self.mlp_norm(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, path: str) -> None:
        super().__init__()
        self.n_head, self.n_query_groups, self.head_size = config.n_head, config.n_query_groups, config.head_size
        kv_size = config.n_query_groups * config.head_size  # separate projections: LoRA adapts each on its own
        self.q_proj = linear(config.n_embd, config.n_embd, f"{path}.q_proj", config.attention_bias)
        self.k_proj = linear(config.n_embd, kv_size, f"{path}.k_proj", config.attention_bias)
        self.v_proj = linear(config.n_embd, kv_size, f"{path}.v_proj", config.attention_bias)
        self.o_proj = linear(config.n_embd, config.n_embd, f"{path}.o_proj", config.attention_bias)
        self.adaption_prompt = adaption_prompt(config, path)  # None but in adapter.adapter()
        self.kv_cache: KVCache | None = None  # LLaMA.set_kv_cache
        self.qkv: nn.Module | None = None  # the three products in one, for decoding on a CPU (utils.packed_linears)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, pos: Tensor | None, lengths: list | None
    ) -> Tensor:
        """LLaMA.forward's rotary tables at the positions, and its KV cache mask and positions `pos` (its input_pos) or
        packed `lengths`; all None: causal attention over the sequence."""
        B, T, C = x.shape
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, n_head, T, head_size)
        k = k.view(B, T, self.n_query_groups, self.head_size).transpose(1, 2)
        v = v.view(B, T, self.n_query_groups, self.head_size).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if pos is not None:
            k, v = self.kv_cache.update(pos, k, v)

        gqa = self.n_query_groups != self.n_head
        if lengths is not None:  # sequences packed into one row: each is causal attention over its own tokens only
            y = packed_attention(q, k, v, lengths)
        elif mask is not None and T == 1 and B > 1 and not q.is_cuda:  # many rows decoding, on a CPU
            y = decode_attention(q, k, v, mask.to(q.dtype))
        else:
            mask = None if mask is None else mask.to(q.dtype)  # bf16 under autocast
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        if self.adaption_prompt is not None:  # LLaMA-Adapter: gated attention over a learned prompt, of every position
            y = y + self.adaption_prompt(q, self.k_proj, self.v_proj)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # y: (B, n_head, T, head_size)


@torch.compiler.disable  # under --train.compile: the one call runs as it is, `lengths` (Python ints) never traced
def packed_attention(q: Tensor, k: Tensor, v: Tensor, lengths: list[int | tuple[int, ...]]) -> Tensor:
    """Causal attention of sequences packed into one row, each over its own tokens only (and a prompt's continuations
    over the prompt too: LLaMA.forward's `lengths`). q: (1, n_head, T, head_size); k, v: (1, n_query_groups, T,
    head_size). Returns (1, n_head, T, head_size).

    On a GPU in bf16 or fp16: one call of flash attention's variable-length form. Elsewhere one
    scaled_dot_product_attention call per sequence, faster on CPUs than one call with a block-diagonal mask (which
    computes every query against every key; the figures: howto/finetune_lora.md)."""
    gqa = k.size(1) != q.size(1)
    if any(not isinstance(n, int) for n in lengths):  # a prompt and its continuations: one call each, masked
        sizes = [n if isinstance(n, int) else sum(n) for n in lengths]
        pieces = zip(lengths, q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2))
        return torch.cat(
            [
                F.scaled_dot_product_attention(*qkv, enable_gqa=gqa, is_causal=True)
                if isinstance(n, int)
                else F.scaled_dot_product_attention(*qkv, attn_mask=shared_prompt_mask(n, q.device), enable_gqa=gqa)
                for n, *qkv in pieces
            ],
            dim=2,
        )
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and varlen_attn is not None:
        starts = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(q.device, non_blocking=True)
        # (T, heads, head_size), as varlen_attn takes them; window (-1, 0): causal
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))
        y = varlen_attn(q, k, v, starts, starts, max(lengths), max(lengths), window_size=(-1, 0), enable_gqa=gqa)
        return y.transpose(0, 1)[None]
    pieces = zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))
    return torch.cat([F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=gqa) for qkv in pieces], dim=2)


def shared_prompt_mask(group: tuple[int, ...], device: torch.device) -> Tensor:
    """Where a prompt of group[0] tokens followed by continuations of group[1:] tokens may attend (True), (N, N):
    causal, and a continuation's tokens over the prompt and their own continuation only."""
    part = torch.repeat_interleave(torch.arange(len(group)), torch.tensor(group)).to(device)  # 0: the prompt
    i = torch.arange(len(part), device=device)
    return (i[None] <= i[:, None]) & ((part[None] == 0) | (part[None] == part[:, None]))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One new position per row over the cache (q: (B, n_head, 1, head_size), mask: (B, 1, 1, S)), written out: on CPUs
    faster than scaled_dot_product_attention for many rows, slower for one (the figures: howto/inference.md)."""
    B, H, _, hs = q.shape
    q = q.reshape(B, k.size(1), H // k.size(1), hs)  # each group's query heads together, as their keys are shared
    # (B, n_query_groups, heads per group, S); as keys x queries, the form MKL's batched product reads faster here
    scores = (k @ q.transpose(-1, -2)).transpose(-1, -2) * hs**-0.5 + mask
    return (torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v).reshape(B, H, 1, hs)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Config, path: str) -> None:
        super().__init__()
        self.gate_proj = linear(config.n_embd, config.intermediate_size, f"{path}.gate_proj", config.mlp_bias)
        self.up_proj = linear(config.n_embd, config.intermediate_size, f"{path}.up_proj", config.mlp_bias)
        self.down_proj = linear(config.intermediate_size, config.n_embd, f"{path}.down_proj", config.mlp_bias)
        self.gate_up: nn.Module | None = None  # the two products in one, for decoding on a CPU (utils.packed_linears)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class RMSNorm(nn.Module):
    """Normalises by the root mean square, computed in float32 as the reference implementation does (in float64 for
    a float64 model, which tests use to tell rounding from a real difference)."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = F.rms_norm(x.to(torch.promote_types(dtype, torch.float32)), x.shape[-1:], eps=self.eps)  # x / rms(x)
        return self.weight * x.to(dtype)


def build_rope_cache(
    length: int, head_size: int, base: float, device: torch.device, scaling: dict | None = None, dtype=torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape (length, head_size), in `dtype`, in the Hugging Face layout (the first and second
    halves of each head form the rotated pairs). `scaling`: Config.rope_scaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, device=device, dtype=dtype) / head_size))
    if scaling is not None:
        inv_freq = llama3_scaled(inv_freq, scaling)
    positions = torch.arange(length, device=device, dtype=dtype)
    freqs = torch.outer(positions, inv_freq)  # (length, head_size / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (length, head_size)
    return angles.cos(), angles.sin()


def llama3_scaled(inv_freq: Tensor, scaling: dict) -> Tensor:
    """Llama 3.1's rope scaling (Config.rope_scaling) of the inverse frequencies (head_size / 2,), as transformers
    computes it: a frequency whose wavelength is longer than the original context / low_freq_factor turns `factor`
    times slower, one shorter than it / high_freq_factor is kept, and those between are interpolated."""
    factor, low, high, original = (scaling[key] for key in ROPE_SCALING_KEYS)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, n_heads, T, head_size); cos, sin: (T, head_size), or (B, T, head_size) for per-row positions."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, head_size): the same for every head
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))
