"""Decoding speed of generate.py against Hugging Face transformers, on CPU in fp32.

    python benchmarks/generate_vs_hf.py

Builds a random 134M LLaMA (n_embd 768, 12 layers, 12 heads, intermediate 2048, vocab 32000) with
transformers, saves it in Hub format, converts it with scripts/convert_hf_checkpoint.py and loads it with
utils.load_model, so both sides hold the same weights. Then greedily decodes 128 tokens after a 16-token
prompt with each (ours also through torch.compile, as generate.py --compile true does), in turns, timing
only runs during which no other process was busy, and prints tokens/sec, whether the greedy tokens are
identical, and the bound memory bandwidth puts on decoding: every new token reads every weight once, so
tokens/sec <= bandwidth / weight bytes.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from convert_hf_checkpoint import convert_hf_checkpoint
from decode import generate
from model import Config
from utils import load_model, use_cpu_decode_layout


def main(prompt_length: int = 16, max_new_tokens: int = 128, repeats: int = 5, seed: int = 0) -> None:
    """Times greedy decoding of the 134M config with generate.py and with transformers.

    Args:
        prompt_length: tokens in the (random) prompt.
        max_new_tokens: tokens each run generates (no EOS: every run generates all of them).
        repeats: timed runs of each implementation, after one warm-up run each.
        seed: seed of the random weights and prompt.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_grad_enabled(False)
    config = Config.from_name("134M")
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.n_embd,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.n_query_groups,
            max_position_embeddings=config.block_size,
            rms_norm_eps=config.norm_eps,
            rope_theta=config.rope_base,
            tie_word_embeddings=config.tie_embeddings,
        )
    ).eval()
    hf.generation_config.eos_token_id = None  # always generate max_new_tokens
    hf.generation_config.pad_token_id = 0

    with tempfile.TemporaryDirectory() as checkpoint_dir:
        checkpoint_dir = Path(checkpoint_dir)
        hf.save_pretrained(checkpoint_dir)
        convert_hf_checkpoint(checkpoint_dir)
        write_tokenizer(checkpoint_dir)
        ours = load_model(checkpoint_dir).eval()
        plain = load_model(checkpoint_dir).eval()  # ablation: nn.Linear's own weight layout
    use_cpu_decode_layout(ours)  # as generate.py does on CPU

    prompt = torch.randint(0, config.vocab_size, (prompt_length,))
    ours.rope(prompt.device)  # as generate.py --compile true does; the warm-up run below compiles
    compiled = torch.compile(ours)
    runs = {
        "transformers": lambda: hf.generate(
            prompt.view(1, -1),
            attention_mask=torch.ones(1, prompt_length, dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )[0],
        "ours": lambda: generate(ours, prompt, max_new_tokens, temperature=0.0),
        "ours, nn.Linear layout": lambda: generate(plain, prompt, max_new_tokens, temperature=0.0),
        "ours, torch.compile": lambda: generate(compiled, prompt, max_new_tokens, temperature=0.0),
    }
    outputs = {name: run() for name, run in runs.items()}  # warm-up
    speeds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            speeds[name].append(max_new_tokens / timed_on_idle_cpus(run))

    print(
        f"134M LLaMA, fp32, CPU ({torch.get_num_threads()} threads), {prompt_length}-token prompt, "
        f"{max_new_tokens} greedy new tokens; best (median) of {repeats} runs:"
    )
    for name, values in speeds.items():
        print(f"  {name:24s} {max(values):5.1f} tokens/s ({statistics.median(values):.1f})")
    for name in ("ours", "ours, torch.compile"):
        best, median = (
            max(speeds[name]) / max(speeds["transformers"]),
            statistics.median(speeds[name]) / statistics.median(speeds["transformers"]),
        )
        print(f"  {name} / transformers: {best:.2f}x ({median:.2f}x)")
    identical = all(torch.equal(outputs["transformers"], out) for out in outputs.values())
    print(f"  greedy tokens identical: {identical}")

    weight_bytes = sum(m.weight.nbytes for m in ours.modules() if isinstance(m, torch.nn.Linear))
    gb_per_s = matvec_bandwidth()
    print(
        f"  large fp32 matvec: {gb_per_s:.1f} GB/s; {weight_bytes / 1e6:.0f} MB of weights per token "
        f"-> at most {gb_per_s * 1e9 / weight_bytes:.1f} tokens/s"
    )


def timed_on_idle_cpus(run: Callable[[], object], patience_s: float = 1800) -> float:
    """Seconds one `run()` takes while no other process uses more than 5% of the CPUs; waits for such a
    moment, and runs again when another process got busy meanwhile.

    On a shared machine another job does not just take its share of the cores: it stalls every
    multi-threaded kernel at its barriers (decoding measured 4x slower). Linux only (/proc/stat);
    elsewhere the first run counts."""
    if not Path("/proc/stat").is_file():
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0

    def busy_ticks() -> int:  # of all CPUs, minus this process's
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = os.times()
        return sum(ticks) - ticks[3] - ticks[4] - round((own.user + own.system) * os.sysconf("SC_CLK_TCK"))

    def others_busy(seconds: float, ticks: int) -> bool:
        return ticks > 0.05 * seconds * os.sysconf("SC_CLK_TCK") * os.cpu_count()

    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        ticks = busy_ticks()
        time.sleep(1)
        if others_busy(1, busy_ticks() - ticks):
            continue
        ticks, t0 = busy_ticks(), time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
        if not others_busy(seconds, busy_ticks() - ticks):
            return seconds
    raise ValueError(f"other processes kept the CPUs busy for {patience_s:.0f} s; benchmark on an idle machine")


def write_tokenizer(checkpoint_dir: Path) -> None:
    """load_model wants a complete checkpoint directory; the benchmark itself feeds token ids."""
    shared = ROOT.parent / "shared" / "data" / "tokenizer.model"
    if shared.is_file():
        shutil.copyfile(shared, checkpoint_dir / "tokenizer.model")
    else:
        (checkpoint_dir / "tokenizer.model").touch()


def matvec_bandwidth(rows: int = 128_000, cols: int = 768) -> float:
    """GB/s of a 393 MB fp32 matrix-vector product (far larger than the caches), in the faster of both layouts."""
    x = torch.randn(1, cols)
    weight = torch.randn(rows, cols)
    seconds = []
    for w in (weight, weight.t().contiguous().t()):
        torch.nn.functional.linear(x, w)
        seconds += [timed_on_idle_cpus(lambda w=w: torch.nn.functional.linear(x, w)) for _ in range(5)]
    return weight.nbytes / min(seconds) / 1e9


if __name__ == "__main__":
    CLI(main)
