"""tokenizer.py on the real LLaMA / Llama-2 tokenizer (../shared/data/tokenizer.model)."""

import pytest
import torch
from conftest import shared_file

from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(shared_file("tokenizer.model"))


def test_known_ids(tokenizer):
    ids = tokenizer.encode("Hello world")
    assert ids.dtype == torch.long
    assert ids.tolist() == [1, 15043, 3186]  # what every Llama-2 tokenizer gives
    assert tokenizer.encode("Hello world", bos=False, eos=True).tolist() == [15043, 3186, 2]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 32000)


@pytest.mark.parametrize("text", ["Hello world", "naïve café 😀\n\ttabs  and  spaces", " leading space", "3.14159 ≈ π", ""])
def test_round_trip(tokenizer, text):
    # byte fallback: any text, emoji included, decodes back exactly
    assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)) == text


def test_max_length_truncates(tokenizer):
    assert tokenizer.encode("Hello world", eos=True, max_length=2).tolist() == [1, 15043]


def test_encode_batch_equals_encode_without_bos(tokenizer):
    texts = ["Hello world", "Second text, a bit longer.", ""]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t, bos=False).tolist() for t in texts]


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=f"^tokenizer file {tmp_path / 'tokenizer.model'} not found") as exc:
        Tokenizer(tmp_path / "tokenizer.model")
    assert "\n" not in str(exc.value)


def test_file_that_is_not_sentencepiece(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text('{"version": "1.0", "model": {"type": "BPE"}}')  # e.g. a tokenizer.json renamed
    with pytest.raises(ValueError, match=f"^{path} is not a sentencepiece model") as exc:
        Tokenizer(path)
    assert "\n" not in str(exc.value)
