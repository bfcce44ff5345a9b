"""A soak test of serve.py: many clients at once over many adapters for a set time, through the real openai client.
It checks what must hold under load: every answer right, every request accounted for, memory flat.

    python benchmarks/serve_load.py --seconds 300

It starts serve.py (a subprocess on a free port of 127.0.0.1) over a checkpoint and 16 adapters: by default a tiny
random checkpoint (model.py's "tiny" config, by export.py's make_checkpoint, with the LLaMA tokenizer of
../shared/data) and 16 random non-zero adapters of different ranks, targets and chat templates, made in a temporary
directory; or --checkpoint_dir and --adapters_dir. Then:

1. references: each adapter's greedy answer to each of PROMPTS, one request at a time, nothing else in flight;
2. warm-up: the load of step 3 for --warmup_seconds; the server's resident memory (VmRSS of /proc/<pid>/status) once
   it is idle again. The warm-up is long because the memory climbs for the first ~40 s of this load before it holds
   (the kernels oneDNN caches for each new shape of product, and the allocator's pools; howto/serve.md);
3. load: --clients concurrent clients (asyncio tasks sharing one openai.AsyncOpenAI) for --seconds, each sending one
   request after another: a random adapter and prompt, greedy, a --stream_fraction of them streamed, and a
   --disconnect_fraction of the streams closed after a random number of pieces, from none (the request may still
   be waiting for a place) to half the answer: a client that goes away.
   serve.py's --max_batch_size and --max_waiting are set below --clients on purpose: a request that finds every place
   taken is answered 429, which is counted, and that client waits --backoff seconds before its next request, as a
   client backs off before it retries;
4. the server's resident memory again, once it is idle.

It prints the requests done, the latency of completed answers (p50 and p99, from sending the request to the answer's
last piece), the statuses, and the server's memory, then the checks, each PASS or FAIL (exit status 1 if one fails):

- right answers: every completed answer (its text, finish_reason and completion_tokens, streamed or not) equals its
  adapter's reference;
- nothing lost: every request ended in a completed answer, a 429 or a deliberate disconnect: no other status, no
  connection error or timeout, no stream cut short by the server; and the server's own count of ended requests
  (`/health`) grew by the requests it accepted, none by an error, none left running or waiting;
- flat memory: the server's RSS grew by less than 8% from after the warm-up to the end;
- clean exit: SIGTERM stops the server with exit status 0, and its stderr has no traceback.

Every loop is bounded: the clients stop sending at the deadline, each request times out after --request_timeout, and
the waits for the server have deadlines. Only loopback traffic.
"""

import asyncio
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import openai
import torch
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent))
from export import make_checkpoint

from lora import lora, save_lora_checkpoint
from model import Config, LLaMA
from tokenizer import CHAT_TEMPLATES

# (chat?, the user's text or the prompt, max_tokens): answers of different lengths, so slots free at different steps
PROMPTS = [
    (False, "Once upon a time", 24),
    (False, "The capital of France is", 8),
    (True, "What is the capital of France?", 16),
    (True, "Write a haiku about the sea.", 32),
]
TARGETS = [("query", "value"), ("all_linear",), ("mlp", "head"), ("key", "projection")]
RSS_GROWTH_LIMIT = 0.08  # after the warm-up: above how far the idle reading moves once settled (~3.5%), below
# what a leak of 100 kB per request adds in 15 s of this load (+12.6%)


@dataclass
class Tally:
    """What the clients saw during one phase of load."""

    sent: int = 0
    completed: int = 0
    disconnected: int = 0  # streams the client closed on purpose before their end
    statuses: Counter = field(default_factory=Counter)  # error statuses (429 and any other), by code
    lost: list[str] = field(default_factory=list)  # requests that ended any other way: what happened
    wrong: list[str] = field(default_factory=list)  # completed answers that differ from their reference
    latencies: list[float] = field(default_factory=list)  # of completed answers, seconds
    tokens: int = 0  # completion tokens of completed answers
    ended: Counter = field(default_factory=Counter)  # the server's /health "ended" grew by these, by reason
    idle: bool = False  # the server had nothing running or waiting within a few seconds after the phase


@dataclass
class Soak:
    """The figures and the checks of a run (main's return value)."""

    references: int
    distinct: list[int]  # per prompt, how many distinct answers the adapters give
    warmup: Tally
    load: Tally
    rss_start_mib: float
    rss_end_mib: float
    exit_status: Optional[int] = None
    tracebacks: int = 0
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())


def main(
    seconds: float = 60.0,
    warmup_seconds: float = 45.0,
    clients: int = 64,
    stream_fraction: float = 0.5,
    disconnect_fraction: float = 0.25,
    max_batch_size: int = 16,
    max_waiting: int = 32,
    backoff: float = 1.0,
    request_timeout: float = 60.0,
    checkpoint_dir: Optional[Path] = None,
    adapters_dir: Optional[Path] = None,
    template: Optional[str] = None,
    seed: int = 0,
) -> Soak:
    """Runs the soak test, prints its figures and checks, and returns them.

    Args:
        seconds: how long the clients send requests (after the warm-up).
        warmup_seconds: the same load before the server's memory is first read: long enough for it to settle.
        clients: concurrent clients, each with one request in flight at a time.
        stream_fraction: of the requests, those streamed.
        disconnect_fraction: of the streamed requests, those the client closes after 0 to max_tokens / 2 pieces.
        max_batch_size: serve.py --max_batch_size, requests decoded together.
        max_waiting: serve.py --max_waiting, requests that may wait for a place; one more is answered 429.
        backoff: seconds a client waits after a 429 before its next request.
        request_timeout: seconds after which a request counts as lost.
        checkpoint_dir: the base checkpoint to serve; by default a tiny random one.
        adapters_dir: a directory of adapters for it (every `*.safetensors` is served and used); by default 16 random
            ones.
        template: serve.py --template, for a checkpoint and adapters without a chat template of their own.
        seed: of the clients' choices.
    """
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        if checkpoint_dir is None:
            if not (ROOT.parent / "shared" / "data" / "tokenizer.model").is_file():
                raise FileNotFoundError(
                    "the tiny checkpoint takes ../shared/data/tokenizer.model; pass --checkpoint_dir"
                )
            checkpoint_dir = workdir / "tiny"
            make_checkpoint("tiny", checkpoint_dir, torch.float32)
        if adapters_dir is None:
            adapters_dir = workdir / "adapters"
            make_adapters(Config.from_file(Path(checkpoint_dir) / "model_config.json"), adapters_dir, 16)
        models = sorted(path.stem for path in Path(adapters_dir).glob("*.safetensors"))
        if not models:
            raise ValueError(f"{adapters_dir} has no adapters (*.safetensors)")
        flags = ["--max_batch_size", max_batch_size, "--max_waiting", max_waiting, "--max_seq_length", 256]
        flags += ["--shutdown_timeout", 5] + (["--template", template] if template else [])
        print(
            f"serve.py on {checkpoint_dir} with {len(models)} adapters, --max_batch_size {max_batch_size} "
            f"--max_waiting {max_waiting}; {clients} clients for {seconds:g} s after {warmup_seconds:g} s of warm-up, "
            f"{stream_fraction:.0%} of the requests streamed, {disconnect_fraction:.0%} of the streams cut short"
        )
        log = workdir / "serve.log"
        server, url = start_server(checkpoint_dir, adapters_dir, flags, log)
        try:
            soak = asyncio.run(
                drive(
                    url,
                    server.pid,
                    models,
                    seconds=seconds,
                    warmup_seconds=warmup_seconds,
                    clients=clients,
                    stream_fraction=stream_fraction,
                    disconnect_fraction=disconnect_fraction,
                    backoff=backoff,
                    request_timeout=request_timeout,
                    rng=random.Random(seed),
                )
            )
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            try:
                exit_status = server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                exit_status = server.wait()
        soak.exit_status = exit_status
        soak.tracebacks = log.read_text().count("Traceback")
        if soak.tracebacks:
            print(f"the server's stderr:\n{log.read_text()[-4000:]}")
    check(soak)
    return soak


def make_adapters(config: Config, directory: Path, n: int) -> None:
    """n adapters with random non-zero A and B (a fresh one has B = 0: the base exactly) of ranks 1 to 8, four
    different sets of targets, and a recorded chat template, alpaca or chatml (serve.py renders chat requests with it).
    Written by lora.save_lora_checkpoint from a model on the meta device whose LoRA tensors alone are real."""
    generator = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True)
    for i in range(n):
        r = (1, 2, 4, 8)[i % 4]
        with torch.device("meta"), lora(r=r, alpha=2 * r, dropout=0.0, targets=TARGETS[i // 4 % len(TARGETS)]):
            skeleton = LLaMA(config)
        for module in skeleton.modules():
            if getattr(module, "adapter", False):  # LoRA's A and B, as utils.load_weights finds them
                module.to_empty(device="cpu")
                for param in module.parameters():
                    param.data.normal_(0, 0.3, generator=generator)
        template = CHAT_TEMPLATES["chatml" if i % 2 else "alpaca"]
        save_lora_checkpoint(skeleton, directory / f"adapter{i:02d}.safetensors", chat_template=template)


def start_server(checkpoint_dir: Path, adapters_dir: Path, flags: list, log: Path) -> tuple[subprocess.Popen, str]:
    """serve.py on a free port of 127.0.0.1, its stderr into `log` (a file: a pipe nobody reads would fill and
    block it); returns it once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "serve.py", "--checkpoint_dir", checkpoint_dir, "--adapters_dir", adapters_dir]
    command += ["--host", "127.0.0.1", "--port", port, *flags]
    with open(log, "w") as stderr:
        server = subprocess.Popen([str(part) for part in command], cwd=ROOT, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"serve.py exited with status {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            health(url)
            return server, url
        except OSError:  # not listening yet
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"serve.py did not answer /health within 300 s:\n{log.read_text()[-4000:]}")


async def drive(
    url: str,
    pid: int,
    models: list[str],
    seconds: float,
    warmup_seconds: float,
    clients: int,
    stream_fraction: float,
    disconnect_fraction: float,
    backoff: float,
    request_timeout: float,
    rng: random.Random,
) -> Soak:
    """The references, the warm-up and the load, with the server's memory read in between."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=request_timeout)
    t0 = time.perf_counter()
    references = {}
    for model in models:
        for p in range(len(PROMPTS)):
            references[model, p] = await ask(client, model, p, stream=False)
    distinct = [len({references[model, p] for model in models}) for p in range(len(PROMPTS))]
    print(
        f"references: {len(references)} requests one at a time ({len(models)} adapters x {len(PROMPTS)} prompts) "
        f"in {time.perf_counter() - t0:.1f} s; distinct answers per prompt: {distinct} of {len(models)}"
    )

    async def phase(duration: float) -> Tally:
        tally, before = Tally(), await asyncio.to_thread(health, url)
        deadline = asyncio.get_running_loop().time() + duration
        await asyncio.gather(
            *(
                send_until(
                    client,
                    models,
                    references,
                    deadline=deadline,
                    stream_fraction=stream_fraction,
                    disconnect_fraction=disconnect_fraction,
                    backoff=backoff,
                    rng=random.Random(rng.random()),
                    tally=tally,
                )
                for _ in range(clients)
            )
        )
        after = await until_idle(url)
        tally.idle = after["running"] == 0 and after["waiting"] == 0
        tally.ended = Counter(after["ended"]) - Counter(before["ended"])
        return tally

    warmup = await phase(warmup_seconds)
    print(f"warm-up: {summary(warmup, warmup_seconds)}")
    rss_start = rss_mib(pid)
    t0 = time.perf_counter()
    load = await phase(seconds)
    elapsed = time.perf_counter() - t0
    rss_end = rss_mib(pid)
    print(f"load: {summary(load, elapsed)}")
    if load.latencies:
        p50, p99 = percentile(load.latencies, 50), percentile(load.latencies, 99)
        print(f"latency of completed answers: p50 {p50:.3f} s, p99 {p99:.3f} s")
    print(f"server /health ended during the load: {dict(load.ended)}")
    growth = rss_end - rss_start
    print(
        f"server RSS: {rss_start:.1f} MiB after the warm-up, {rss_end:.1f} MiB at the end "
        f"({growth / rss_start:+.2%}, {growth * 1024 / max(1, load.sent):+.2f} KiB per request)"
    )
    await client.close()
    return Soak(len(references), distinct, warmup, load, rss_start, rss_end)


async def send_until(
    client: openai.AsyncOpenAI,
    models: list[str],
    references: dict,
    deadline: float,
    stream_fraction: float,
    disconnect_fraction: float,
    backoff: float,
    rng: random.Random,
    tally: Tally,
) -> None:
    """One client: a request after another until the deadline, each one's end added to `tally`."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        model, p, stream = rng.choice(models), rng.randrange(len(PROMPTS)), rng.random() < stream_fraction
        cut_after = None
        if stream and rng.random() < disconnect_fraction:
            cut_after = rng.randint(0, PROMPTS[p][2] // 2)  # 0: before the first token, maybe still waiting
        what = f"{model}, prompt {p}, {'streamed' if stream else 'not streamed'}"
        tally.sent += 1
        t0 = loop.time()
        try:
            answer = await ask(client, model, p, stream, cut_after)
        except openai.APIStatusError as e:
            tally.statuses[e.status_code] += 1
            if e.status_code == 429:
                await asyncio.sleep(backoff)
            continue
        except Exception as e:  # a connection error, a timeout, a stream cut short: lost without a status
            tally.lost.append(f"{what}: {type(e).__name__}: {e}")
            continue
        if answer is None:
            tally.disconnected += 1
            continue
        tally.completed += 1
        tally.latencies.append(loop.time() - t0)
        tally.tokens += answer[2]
        if answer != references[model, p]:
            tally.wrong.append(f"{what}: {answer} instead of {references[model, p]}")


async def ask(
    client: openai.AsyncOpenAI, model: str, p: int, stream: bool, cut_after: Optional[int] = None
) -> Optional[tuple[str, str, int]]:
    """PROMPTS[p] to `model`, greedy: the answer's text, finish_reason and completion_tokens; None for a stream
    closed on purpose after `cut_after` pieces of text (0: as soon as the response has begun), before its end."""
    chat, text, max_tokens = PROMPTS[p]
    settings = dict(model=model, max_tokens=max_tokens, temperature=0, stream=stream)
    if stream:
        settings["stream_options"] = {"include_usage": True}
    if chat:
        reply = await client.chat.completions.create(messages=[{"role": "user", "content": text}], **settings)
    else:
        reply = await client.completions.create(prompt=text, **settings)
    if not stream:
        choice = reply.choices[0]
        return choice.message.content if chat else choice.text, choice.finish_reason, reply.usage.completion_tokens
    pieces, finish_reason, n_tokens = [], None, None
    if cut_after == 0:
        await reply.close()
        return None
    async for event in reply:
        for choice in event.choices:
            piece = (choice.delta.content if chat else choice.text) or ""
            pieces += [piece] if piece else []
            finish_reason = choice.finish_reason or finish_reason
        if event.usage is not None:
            n_tokens = event.usage.completion_tokens
        if len(pieces) == cut_after and finish_reason is None:
            await reply.close()
            return None
    if finish_reason is None or n_tokens is None:
        raise RuntimeError(f"the stream ended without a finish_reason or usage after {len(pieces)} pieces")
    return "".join(pieces), finish_reason, n_tokens


def health(url: str) -> dict:
    """GET /health (urllib: the openai client speaks only to /v1)."""
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.loads(response.read())


async def until_idle(url: str, seconds: float = 10.0) -> dict:
    """/health once nothing is running or waiting (a closed stream's slot is freed at the next step), or after
    `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        state = await asyncio.to_thread(health, url)
        if (state["running"] == 0 and state["waiting"] == 0) or asyncio.get_running_loop().time() > deadline:
            return state
        await asyncio.sleep(0.1)


def rss_mib(pid: int) -> float:
    """The process's resident memory (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1] if len(values) > 1 else values[0]


def summary(tally: Tally, seconds: float) -> str:
    statuses = ", ".join(f"{n} of {code}" for code, n in sorted(tally.statuses.items())) or "none"
    return (
        f"{tally.sent} requests in {seconds:.1f} s: {tally.completed} completed ({tally.tokens / seconds:.1f} "
        f"tokens/s), {tally.disconnected} disconnected on purpose, error statuses: {statuses}; "
        f"{len(tally.lost)} lost, {len(tally.wrong)} wrong"
    )


def check(soak: Soak) -> None:
    """Fills soak.checks and prints each, with what failed."""
    phases = (soak.warmup, soak.load)
    wrong = [line for tally in phases for line in tally.wrong]
    lost = [line for tally in phases for line in tally.lost]
    other = Counter({code: n for tally in phases for code, n in tally.statuses.items() if code != 429})
    accounting = [
        f"{name}: the server ended {sum(t.ended.values())} ({dict(t.ended)}), the clients were accepted "
        f"{t.completed + t.disconnected}; idle after it: {t.idle}"
        for name, t in zip(("warm-up", "load"), phases)
        if not (t.idle and t.ended["error"] == 0 and sum(t.ended.values()) == t.completed + t.disconnected)
    ]
    growth = (soak.rss_end_mib - soak.rss_start_mib) / soak.rss_start_mib
    completed = sum(tally.completed for tally in phases)
    soak.checks = {
        f"right answers: {completed - len(wrong)} of {completed} completed answers equal their reference": not wrong,
        f"nothing lost: {len(lost)} lost, other statuses {dict(other)}, server accounting "
        f"{'off' if accounting else 'matches'}": not lost and not other and not accounting,
        f"flat memory: RSS grew {growth:+.2%} (limit {RSS_GROWTH_LIMIT:.0%})": growth < RSS_GROWTH_LIMIT,
        f"clean exit: status {soak.exit_status} on SIGTERM, {soak.tracebacks} tracebacks on stderr": (
            soak.exit_status == 0 and soak.tracebacks == 0
        ),
    }
    for line in [*wrong[:5], *lost[:5], *accounting]:
        print(f"  {line}")
    for name, ok in soak.checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")


if __name__ == "__main__":
    raise SystemExit(0 if CLI(main).passed else 1)
