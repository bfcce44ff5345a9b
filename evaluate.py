"""Evaluates a checkpoint, an adapter on it (LoRA or LLaMA-Adapter), or a quantized base: lm-evaluation-harness tasks,
the perplexity of a text corpus, and the loss on the test split of a fine-tuning run.

    python evaluate.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M --tasks arc_easy,hellaswag --limit 200
    python evaluate.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M \
        --lora_path out/lora/alpaca/lit_model_lora_finetuned.safetensors --data_dir data/alpaca --data_file corpus.txt

Tasks run in EleutherAI's lm-evaluation-harness (the `lm-eval` package), in this process: its task definitions, prompts,
few-shot sampling, metrics and tables are the ones every published score and every other fine-tuning tool
(`lm-eval --model hf`, litgpt, torchtune, axolotl) uses, so a number from here compares with theirs; what this script
adds is our model behind lm-eval's three questions (`HarnessLM`): the log-likelihood of a continuation, of a whole
text, and a generation until a stop sequence. Its answers equal those of lm-eval's own transformers backend on the same
weights (tests/test_evaluate.py), faster on CPU (benchmarks/evaluate_vs_hflm.py): continuations that share a context
(the choices of a multiple-choice question) score it once and go on from the KV cache, the output head runs only where
a token is scored, and generation stops each row at its own stop sequence.

Writes to --out_dir: results.json (lm-eval's results: every metric with its standard error, the task configs and
versions), samples_<task>.jsonl with --log_samples, perplexity.json for --data_file/--data_dir; prints the markdown
tables. Offline, point --include_path at a folder of task YAMLs over local JSON/JSONL files (howto/evaluate.md).
"""

import difflib
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table
from tqdm import tqdm

from batched import BatchGenerator, Job, generate_all
from data import load_prepared_data
from decode import Completion, check_inference_model, load_inference_model
from losses import cross_entropy_sum, pack_batch
from model import Config, LLaMA
from tokenizer import Tokenizer
from utils import (
    atomic_path,
    cli,
    load_config,
    one_line,
    peak_memory_gb,
)

IGNORE_INDEX = -100  # the label of a corpus token that is not scored


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    tasks: Optional[str] = None,
    data_file: Optional[Path] = None,
    data_dir: Optional[Path] = None,
    lora_path: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    merge: bool = False,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    stride: Optional[int] = None,
    apply_chat_template: bool = False,
    include_path: Optional[Path] = None,
    log_samples: bool = False,
    out_dir: Path = Path("out/evaluate"),
) -> None:
    """Evaluates a checkpoint (with an adapter, or quantized) on lm-eval tasks and/or the perplexity of text.

    Args:
        checkpoint_dir: the model, as converted by scripts/convert_hf_checkpoint.py (or written by merge_lora.py).
        tasks: lm-eval task, group or tag names, comma-separated (arc_easy,hellaswag,mmlu), including those of the
            YAMLs in --include_path.
        data_file: a text corpus whose perplexity to compute: a .txt file, or a .jsonl file with a "text" field on
            each line (joined with blank lines); windows of --max_length tokens every --stride tokens, each token
            scored once (transformers' sliding-window perplexity).
        data_dir: a directory prepared by prepare_alpaca.py or prepare_chat.py for this checkpoint's tokenizer: the
            loss and perplexity on its test split, scored as fine-tuning validates (only the response tokens).
        lora_path: a LoRA adapter written by finetune_lora.py, applied on the base of `checkpoint_dir`.
        adapter_path: a LLaMA-Adapter (v1 or v2) written by finetune_adapter.py, instead of --lora_path; on the
            unquantized base.
        merge: fold the adapter into the weights first (same scores, base-model speed; for a LLaMA-Adapter only v2
            without prompts merges); by default it stays separate, which also scores a QLoRA adapter on the
            quantized base it was trained on.
        quantize: hold the projections in 4 bits ("bnb.nf4", "bnb.fp4"; "-dq" quantizes their scales too) or 8 bits
            ("bnb.int8") with bitsandbytes, as generate.py does (see howto/quantize.md).
        precision: "bf16-true", "16-true" or "32-true"; by default bf16-true on GPUs that support it, else 32-true.
        num_fewshot: examples in each prompt, overriding the tasks' own numbers (lm-eval keeps a task's 0).
        limit: evaluate only the first `limit` documents of each task (or that fraction of them, below 1): for a
            quick look, not for a score to report.
        batch_size: sequences per forward pass. Lower it when memory runs out: the logits of every scored token in a
            batch are held at once (vocab_size x 4 bytes each).
        max_length: the longest input the model sees, by default its block_size: lm-eval's requests are cut from the
            left to it, as lm-eval's transformers backend cuts them, and it is the perplexity window.
        stride: tokens between the starts of two perplexity windows (at most --max_length), by default half a window:
            each token after the first window is scored with at least max_length - stride tokens of context.
        apply_chat_template: put each prompt into the checkpoint's chat template (the few-shot examples as turns),
            as chat models are asked; without it, prompts are plain text.
        include_path: a folder of task YAMLs (searched recursively), for tasks over local files or your own tasks.
        log_samples: also write every document's prompt, model answer and metrics to samples_<task>.jsonl.
        out_dir: where results.json, samples_*.jsonl and perplexity.json go; created if needed.
    """
    names = [name.strip() for name in tasks.split(",") if name.strip()] if tasks else []
    validate_args(names, data_file, data_dir, lora_path, adapter_path, merge, limit, batch_size)
    check_inference_model(checkpoint_dir, lora_path, adapter_path, merge, quantize)
    config = load_config(checkpoint_dir)
    max_length = max_length or config.block_size
    stride = stride or max(1, max_length // 2)
    check_window(config, max_length, stride)
    tokenizer = Tokenizer(checkpoint_dir)
    # everything that can be checked without the model first: a mistake stops before the slow part, writing nothing
    task_manager, task_objects = load_tasks(names, include_path) if names else (None, [])
    corpus, test_data, ignore_index = read_data(data_file, data_dir, checkpoint_dir, tokenizer)

    model, loaded = load_inference_model(
        checkpoint_dir, lora_path, adapter_path, merge, quantize, precision, many_rows=True
    )
    print(loaded, file=sys.stderr)

    t0 = time.perf_counter()
    results, perplexities = None, {}
    if task_objects:
        lm = HarnessLM(model, tokenizer, batch_size, max_length)
        model_args = dict(
            checkpoint_dir=str(checkpoint_dir),
            lora_path=str(lora_path) if lora_path else None,
            adapter_path=str(adapter_path) if adapter_path else None,
            merge=merge,
            quantize=quantize,
            precision=str(model.embed.weight.dtype),
        )
        results = run_tasks(
            lm, model_args, task_manager, task_objects, num_fewshot, limit, log_samples, apply_chat_template
        )
    if corpus is not None:
        windows = sliding_windows(corpus, max_length, stride)
        scores = perplexity(model, windows, IGNORE_INDEX, max_length, batch_size)
        perplexities["data_file"] = {"path": str(data_file), **scores, "max_length": max_length, "stride": stride}
    if test_data is not None:
        scores = perplexity(model, test_data, ignore_index, max_length, batch_size)
        perplexities["data_dir"] = {"path": str(data_dir), **scores, "records": len(test_data)}
    seconds = time.perf_counter() - t0
    write_results(Path(out_dir), results, perplexities, seconds, peak_memory_gb(model.embed.weight.device))


def run_tasks(
    lm: "HarnessLM",
    model_args: dict,
    task_manager: TaskManager,
    task_objects: list,
    num_fewshot: Optional[int],
    limit: Optional[float],
    log_samples: bool,
    apply_chat_template: bool,
) -> dict:
    """lm-eval's results of the tasks, asked of `lm` (`model_args` only go into the results, to say what was
    evaluated)."""
    return simple_evaluate(
        model=lm,
        model_args=model_args,
        tasks=task_objects,
        task_manager=task_manager,
        num_fewshot=num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
    )


def validate_args(
    names: list[str],
    data_file: Optional[Path],
    data_dir: Optional[Path],
    lora_path: Optional[Path],
    adapter_path: Optional[Path],
    merge: bool,
    limit: Optional[float],
    batch_size: int,
) -> None:
    """The checks of main's flags that need no file: what to evaluate, and which combinations make sense."""
    if not names and data_file is None and data_dir is None:
        raise ValueError("nothing to evaluate: give --tasks, --data_file or --data_dir (or several)")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive (documents per task, or a fraction below 1), not {limit}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, not {batch_size}")
    if merge and lora_path is None and adapter_path is None:
        raise ValueError("--merge folds an adapter into the weights: give --lora_path or --adapter_path too")


def check_window(config: Config, max_length: int, stride: int) -> None:
    """The perplexity window's flags against the checkpoint's `config`."""
    if not 1 < max_length <= config.block_size:
        raise ValueError(f"--max_length must be between 2 and the model's block_size {config.block_size}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"--stride must be between 1 and --max_length {max_length}, not {stride}")


def read_data(
    data_file: Optional[Path], data_dir: Optional[Path], checkpoint_dir: Path, tokenizer: Tokenizer
) -> tuple[Optional[torch.Tensor], Optional[list[dict]], int]:
    """The ids of --data_file's corpus, the test records of --data_dir and their ignore_index (None where not given;
    IGNORE_INDEX without --data_dir), checked before the model is loaded."""
    corpus = tokenizer.encode(read_corpus(data_file)) if data_file is not None else None
    if corpus is not None and len(corpus) < 2:
        raise ValueError(f"--data_file {data_file} has fewer than 2 tokens: nothing to score")
    test_data, ignore_index = None, IGNORE_INDEX
    if data_dir is not None:
        prepared = load_prepared_data(data_dir, checkpoint_dir)
        test_data, ignore_index = prepared.val, prepared.ignore_index
        if not test_data:
            raise ValueError(f"{data_dir}/test.pt holds no records; prepare the data with a test split")
    return corpus, test_data, ignore_index


def write_results(out_dir: Path, results: Optional[dict], perplexities: dict, seconds: float, memory: float) -> None:
    """results.json and samples_<task>.jsonl (lm-eval's results, as `lm-eval --output_path` writes them but under
    fixed names) and perplexity.json in `out_dir`, each written whole or not at all; the tables on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if results is not None:
        samples = results.pop("samples", None) or {}
        for task, task_samples in samples.items():
            with atomic_path(out_dir / f"samples_{task}.jsonl") as tmp:
                tmp.write_text("".join(to_json(sample, indent=None) + "\n" for sample in task_samples))
        with atomic_path(out_dir / "results.json") as tmp:
            tmp.write_text(to_json(results) + "\n")
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
    if perplexities:
        with atomic_path(out_dir / "perplexity.json") as tmp:
            tmp.write_text(to_json({**perplexities, "seconds": seconds, "peak_memory_gb": memory}) + "\n")
        print(perplexity_table(perplexities))
    print(f"Evaluated in {seconds:.1f} s; peak memory {memory:.2f} GB; wrote {out_dir}", file=sys.stderr)


class HarnessLM(TemplateLM):
    """Our LLaMA as an lm-eval model: it answers lm-eval's three kinds of request, as lm-eval's transformers backend
    (lm_eval.models.huggingface.HFLM) answers them.

    TemplateLM turns a (context, continuation) pair into token ids (here with tokenizer.py); `_loglikelihood_tokens`
    scores them, `loglikelihood_rolling` cuts a whole text into the same windows as HFLM, and `generate_until`
    decodes greedily (or samples, where a task asks) until a stop sequence."""

    def __init__(self, model: LLaMA, tokenizer: Tokenizer, batch_size: int = 8, max_length: Optional[int] = None):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length = max_length or model.config.block_size
        self._device = model.embed.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: BOS, else EOS (as HFLM)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_gen_toks(self) -> int:
        return 256  # tokens generated when a task does not say (HFLM's default)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path.parent).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """The ids of `string`, with BOS where the tokenizer adds one, unless told not to or the string (a prompt in
        the chat template) starts with it already."""
        bos_text = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(bos_text)
        return self.tokenizer.encode(string, bos=self.tokenizer.add_bos and add_special_tokens).tolist()

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt in the checkpoint's chat template, ending with the assistant's header, or, without
        `add_generation_prompt`, right after the last message (a task's answer prefix, which the model continues).
        A template that refuses a system message is tried again without it, as HFLM does."""
        try:
            text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)
        except ValueError:
            chat_history = [message for message in chat_history if message["role"] != "system"]
            text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)
        if not add_generation_prompt:
            last = chat_history[-1]["content"].strip()
            text = text[: text.rindex(last) + len(last)]
        return text

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """The log-likelihood of each continuation after its context, and whether greedy decoding would give it.
        requests: ((context, continuation) strings, context ids, continuation ids), as TemplateLM encodes them.

        An input longer than max_length loses tokens on the left, as in HFLM. Requests whose inputs agree up to the
        token that predicts the continuation's first token (the choices of a multiple-choice question) form one row:
        that prefix is computed once, and each continuation's remaining tokens follow in later passes over the KV
        cache. A lone request's row is its whole input. Rows are scored longest first, batch_size at a time."""
        results: list = [None] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, list[int], list[int]]]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not 0 < len(continuation) <= self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens does not fit max_length {self.max_length}"
                )
            tokens = (context + continuation)[-(self.max_length + 1) :]  # the input is tokens[:-1]
            n = len(continuation)
            # tokens[:-n] ends with the token that predicts continuation[0]; tokens[-n:-1] predict the rest
            groups.setdefault(tuple(tokens[:-n]), []).append((i, tokens[-n:-1], continuation))
        rows = []  # (input ids, [(request, tokens left for the later passes, continuation)])
        for prefix, members in groups.items():
            # sharing saves (members - 1) x len(prefix) tokens and costs a pass per member: worth it for a prefix at
            # least as long as the continuations (a question, few-shot examples), not for the one BOS token before
            # each text of loglikelihood_rolling. The later passes pad to one position past a row's longest input,
            # which must be a position of the model: inputs of the full block_size, rare, go alone.
            longest_rest = max(len(rest) for _, rest, _ in members)
            if len(members) > 1 and longest_rest <= len(prefix) < self.model.config.block_size - longest_rest:
                rows.append((list(prefix), members))
            else:
                rows.extend((list(prefix) + rest, [(i, [], continuation)]) for i, rest, continuation in members)
        rows.sort(key=lambda row: -(len(row[0]) + max(len(rest) for _, rest, _ in row[1])))

        bar = tqdm(total=len(requests), desc="loglikelihood", unit=" requests", disable=disable_tqdm)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            for i, score in self.score_rows(batch):
                results[i] = score
            bar.update(sum(len(members) for _, members in batch))
        bar.close()
        return results

    @torch.no_grad()
    def score_rows(self, batch: list) -> list[tuple[int, tuple[float, bool]]]:
        """One batch of `_loglikelihood_tokens`' rows: a pass over the rows' input ids scores every lone continuation
        and the first token of every shared one; the k-th pass after it feeds the k-th shared continuation of each row
        (its tokens but the last) at the positions after the row's prefix, which the KV cache holds. Returns
        (request, (log-likelihood, is_greedy)) for each request in the batch."""
        passes = max(sum(1 for _, rest, _ in members if rest) for _, members in batch)
        longest = max(len(ids) + max(len(rest) for _, rest, _ in members) for ids, members in batch)
        input_pos = None  # without later passes, a plain causal pass over positions 0..T-1
        if passes:
            self.model.set_kv_cache(len(batch), longest + 1)
            input_pos = torch.arange(max(len(ids) for ids, _ in batch), device=self._device)
        try:
            # right-padded rows: a pad only follows the real tokens, which never attend to it
            targets = [[continuation[: len(continuation) - len(rest)] for _, rest, continuation in m] for _, m in batch]
            first = self.score([ids for ids, _ in batch], targets, input_pos)
            totals = {
                i: score for (_, members), scores in zip(batch, first) for (i, _, _), score in zip(members, scores)
            }
            for k in range(passes):
                rows, targets, positions, owners = [], [], [], []
                for ids, members in batch:
                    shared = [(i, rest, continuation) for i, rest, continuation in members if rest]
                    if k < len(shared):
                        i, rest, continuation = shared[k]
                        rows.append(rest)
                        targets.append([continuation[1:]])
                        positions.append(range(len(ids), len(ids) + len(rest)))
                        owners.append(i)
                    else:  # nothing left for this row: one pad at position 0 of its finished cache row
                        rows.append([0])
                        targets.append([])
                        positions.append(range(0))
                        owners.append(None)
                width = max(len(row) for row in rows)
                # a row's padding all goes to the one position after its tokens, which they never attend to
                input_pos = torch.tensor([[*p, *[p.stop] * (width - len(p))] for p in positions], device=self._device)
                for i, row_scores in zip(owners, self.score(rows, targets, input_pos)):
                    if i is not None:
                        (log_likelihood, greedy), (more, more_greedy) = totals[i], row_scores[0]
                        totals[i] = (log_likelihood + more, greedy and more_greedy)
        finally:
            if passes:
                self.model.clear_kv_cache()
        return list(totals.items())

    def score(
        self, rows: list[list[int]], targets: list[list[list[int]]], input_pos: Optional[torch.Tensor]
    ) -> list[list[tuple[float, bool]]]:
        """One forward pass over `rows` (token ids, right-padded into one batch) at `input_pos`. targets[r] holds the
        continuations (of one length n) that the last n tokens of row r predict, several where rows share them.
        Returns, for each row, each continuation's (log-likelihood, whether every token is the most likely one)."""
        width = max(len(row) for row in rows)
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        scored = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, (row, continuations) in enumerate(zip(rows, targets)):
            idx[r, : len(row)] = torch.tensor(row)
            n = len(continuations[0]) if continuations else 0
            scored[r, len(row) - n : len(row)] = True
        # the output head runs only where a token is scored: (scored positions, vocab_size)
        logits = self.model(idx.to(self._device), input_pos, logits_at=scored.to(self._device)).float()
        log_probs, greedy = torch.log_softmax(logits, dim=-1), logits.argmax(dim=-1)
        results, start = [], 0
        for continuations in targets:
            n = len(continuations[0]) if continuations else 0
            positions = torch.arange(start, start + n, device=self._device)
            row_results = []
            for continuation in continuations:
                target = torch.tensor(continuation, device=self._device)
                log_likelihood = log_probs[positions, target].sum().item()
                row_results.append((log_likelihood, bool((greedy[positions] == target).all())))
            results.append(row_results)
            start += n
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: cut into windows of at most max_length tokens, each token scored
        once, the first after the prefix token (lm-eval's rolling windows, as HFLM cuts them)."""
        windows, owners = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            token_windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            for context, continuation in map(make_disjoint_window, token_windows):
                windows.append(((None, None), context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (log_likelihood, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += log_likelihood
        return totals

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # as HFLM decodes a continuation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation of its context, greedy unless the task samples, until one of the task's stop
        sequences, the tokenizer's stop ids or max_gen_toks; the text up to the first stop sequence (as HFLM).
        Requests with the same settings are decoded together, batch_size rows at a time with continuous batching
        (batched.py): a row that ends takes the next request at once instead of waiting for the longest answer of its
        batch."""
        by_settings: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_settings.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", unit=" requests", disable=disable_tqdm)
        for indices in by_settings.values():
            settings = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(settings.pop("until"), eos=self.tokenizer.decode([self.eot_token_id]))
            max_new_tokens = settings.pop("max_gen_toks")
            do_sample, temperature = settings.pop("do_sample"), settings.pop("temperature")
            top_k, top_p = settings.pop("top_k", None), settings.pop("top_p", None)
            if settings:
                raise ValueError(f"a task asks for generation settings evaluate.py does not implement: {settings}")
            if max_new_tokens >= self.max_length:
                raise ValueError(f"a task asks for {max_new_tokens} new tokens, max_length is {self.max_length}")
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new_tokens) :] for i in indices}
            jobs = {
                i: Job(
                    Completion(
                        prompts[i],
                        max_new_tokens,
                        temperature if do_sample else 0.0,
                        top_k,
                        top_p,
                        stop_ids=self.tokenizer.stop_ids,
                        stop_strings=until,
                        detokenize=self.decode_text,
                    ),
                    on_end=lambda: bar.update(1),
                )
                for i in sorted(indices, key=lambda i: -len(prompts[i]))
            }
            length = min(max(len(prompt) for prompt in prompts.values()) + max_new_tokens, self.model.config.block_size)
            try:
                generate_all(BatchGenerator(self.model, None, self.batch_size, length, len(jobs)), list(jobs.values()))
            finally:
                self.model.clear_kv_cache()
            for i, job in jobs.items():
                results[i] = postprocess_generated_text(job.completion.text, until, None)
        bar.close()
        return results


def load_tasks(names: list[str], include_path: Optional[Path]) -> tuple[TaskManager, list]:
    """lm-eval's task manager and the Task (or Group) objects of `names`, their datasets loaded: a missing file, an
    unreachable Hub or a broken YAML stops here, with one line, before the model is loaded. The index of lm-eval's
    own few thousand task YAMLs takes seconds to build; tasks that are all in --include_path skip it."""
    manager = None
    if include_path is not None:
        check_task_yamls(Path(include_path))
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not all(name in manager.all_tasks for name in names):
            manager = None
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    objects = []
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            where = f" nor in --include_path {include_path}" if include_path else ""
            hint = f" (did you mean {', '.join(close)}?)" if close else "; `lm-eval ls tasks` lists them"
            raise ValueError(f"unknown task {name!r}: not one of lm-eval's tasks{where}{hint}")
        try:
            loaded = manager.load([name])
        except ConnectionError as e:  # datasets could not reach the Hub, or HF_HUB_OFFLINE=1
            raise ValueError(
                f"task {name} needs its dataset from the Hugging Face Hub, which cannot be reached ({one_line(e)}); "
                "save the dataset as JSON/JSONL where the Hub is reachable and point --include_path at a folder with "
                "a task YAML over those files (howto/evaluate.md#offline)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            raise ValueError(f"task {name} could not be loaded: {type(e).__name__}: {one_line(e)}") from None
        objects += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return manager, objects


def check_task_yamls(include_path: Path) -> None:
    """Every YAML under --include_path parses into a task, group or tag config. lm-eval's index skips a file it cannot
    read without a word, and the task would then be reported unknown; here the file and its fault are named."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not include_path.is_dir():
        raise FileNotFoundError(f"--include_path {include_path} is not a directory of task YAMLs")
    for path in sorted(include_path.glob("**/*.yaml")):
        try:
            config = load_yaml(path, resolve_func=False)
        except Exception as e:  # YAML syntax, a missing `include`, not a mapping
            raise ValueError(f"{path} is not a valid task YAML: {one_line(e)}") from None
        if not any(key in config for key in ("task", "group", "class")):
            raise ValueError(f"{path} is not a valid task YAML: it names no `task` (nor `group`)")


def read_corpus(path: Path) -> str:
    """The text of a .txt file, or the "text" fields of a .jsonl file joined with blank lines."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f'--data_file {path} must be a .txt file or a .jsonl file with a "text" field per line')
    text = path.read_text()
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f'{path}:{number} is not a JSON object with a "text" field') from None
        text = "\n\n".join(texts)
    if not text.strip():
        raise ValueError(f"--data_file {path} is empty: nothing to score")
    return text


def sliding_windows(ids: torch.Tensor, max_length: int, stride: int) -> list[dict[str, torch.Tensor]]:
    """transformers' sliding-window perplexity (its perplexity guide) as prepared records: windows of up to
    `max_length` tokens starting every `stride` tokens; the labels of tokens an earlier window scored are IGNORE_INDEX,
    so each token is scored once, with up to max_length - 1 tokens of context (the first token has none)."""
    windows, scored_until = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        labels = ids[begin:end].clone()
        labels[: scored_until - begin] = IGNORE_INDEX  # pack_batch never scores a window's first token
        if end - begin > 1:  # a last window of one token, without overlap, has nothing to score
            windows.append({"input_ids": ids[begin:end], "labels": labels})
        scored_until = end
        if end == len(ids):
            break
    return windows


@torch.no_grad()
def perplexity(
    model: LLaMA, records: list[dict[str, torch.Tensor]], ignore_index: int, max_length: int, batch_size: int
) -> dict[str, float]:
    """The mean loss per scored token and its exponential over prepared records (input_ids, labels), cut to
    `max_length`, `batch_size` at a time packed into one row, as fine-tuning validates (losses.pack_batch,
    cross_entropy_sum)."""
    device = model.embed.weight.device
    loss_sum, n_tokens = 0.0, 0
    for start in tqdm(range(0, len(records), batch_size), desc="perplexity", unit=" batches"):
        input_ids, targets, lengths = pack_batch(records[start : start + batch_size], max_length)
        input_ids, targets = input_ids.to(device), targets.to(device)
        where = targets != ignore_index
        loss_sum += cross_entropy_sum(model(input_ids, lengths=lengths, logits_at=where), targets[where]).item()
        n_tokens += int(where.sum())
    if n_tokens == 0:
        raise ValueError("no token to score: every label is masked")
    return {"tokens": n_tokens, "loss": loss_sum / n_tokens, "perplexity": math.exp(loss_sum / n_tokens)}


def perplexity_table(perplexities: dict[str, dict]) -> str:
    lines = ["| data | tokens | loss | perplexity |", "|---|---:|---:|---:|"]
    for kind, figures in perplexities.items():
        name = f"{figures['path']} ({'test split' if kind == 'data_dir' else 'corpus'})"
        lines.append(f"| {name} | {figures['tokens']} | {figures['loss']:.4f} | {figures['perplexity']:.4f} |")
    return "\n".join(lines)


def to_json(value, indent: Optional[int] = 2) -> str:
    return json.dumps(value, indent=indent, default=handle_non_serializable, ensure_ascii=False)


if __name__ == "__main__":
    cli(main)
