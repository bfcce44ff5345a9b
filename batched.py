"""Continuous batching: many generation jobs (serve.py's requests) decoded together on one base model, each with its own
adapter, sampling settings and length.

The KV cache has `max_batch_size` rows ("slots"). A new job takes a free slot: its prompt is fed in one pass into
that row of the cache (model.forward's `kv_rows`); then every step feeds the newest token of every busy slot in one
forward pass, each row at its own position (`input_pos` of shape (B, 1)) and with its own adapter (model.forward's
`adapters`: each row's slot in the multilora.AdapterStack). A job that ends (a stop id, its max_new_tokens,
cancelled) frees its slot at once for the next waiting one. Each row's greedy output equals generate.generate's for
that job alone (tests/test_batched.py).

    generator = BatchGenerator(model, stack, max_batch_size=8, max_seq_length=1024)
    jobs = [Job(prompt=ids, adapter="support", max_new_tokens=64), ...]
    generate_all(generator, jobs)  # or: generator.submit(r) from any thread, generator.loop(stop) in one thread
    jobs[0].tokens
"""

import collections
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from generate import sample
from model import LLaMA
from multilora import AdapterStack


class QueueFull(Exception):
    """submit() found every slot busy and `max_waiting` jobs already waiting for one (serve.py answers 429)."""


@dataclass
class Job:
    """One request's generation: its prompt and settings, and what the generator fills in."""

    prompt: list[int]  # token ids, at least one
    max_new_tokens: int
    adapter: str = ""  # a name in the AdapterStack, "" for the base
    temperature: float = 0.0  # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop_ids: Sequence[int] = ()  # generation ends after yielding one of these
    seed: Optional[int] = None  # the job's own random numbers when sampling
    # called from the generation loop with each new token id, then once with None when the job has ended
    on_token: Optional[Callable[[Optional[int]], None]] = None
    # set by the generator
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" (a stop id), "length" (max_new_tokens), "cancelled" or "error"
    cancelled: bool = False  # set from any thread: the slot is freed at the next step


class BatchGenerator:
    """Slots of a KV cache shared by the jobs in flight, and the queue of those waiting for one."""

    def __init__(
        self, model: LLaMA, stack: AdapterStack, max_batch_size: int, max_seq_length: int, max_waiting: int = 64
    ) -> None:
        if max_seq_length > model.config.block_size:
            raise ValueError(
                f"max_seq_length {max_seq_length} exceeds the model's block_size {model.config.block_size}"
            )
        self.model, self.stack = model, stack
        self.max_seq_length, self.max_waiting = max_seq_length, max_waiting
        self.device = model.embed.weight.device
        model.set_kv_cache(max_batch_size, max_seq_length)
        self.slots: list[Optional[Job]] = [None] * max_batch_size
        self.positions = [0] * max_batch_size  # where each slot's next token goes
        self.last = [0] * max_batch_size  # each slot's newest token, fed at the next step
        self.adapter_slots = [0] * max_batch_size
        self.generators: list[Optional[torch.Generator]] = [None] * max_batch_size
        self.waiting: collections.deque[Job] = collections.deque()
        self.ended = collections.Counter()  # jobs ended so far, by finish_reason (serve.py's /health)
        self.lock = threading.Lock()  # held by a step; adding an adapter waits for it
        self.wakeup = threading.Condition(threading.Lock())

    def submit(self, job: Job) -> None:
        """Queues a job (from any thread); it starts as soon as a slot is free."""
        if not job.prompt or job.max_new_tokens < 1:
            raise ValueError("a job needs at least one prompt token and max_new_tokens >= 1")
        if len(job.prompt) + job.max_new_tokens > self.max_seq_length:
            raise ValueError(
                f"the prompt ({len(job.prompt)} tokens) plus max_new_tokens ({job.max_new_tokens}) "
                f"exceeds max_seq_length {self.max_seq_length}"
            )
        self.stack.index(job.adapter)  # an unknown adapter fails here, not in the loop
        with self.wakeup:
            # free slots take jobs at the next step: until then those count as places in the queue too
            if len(self.waiting) >= self.max_waiting + self.slots.count(None):
                raise QueueFull(f"{len(self.waiting)} requests are already waiting for a slot (the limit); retry later")
            self.waiting.append(job)
            self.wakeup.notify()

    def busy(self) -> bool:
        return bool(self.waiting) or any(slot is not None for slot in self.slots)

    @torch.no_grad()
    def step(self) -> None:
        """Starts waiting jobs in free slots, then generates one token for every busy slot."""
        with self.lock:
            for i, job in enumerate(self.slots):
                if job is not None and job.cancelled:
                    self.finish(i, "cancelled")
            while self.waiting and None in self.slots:
                with self.wakeup:
                    job = self.waiting.popleft()
                if not job.cancelled:
                    self.start(self.slots.index(None), job)
                else:
                    self.end(job, "cancelled")
            busy = [i for i, job in enumerate(self.slots) if job is not None]
            if busy:
                self.decode(busy[-1] + 1)

    def start(self, i: int, job: Job) -> None:
        """Feeds the prompt into slot i's row of the cache and takes the first new token from its last position."""
        self.slots[i] = job
        self.adapter_slots[i] = self.stack.index(job.adapter)
        self.generators[i] = None
        if job.seed is not None:
            self.generators[i] = torch.Generator(self.device).manual_seed(job.seed)
        T = len(job.prompt)
        idx = torch.tensor([job.prompt], device=self.device)  # (1, T)
        logits_at = torch.zeros(1, T, dtype=torch.bool, device=self.device)
        logits_at[0, -1] = True
        logits = self.model(
            idx,
            torch.arange(T, device=self.device)[None],
            logits_at=logits_at,
            kv_rows=torch.tensor([i], device=self.device),
            adapters=self.adapters_tensor([self.adapter_slots[i]]),
        )  # (1, vocab_size)
        self.positions[i] = T
        self.take(i, logits[0])

    def decode(self, n: int) -> None:
        """One forward pass over slots 0..n-1 (free ones among them fed a dummy token at position 0 of their own row,
        which the next job there overwrites), one new token each."""
        idx = torch.tensor(self.last[:n], device=self.device)[:, None]  # (n, 1)
        input_pos = torch.tensor(self.positions[:n], device=self.device)[:, None]  # (n, 1)
        adapters = [a if self.slots[i] is not None else 0 for i, a in enumerate(self.adapter_slots[:n])]
        logits = self.model(idx, input_pos, adapters=self.adapters_tensor(adapters))[:, -1]  # (n, vocab_size)
        greedy = logits.argmax(dim=-1).tolist()  # one host sync for every greedy row
        for i in range(n):
            if self.slots[i] is not None:
                self.positions[i] += 1
                self.take(i, logits[i], greedy[i])

    def adapters_tensor(self, slots: list[int]) -> Optional[torch.Tensor]:
        """model.forward's `adapters` for rows on these adapter slots: None when every row is on the base."""
        return torch.tensor(slots, device=self.device) if any(slots) else None

    def take(self, i: int, logits: torch.Tensor, greedy: Optional[int] = None) -> None:
        """Picks slot i's next token from its logits (vocab_size,), hands it over, and ends the job if it is done."""
        job = self.slots[i]
        if job.temperature == 0.0 and greedy is not None:
            token = greedy
        else:
            token = sample(logits, job.temperature, job.top_k, job.top_p, self.generators[i]).item()
        job.tokens.append(token)
        self.last[i] = token
        if job.on_token is not None:
            job.on_token(token)
        if token in job.stop_ids:
            self.finish(i, "stop")
        elif len(job.tokens) >= job.max_new_tokens:
            self.finish(i, "length")

    def finish(self, i: int, reason: str) -> None:
        job, self.slots[i], self.last[i], self.positions[i] = self.slots[i], None, 0, 0
        self.end(job, reason)

    def end(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        self.ended[reason] += 1
        if job.on_token is not None:
            job.on_token(None)

    def cancel_all(self, reason: str = "cancelled") -> None:
        """Ends every job in flight or waiting (serve.py at shutdown)."""
        with self.lock:
            for i, job in enumerate(self.slots):
                if job is not None:
                    self.finish(i, reason)
            with self.wakeup:
                waiting, self.waiting = list(self.waiting), collections.deque()
            for job in waiting:
                self.end(job, reason)

    def loop(self, stop: threading.Event) -> None:
        """The generation loop, for a thread of its own: steps while there is work, sleeps while there is none. A step
        that fails (out of memory, a bug) ends the jobs in flight with finish_reason "error", and the loop goes
        on."""
        while not stop.is_set():
            with self.wakeup:
                if not self.busy():
                    self.wakeup.wait(timeout=0.1)
                    continue
            try:
                self.step()
            except Exception:
                traceback.print_exc()
                self.cancel_all("error")


def generate_all(generator: BatchGenerator, jobs: list[Job]) -> None:
    """Submits every job and steps until all have ended (no thread: for tests, benchmarks and notebooks)."""
    for job in jobs:
        generator.submit(job)
    while generator.busy():
        generator.step()
