"""Reward functions for learning from rewards (GRPO): the built-ins, loading a user's own, scoring a batch of
completions with several and weighing them into one reward per completion.

A reward function has the signature of TRL's GRPOTrainer, so that one function works in both:

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float | None]: ...

`prompts[i]` is the text the model continued (prepare_prompts.py's "prompt", rendered in the chat template),
`completions[i]` its completion (decoded, special tokens left out), and `fields` the records' other fields, one list
each (`answer`: the reference answer, and whatever else the data has), in the order of the completions. It returns one
reward per completion, or None where it has nothing to say about one: that completion is left out of this reward (in
the weighted sum it counts as nothing; where every reward says None, the completion is left out of learning), as TRL
does. Take `**fields` in your function, since it gets every field.

Built-ins, by name (`load_rewards`):

    number_match  1.0 when the last number in the completion equals the last number of the answer (GSM8K's answers
                  end "#### 72"), else 0.0; None without an answer holding a number
    exact_match   1.0 when the completion equals the answer, both stripped of surrounding space, else 0.0; None
                  without an answer
    format        1.0 when the regular expression `format_pattern` matches somewhere in the completion (anchor it
                  with ^ and $ for the whole; inline flags such as (?s) apply), else 0.0

or `path/to/file.py:function` for a function of your own. `score` calls each on a batch and checks what it returns
(one number or None per completion, none NaN or infinite), `combine` weighs them as TRL does: the sum of the weighted
rewards over those not None, NaN (no reward) where all are None.
"""

import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from utils import one_line

RewardFunction = Callable[..., list[Optional[float]]]
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")  # 72, -3, 1,234, 3.50; "1,2,3" is three numbers


def number_match(prompts: list[str], completions: list[str], answer: Optional[list] = None, **fields) -> list:
    """1.0 where the last number in the completion equals the last number in the answer ("... #### 72"; 3.50 equals
    3.5, 1,234 equals 1234), else 0.0; None where the record has no answer or its answer holds no number."""
    rewards = []
    for completion, reference in zip(completions, answer or [None] * len(completions)):
        expected = last_number(str(reference)) if reference is not None else None
        if expected is None:
            rewards.append(None)
        else:
            rewards.append(1.0 if last_number(completion) == expected else 0.0)
    return rewards


def exact_match(prompts: list[str], completions: list[str], answer: Optional[list] = None, **fields) -> list:
    """1.0 where the completion equals the answer, both stripped of surrounding white space, else 0.0; None where the
    record has no answer."""
    answers = answer or [None] * len(completions)
    return [
        None if reference is None else float(completion.strip() == str(reference).strip())
        for completion, reference in zip(completions, answers)
    ]


def format_reward(pattern: str) -> RewardFunction:
    """The reward `format`: 1.0 where `pattern` (a regular expression) matches somewhere in the completion, else 0.0."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--format_pattern {pattern!r} is not a regular expression: {e}") from None

    def format(prompts: list[str], completions: list[str], **fields) -> list:
        return [float(regex.search(completion) is not None) for completion in completions]

    return format


BUILT_IN = {"number_match": number_match, "exact_match": exact_match, "format": None}  # format: format_reward(pattern)


def last_number(text: str) -> Optional[float]:
    """The value of the last number written in `text`, or None when it has none."""
    numbers = NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def load_rewards(names: Sequence[str], format_pattern: Optional[str] = None) -> list[tuple[str, RewardFunction]]:
    """(name, function) of each of `names`: a built-in's name (`format` needs `format_pattern`) or
    "path/to/file.py:function", a function of that Python file (which is run, as an import runs it)."""
    if not names:
        raise ValueError(f"--rewards names no reward; give at least one of {', '.join(BUILT_IN)} or file.py:function")
    if len(set(names)) < len(names):
        raise ValueError(f"--rewards names a reward twice: {', '.join(names)}")
    functions = []
    for name in names:
        if name == "format":
            if not format_pattern:
                raise ValueError("the reward format needs --format_pattern, the regular expression to match")
            functions.append((name, format_reward(format_pattern)))
        elif name in BUILT_IN:
            functions.append((name, BUILT_IN[name]))
        elif ":" in name:
            functions.append((name, load_function(name)))
        else:
            raise ValueError(
                f"--rewards {name} is neither a built-in reward ({', '.join(BUILT_IN)}) nor path/to/file.py:function"
            )
    return functions


def load_function(spec: str) -> RewardFunction:
    """The function `name` of the Python file `path` ("path:name"), loaded as a module of its own."""
    path, _, name = spec.rpartition(":")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the reward file {path} does not exist (--rewards {spec})")
    module_spec = importlib.util.spec_from_file_location(f"reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # any error of the user's file, which would otherwise end in a traceback of ours
        raise ValueError(f"the reward file {path} failed to load: {type(e).__name__}: {one_line(e)}") from None
    function = getattr(module, name, None)
    if function is None:
        defined = [key for key, value in vars(module).items() if callable(value) and not key.startswith("_")]
        raise ValueError(f"{path} has no function {name!r} (it defines: {', '.join(defined) or 'none'})")
    if not callable(function):
        raise ValueError(f"{path}'s {name!r} is a {type(function).__name__}, not a function")
    return function


def score(
    functions: list[tuple[str, RewardFunction]], prompts: list[str], completions: list[str], fields: dict[str, list]
) -> torch.Tensor:
    """The reward of each completion under each function (completions, functions), float64, NaN where a function
    returned None. Each function gets the prompts, the completions and `fields` (one list per field, in the order of
    the completions); one that raises, returns another number of values than completions, or a value that is not a
    finite number or None, stops here with its name and the first such value."""
    rewards = torch.empty(len(completions), len(functions), dtype=torch.float64)
    for j, (name, function) in enumerate(functions):
        try:
            values = function(prompts=prompts, completions=completions, **fields)
        except Exception as e:  # the user's code: its error, named, in one line
            raise ValueError(f"the reward {name} raised {type(e).__name__}: {one_line(e)}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise ValueError(f"the reward {name} returned {got} for {len(completions)} completions; return one each")
        for i, value in enumerate(values):
            rewards[i, j] = check_value(value, name, i)
    return rewards


def check_value(value: Any, name: str, i: int) -> float:
    """A reward as a float (None: NaN), or the error that names the reward and the completion."""
    if value is None:
        return math.nan
    if not isinstance(value, (int, float)) and not (isinstance(value, torch.Tensor) and value.numel() == 1):
        raise ValueError(f"the reward {name} returned {value!r} for completion {i}; return a number or None")
    if not math.isfinite(float(value)):
        raise ValueError(
            f"the reward {name} returned {float(value)} for completion {i}; return a finite number, or None to leave "
            "the completion out of this reward"
        )
    return float(value)


def combine(rewards: torch.Tensor, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """One reward per completion (completions,) from `score`'s (completions, functions): the sum of the rewards
    times their `weights` (1 each when None) over those not NaN, as TRL's nansum; NaN where every one is NaN (no
    reward says anything about the completion: TRL leaves it out of the group's mean and gives it no advantage)."""
    if weights is None:
        weights = [1.0] * rewards.size(1)
    if len(weights) != rewards.size(1):
        raise ValueError(f"--reward_weights has {len(weights)} weights for {rewards.size(1)} rewards; give one each")
    weights = torch.tensor(weights, dtype=rewards.dtype)
    combined = (rewards * weights).nansum(dim=1)
    return combined.masked_fill(rewards.isnan().all(dim=1), math.nan)
