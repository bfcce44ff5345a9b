"""Attention over records packed into one row, forward and backward: the ways model.py could do it, side by side.

    python benchmarks/packed_attention.py                  # CPU, fp32
    python benchmarks/packed_attention.py --device cuda    # bf16

- "per record": one scaled_dot_product_attention call per record (model.packed_attention off CUDA-bf16);
- "block-diagonal mask": one call with a boolean mask (T, T), which computes every query against every key;
- "varlen flash": torch.nn.attention.varlen's flash attention (model.packed_attention on CUDA in bf16/fp16);
- "flex, compiled": FlexAttention with a block mask from the records' ids (CUDA only: no backward on CPUs).

Each is checked against the per-record output before it is timed. Heads and head size of a 7B model (32 x 128) on
CUDA, of the 134M config (12 x 64) on CPU; 4 records of Alpaca-like lengths.
"""

import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from jsonargparse import CLI

sys.path.insert(0, str(Path(__file__).parent.parent))
from model import packed_attention


def main(device: str = "cpu", lengths: list[int] = [180, 90, 300, 120], repeats: int = 20, threads: int = 0) -> None:
    """Args:
    device: "cpu" (fp32) or "cuda" (bf16).
    lengths: the packed records' lengths.
    repeats: timed forward + backward passes of each (after 3 untimed).
    threads: CPU threads for PyTorch, 0 for one per core (on a machine shared with other jobs 1 is steadier).
    """
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype, n_head, head_size = (torch.bfloat16, 32, 128) if cuda else (torch.float32, 12, 64)
    T = sum(lengths)
    records = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    positions = torch.arange(T, device=device)
    mask = (records[:, None] == records[None, :]) & (positions[:, None] >= positions[None, :])  # (T, T)

    def per_record(q, k, v):
        return torch.cat(
            [
                F.scaled_dot_product_attention(q_i, k_i, v_i, is_causal=True)
                for q_i, k_i, v_i in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
            ],
            2,
        )

    ways: dict[str, Callable] = {
        "per record": per_record,
        "block-diagonal mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }
    if cuda:
        ways["varlen flash (model.py)"] = lambda q, k, v: packed_attention(q, k, v, lengths)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(
            lambda b, h, q_i, k_i: (records[q_i] == records[k_i]) & (q_i >= k_i), None, None, T, T, device=device
        )
        flex = torch.compile(flex_attention)
        ways["flex, compiled"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask)

    print(
        f"{torch.cuda.get_device_name(device) if cuda else 'CPU'}, {dtype}, {n_head} heads x {head_size}, "
        f"records of {lengths} tokens; forward + backward, mean of {repeats}"
    )
    q, k, v = (torch.randn(1, n_head, T, head_size, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    expected = per_record(q, k, v).detach().float()
    for name, attention in ways.items():
        error = float((attention(q, k, v).detach().float() - expected).abs().max())
        for _ in range(3):
            attention(q, k, v).sum().backward()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            attention(q, k, v).sum().backward()
        synchronize(device)
        print(f"  {name:28s} {1000 * (time.perf_counter() - t0) / repeats:8.3f} ms   (max difference {error:.1e})")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    CLI(main)
