"""data.py: the Alpaca template, the token ids and label mask of instruction records against sentencepiece called
directly, the prompt a fine-tuned model is asked in, the record checks, and prepared data read back for fine-tuning.
The whole preparation (prepare_alpaca.py, prepare_chat.py, scripts/prepare_dolly.py) is tested in their own files."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from data import (
    encode_prompt,
    find_problem,
    generate_prompt,
    load_prepared_data,
    prepare_instructions,
    tokenize_instructions,
)
from tokenizer import Tokenizer

WITH_INPUT = {"instruction": "Sum up the numbers.", "input": "3, 2, 5", "output": "The sum of the numbers is 10."}
WITHOUT_INPUT = {"instruction": "Calculate 15% of 500.", "input": "", "output": "15% of 500 is 75."}


def test_generate_prompt_is_the_alpaca_template():
    # records 554 and 362 of alpaca_en_demo.json
    assert generate_prompt(WITH_INPUT) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum up the numbers.\n\n### Input:\n3, 2, 5\n\n### Response:"
    )
    expected_without = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nCalculate 15% of 500.\n\n### Response:"
    )
    assert generate_prompt(WITHOUT_INPUT) == expected_without
    # generate scripts may pass no input, or a blank one
    assert generate_prompt({"instruction": "Calculate 15% of 500."}) == expected_without
    assert generate_prompt({"instruction": "Calculate 15% of 500.", "input": " \n"}) == expected_without


def test_labels_are_ignore_index_over_bos_and_prompt_and_the_ids_over_response_and_eos(sentencepiece_dir, sp):
    tokenizer = Tokenizer(sentencepiece_dir)
    record = {"instruction": "Classify this as either an object or an action.", "input": "running", "output": "Action."}
    samples, lengths, truncated, too_long = tokenize_instructions(
        [record], tokenizer, 256, mask_inputs=True, ignore_index=-100
    )
    prompt_ids = [1] + sp.encode(generate_prompt(record))
    response_ids = [9123, 29889]  # "▁Action", "."
    assert samples[0]["input_ids"].tolist() == prompt_ids + response_ids + [2]
    assert samples[0]["labels"].tolist() == [-100] * len(prompt_ids) + response_ids + [2]
    assert samples[0]["input_ids"].dtype == samples[0]["labels"].dtype == torch.long
    assert (lengths, truncated, too_long) == ([len(prompt_ids) + 3], 0, [])
    # generation feeds exactly the prompt ids the model was trained on
    generation_ids = tokenizer.encode(generate_prompt(record), bos=True).tolist()
    assert samples[0]["input_ids"][: len(prompt_ids)].tolist() == generation_ids

    samples, *_ = tokenize_instructions([record], tokenizer, 256, mask_inputs=False, ignore_index=-100)
    assert samples[0]["labels"].tolist() == prompt_ids + response_ids + [2]


def test_prompt_and_response_are_encoded_separately_because_joint_encoding_merges_the_boundary(sentencepiece_dir, sp):
    tokenizer = Tokenizer(sentencepiece_dir)
    record = {"instruction": "Describe a process of making crepes.", "input": "", "output": "Making crepes is easy."}
    prompt = generate_prompt(record)
    joint = sp.encode(prompt + record["output"], out_type=str)
    start = joint.index("▁Response")
    assert joint[start : start + 4] == ["▁Response", ":", "M", "aking"]  # "Making" lost its own token
    samples, *_ = tokenize_instructions([record], tokenizer, 256, mask_inputs=True, ignore_index=-100)
    n_prompt = 1 + len(sp.encode(prompt))
    assert samples[0]["input_ids"][:n_prompt].tolist() == [1] + sp.encode(prompt)
    assert samples[0]["labels"][n_prompt:].tolist() == sp.encode(record["output"]) + [2]
    assert sp.decode(samples[0]["labels"][n_prompt:-1].tolist()) == record["output"]


def test_importing_does_no_work_and_loads_no_cli_or_hub_code():
    """Fine-tuning and generation import data.py, as the prepare scripts do."""
    code = "import sys, data, prepare_alpaca; print(sorted({'jsonargparse', 'huggingface_hub'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout == "[]\n" and result.stderr == ""


def test_encode_prompt_is_bos_and_the_alpaca_prompt_or_one_user_turn_of_the_chat_template(sentencepiece_dir, sp):
    tokenizer = Tokenizer(sentencepiece_dir)
    assert encode_prompt(tokenizer, WITH_INPUT).tolist() == [1] + sp.encode(generate_prompt(WITH_INPUT))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    template += "{% if add_generation_prompt %}<a>{% endif %}"
    expected = sp.encode("<user>Sum up the numbers.\n\n3, 2, 5<a>")  # the input after the instruction; no BOS added
    assert encode_prompt(tokenizer, WITH_INPUT, chat_template=template).tolist() == expected


def test_find_problem_names_what_is_wrong_with_a_record():
    required, optional = ("prompt", "chosen"), ("system",)
    assert find_problem({"prompt": "a", "chosen": "b"}, required, optional) is None
    assert find_problem({"prompt": "a", "chosen": "b", "system": None}, required, optional) is None
    assert find_problem(["a"], required) == "is a JSON list, not an object"
    assert find_problem({"prompt": "a"}, required) == "has no 'chosen'"
    assert find_problem({"prompt": "a", "chosen": None}, required) == "has no 'chosen'"
    assert find_problem({"prompt": 1, "chosen": "b"}, required) == "has a non-text 'prompt' (int)"
    assert find_problem({"prompt": " ", "chosen": "b"}, required) == "has an empty 'prompt'"
    assert (
        find_problem({"prompt": "a", "chosen": "b", "system": 2}, required, optional) == "has a non-text 'system' (int)"
    )


def test_prepared_data_reads_back_as_written_with_its_ignore_index(sentencepiece_dir, tmp_path):
    """What prepare_instructions writes, load_prepared_data returns (after checking the tokenizer and vocabulary)."""
    from conftest import make_checkpoint

    checkpoint_dir = tmp_path / "checkpoint"
    make_checkpoint(checkpoint_dir, num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    records = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(1, 9)
    ]
    (tmp_path / "records.json").write_text(json.dumps(records))
    fields = {"instruction": "instruction", "input": "input", "output": "output"}
    prepare_instructions(
        tmp_path / "data", checkpoint_dir, tmp_path / "records.json", "", "", 0.25, 64, True, -7, 3, False, fields
    )
    data = load_prepared_data(tmp_path / "data", checkpoint_dir)
    for records, name in ((data.train, "train.pt"), (data.val, "test.pt")):
        written = torch.load(tmp_path / "data" / name, weights_only=True)
        assert [r["input_ids"].tolist() for r in records] == [r["input_ids"].tolist() for r in written]
        assert [r["labels"].tolist() for r in records] == [r["labels"].tolist() for r in written]
    assert (len(data.train), len(data.val), data.ignore_index, data.chat_template) == (6, 2, -7, None)
    assert data.metadata == json.loads((tmp_path / "data" / "metadata.json").read_text())
    with pytest.raises(
        ValueError,
        match="train.pt does not hold a list of input_ids/chosen records .*; prepare the data for this script",
    ):
        load_prepared_data(tmp_path / "data", checkpoint_dir, keys=("input_ids", "chosen"))
