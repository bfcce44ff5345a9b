"""batched.py, with multilora.py's stacked adapters: a batch mixing 5 adapters of different ranks, targets and variants
(rsLoRA, DoRA), the plain base, and prompts of different lengths, decoded together with continuous batching; each
row's greedy ids must equal generate_lora.py's path for that adapter alone (lora.load_lora_model unmerged, fp32,
decode.generate)."""

import threading
from pathlib import Path

import pytest
import torch

from batched import BatchGenerator, Job, QueueFull, generate_all
from conftest import make_adapters
from decode import Completion, generate
from lora import load_lora_model
from multilora import AdapterStack, adapter_updates
from utils import load_model

# (name, r, alpha, targets, settings): different ranks, different projections, the output head among them, and rsLoRA
# with DoRA and a rank of its own in one layer (lora.py's variants: each projection's scaling and DoRA's row factor)
ADAPTERS = [
    ("qv2", 2, 4, ("query", "value"), {}),
    ("all4", 4, 8, ("all_linear",), {}),
    ("mlp_head8", 8, 16, ("mlp", "head"), {}),
    ("ko1", 1, 1, ("key", "projection"), {}),
    ("dora_rs", 4, 4, ("query", "down"), dict(rslora=True, dora=True, ranks={"blocks.1.mlp.down_proj": 6})),
]
PROMPTS = [
    [1, 450, 4996, 17354],
    [1, 306, 763, 2, 99, 7],
    [1, 15043],
    [1, 450, 263, 4086, 310, 278, 29871, 13, 8, 19],
    [1, 3532, 1024],
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, checkpoint_dir) -> dict[str, Path]:
    return make_adapters(checkpoint_dir, tmp_path_factory.mktemp("adapters"), ADAPTERS)


@pytest.fixture(scope="module")
def reference(checkpoint_dir, adapters):
    """greedy(adapter name or "", prompt, n) -> new ids: decode.generate on the adapter alone, unmerged, fp32."""
    models = {"": load_model(checkpoint_dir).eval()}
    models.update({name: load_lora_model(checkpoint_dir, path, merge=False).eval() for name, path in adapters.items()})

    def greedy(name: str, prompt: list[int], n: int) -> list[int]:
        ids = generate(models[name], torch.tensor(prompt), n, temperature=0.0)
        return ids[len(prompt) :].tolist()

    return greedy


def stacked(checkpoint_dir, adapters, max_batch_size, max_seq_length=64, max_waiting=64) -> BatchGenerator:
    model = load_model(checkpoint_dir).eval()
    stack = AdapterStack(model)
    for name, path in adapters.items():
        stack.add(name, adapter_updates(path, model))
    return BatchGenerator(model, stack, max_batch_size, max_seq_length, max_waiting)


def test_each_row_equals_its_adapter_alone(checkpoint_dir, adapters, reference):
    generator = stacked(checkpoint_dir, adapters, max_batch_size=10)
    names = ["", *adapters]
    jobs = [Job(Completion(PROMPTS[i % len(PROMPTS)], 12), adapter=names[i % len(names)]) for i in range(10)]
    generate_all(generator, jobs)
    for job in jobs:
        assert job.completion.tokens == reference(job.adapter, job.completion.prompt, 12), job.adapter
        assert job.finish_reason == "length"
    # the adapters do change the answers: the same prompt gives six different continuations
    same_prompt = [reference(name, PROMPTS[0], 12) for name in names]
    assert len({tuple(ids) for ids in same_prompt}) == len(names)


def test_continuous_batching_reuses_freed_slots_with_per_row_stop_ids(checkpoint_dir, adapters, reference):
    """3 slots for 9 requests of different lengths, each ending at its own max_new_tokens or stop id: slots are freed
    and refilled while the other rows keep decoding, and nothing changes any row's output."""
    generator = stacked(checkpoint_dir, adapters, max_batch_size=3)
    names = ["", *adapters]
    jobs, expected = [], []
    for i in range(9):
        name, prompt, n = names[i % len(names)], PROMPTS[(i * 2) % len(PROMPTS)], 3 + 2 * i
        full = reference(name, prompt, n)
        stop_ids = (full[2],) if i % 3 == 0 else ()  # ends at the third new token (or earlier, if it came before)
        expected.append(full[: full.index(full[2]) + 1] if stop_ids else full)
        jobs.append(Job(Completion(prompt, n, stop_ids=stop_ids), adapter=name))
    generate_all(generator, jobs)
    assert [job.completion.tokens for job in jobs] == expected
    assert [job.finish_reason for job in jobs] == ["stop" if i % 3 == 0 else "length" for i in range(9)]
    assert generator.jobs == [None, None, None]


def test_an_adapter_added_later_and_sampling_by_seed(checkpoint_dir, adapters, reference):
    generator = stacked(checkpoint_dir, {name: adapters[name] for name in ("qv2", "ko1")}, max_batch_size=4)
    generator.submit(Job(Completion(PROMPTS[1], 8), adapter="qv2"))
    generator.step()  # in flight while a larger, wider adapter comes in
    generator.stack.add("all4", adapter_updates(adapters["all4"], generator.model))
    first = generator.jobs[0]
    late = Job(Completion(PROMPTS[3], 8), adapter="all4")
    generate_all(generator, [late])
    assert first.completion.tokens == reference("qv2", PROMPTS[1], 8)
    assert late.completion.tokens == reference("all4", PROMPTS[3], 8)

    def seeded(seed: int) -> Job:
        return Job(Completion(PROMPTS[0], 10, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(seed)), "all4")

    sampled = [seeded(1), seeded(1), seeded(2)]
    generate_all(generator, sampled)
    assert sampled[0].completion.tokens == sampled[1].completion.tokens != sampled[2].completion.tokens

    with pytest.raises(ValueError, match="no adapter named 'nope' is loaded"):
        generator.submit(Job(Completion([1], 1), adapter="nope"))
    with pytest.raises(ValueError, match="exceeds max_seq_length 64"):
        generator.submit(Job(Completion([1] * 60, 5)))


def test_a_full_queue_refuses(checkpoint_dir, adapters):
    generator = stacked(checkpoint_dir, {}, max_batch_size=1, max_waiting=2)
    for _ in range(3):  # the free slot takes one at the next step, the queue two
        generator.submit(Job(Completion([1], 1)))
    with pytest.raises(QueueFull, match="3 requests are already waiting for a slot"):
        generator.submit(Job(Completion([1], 1)))
    generator.step()  # one starts (and ends: one token); the queue has room again
    generator.submit(Job(Completion([1], 1)))


def test_between_steps_runs_on_the_loops_thread_and_hands_back_results_and_errors(checkpoint_dir, adapters):
    """serve.py loads new adapters through between_steps: on the loop's thread (PyTorch's OpenMP threads are that
    thread's), between steps, a result or an exception back in the Future; once the loop stops, none is left waiting."""
    generator = stacked(checkpoint_dir, {}, max_batch_size=2)
    stop = threading.Event()
    loop = threading.Thread(target=generator.loop, args=(stop,))
    loop.start()
    try:
        job = Job(Completion(PROMPTS[0], 8))
        generator.submit(job)
        added = generator.between_steps(
            lambda: (
                threading.current_thread(),
                generator.stack.add("qv2", adapter_updates(adapters["qv2"], generator.model)),
            )
        )
        assert added.result(timeout=30) == (loop, 1)
        failed = generator.between_steps(lambda: generator.stack.index("nope"))
        with pytest.raises(ValueError, match="no adapter named 'nope'"):
            failed.result(timeout=30)
    finally:
        stop.set()
        loop.join()
    pending = generator.between_steps(lambda: None)
    generator.cancel_all()
    with pytest.raises(RuntimeError, match="the generation loop has stopped"):
        pending.result(timeout=1)
