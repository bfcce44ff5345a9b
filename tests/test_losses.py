"""losses.py, each against a reference: pack_batch against the records laid out by hand, the packed model and
cross_entropy_sum against each record on its own and F.cross_entropy over all the logits (values and gradients, fp32
and bf16). finetune_dpo.py's per-answer sums of token_cross_entropy are checked against TRL in
tests/test_finetune_dpo.py."""

import pytest
import torch
import torch.nn.functional as F

from lora import lora, mark_only_lora_as_trainable
from losses import cross_entropy_sum, pack_batch
from model import Config, LLaMA

TINY = dict(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48)


def test_pack_batch_packs_the_records_into_one_row_and_shifts_the_targets():
    records = [
        {"input_ids": torch.tensor([1, 5, 6, 7, 2]), "labels": torch.tensor([-100, -100, 6, 7, 2])},
        {"input_ids": torch.tensor([1, 8, 2]), "labels": torch.tensor([-100, 8, 2])},
    ]
    input_ids, targets, lengths = pack_batch(records, max_seq_length=512)
    assert input_ids.tolist() == [[1, 5, 6, 7, 1, 8]]  # no padding; a record's last token is no input
    assert targets.tolist() == [[-100, 6, 7, 2, 8, 2]]  # position t predicts token t + 1 of the same record
    assert lengths == [4, 2]
    input_ids, targets, lengths = pack_batch(records, max_seq_length=3)
    assert input_ids.tolist() == [[1, 5, 1, 8]] and targets.tolist() == [[-100, 6, 8, 2]] and lengths == [2, 2]


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_packed_records_give_each_records_own_logits_loss_and_gradients(gradient_checkpointing):
    """Packing is only a cheaper layout: every record attends to itself alone, from position 0."""
    torch.manual_seed(0)
    with lora(r=4, alpha=8, dropout=0.0, targets=("query", "value")):
        model = LLaMA(Config(**TINY))
    mark_only_lora_as_trainable(model)
    model.gradient_checkpointing = gradient_checkpointing
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora.B"):
                param.normal_(std=0.1)
    records = []
    for length in (9, 3, 14):
        ids = torch.randint(3, 100, (length,))
        records.append({"input_ids": ids, "labels": torch.cat([torch.full((2,), -100), ids[2:]])})

    input_ids, targets, lengths = pack_batch(records, max_seq_length=12)
    logits = model(input_ids, lengths=lengths)[0]
    alone = torch.cat([model(record["input_ids"][None, :12][:, :-1])[0] for record in records])
    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)

    where = targets != -100
    loss = cross_entropy_sum(model(input_ids, lengths=lengths, logits_at=where), targets[where])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    expected = sum(
        F.cross_entropy(model(r["input_ids"][None, :12][:, :-1])[0], r["labels"][1:12], reduction="sum")
        for r in records
    )
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must add up"):
        model(input_ids, lengths=[1, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_sum_equals_f_cross_entropy_over_the_logits_in_value_and_gradient(dtype):
    torch.manual_seed(0)
    with lora(r=4, alpha=8, dropout=0.0, targets=("query", "value", "head")):
        model = LLaMA(Config(**TINY)).to(dtype)
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora.B"):
                param.normal_(std=0.1)
    input_ids = torch.randint(0, 100, (3, 20))
    targets = torch.randint(0, 100, (3, 20))
    targets[0, :7] = targets[2, 12:] = -100  # a prompt, padding

    where = targets != -100
    loss = cross_entropy_sum(model(input_ids, logits_at=where), targets[where])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    expected = F.cross_entropy(model(input_ids).float().flatten(0, 1), targets.flatten(), reduction="sum")
    expected.backward()
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss, expected, **tolerance)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, **tolerance)
    assert not model.lm_head._forward_pre_hooks  # the head is back to computing every position
    with torch.no_grad():
        logits = model(input_ids, logits_at=where)
        torch.testing.assert_close(cross_entropy_sum(logits, targets[where]), expected.detach(), **tolerance)
        nowhere = torch.zeros_like(where)
        assert cross_entropy_sum(model(input_ids, logits_at=nowhere), targets[nowhere]).item() == 0
        # without logits_at, every position is a target: the same as F.cross_entropy over all the logits
        all_targets = torch.randint(0, 100, (3, 20))
        every = F.cross_entropy(model(input_ids).float().flatten(0, 1), all_targets.flatten(), reduction="sum")
        torch.testing.assert_close(cross_entropy_sum(model(input_ids), all_targets), every, **tolerance)
