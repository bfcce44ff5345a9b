"""A real modern model end to end: SmolLM2-135M-Instruct (Llama architecture, grouped-query attention, tied embeddings,
rope base 100000, a tokenizer.json and a chat template), converted by scripts/convert_hf_checkpoint.py and compared
with transformers' LlamaForCausalLM on the same Hub-format directory (tests/conftest.py's smollm2_dir), in fp32."""

from dataclasses import replace

import pytest
import torch

from convert_hf_checkpoint import convert_hf_checkpoint
from decode import generate
from model import Config
from tokenizer import Tokenizer
from utils import load_model

IM_END = 2  # <|im_end|>: the end of each chat turn, SmolLM2-Instruct's EOS

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in a few sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def models(smollm2_dir):
    """(ours, transformers', transformers' tokenizer), all from the one directory."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    convert_hf_checkpoint(smollm2_dir)
    ours = load_model(smollm2_dir).eval()
    hf = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return ours, hf, AutoTokenizer.from_pretrained(smollm2_dir)


def chat_prompt(tokenizer, question: str) -> torch.Tensor:
    """The prompt's token ids, (T,), as the chat template makes them, ending with the assistant's turn opened."""
    return torch.tensor(
        tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)["input_ids"]
    )


def test_converted_config_is_the_preset(models):
    ours, _, _ = models
    # the GGUF file holds rms_norm_eps as a float32, 9.999999747e-06
    assert ours.config.norm_eps == pytest.approx(1e-5)
    assert replace(ours.config, norm_eps=1e-5) == Config.from_name("SmolLM2-135M")


def test_logits_match_transformers(models):
    ours, hf, tokenizer = models
    for question in QUESTIONS:
        idx = chat_prompt(tokenizer, question)[None]  # (1, T)
        with torch.no_grad():
            expected = hf(idx).logits
            actual = ours(idx)
        assert actual.shape == expected.shape == (1, idx.size(1), 49152)
        assert (actual - expected).abs().max() <= 1e-4, question


@pytest.mark.parametrize("question", QUESTIONS)
def test_greedy_chat_answers_match_transformers(models, question):
    """64 new tokens at most, stopping after <|im_end|>: the same ids as transformers' greedy generate."""
    ours, hf, tokenizer = models
    idx = chat_prompt(tokenizer, question)
    expected = hf.generate(
        idx[None],
        attention_mask=torch.ones_like(idx[None]),
        max_new_tokens=64,
        do_sample=False,
        eos_token_id=IM_END,
        pad_token_id=IM_END,
    )[0]
    assert generate(ours, idx, 64, temperature=0.0, stop_ids=[IM_END]).tolist() == expected.tolist()


def test_our_tokenizer_gives_the_chat_prompt_ids_and_stops_at_im_end(models, smollm2_dir):
    """tokenizer.py on the converted directory: the rendered chat text encodes to transformers' ids, <|im_end|> is a
    stop id (tokenizer_config.json's EOS), and the greedy answer ends there."""
    ours, _, hf_tokenizer = models
    tokenizer = Tokenizer(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    idx = tokenizer.encode(text)
    assert idx.tolist() == chat_prompt(hf_tokenizer, messages[0]["content"]).tolist()
    assert IM_END in tokenizer.stop_ids
    answer = generate(ours, idx, 64, temperature=0.0, stop_ids=tokenizer.stop_ids)[len(idx) :].tolist()
    assert answer[-1] == IM_END
    assert tokenizer.decode(answer[:-1]) == "The capital of France is Paris."
