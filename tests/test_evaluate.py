"""evaluate.py against references nobody here wrote, on the real SmolLM2-135M-Instruct (conftest's smollm2_dir):
lm-eval's own transformers backend (HFLM) on the same weights for each kind of request lm-eval makes, also with a
LoRA adapter (HFLM with the PEFT adapter scripts/export_peft.py writes); transformers' sliding-window perplexity; the
masked loss transformers computes on prepared records; and bad input, which stops with one line and writes nothing.

The tasks are YAMLs over a few local JSONL documents written here (lm-eval's `json` dataset builder, no Hub), each
with its metrics spelled out: multiple choice (loglikelihood requests), rolling loglikelihood (perplexity of texts
from ../shared/data's Alpaca outputs, in windows of max_length 64 so that texts span several windows), and
generation with stop sequences and exact match, few-shot, its prompts cut from the left to fit."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_adapter, make_llama_adapter, shared_file
from evaluate import main as evaluate

MAX_LENGTH = 64  # both backends: rolling texts span several windows, generation prompts are cut to 64 - 8 tokens
LIMIT = 3  # documents per task
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many legs does a spider have?", ["six", "four", "ten", "eight"], 3),
    ("What do bees make?", ["milk", "silk", "honey", "wool"], 2),
    ("Which planet is known as the Red Planet?", ["Venus", "Mars", "Jupiter", "Saturn"], 1),
    ("What is frozen water called?", ["steam", "ice", "fog"], 1),
    ("Which animal is the largest mammal on Earth?", ["the African elephant", "the blue whale", "the giraffe"], 1),
]
ANSWERS = [
    ("What is the capital of Italy?", "Rome"),
    ("What is 2 + 3?", "5"),
    ("What color is the sky on a clear day?", "Blue"),
    ("What is the opposite of hot?", "Cold"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
]
TASKS = {
    "demo_choice": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "demo_text": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
    "demo_answer": """output_type: generate_until
fewshot_split: test
num_fewshot: 4
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: " {{answer}}"
generation_kwargs: {until: ["\\n", "Question:"], do_sample: false, max_gen_toks: 8}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}
""",
}


@pytest.fixture(scope="module")
def smollm2(smollm2_dir) -> Path:
    """The SmolLM2 directory with our conversion beside the Hub files (test_smollm2.py may have made it already)."""
    from convert_hf_checkpoint import convert_hf_checkpoint

    if not (smollm2_dir / "lit_model.safetensors").is_file():
        convert_hf_checkpoint(smollm2_dir)
    return smollm2_dir


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """The three task YAMLs and their JSONL documents."""
    folder = tmp_path_factory.mktemp("tasks")
    records = json.loads(shared_file("alpaca_en_demo.json").read_text())
    documents = {
        "demo_choice": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
        "demo_text": [{"text": records[i]["output"]} for i in (3, 4, 13)],  # 37, 80, 84 tokens
        "demo_answer": [{"question": q, "answer": a} for q, a in ANSWERS],
    }
    for name, config in TASKS.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents[name]))
        data = f"dataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\n{data}test_split: test\n{config}")
    return folder


def hflm_results(tasks_dir: Path, tasks: list[str], apply_chat_template: bool = False, **hflm_settings) -> dict:
    """lm-eval's own transformers backend on the same tasks (its per-request answers in results["samples"])."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(device="cpu", dtype="float32", batch_size=4, max_length=MAX_LENGTH, **hflm_settings)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=LIMIT,
        log_samples=True,
        apply_chat_template=apply_chat_template,
    )


@pytest.fixture(scope="module")
def reference(smollm2, tasks_dir) -> dict:
    """HFLM's results on the three tasks, with the base model."""
    return hflm_results(tasks_dir, list(TASKS), pretrained=str(smollm2))


def our_results(out_dir: Path, tasks: list[str]) -> tuple[dict, dict[str, list]]:
    """results.json and the samples_<task>.jsonl that evaluate.py wrote."""
    results = json.loads((out_dir / "results.json").read_text())
    samples = {t: [json.loads(line) for line in (out_dir / f"samples_{t}.jsonl").open()] for t in tasks}
    return results, samples


def assert_same_answers(ours: list[dict], reference: list[dict], tolerance: float = 1e-4) -> None:
    """Per document and request: log-likelihoods within `tolerance` (a rolling text's sum over hundreds of tokens:
    1e-6 relative, fp32's precision), the same is_greedy, the same generated text."""
    assert [sample["doc_id"] for sample in ours] == [sample["doc_id"] for sample in reference]
    for our_sample, sample in zip(ours, reference):
        for (answer,), (expected,) in zip(our_sample["resps"], sample["resps"], strict=True):
            if isinstance(expected, tuple):  # loglikelihood: (log-likelihood, is_greedy)
                assert answer[0] == pytest.approx(expected[0], abs=tolerance) and answer[1] == expected[1]
            elif isinstance(expected, float):  # loglikelihood_rolling
                assert answer == pytest.approx(expected, abs=tolerance, rel=1e-6)
            else:  # generate_until
                assert answer == expected


def assert_same_metrics(ours: dict, reference: dict, tasks: list[str]) -> None:
    """Every metric and standard error of `tasks`; those computed from log-likelihoods to 1e-6 relative."""
    for task in tasks:
        metrics = reference["results"][task]
        assert ours["results"][task].keys() == metrics.keys()
        for key, value in metrics.items():
            if isinstance(value, float):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-6), (task, key)
            else:
                assert ours["results"][task][key] == value, (task, key)


def test_every_request_type_matches_lm_evals_transformers_backend(smollm2, tasks_dir, reference, tmp_path, capsys):
    """Multiple choice (shared question, continuations from the KV cache), rolling windows, few-shot generation with
    stop sequences: per-request answers and every metric equal HFLM's, at the same max_length and batch size."""
    tasks = list(TASKS)
    evaluate(
        checkpoint_dir=smollm2,
        tasks=",".join(tasks),
        include_path=tasks_dir,
        limit=LIMIT,
        batch_size=4,
        max_length=MAX_LENGTH,
        log_samples=True,
        out_dir=tmp_path,
    )
    table = capsys.readouterr().out
    results, samples = our_results(tmp_path, tasks)
    for task in tasks:
        assert_same_answers(samples[task], reference["samples"][task])
    assert_same_metrics(results, reference, tasks)
    # the answers are worth comparing: the model picks some right choices, and generates a right answer
    assert 0 < results["results"]["demo_choice"]["acc,none"] < 1
    assert results["results"]["demo_answer"]["exact_match,none"] > 0
    # lm-eval's markdown table: task, metric, value, standard error
    assert "|demo_choice|" in table.replace(" ", "") and "acc_norm" in table and "±" in table


def test_chat_template_prompts_match_lm_evals_transformers_backend(smollm2, tasks_dir, tmp_path):
    """--apply_chat_template: the few-shot examples as turns of SmolLM2's chat template, rendered by tokenizer.py (by
    transformers' tokenizer in HFLM), greedy answers until the end of the turn: the same text."""
    evaluate(
        checkpoint_dir=smollm2,
        tasks="demo_answer",
        include_path=tasks_dir,
        limit=LIMIT,
        batch_size=4,
        max_length=MAX_LENGTH,
        apply_chat_template=True,
        log_samples=True,
        out_dir=tmp_path,
    )
    results, samples = our_results(tmp_path, ["demo_answer"])
    reference = hflm_results(tasks_dir, ["demo_answer"], apply_chat_template=True, pretrained=str(smollm2))
    assert_same_answers(samples["demo_answer"], reference["samples"]["demo_answer"])
    assert_same_metrics(results, reference, ["demo_answer"])
    assert samples["demo_answer"][0]["arguments"][0][0].startswith("<|im_start|>")


@pytest.mark.parametrize(
    "settings, tolerance",
    [
        (
            dict(targets=("all_linear",), rslora=True, ranks={"blocks.0.attn.q_proj": 4, "blocks.5.mlp.down_proj": 2}),
            1e-4,
        ),
        # make_adapter draws DoRA magnitudes up to 1.5x the rows' norms, which moves SmolLM2's logits by tens; fp32
        # rounding then leaves ours and PEFT's apart by as much as each is from an fp64 computation (4e-4 in the
        # logits with DoRA on every projection)
        (dict(targets=("query", "value"), dora=True), 1e-3),
    ],
    ids=["rslora_ranks", "dora"],
)
def test_an_adapter_matches_hflm_with_the_exported_peft_adapter(
    smollm2, tasks_dir, reference, tmp_path, settings, tolerance
):
    """An adapter, applied unmerged by default (and merged with --merge): its answers equal HFLM's with peft= the
    directory scripts/export_peft.py writes from it."""
    from export_peft import export_peft

    adapter = tmp_path / "adapter.safetensors"
    make_adapter(smollm2, adapter, 8, 16, seed=3, scale=0.02, **settings)
    export_peft(lora_path=adapter, out_dir=tmp_path / "peft")
    expected = hflm_results(tasks_dir, ["demo_choice"], pretrained=str(smollm2), peft=str(tmp_path / "peft"))
    for merge in (False, True) if "rslora" in settings else (False,):
        out_dir = tmp_path / f"merge_{merge}"
        choices_match(expected, reference, smollm2, tasks_dir, out_dir, tolerance, lora_path=adapter, merge=merge)


def test_a_llama_adapter_matches_hflm_with_peft_s_adaption_prompt(smollm2, tasks_dir, reference, tmp_path):
    """--adapter_path: a LLaMA-Adapter v1 (prompts in the top layers, unmerged) answers as HFLM with peft= the
    adaption-prompt directory scripts/export_peft.py writes from it."""
    from export_peft import export_peft

    adapter = tmp_path / "adapter.safetensors"
    make_llama_adapter(smollm2, adapter, seed=2, version=1, adapter_len=4, adapter_layers=4)
    export_peft(adapter_path=adapter, out_dir=tmp_path / "peft")
    expected = hflm_results(tasks_dir, ["demo_choice"], pretrained=str(smollm2), peft=str(tmp_path / "peft"))
    choices_match(expected, reference, smollm2, tasks_dir, tmp_path, adapter_path=adapter)


def choices_match(
    expected: dict, reference: dict, smollm2: Path, tasks_dir: Path, out_dir: Path, tolerance=1e-4, **adapter
) -> None:
    """evaluate.py on demo_choice with `adapter` (its flags) answers as `expected` (HFLM with the adapter in PEFT),
    and not as the base model does (`reference`): this is not a comparison of two base models."""
    evaluate(
        checkpoint_dir=smollm2,
        tasks="demo_choice",
        include_path=tasks_dir,
        limit=LIMIT,
        batch_size=4,
        max_length=MAX_LENGTH,
        log_samples=True,
        out_dir=out_dir,
        **adapter,
    )
    results, samples = our_results(out_dir, ["demo_choice"])
    assert_same_answers(samples["demo_choice"], expected["samples"]["demo_choice"], tolerance)
    assert_same_metrics(results, expected, ["demo_choice"])
    ours, base = samples["demo_choice"][0]["resps"], reference["samples"]["demo_choice"][0]["resps"]
    assert max(abs(a[0][0] - b[0][0]) for a, b in zip(ours, base)) > 0.1


def test_a_llama_adapter_v2_scores_the_same_merged(checkpoint_dir, tasks_dir, tmp_path):
    """--adapter_path with a v2 adapter (bias, scale and norms on every projection, no prompts), unmerged and with
    --merge (folded into a checkpoint with biases, adapter.merge_adapter_v2): the same log-likelihoods and corpus
    perplexity, which differ from the base model's. A v1 adapter's prompts cannot merge: one line."""
    adapter = tmp_path / "v2.safetensors"
    make_llama_adapter(checkpoint_dir, adapter, seed=3, version=2, adapter_layers=0)
    (tmp_path / "corpus.txt").write_text(json.loads(shared_file("alpaca_en_demo.json").read_text())[4]["output"])
    figures = {}
    runs = {"base": {}, "unmerged": dict(adapter_path=adapter), "merged": dict(adapter_path=adapter, merge=True)}
    for name, settings in runs.items():
        evaluate(
            checkpoint_dir=checkpoint_dir,
            tasks="demo_choice",
            include_path=tasks_dir,
            limit=LIMIT,
            data_file=tmp_path / "corpus.txt",
            max_length=32,
            log_samples=True,
            out_dir=tmp_path / name,
            **settings,
        )
        _, samples = our_results(tmp_path / name, ["demo_choice"])
        ppl = json.loads((tmp_path / name / "perplexity.json").read_text())["data_file"]["perplexity"]
        figures[name] = (ppl, [resp[0][0] for sample in samples["demo_choice"] for resp in sample["resps"]])
    assert figures["merged"][0] == pytest.approx(figures["unmerged"][0], rel=1e-5)
    assert figures["merged"][1] == pytest.approx(figures["unmerged"][1], abs=1e-4)
    assert abs(figures["base"][0] / figures["unmerged"][0] - 1) > 1e-3

    v1 = tmp_path / "v1.safetensors"
    make_llama_adapter(checkpoint_dir, v1, seed=3, version=1, adapter_len=2, adapter_layers=1)
    with pytest.raises(ValueError, match=f"^{re.escape(str(v1))} holds prompts .* cannot merge into weights: leave"):
        evaluate(
            checkpoint_dir=checkpoint_dir,
            adapter_path=v1,
            merge=True,
            data_file=tmp_path / "corpus.txt",
            out_dir=tmp_path / "refused",
        )
    assert not (tmp_path / "refused").exists()


def test_batched_scoring_equals_each_request_alone(checkpoint_dir):
    """HarnessLM's batching on the tiny checkpoint, against each request scored by a plain forward pass of its own:
    groups of continuations sharing a context (of 1 to 5 tokens, some of a single token, some groups larger than
    others, so that later passes have rows with nothing left), lone requests, inputs cut from the left at max_length,
    at every batch size (generate_until's batches: decode.py, tests/test_decode.py)."""
    from evaluate import HarnessLM
    from tokenizer import Tokenizer
    from utils import load_model

    model = load_model(checkpoint_dir).eval()
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 32000, (n,), generator=generator).tolist()

    requests = []
    for context_length, n_continuations in ((12, 4), (9, 2), (30, 3), (7, 1), (40, 1), (5, 3)):
        context = tokens(context_length)
        requests += [(("", ""), context, tokens(1 + (k * 3) % 5)) for k in range(n_continuations)]
    requests.append((("", ""), tokens(50), tokens(3)))  # cut from the left to max_length 48
    expected = []
    with torch.no_grad():
        for _, context, continuation in requests:
            ids = torch.tensor((context + continuation)[-49:])
            log_probs = model(ids[None, :-1])[0, -len(continuation) :].log_softmax(-1)
            target = torch.tensor(continuation)
            likelihood = log_probs[torch.arange(len(target)), target].sum().item()
            expected.append((likelihood, bool((log_probs.argmax(-1) == target).all())))
    for batch_size in (1, 2, 3, 8):
        lm = HarnessLM(model, Tokenizer(checkpoint_dir), batch_size=batch_size, max_length=48)
        for (likelihood, greedy), (reference, reference_greedy) in zip(
            lm._loglikelihood_tokens(requests, True), expected
        ):
            assert likelihood == pytest.approx(reference, abs=1e-4) and greedy == reference_greedy


def transformers_sliding_window_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """transformers' perplexity guide (docs/source/en/perplexity.md), line for line, with one change: its
    `num_loss_tokens = num_valid_tokens - batch_size` counts the labels the loss scores after its internal shift
    only when a window's first label is scored, i.e. stride == max_length; with overlapping windows it counts one
    token too few per window, so the count here is that of the scored labels. Returns the mean NLL per token."""
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    seq_len = ids.size(1)
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        if stride == max_length:
            assert num_loss_tokens == (target_ids != -100).sum().item() - 1  # the guide's count
        if num_loss_tokens:  # a last window of a single token scores nothing (its mean loss is nan)
            nll_sum += neg_log_likelihood.item() * num_loss_tokens
            n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens


def test_corpus_perplexity_equals_transformers_sliding_window(smollm2, tmp_path):
    """--data_file as .txt and as .jsonl (its texts joined with blank lines, as the guide joins wikitext's), windows
    of 32 tokens, overlapping (stride 20) and not (stride 32): perplexity within 1e-4 relative of the guide's."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    records = json.loads(shared_file("alpaca_en_demo.json").read_text())
    texts = [records[i]["output"] for i in (13, 77)]  # 129 tokens together
    (tmp_path / "corpus.txt").write_text("\n\n".join(texts))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    hf = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(smollm2)("\n\n".join(texts), return_tensors="pt").input_ids
    assert ids.size(1) % 32 == 1  # without overlap, the last window is a single token
    for data_file, stride in (("corpus.txt", 20), ("corpus.jsonl", 32)):
        out_dir = tmp_path / f"out_{stride}"
        evaluate(checkpoint_dir=smollm2, data_file=tmp_path / data_file, max_length=32, stride=stride, out_dir=out_dir)
        figures = json.loads((out_dir / "perplexity.json").read_text())["data_file"]
        expected = math.exp(transformers_sliding_window_nll(hf, ids, 32, stride))
        assert figures["perplexity"] == pytest.approx(expected, rel=1e-4)
        # each token once but the first; without overlap, each window's first token has no context in it
        assert figures["tokens"] == ids.size(1) - (1 if stride < 32 else math.ceil(ids.size(1) / 32))


def test_a_4bit_base_equals_transformers_with_bitsandbytes(smollm2, tmp_path):
    """--quantize bnb.nf4: the corpus perplexity equals that of transformers' LlamaForCausalLM quantized by its own
    bitsandbytes integration (nf4, fp32 compute), on the same weights: the same 4-bit codes and scales. Its layers
    are kept from repacking into bf16 on CPUs with AVX512-BF16, as quantize.py keeps ours (exact, not bf16)."""
    import bitsandbytes as bnb
    from transformers import AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM

    records = json.loads(shared_file("alpaca_en_demo.json").read_text())
    text = records[4]["output"]  # 80 tokens
    (tmp_path / "corpus.txt").write_text(text)
    evaluate(
        checkpoint_dir=smollm2,
        data_file=tmp_path / "corpus.txt",
        quantize="bnb.nf4",
        max_length=32,
        stride=32,
        out_dir=tmp_path,
    )
    figures = json.loads((tmp_path / "perplexity.json").read_text())["data_file"]
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32, quantization_config=nf4, device_map="cpu")
    for module in hf.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    ids = AutoTokenizer.from_pretrained(smollm2)(text, return_tensors="pt").input_ids
    expected = math.exp(transformers_sliding_window_nll(hf.eval(), ids, 32, 32))
    assert figures["perplexity"] == pytest.approx(expected, rel=1e-4)
    full_precision = math.exp(
        transformers_sliding_window_nll(LlamaForCausalLM.from_pretrained(smollm2).eval(), ids, 32, 32)
    )
    assert abs(expected / full_precision - 1) > 1e-3  # 4 bits do change the model


def test_test_split_loss_is_the_masked_loss_of_transformers(checkpoint_dir, eight_records, tmp_path):
    """--data_dir: the mean loss over the response tokens of test.pt (the prompt masked, as in training) equals
    transformers' loss with the same labels, on the tiny checkpoint the records were prepared for."""
    from transformers import LlamaForCausalLM

    evaluate(checkpoint_dir=checkpoint_dir, data_dir=eight_records, out_dir=tmp_path)
    figures = json.loads((tmp_path / "perplexity.json").read_text())["data_dir"]
    hf = LlamaForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    loss_sum, n_tokens = 0.0, 0
    for record in torch.load(eight_records / "test.pt", weights_only=True):
        labels = record["labels"].clone()
        labels[labels == json.loads((eight_records / "metadata.json").read_text())["ignore_index"]] = -100
        n = int((labels[1:] != -100).sum())
        with torch.no_grad():
            loss_sum += hf(record["input_ids"][None], labels=labels[None]).loss.item() * n
        n_tokens += n
    assert figures["tokens"] == n_tokens and figures["records"] >= 1
    assert figures["loss"] == pytest.approx(loss_sum / n_tokens, rel=1e-5)
    assert figures["perplexity"] == pytest.approx(math.exp(loss_sum / n_tokens), rel=1e-5)


def test_bad_input_stops_with_one_line_and_writes_nothing(smollm2, checkpoint_dir, tasks_dir, tmp_path):
    """Each mistake is a ValueError (or FileNotFoundError) of one line that says what to do, raised before anything
    is written; the command line turns it into that line on stderr and exit status 1 (the Hub case below)."""
    out_dir = tmp_path / "out"

    def error(**settings) -> str:
        with pytest.raises((ValueError, OSError)) as raised:
            evaluate(checkpoint_dir=smollm2, out_dir=out_dir, **settings)
        assert "\n" not in str(raised.value) and not out_dir.exists()
        return str(raised.value)

    assert error(tasks="demo_choice", include_path=tasks_dir, limit=0) == (
        "--limit must be positive (documents per task, or a fraction below 1), not 0"
    )
    assert error(tasks="demo_choise", include_path=tasks_dir).startswith(
        f"unknown task 'demo_choise': not one of lm-eval's tasks nor in --include_path {tasks_dir} (did you mean "
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "good.yaml").write_text((tasks_dir / "demo_choice.yaml").read_text())
    (broken / "bad.yaml").write_text("task: demo_broken\ndoc_to_text: [unclosed\n")
    assert error(tasks="demo_choice", include_path=broken).startswith(
        f"{broken / 'bad.yaml'} is not a valid task YAML: "
    )
    (tmp_path / "empty.txt").write_text("\n \n")
    assert error(data_file=tmp_path / "empty.txt") == f"--data_file {tmp_path / 'empty.txt'} is empty: nothing to score"
    adapter = tmp_path / "tiny_adapter.safetensors"
    make_adapter(checkpoint_dir, adapter, 4, 8, ("query", "value"), seed=0)
    assert error(tasks="demo_choice", include_path=tasks_dir, lora_path=adapter).startswith(
        f"{adapter} was trained on another base model: "
    )
    assert error(data_file=tmp_path / "empty.txt", quantize="bnb.nf4", merge=True, lora_path=adapter).startswith(
        "--quantize bnb.nf4 holds the base in 4 or 8 bits"
    )
    # an adapter file given to the other kind's flag names the flag it goes to
    assert error(tasks="demo_choice", include_path=tasks_dir, adapter_path=adapter).startswith(
        f"{adapter} is a LoRA checkpoint (lora.py), not a LLaMA-Adapter one; LoRA files go to --lora_path"
    )
    llama_adapter = tmp_path / "tiny_llama_adapter.safetensors"
    make_llama_adapter(checkpoint_dir, llama_adapter, version=1, adapter_len=2, adapter_layers=1)
    assert error(tasks="demo_choice", include_path=tasks_dir, lora_path=llama_adapter).startswith(
        f"{llama_adapter} is a LLaMA-Adapter checkpoint (adapter.py), not a LoRA one; LLaMA-Adapter files go to "
        "--adapter_path"
    )
    assert error(tasks="demo_choice", include_path=tasks_dir, adapter_path=llama_adapter).startswith(
        f"{llama_adapter} was trained on another base model: "
    )


def test_a_hub_task_while_offline_is_one_line_naming_its_dataset(smollm2, tmp_path):
    """The command line with HF_HUB_OFFLINE=1, as on a machine without the Hub: lm-eval's hellaswag needs
    Rowan/hellaswag; one line on stderr says so and how to point --include_path at a local copy; exit status 1."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out_dir = tmp_path / "out"
    command = [sys.executable, "evaluate.py", "--checkpoint_dir", str(smollm2), "--tasks", "hellaswag"]
    result = subprocess.run(
        [*command, "--out_dir", str(out_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and result.stdout == "" and not out_dir.exists()
    assert result.stderr.startswith("error: task hellaswag needs its dataset from the Hugging Face Hub")
    assert "Rowan/hellaswag" in result.stderr and "--include_path" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
