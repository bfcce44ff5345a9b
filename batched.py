"""Continuous batching: many generation jobs (serve.py's requests, evaluate.py's generate_until) decoded together on one
base model, each with its own adapter, sampling settings and length, joining and leaving while the others decode.

The KV cache has `max_batch_size` rows ("slots"): a `SlotCache` in every attention layer. A new job takes the lowest
free slot, and the prompts of the jobs starting at one step are fed in one pass into their rows of the cache; then
each step is decode.py's `Batch.step`, one token for every busy slot, each at its own position and with its own
adapter (`AdapterStack.rows`). A job that ends (a stop id or string, its max_new_tokens, cancelled) frees its slot at
once for the next waiting one. Each row's greedy output equals decode.generate's for that job alone
(tests/test_batched.py).

    generator = BatchGenerator(model, stack, max_batch_size=8, max_seq_length=1024)
    jobs = [Job(Completion(ids, max_new_tokens=64), adapter="support"), ...]
    generate_all(generator, jobs)  # or: submit(job) from any thread, and loop(stop) on the model's thread
    jobs[0].completion.tokens
"""

import collections
import threading
import traceback
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional

import torch

from decode import Batch, Completion, prefill
from model import KVCache, LLaMA
from multilora import AdapterStack


class QueueFull(Exception):
    """submit() found every slot busy and `max_waiting` jobs already waiting for one (serve.py answers 429)."""


@dataclass
class Job:
    """One request: its completion (prompt, settings, what decoding fills in), its adapter, and how it ended."""

    completion: Completion
    adapter: str = ""  # a name in the AdapterStack, "" for the base
    on_end: Optional[Callable[[], None]] = None  # called from the generation loop once the job has ended
    finish_reason: Optional[str] = None  # the completion's ("stop", "length"), or "cancelled" or "error"
    cancelled: bool = False  # set from any thread: the slot is freed at the next step


class Slots:
    """Which rows of the SlotCaches a forward pass uses: set for its span by `use`, so that the model's forward needs
    no argument for them. A slice for a step (rows 0..n-1: the cache's own rows, no copy), the rows' indices for
    prompts starting together in any free rows."""

    def __init__(self) -> None:
        self.rows: slice | torch.Tensor = slice(0, 0)

    @contextmanager
    def use(self, rows: slice | torch.Tensor) -> Iterator[None]:
        before, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = before


class SlotCache(KVCache):
    """model.KVCache whose batch row i is the cache's row slots.rows[i]. Its attention reads only as far as the
    longest row (decode.py sets `length` for every pass): a cache sized for the longest request a server takes is
    mostly empty."""

    def __init__(
        self, slots: Slots, shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__(shape, device, dtype)
        self.slots = slots

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, n = self.slots.rows, self.length or self.k.size(2)
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        index = torch.arange(rows.start, rows.stop, device=k.device) if isinstance(rows, slice) else rows
        index = index[:, None]  # (B, 1)
        self.k[index, :, input_pos] = k.transpose(1, 2)  # (B, T, n_query_groups, head_size) written
        self.v[index, :, input_pos] = v.transpose(1, 2)
        return self.k[rows, :, :n], self.v[rows, :, :n]


class BatchGenerator:
    """Slots of a KV cache shared by the jobs in flight, and the queue of those waiting for one."""

    def __init__(
        self,
        model: LLaMA,
        stack: Optional[AdapterStack],
        max_batch_size: int,
        max_seq_length: int,
        max_waiting: int = 64,
    ) -> None:
        """stack: the adapters the jobs name (serve.py's), or None: the model alone (evaluate.py's generate_until)."""
        if max_seq_length > model.config.block_size:
            raise ValueError(
                f"max_seq_length {max_seq_length} exceeds the model's block_size {model.config.block_size}"
            )
        self.model, self.stack = model, stack
        self.max_seq_length, self.max_waiting = max_seq_length, max_waiting
        self.slots = Slots()
        device, dtype = model.embed.weight.device, model.embed.weight.dtype
        for block in model.blocks:
            shape = (max_batch_size, block.attn.n_query_groups, max_seq_length, block.attn.head_size)
            block.attn.kv_cache = SlotCache(self.slots, shape, device, dtype)
        self.batch = Batch(model, max_batch_size)
        self.jobs: list[Optional[Job]] = [None] * max_batch_size
        self.adapter_slots = [0] * max_batch_size
        self.waiting: collections.deque[Job] = collections.deque()
        self.ended = collections.Counter()  # jobs ended so far, by finish_reason (serve.py's /health)
        self.lock = threading.Lock()  # held by a step and by cancel_all
        self.wakeup = threading.Condition(threading.Lock())
        self.calls: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()  # between_steps'

    def submit(self, job: Job) -> None:
        """Queues a job (from any thread); it starts as soon as a slot is free."""
        completion = job.completion
        if not completion.prompt or completion.max_new_tokens < 1:
            raise ValueError("a job needs at least one prompt token and max_new_tokens >= 1")
        if len(completion.prompt) + completion.max_new_tokens > self.max_seq_length:
            raise ValueError(
                f"the prompt ({len(completion.prompt)} tokens) plus max_new_tokens ({completion.max_new_tokens}) "
                f"exceeds max_seq_length {self.max_seq_length}"
            )
        self.adapter_slot(job.adapter)  # an unknown adapter fails here, not in the loop
        with self.wakeup:
            # free slots take jobs at the next step: until then those count as places in the queue too
            if len(self.waiting) >= self.max_waiting + self.jobs.count(None):
                raise QueueFull(f"{len(self.waiting)} requests are already waiting for a slot (the limit); retry later")
            self.waiting.append(job)
            self.wakeup.notify()

    def between_steps(self, function: Callable[[], object]) -> Future:
        """Runs `function` on the loop's thread before its next step (from any thread; serve.py loads new adapters so)
        and returns its Future. PyTorch work belongs on that one thread: a second thread that runs a parallel operation
        starts a second team of OpenMP threads, and both teams on the same cores slow every operation down."""
        future = Future()
        with self.wakeup:
            self.calls.append((function, future))
            self.wakeup.notify()
        return future

    def adapter_slot(self, name: str) -> int:
        if self.stack is None and name:
            raise ValueError(f"no adapter named {name!r}: this generator runs the model alone")
        return 0 if self.stack is None else self.stack.index(name)

    def adapter_rows(self, slots: list[int]) -> ContextManager:
        """AdapterStack.rows, for the span of one forward pass."""
        return nullcontext() if self.stack is None else self.stack.rows(slots)

    def busy(self) -> bool:
        return bool(self.waiting) or any(job is not None for job in self.jobs)

    @torch.no_grad()
    def step(self) -> None:
        """Starts waiting jobs in free slots, then generates one token for every busy slot."""
        with self.lock:
            for i, job in enumerate(self.jobs):
                if job is not None and job.cancelled:
                    self.batch.rows[i] = None
                    self.finish(i, "cancelled")
            starting = []
            while self.waiting and None in self.jobs:
                with self.wakeup:
                    job = self.waiting.popleft()
                if not job.cancelled:
                    i = self.jobs.index(None)
                    self.jobs[i], self.adapter_slots[i] = job, self.adapter_slot(job.adapter)
                    starting.append(i)
                else:
                    self.end(job, "cancelled")
            if starting:
                self.start(starting)
            if self.batch.width:
                self.decode()

    def start(self, rows: list[int]) -> None:
        """Feeds the prompts of the jobs just placed in `rows` into those rows of the cache, in one pass (each at its
        own length, decode.prefill), and takes each one's first new token from its last position."""
        completions = [self.jobs[i].completion for i in rows]
        index = torch.tensor(rows, device=self.batch.device)
        with self.slots.use(index), self.adapter_rows([self.adapter_slots[i] for i in rows]):
            # starts given: no prompt fed once for several rows (that copies rows 0..B-1 of the cache, not slots')
            logits = prefill(self.model, [c.prompt for c in completions], [0] * len(rows))  # (len(rows), vocab_size)
        self.batch.begin(rows, completions, logits, [len(c.prompt) for c in completions])
        for i in rows:
            if self.batch.rows[i] is None:  # ended at its first token
                self.finish(i, self.jobs[i].completion.finish_reason)

    def decode(self) -> None:
        """One step of every busy slot (free ones below the last busy one are fed a dummy token, decode.Batch.step)."""
        n = self.batch.width
        adapters = [a if self.batch.rows[i] is not None else 0 for i, a in enumerate(self.adapter_slots[:n])]
        with self.slots.use(slice(0, n)), self.adapter_rows(adapters):
            taken = self.batch.step()
        for i, _ in taken:
            if self.batch.rows[i] is None:
                self.finish(i, self.jobs[i].completion.finish_reason)

    def finish(self, i: int, reason: str) -> None:
        job, self.jobs[i] = self.jobs[i], None
        self.end(job, reason)

    def end(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        self.ended[reason] += 1
        if job.on_end is not None:
            job.on_end()

    def cancel_all(self, reason: str = "cancelled") -> None:
        """Ends every job in flight or waiting (serve.py at shutdown)."""
        with self.lock:
            for i, job in enumerate(self.jobs):
                if job is not None:
                    self.batch.rows[i] = None
                    self.finish(i, reason)
            with self.wakeup:
                waiting, self.waiting = list(self.waiting), collections.deque()
                calls, self.calls = self.calls, collections.deque()
            for job in waiting:
                self.end(job, reason)
            for _, future in calls:
                future.set_exception(RuntimeError("the generation loop has stopped"))

    def loop(self, stop: threading.Event) -> None:
        """The generation loop, on the thread that loaded the model (serve.py's main thread; see between_steps): runs
        what between_steps was given, steps while there is work, sleeps while there is none. A step that fails (out of
        memory, a bug) ends the jobs in flight with finish_reason "error", and the loop goes on."""
        while not stop.is_set():
            with self.wakeup:
                calls, self.calls = self.calls, collections.deque()
                if not calls and not self.busy():
                    self.wakeup.wait(timeout=0.1)
                    continue
            for function, future in calls:
                try:
                    future.set_result(function())
                except Exception as e:
                    future.set_exception(e)
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
