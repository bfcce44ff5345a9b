"""rewards.py: the built-ins on GSM8K-style answers, a user's reward loaded from its file, one-line errors for a missing
file or function and for a reward that raises, returns another number of values, NaN or something else; and the
rewards of several functions, weighted and with None, equal to TRL's GRPOTrainer's for the same functions."""

import math
import re

import pytest
import torch

from conftest import shared_file
from rewards import combine, exact_match, format_reward, last_number, load_rewards, number_match, score


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("So he has 72 apples.", "48 + 24 = 72\n#### 72", 1.0),
        ("The answer is 72.", "#### 71", 0.0),
        ("3 + 4 = 7, so 8", "#### 8", 1.0),  # the last number counts
        ("3 + 4 = 7, so 8 ... no, 7", "#### 8", 0.0),
        ("It costs $1,234.50", "#### 1234.5", 1.0),
        ("minus -3", "#### -3", 1.0),
        ("no number here", "#### 5", 0.0),
        ("5", 5, 1.0),  # a number as the answer itself
        ("5", "no number", None),
        ("5", None, None),
    ],
)
def test_number_match_compares_the_last_numbers(completion, answer, expected):
    assert number_match(prompts=["q"], completions=[completion], answer=[answer]) == [expected]


def test_last_number_exact_match_and_format():
    assert last_number("1,2,3") == 3.0 and last_number("a 1,234 b") == 1234.0 and last_number("none") is None
    assert exact_match(["q"] * 3, [" Paris\n", "paris", "Paris"], answer=["Paris", "Paris", None]) == [1.0, 0.0, None]
    assert number_match(["q"], ["7"]) == [None]  # no answer field at all
    reward = format_reward(r"^<think>.*</think>\s*\d+$")
    completions = ["<think>3 and 4</think> 7", "7", "<think>\nmultiline\n</think>7"]
    assert reward(prompts=["q"] * 3, completions=completions) == [1.0, 0.0, 0.0]  # . is no newline without (?s)
    assert format_reward(r"(?s)^<think>.*</think>\s*\d+$")(["q"], completions[2:]) == [1.0]


def test_a_users_reward_loads_from_its_file_and_builtins_by_name(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def long(prompts, completions, **fields):\n    return [float(len(c) > 3) for c in completions]\n")
    functions = load_rewards(["number_match", f"{path}:long", "format"], format_pattern="7")
    assert [name for name, _ in functions] == ["number_match", f"{path}:long", "format"]
    rewards = score(functions, ["q", "q"], ["7", "eight"], {"answer": ["#### 7", "#### 8"], "id": [1, 2]})
    assert rewards.dtype == torch.float64 and rewards.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


@pytest.mark.parametrize(
    "names, pattern, error, message",
    [
        (["nope.py:f"], None, FileNotFoundError, "the reward file nope.py does not exist (--rewards nope.py:f)"),
        (["{dir}/mine.py:missing"], None, ValueError, "mine.py has no function 'missing' (it defines: long)"),
        (["{dir}/mine.py:CONSTANT"], None, ValueError, "mine.py's 'CONSTANT' is a int, not a function"),
        (["{dir}/broken.py:f"], None, ValueError, "broken.py failed to load: ZeroDivisionError: division by zero"),
        (["format"], None, ValueError, "the reward format needs --format_pattern"),
        (["format"], "(", ValueError, "--format_pattern '(' is not a regular expression: missing )"),
        (["accuracy"], None, ValueError, "--rewards accuracy is neither a built-in reward (number_match, exact_match"),
        (["number_match", "number_match"], None, ValueError, "--rewards names a reward twice"),
        ([], None, ValueError, "--rewards names no reward"),
    ],
    ids=[
        "no file",
        "no function",
        "not a function",
        "file fails",
        "no pattern",
        "bad regex",
        "unknown",
        "twice",
        "none",
    ],
)
def test_a_reward_that_cannot_be_loaded_is_named_in_one_line(tmp_path, names, pattern, error, message):
    (tmp_path / "mine.py").write_text("CONSTANT = 3\n\n\ndef long(prompts, completions, **fields):\n    return []\n")
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    with pytest.raises(error, match=re.escape(message.replace("{dir}", str(tmp_path)))):
        load_rewards([name.replace("{dir}", str(tmp_path)) for name in names], format_pattern=pattern)


@pytest.mark.parametrize(
    "returns, message",
    [
        ("1 / 0", "the reward bad raised ZeroDivisionError: division by zero"),
        ("[1.0]", "the reward bad returned 1 values for 2 completions; return one each"),
        ("3.0", "the reward bad returned a float for 2 completions; return one each"),
        ("[1.0, float('nan')]", "the reward bad returned nan for completion 1; return a finite number, or None"),
        ("[float('inf'), 1.0]", "the reward bad returned inf for completion 0; return a finite number"),
        ("[1.0, 'yes']", "the reward bad returned 'yes' for completion 1; return a number or None"),
    ],
    ids=["raises", "too few", "not a list", "nan", "inf", "text"],
)
def test_a_reward_that_misbehaves_is_named_in_one_line(returns, message):
    namespace = {}
    exec(f"def bad(prompts, completions, **fields):\n    return {returns}\n", namespace)
    with pytest.raises(ValueError, match=re.escape(message)):
        score([("bad", namespace["bad"])], ["q", "q"], ["a", "b"], {})


def test_combine_weighs_and_leaves_out_none_and_refuses_wrong_weights():
    rewards = torch.tensor([[1.0, 0.5], [math.nan, 0.5], [math.nan, math.nan], [0.0, math.nan]], dtype=torch.float64)
    combined = combine(rewards, [2.0, 0.5])
    assert combined[:2].tolist() == [2.25, 0.25] and combined[2].isnan() and combined[3] == 0.0
    assert combine(rewards)[0] == 1.5
    with pytest.raises(ValueError, match=re.escape("--reward_weights has 1 weights for 2 rewards; give one each")):
        combine(rewards, [1.0])


def test_weighted_rewards_with_none_equal_trls(tmp_path):
    """The same functions (number_match, a user's that says None for questions) with weights, in TRL's
    GRPOTrainer with its generation replaced by fixed completions: its rewards per function are ours, and with
    scale_rewards "none" its advantages, reward mean and spread are our combined rewards less their group's mean,
    their mean and spread (the completion no reward scored left out, and its advantage 0)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from finetune_grpo import group_advantages, nanstd

    path = tmp_path / "mine.py"
    path.write_text(
        "def polite(prompts, completions, **fields):\n"
        "    return [None if '?' in c else float('please' in c) for c in completions]\n"
    )
    functions = load_rewards(["number_match", f"{path}:polite"])
    weights = [0.5, 2.0]
    prompts = ["What is 3 + 4?", "Say something."]
    answers = ["#### 7", "none"]
    completions = [["7.", "It is 8.", "please, 7", "Is it 7?"], ["please.", "Hi?", "What?", "ok 2."]]
    tokenizer = AutoTokenizer.from_pretrained(shared_file("llama-3.1/tokenizer.json").parent)
    ids = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id] for g in completions for c in g]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)

    fields = {"answer": [a for a in answers for _ in range(4)]}
    per_function = score(functions, [p for p in prompts for _ in range(4)], texts, fields)
    combined = combine(per_function, weights)
    assert combined.isnan().sum() == 2  # "Hi?" and "What?": no number in the answer, and a question

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
    )
    trainer = GRPOTrainer(
        model=LlamaForCausalLM(config),
        reward_funcs=[fn for _, fn in functions],
        args=GRPOConfig(
            output_dir=str(tmp_path / "trl"),
            report_to="none",
            use_cpu=True,
            per_device_train_batch_size=8,
            num_generations=4,
            scale_rewards="none",
            reward_weights=weights,
        ),
        train_dataset=Dataset.from_list([{"prompt": "a", "answer": "b"}]),
        processing_class=tokenizer,
    )
    trainer._generate_single_turn = lambda prompt_ids, *args, **kwargs: (ids, None)
    inputs = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers) for _ in range(4)]
    torch.set_default_dtype(torch.float64)  # TRL's rewards and nanstd's Bessel factor (4/3) are in the default dtype
    try:
        output = trainer._generate_and_score_completions(inputs)
    finally:
        torch.set_default_dtype(torch.float32)
    for j, (_, function) in enumerate(functions):
        expected = torch.tensor(trainer._logs["rewards"][function.__name__], dtype=torch.float64)
        torch.testing.assert_close(per_function[:, j], expected, rtol=0, atol=0, equal_nan=True)
    advantages, _ = group_advantages(combined, 4, "none")
    torch.testing.assert_close(advantages, output["advantages"], rtol=0, atol=1e-15)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert metrics["reward"] == pytest.approx(torch.nanmean(combined).item(), rel=1e-12)
    assert metrics["reward_std"] == pytest.approx(nanstd(combined).item(), rel=1e-12)
