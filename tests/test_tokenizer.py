"""tokenizer.py on real tokenizers: the LLaMA / Llama-2 sentencepiece model (../shared/data/tokenizer.model), and the
tokenizer.json of Llama 3, Llama 3.1 (../shared/data/llama-3*/) and SmolLM2, against transformers' AutoTokenizer."""

import json
import shutil

import pytest
import torch

from conftest import SHARED_DATA, shared_file
from tokenizer import CHAT_TEMPLATES, Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(shared_file("tokenizer.model").parent)


def test_known_ids(tokenizer):
    ids = tokenizer.encode("Hello world")
    assert ids.dtype == torch.long
    assert ids.tolist() == [1, 15043, 3186]  # what every Llama-2 tokenizer gives
    assert tokenizer.encode("Hello world", bos=False, eos=True).tolist() == [15043, 3186, 2]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size, tokenizer.stop_ids) == (1, 2, 32000, (2,))
    assert tokenizer.add_bos and tokenizer.chat_template is None


@pytest.mark.parametrize(
    "text", ["Hello world", "naïve café 😀\n\ttabs  and  spaces", " leading space", "3.14159 ≈ π", ""]
)
def test_round_trip(tokenizer, text):
    # byte fallback: any text, emoji included, decodes back exactly
    assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)) == text


def test_max_length_truncates(tokenizer):
    assert tokenizer.encode("Hello world", eos=True, max_length=2).tolist() == [1, 15043]


def test_encode_batch_equals_encode_without_bos(tokenizer):
    texts = ["Hello world", "Second text, a bit longer.", ""]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t, bos=False).tolist() for t in texts]


def test_add_bos_token_false_in_the_config(tmp_path):
    shutil.copy(shared_file("tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": "</s>"}))
    assert Tokenizer(tmp_path).encode("Hello world").tolist() == [15043, 3186]


def test_directory_without_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path} has no tokenizer.model or tokenizer.json") as exc:
        Tokenizer(tmp_path)
    assert "\n" not in str(exc.value)


def test_file_that_is_not_sentencepiece(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text('{"version": "1.0", "model": {"type": "BPE"}}')  # e.g. a tokenizer.json renamed
    with pytest.raises(ValueError, match=f"^{path} is not a sentencepiece model") as exc:
        Tokenizer(tmp_path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "damage", [lambda b: b[: len(b) // 2], lambda b: b'{"version": "1.0", "model": {"type": "Nope"}}']
)
def test_corrupt_tokenizer_json(tmp_path, damage):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(damage(llama_dir("llama-3.1").joinpath("tokenizer.json").read_bytes()))
    with pytest.raises(ValueError, match=f"^{path} is not a Hugging Face tokenizer .*; download it again$"):
        Tokenizer(tmp_path)


def test_corrupt_tokenizer_config(tmp_path):
    shutil.copy(llama_dir("llama-3.1") / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(ValueError, match=f"^{tmp_path / 'tokenizer_config.json'} is not valid JSON"):
        Tokenizer(tmp_path)


# unicode, emoji, code, runs of spaces and newlines, digits, and special-token strings inside ordinary text
TEXTS = [
    "Hello world",
    "naïve café, Ærøskøbing, 日本語のテキスト, Привет мир, مرحبا",
    "emoji 😀👍🏽 and 🇫🇷 flags",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n\tindented\r\n",
    "runs    of     spaces   and\n\n\n\nnewlines  \n  ",
    "digits 1234567890 3.14159 1,000,000 2024-06-01",
    "say <|eot_id|> now, then <|begin_of_text|>again<|end_of_text|> and <|im_end|><|im_start|>user",
    " leading space",
    "",
]


def llama_dir(name: str):
    return shared_file(f"{name}/tokenizer.json").parent


@pytest.fixture(scope="module", params=["llama-3", "llama-3.1", "SmolLM2"])
def hf_dir(request):
    return llama_dir(request.param) if request.param != "SmolLM2" else request.getfixturevalue("smollm2_dir")


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers(hf_dir, text):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer = Tokenizer(hf_dir)
    assert tokenizer.encode(text).tolist() == reference(text)["input_ids"]
    assert tokenizer.encode_batch([text, text[::-1]]) == [
        reference(t, add_special_tokens=False)["input_ids"] for t in (text, text[::-1])
    ]
    ids = tokenizer.encode(text, bos=False)
    assert tokenizer.decode(ids) == text  # byte-level BPE: every text decodes back exactly
    assert tokenizer.decode(ids) == reference.decode(ids.tolist(), clean_up_tokenization_spaces=False)


@pytest.mark.parametrize(
    "name, bos, eos, add_bos",
    [
        ("llama-3", 128000, 128001, False),  # the first Llama 3 release: tokenizer.json adds no <|begin_of_text|>
        ("llama-3.1", 128000, 128009, True),
    ],
)
def test_llama3_special_ids(name, bos, eos, add_bos):
    from transformers import AutoTokenizer

    tokenizer, reference = Tokenizer(llama_dir(name)), AutoTokenizer.from_pretrained(llama_dir(name))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos, tokenizer.stop_ids) == (bos, eos, add_bos, (eos,))
    assert (reference.bos_token_id, reference.eos_token_id) == (bos, eos)
    assert tokenizer.vocab_size == len(reference) == 128256
    assert (
        tokenizer.chat_template == json.loads((llama_dir(name) / "tokenizer_config.json").read_text())["chat_template"]
    )
    assert tokenizer.encode("Hi", bos=True, eos=True).tolist() == [128000, 13347, eos]


def test_smollm2_special_ids(smollm2_dir):
    tokenizer = Tokenizer(smollm2_dir)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos, tokenizer.stop_ids) == (1, 2, False, (2,))
    assert tokenizer.decode([tokenizer.eos_id]) == "<|im_end|>"
    assert tokenizer.chat_template == (smollm2_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in tokenizer.chat_template


@pytest.mark.parametrize(
    "eos_token_id, stop_ids", [(128001, (128009, 128001)), ([128001, 128008, 128009], (128009, 128001, 128008))]
)
def test_stop_ids_from_generation_config(tmp_path, eos_token_id, stop_ids):
    """Llama 3.1 Instruct's generation_config.json lists <|end_of_text|>, <|eom_id|> and <|eot_id|>; an int is one
    id."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir("llama-3.1") / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": eos_token_id}))
    assert Tokenizer(tmp_path).stop_ids == stop_ids


def test_tokenizer_json_without_config_takes_eos_from_generation_config(tmp_path):
    shutil.copy(llama_dir("llama-3.1") / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    tokenizer = Tokenizer(tmp_path)
    assert (tokenizer.eos_id, tokenizer.stop_ids) == (128001, (128001, 128009))
    assert tokenizer.encode("Hi").tolist() == [128000, 13347]  # the post-processor's BOS, as transformers
    (tmp_path / "generation_config.json").unlink()
    with pytest.raises(ValueError, match=f"^{tmp_path} names no EOS token; add eos_token to its tokenizer_config.json"):
        Tokenizer(tmp_path)


def test_tokenizer_json_wins_over_tokenizer_model(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir("llama-3.1") / name, tmp_path / name)
    shutil.copy(SHARED_DATA / "tokenizer.model", tmp_path / "tokenizer.model")
    assert Tokenizer(tmp_path).path == tmp_path / "tokenizer.json"


# Chat templates: text and ids against transformers' apply_chat_template, for the templates the checkpoints ship and the
# built-in ones
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"}],
    "one turn, system": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
    "several turns, system": [
        SYSTEM,
        {"role": "user", "content": "Hi! Name a colour."},
        {"role": "assistant", "content": "  Blue.  "},
        {"role": "user", "content": "And a naïve fruit? 🍎"},
        {"role": "assistant", "content": "An apple."},
        {"role": "user", "content": "Thanks"},
    ],
    "several turns": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Say {{ nothing }}"},
    ],
}


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("case", ["llama-3", "llama-3.1", "llama-3.1 + llama-2", "smollm2", "llama-3.1 + chatml"])
def test_apply_chat_template_equals_transformers(request, case, conversation, add_generation_prompt):
    from transformers import AutoTokenizer

    directory, _, builtin = case.partition(" + ")
    if directory == "smollm2":
        directory = request.getfixturevalue("smollm2_dir")
    else:
        directory = shared_file(f"{directory}/tokenizer.json").parent
    messages = CONVERSATIONS[conversation]
    ours, reference = Tokenizer(directory), AutoTokenizer.from_pretrained(directory)
    template = CHAT_TEMPLATES[builtin] if builtin else None
    text = ours.apply_chat_template(messages, add_generation_prompt, template=builtin or None)
    expected = reference.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, chat_template=template, tokenize=False
    )
    assert text == expected
    expected_ids = reference.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, chat_template=template, tokenize=True, return_dict=False
    )
    assert ours.encode(text, bos=False).tolist() == list(expected_ids)


def test_apply_chat_template_errors(tmp_path):
    directory = shared_file("llama-3.1/tokenizer.json").parent
    tokenizer = Tokenizer(directory)
    alternating = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="the chat template failed: Conversation roles must alternate"):
        tokenizer.apply_chat_template(alternating, template="llama-2")
    with pytest.raises(ValueError, match=r"not valid Jinja \(line 1"):
        tokenizer.apply_chat_template(alternating, template="{% for %}")
    shutil.copy(shared_file("tokenizer.model"), tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="has no chat template .*choose one of llama-3, llama-2, chatml, alpaca"):
        Tokenizer(tmp_path).apply_chat_template(alternating)
