"""decode.py: the one decoding loop, against recomputing every position, against transformers' generate (one prompt
and batches of prompts of different lengths), its stops, and sampling.

Parity of greedy decoding with transformers' generate per model config is in tests/test_model.py; with LoRA unmerged
against PEFT in tests/test_generate_lora.py; chat.py's kept cache in tests/test_chat.py."""

import pytest
import torch

from conftest import make_checkpoint
from decode import Completion, compile_step, decode_all, draw, generate, nucleus, sample, stream
from model import Config, LLaMA
from tokenizer import Tokenizer
from utils import load_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Config(
        block_size=64, vocab_size=100, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=86
    )
    return LLaMA(config).eval()


def decode_without_cache(model, idx, max_new_tokens, temperature, top_k):
    """The reference: recompute the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx.view(1, -1))[:, -1]
            idx = torch.cat([idx, sample(logits, temperature, top_k)])
    return idx


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (0.8, 20), (1.0, None)])
def test_cached_decoding_equals_full_recomputation(model, temperature, top_k):
    prompt = torch.tensor([1, 5, 7, 11, 13])
    torch.manual_seed(42)
    expected = decode_without_cache(model, prompt, 24, temperature, top_k)
    torch.manual_seed(42)
    assert generate(model, prompt, 24, temperature=temperature, top_k=top_k).tolist() == expected.tolist()
    assert all(block.attn.kv_cache is None for block in model.blocks)  # freed for the caller


def test_decoding_under_autocast_with_fp32_weights(model):
    """As finetune_full.py's bf16-mixed samples an answer: fp32 weights and caches, bf16 activations."""
    prompt = torch.tensor([1, 5, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = generate(model, prompt, max_new_tokens=4, temperature=0.0)
        expected = decode_without_cache(model, prompt, max_new_tokens=4, temperature=0.0, top_k=None)
    assert tokens.tolist() == expected.tolist()


def test_stops_after_any_stop_id(model):
    prompt = torch.tensor([1, 5, 7])
    greedy = generate(model, prompt, 20, temperature=0.0).tolist()
    stop_ids = (greedy[3 + 9], greedy[3 + 5])  # pretend the 10th and the 6th new tokens are EOS and end of turn
    stop = min(greedy.index(i, 3) for i in stop_ids)
    assert generate(model, prompt, 20, temperature=0.0, stop_ids=stop_ids).tolist() == greedy[: stop + 1]


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match=r"1-D tensor, not of shape \(1, 3\)"):
        generate(model, torch.tensor([[1, 2, 3]]), 5)
    with pytest.raises(ValueError, match=r"exceeds the model's block_size 64"):
        generate(model, torch.ones(60, dtype=torch.long), 5)
    with pytest.raises(ValueError, match=r"max_new_tokens must be at least 1"):
        generate(model, torch.tensor([1, 2, 3]), 0)
    with pytest.raises(ValueError, match=r"at least one token"):
        decode_all(model, [Completion([], 3)])


def test_rows_of_different_lengths_decode_as_each_alone(model):
    """Right-padded prefill, then every row at its own position: each row's tokens are those it gets alone, also
    when rows end at different steps (max_new_tokens, a stop id)."""
    prompts = [[1, 5, 7, 11, 13, 17, 19], [2], [3, 4, 5], [8, 9, 10, 11]]
    alone = [generate(model, torch.tensor(p), 12, temperature=0.0)[len(p) :].tolist() for p in prompts]
    completions = [Completion(p, n) for p, n in zip(prompts, (12, 5, 12, 9))]
    completions[2].stop_ids = (alone[2][6],)
    decode_all(model, completions)
    assert completions[0].tokens == alone[0] and completions[0].finish_reason == "length"
    assert completions[1].tokens == alone[1][:5]
    assert completions[2].tokens == alone[2][: alone[2].index(alone[2][6]) + 1]
    assert completions[2].finish_reason == "stop"
    assert completions[3].tokens == alone[3][:9]


def test_batched_greedy_ids_equal_transformers(tmp_path):
    """Prompts of 3 to 17 tokens decoded together (no left padding), each row equal to transformers' generate."""
    hf = make_checkpoint(tmp_path, num_attention_heads=8, num_key_value_heads=2)
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    ours = load_model(tmp_path).eval()
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=generator) for n in (17, 3, 9, 12)]
    completions = decode_all(ours, [Completion(p.tolist(), 16) for p in prompts])
    for prompt, completion in zip(prompts, completions):
        expected = hf.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=16)
        assert completion.tokens == expected[0, len(prompt) :].tolist()


def test_stop_strings_end_a_row_and_cut_its_text(tmp_path):
    """A stop string is looked for in the new text only (also when it spans tokens), the text is cut before it, and
    the text is the tokenizer's decoding of the tokens."""
    make_checkpoint(tmp_path)
    model, tokenizer = load_model(tmp_path).eval(), Tokenizer(tmp_path)
    prompt = tokenizer.encode("Hello").tolist()
    free = decode_all(model, [Completion(prompt, 24, detokenize=tokenizer.decode)])[0]
    assert free.text == tokenizer.decode(free.tokens)
    cut = len(free.text) * 2 // 3
    stop = free.text[cut : cut + 3]
    assert len(stop) == 3 and stop not in free.text[: cut + 2]
    stopped = decode_all(model, [Completion(prompt, 24, stop_strings=[stop], detokenize=tokenizer.decode)])[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:cut]
    assert stopped.tokens == free.tokens[: len(stopped.tokens)] and len(stopped.tokens) < len(free.tokens)


def test_sampling_is_reproducible_from_the_seed_and_streams_every_token(model):
    prompts = [[1, 5, 7], [2, 3], [1, 5, 7]]

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        completions = [Completion(p, 10, temperature=1.0, top_p=0.9, generator=generator) for p in prompts]
        streamed = [[] for _ in prompts]
        for row, token in stream(model, completions):
            streamed[row].append(token)
        assert streamed == [c.tokens for c in completions]
        return streamed

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sample_follows_softmax_of_the_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    assert sample(logits, 0.0).tolist() == [4]
    torch.manual_seed(0)
    draws = sample(logits.expand(4000, -1), 0.5, 2)
    # only ids 4 and 0 are among the top 2; p(4) = e^(3/0.5) / (e^(3/0.5) + e^(2/0.5)) = 1 / (1 + e^-2)
    assert set(draws.tolist()) == {0, 4}
    assert abs((draws == 4).float().mean().item() - 1 / (1 + torch.e**-2)) < 0.02
    probs = torch.softmax(logits[0], -1)
    frequencies = torch.bincount(sample(logits.expand(4000, -1), 1.0), minlength=5).float() / 4000
    assert (frequencies - probs).abs().max() < 0.02
    # top_p 0.8: ids 4 (0.61) and 0 (0.22) add up past it, so only they stay, renormalised
    frequencies = torch.bincount(sample(logits.expand(4000, -1), 1.0, top_p=0.8), minlength=5).float() / 4000
    kept = torch.zeros(5)
    kept[[4, 0]] = probs[[4, 0]] / probs[[4, 0]].sum()
    assert (frequencies - kept).abs().max() < 0.02


def test_nucleus_keeps_what_a_sort_of_the_whole_vocabulary_keeps():
    """decode.nucleus takes the k most likely first and more only for the rows whose nucleus lies beyond them: the
    tokens kept are those of the plain definition (sort everything, keep each token whose more likely predecessors add
    up to less than top_p), in one batch of peaked rows (found among the first k) and flat ones (k grown eightfold,
    up to the whole row)."""
    torch.manual_seed(0)
    scales = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.3])[:, None]  # from one dominant token to nearly uniform
    probs = torch.softmax(torch.randn(5, 5000) * scales, dim=-1)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        expected = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
        assert torch.equal(nucleus(probs, top_p, k=16), expected)
    assert 16 < (nucleus(probs[3:4], 0.9, k=16) > 0).sum() < 5000  # grown past 16, short of the whole row


def test_draw_finds_the_block_then_the_index_with_the_probabilities_given():
    """decode.draw's two-step lookup (the block of 256 indices, then the index in it) over rows of 1000 (the last block
    padded), unnormalised, the mass at the blocks' edges: 20,000 draws follow the probabilities, and an index without
    probability is never drawn; the same generator seed, the same draws."""
    probs = torch.zeros(1000)
    probs[[0, 255, 256, 511, 700, 999]] = torch.tensor([0.1, 0.2, 0.15, 0.05, 0.3, 0.2])
    draws = draw(3 * probs.expand(20_000, -1), torch.Generator().manual_seed(0))[:, 0]
    assert set(draws.tolist()) == {0, 255, 256, 511, 700, 999}
    assert (torch.bincount(draws, minlength=1000) / 20_000 - probs).abs().max() < 0.015
    assert torch.equal(draw(3 * probs.expand(20_000, -1), torch.Generator().manual_seed(0))[:, 0], draws)


def test_a_compiled_step_gives_the_eager_tokens_with_one_graph(model):
    """decode.compile_step (generate.py --compile): prompts of other lengths reuse the graph (the cache's length is
    rounded up to a multiple of 64), and the tokens are the eager ones."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = compile_step(model)
    for prompt in ([1, 5, 7], [2, 3, 4, 5, 6, 7, 8]):
        eager = generate(model, torch.tensor(prompt), 10, temperature=0.0)
        assert generate(model, torch.tensor(prompt), 10, temperature=0.0, step_model=step).tolist() == eager.tolist()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_rows_sharing_a_prompt_decode_as_each_alone(model):
    """GRPO's groups: a prompt several rows share is prefilled once and its cache row copied; each row still gets
    the tokens it gets alone (greedy), and sampled rows of one prompt differ."""
    prompts = [[1, 5, 7], [2, 3, 4, 9, 9], [1, 5, 7], [2, 3, 4, 9, 9], [1, 5, 7]]
    alone = {tuple(p): generate(model, torch.tensor(p), 8, temperature=0.0)[len(p) :].tolist() for p in prompts}
    completions = decode_all(model, [Completion(p, 8) for p in prompts])
    assert [c.tokens for c in completions] == [alone[tuple(p)] for p in prompts]
    generator = torch.Generator().manual_seed(0)
    sampled = decode_all(model, [Completion([1, 5, 7], 8, 1.0, generator=generator) for _ in range(4)])
    assert len({tuple(c.tokens) for c in sampled}) > 1
