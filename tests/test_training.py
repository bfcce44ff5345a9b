"""training.py's parts, each against a reference: compiled and gradient-checkpointed Blocks against eager ones
(losses and gradients), the data order and the learning rate against their definitions, and the stop on a loss that
is not finite (the losses and packing: tests/test_losses.py). finetune_lora.py's and finetune_full.py's runs, which
use them, are in their own test files."""

import argparse
import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import training
from lora import lora, mark_only_lora_as_trainable
from losses import cross_entropy_sum, pack_batch
from model import Config, LLaMA
from training import TrainArgs, batch_indices, learning_rate, stop_if_diverged

TINY = dict(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48)


def test_compiled_blocks_give_the_eager_losses_and_gradients():
    """--train.compile: Blocks compiled by torch.compile (inductor: C++ kernels on CPU), packed micro-batches of other
    lengths one after another, with and without gradient checkpointing, give each record's own eager loss and LoRA
    gradients. Off by default on CPU."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++), which this machine lacks")
    cpu = argparse.Namespace(
        device=torch.device("cpu"), strategy=None, print=print
    )  # what compile_blocks asks of a Fabric
    torch.manual_seed(0)
    with lora(r=4, alpha=8, dropout=0.0, targets=("query", "value", "mlp")):
        model = LLaMA(Config(**TINY))
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora.B"):
                param.normal_(std=0.1)
    assert not training.compile_blocks(cpu, model, TrainArgs())
    compiled = copy.deepcopy(model)
    assert training.compile_blocks(cpu, compiled, TrainArgs(compile=True))
    for lengths, gradient_checkpointing in (((9, 3, 14), False), ((20, 5), True), ((7, 11, 2), True)):
        compiled.gradient_checkpointing = gradient_checkpointing
        records = []
        for length in lengths:
            ids = torch.randint(3, 100, (length,))
            records.append({"input_ids": ids, "labels": torch.cat([torch.full((2,), -100), ids[2:]])})
        input_ids, targets, packed = pack_batch(records, max_seq_length=64)
        where = targets != -100
        loss = cross_entropy_sum(compiled(input_ids, lengths=packed, logits_at=where), targets[where])
        loss.backward()
        expected = sum(
            F.cross_entropy(model(r["input_ids"][None, :-1])[0], r["labels"][1:], reduction="sum") for r in records
        )
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        eager_grads = dict(model.named_parameters())
        for name, param in compiled.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.grad, eager_grads[name].grad, rtol=1e-5, atol=1e-5)
        model.zero_grad(), compiled.zero_grad()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile, not fall back to eager


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    with lora(r=4, alpha=8, dropout=0.1, targets=("all_linear",)):
        model = LLaMA(Config(**TINY))
    mark_only_lora_as_trainable(model)
    input_ids = torch.randint(0, 100, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the RNG in the recomputation
        model(input_ids).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_args_that_would_train_nothing_or_divide_by_zero_are_refused_in_one_place():
    assert TrainArgs(batch_size=4, epochs=2).for_records(10).max_steps == 5
    assert TrainArgs(max_steps=3).for_records(10).max_steps == 3
    for name, value in (
        ("max_steps", -1),
        ("max_steps", 0),
        ("epochs", 0),
        ("eval_interval", 0),
        ("save_interval", -5),
    ):
        with pytest.raises(ValueError) as raised:
            TrainArgs(**{name: value}).for_records(10)
        assert str(raised.value) == f"--train.{name} {value} must be at least 1"


def test_each_epoch_reads_every_record_once_in_an_order_fixed_by_seed_and_epoch():
    first = [i for step in range(0, 5) for i in batch_indices(step, 4, 20, seed=7)]
    second = [i for step in range(5, 10) for i in batch_indices(step, 4, 20, seed=7)]
    assert sorted(first) == sorted(second) == list(range(20))
    assert first != second and first != list(range(20))
    assert batch_indices(6, 4, 20, seed=7) == second[4:8]  # a step's batch follows from its number alone
    assert batch_indices(0, 4, 20, seed=8) != first[:4]


def test_learning_rate_warms_up_linearly_then_decays_along_a_cosine_to_zero():
    rates = [learning_rate(step, 2.0, warmup_steps=4, max_steps=14) for step in range(15)]
    assert rates[:4] == [0.5, 1.0, 1.5, 2.0]
    assert rates[9] == pytest.approx(1.0)  # half way through the decay
    assert rates[13] == pytest.approx(1 + torch.cos(torch.tensor(0.9 * torch.pi)).item())
    assert rates[14] == pytest.approx(0.0, abs=1e-12)


def test_a_loss_or_gradient_that_is_not_finite_stops_before_the_update_naming_what_to_do(tmp_path):
    state = {"step": 6, "history": {"train": [], "val": []}}
    stop_if_diverged(2.5, torch.tensor(0.7), state, tmp_path / "train_state.pt")  # finite: nothing happens
    saved = tmp_path / "train_state.pt"
    for loss, grad_norm in ((math.nan, torch.tensor(0.7)), (2.5, torch.tensor(math.inf))):
        with pytest.raises(FloatingPointError) as raised:
            stop_if_diverged(loss, grad_norm, state, saved)
        assert str(raised.value) == (
            f"the loss ({loss}) or its gradient (norm {float(grad_norm)}) is not finite at step 7; stopped before "
            "updating the weights. Nothing was saved; try a lower --train.learning_rate"
        )
    saved.write_bytes(b"")
    with pytest.raises(FloatingPointError, match=f"The last good checkpoint is {saved}: resume from it with a lower"):
        stop_if_diverged(math.inf, torch.tensor(math.nan), state, saved)


def test_a_loss_stuck_at_a_uniform_guess_stops_but_not_a_random_models_start_nor_an_ordinary_spike(tmp_path):
    uniform, saved = math.log(32000), tmp_path / "train_state.pt"  # 10.3735

    def stops(losses: list[float], grad_norm: float = 0.5) -> bool:
        state = {"step": len(losses) - 1, "history": {"train": list(enumerate(losses[:-1], 1)), "val": []}}
        try:
            stop_if_diverged(losses[-1], torch.tensor(grad_norm), state, saved, vocab_size=32000)
        except FloatingPointError:
            return True
        return False

    assert not stops([uniform + 0.01])  # a random model's first step
    assert not stops([uniform + 0.01] * 8)  # learning slowly
    assert not stops([2.0, 2.9, 3.1, 2.8, 3.0, 2.9])  # a trained model's bumps: far below a uniform guess
    assert not stops([0.1, 0.0], grad_norm=0.0)  # no gradient where nothing is left to learn
    assert stops([uniform - 0.01, uniform], grad_norm=0.0)  # every logit equal: the output ignores the weights
    # the tests' overfitting run (LoRA, learning rate 3e-2), steps 7 to 11: a spike that came back down
    assert not stops([3.759, 3.545, 27.672, 12.015, 5.168])
    assert not stops([3.759, 3.545, 27.672, 12.015])
    assert stops([10.36, 1519.4, 2730.1, 4058.7, 3000.0, 2500.0])  # full fine-tuning at learning rate 10 (measured)
    assert not stops([10.36, 1519.4, 2730.1, 4058.7, 3000.0])  # for 4 steps only
    assert stops([2.0, 9.5, 9.6, 9.8, 9.9, 10.0])  # a trained model back near a uniform guess for 5 steps
    (tmp_path / "train_state").mkdir()  # a sharded train state (--strategy fsdp) is a directory
    state = {"step": 5, "history": {"train": [(1, 10.36), (2, 1519.4), (3, 2730.1), (4, 4058.7), (5, 3000)], "val": []}}
    with pytest.raises(FloatingPointError) as raised:
        stop_if_diverged(2500.0, torch.tensor(85.8), state, saved, 32000)
    assert str(raised.value) == (
        "the loss has been no better than a uniform guess over the vocabulary (ln 32000 = 10.3735) for 5 steps, up "
        f"from 10.3600: 2500.0000 at step 6; stopped before updating the weights. The last good checkpoint is "
        f"{tmp_path / 'train_state'}: resume from it with a lower --train.learning_rate"
    )
