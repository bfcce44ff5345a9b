"""The losses the fine-tuning scripts, evaluate.py and finetune_dpo.py compute, and the packing of records they are
computed over:

- `pack_batch`: a micro-batch of prepared records in one row, without padding (the model keeps the records apart);
- `cross_entropy_sum`: the cross-entropy summed over every target, for the loss of a step or of an evaluation;
- `token_cross_entropy`: the cross-entropy of each target (minus its log-probability: finetune_dpo.py sums it per
  answer), with `TokenCrossEntropy`, which keeps one tensor of the logits' size for the backward pass instead of three.
"""

import torch
import torch.nn.functional as F


def pack_batch(
    samples: list[dict[str, torch.Tensor]], max_seq_length: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Inputs (1, N) and next-token targets (1, N) of a micro-batch of prepared records (prepare_alpaca.py's
    {"input_ids", "labels"}, labels not shifted), each cut to `max_seq_length` tokens and then packed one after
    another into a single row, and the length of each record's part (`LLaMA.forward`'s `lengths`).

    Packed, not padded to the longest record: a padding position costs as much compute and memory as a token,
    and instruction records vary in length (how much padding there would be: howto/finetune_lora.md#the-flags).
    The model keeps the records apart (each attends only to itself, from position 0), so the logits are those
    of each record on its own."""
    samples = [{key: sample[key][:max_seq_length] for key in ("input_ids", "labels")} for sample in samples]
    input_ids = torch.cat([sample["input_ids"][:-1] for sample in samples])
    targets = torch.cat([sample["labels"][1:] for sample in samples])  # position t predicts token t + 1
    return input_ids[None], targets[None], [len(sample["input_ids"]) - 1 for sample in samples]


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of `logits` (..., vocab_size) against `targets` (...), summed over every target: ask the
    model for logits only where there is one (`LLaMA.forward`'s `logits_at`: `targets != ignore_index`).

    A sum, not a mean: the fine-tuning loops divide by the number of targets in the whole batch, which spans
    micro-batches and devices. Two things make it cheaper than F.cross_entropy over all the logits, with the same
    value and gradient: the output head, a step's largest matrix product at a vocabulary of 32000, only computes
    logits where there is a target (in instruction data the prompt, and padding if any, have none), and, when there
    is a gradient to compute, TokenCrossEntropy keeps one tensor of the logits' size instead of three (hand it logits
    nothing else needs)."""
    return token_cross_entropy(logits, targets).sum()


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of each target (N,), in fp32 (float64 for float64 logits): minus the log-probability the
    logits (..., vocab_size) give it, with `cross_entropy_sum`'s economy of memory. finetune_dpo.py sums it per
    answer."""
    logits, targets = logits.flatten(0, -2), targets.flatten()
    if torch.is_grad_enabled() and logits.requires_grad:
        return TokenCrossEntropy.apply(logits, targets)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(x, targets, reduction="none")  # evaluation: no gradient to keep


class TokenCrossEntropy(torch.autograd.Function):
    """The cross-entropy of each row of logits (N, vocab) against targets (N,), which computes its gradient, softmax
    minus one-hot, already in the forward pass, a chunk of rows at a time, into the logits' own memory.

    F.cross_entropy keeps a log-softmax as large as the logits for the backward pass and allocates two more
    tensors that size in it (the gradients of the log-softmax and of the logits), in fp32 even for bf16 logits.
    Here the logits' memory is the only one: it ends up holding the gradient, in the logits' dtype, and fp32
    temporaries exist for one chunk at a time. The logits are `token_cross_entropy`'s own, needed by nothing else
    (a later use would be caught: the in-place writes advance their version counter)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        losses = torch.empty(logits.size(0), device=logits.device, dtype=dtype)
        chunk_size = max(1, 2**22 // logits.size(1))  # rows per chunk: 16 MB in fp32
        for start in range(0, logits.size(0), chunk_size):
            chunk, target = logits[start : start + chunk_size], targets[start : start + chunk_size]
            x = chunk.to(dtype)  # the chunk itself when the logits are fp32 (or float64), else an fp32 copy of it
            log_z = torch.logsumexp(x, dim=1)
            losses[start : start + chunk_size] = log_z - x.gather(1, target[:, None]).squeeze(1)
            x = x.sub_(log_z[:, None]).exp_()  # softmax
            x[torch.arange(len(target), device=x.device), target] -= 1
            chunk.copy_(x)  # the gradient, where the logits were
        ctx.save_for_backward(logits)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)[:, None]), None  # in place: the graph is backpropagated once
