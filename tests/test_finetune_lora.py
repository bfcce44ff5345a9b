"""finetune_lora.py: overfitting with a frozen base, the adapter it saves, a killed run resumed to the same losses, DDP
on two CPU processes against one, and one-line errors on bad input (training.py's parts: tests/test_training.py).

All on the tiny config of conftest.make_checkpoint (real 32000-token tokenizer), fp32 on CPU, with records of
../shared/data/alpaca_en_demo.json prepared by prepare_alpaca.py."""

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import decode
import finetune_lora
import training
from conftest import ROOT, caught_models, command, finetune, run_command, shared_file
from finetune_lora import setup
from lora import read_lora_config
from model import Config
from prepare_alpaca import setup as prepare

# a short run: tests pass what they are about on top
QUICK = dict(
    batch_size=4,
    micro_batch_size=2,
    max_steps=3,
    warmup_steps=1,
    eval_interval=1000,
    eval_batches=1,
    save_interval=1000,
    max_seq_length=96,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, checkpoint_dir) -> Path:
    """The 999 shared records, prepared with max_seq_length 128."""
    directory = tmp_path_factory.mktemp("alpaca")
    prepare(
        destination_path=directory,
        checkpoint_dir=checkpoint_dir,
        data_file_path=shared_file("alpaca_en_demo.json"),
        max_seq_length=128,
    )
    return directory


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, checkpoint_dir, eight_records):
    """80 steps on the 8 records, with the model finetune_lora.py trained (caught where it is loaded)."""
    out_dir = tmp_path_factory.mktemp("overfit")
    with pytest.MonkeyPatch.context() as monkeypatch, caught_models(monkeypatch, finetune_lora) as models:
        finetune(
            setup,
            data_dir=eight_records,
            checkpoint_dir=checkpoint_dir,
            out_dir=out_dir,
            **{
                **QUICK,
                "batch_size": 8,
                "micro_batch_size": 4,
                "max_steps": 80,
                "warmup_steps": 5,
                "learning_rate": 3e-2,
                "lora_dropout": 0.0,
                "lora_targets": ["query", "value", "head"],
                "max_seq_length": 128,
                "eval_interval": 40,
                "save_interval": 40,
            },
        )
    return out_dir, models[0]


def train_state(out_dir: Path) -> dict:
    return torch.load(out_dir / "train_state.pt", weights_only=True)


def losses(state: dict) -> list[float]:
    return [loss for _, loss in state["history"]["train"]]


def assert_same_history(actual: dict, expected: dict, atol: float) -> None:
    """Two runs' (step, loss) histories, train and validation: the same steps, and losses within `atol` of each other
    (pytest.approx compares flat lists only)."""
    for split in ("train", "val"):
        assert [step for step, _ in actual[split]] == [step for step, _ in expected[split]], split
        assert [loss for _, loss in actual[split]] == pytest.approx([loss for _, loss in expected[split]], abs=atol), (
            split
        )


def test_lora_overfits_eight_records_while_the_base_weights_stay_bitwise_unchanged(overfit, checkpoint_dir):
    out_dir, model = overfit
    state = train_state(out_dir)
    assert state["step"] == 80 and losses(state)[0] > 10 and losses(state)[-1] < 0.5
    base = load_file(checkpoint_dir / "lit_model.safetensors")
    trained = dict(model.named_parameters())
    assert {name for name in trained if ".lora." not in name} == set(base)
    for name, weight in base.items():
        assert torch.equal(trained[name], weight), name
        assert not trained[name].requires_grad
    assert all(trained[name].requires_grad for name in trained if ".lora." in name)

    # the logs: a CSV row per step and evaluation, and the loss curve
    csv = (out_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = csv[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in csv[1:]]
    assert [float(r["train_loss"]) for r in rows if r["train_loss"]] == pytest.approx(losses(state))
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [40, 80]
    assert (out_dir / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_bf16_mixed_precision_holds_the_base_in_bf16_and_lora_in_fp32(checkpoint_dir, eight_records, tmp_path):
    losses_by_precision = {}
    with pytest.MonkeyPatch.context() as monkeypatch, caught_models(monkeypatch, finetune_lora) as models:
        # the sample answer is not what this is about, and decoding in bf16 on a CPU takes half a minute
        monkeypatch.setattr(training, "generate", lambda model, prompt, *args, **kwargs: prompt)
        for precision in ("bf16-mixed", "32-true"):
            finetune(
                setup,
                data_dir=eight_records,
                checkpoint_dir=checkpoint_dir,
                out_dir=tmp_path / precision,
                precision=precision,
                **{**QUICK, "batch_size": 2, "max_steps": 2, "max_seq_length": 64},
            )
            losses_by_precision[precision] = losses(train_state(tmp_path / precision))
    parameters = dict(models[0].named_parameters())
    assert {p.dtype for name, p in parameters.items() if ".lora." in name} == {torch.float32}
    assert {p.dtype for name, p in parameters.items() if ".lora." not in name} == {torch.bfloat16}
    adapter = load_file(tmp_path / "bf16-mixed" / "lit_model_lora_finetuned.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    assert losses_by_precision["bf16-mixed"] == pytest.approx(losses_by_precision["32-true"], abs=0.05)


def test_the_saved_adapter_holds_only_lora_tensors_and_its_settings(overfit, checkpoint_dir):
    out_dir, model = overfit
    expected = {name: param for name, param in model.named_parameters() if ".lora." in name}
    assert len(expected) == 2 * (2 * 2 + 1)  # A and B of query and value in 2 layers, and of the head
    for path in (out_dir / "lit_model_lora_finetuned.safetensors", out_dir / "lora_step-000040.safetensors"):
        assert set(load_file(path)) == set(expected)
    for name, tensor in load_file(out_dir / "lit_model_lora_finetuned.safetensors").items():
        assert torch.equal(tensor, expected[name].detach())
    assert set(train_state(out_dir)["model"]) == set(expected)  # the resumable state: no base weights either
    lora_config, base_config = read_lora_config(out_dir / "lit_model_lora_finetuned.safetensors")
    assert (lora_config.r, lora_config.alpha, lora_config.targets) == (8, 16, ("query", "value", "head"))
    assert base_config == Config.from_file(checkpoint_dir / "model_config.json")


def test_a_killed_run_resumes_to_the_losses_of_an_uninterrupted_one(checkpoint_dir, data_dir, tmp_path):
    # LoRA dropout is on (the default 0.05), so the resumed run must also restore the RNG it draws from
    settings = {
        **QUICK,
        "batch_size": 4,
        "micro_batch_size": 1,
        "max_steps": 16,
        "save_interval": 4,
        "eval_interval": 8,
    }
    finetune(setup, data_dir=data_dir, checkpoint_dir=checkpoint_dir, out_dir=tmp_path / "whole", **settings)
    whole = train_state(tmp_path / "whole")

    process = subprocess.Popen(
        command("finetune_lora.py", data_dir, checkpoint_dir, tmp_path / "killed", **settings),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "train_state.pt").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    stopped_at = train_state(tmp_path / "killed")["step"]
    assert stopped_at in (4, 8, 12)

    finetune(
        setup, data_dir=data_dir, checkpoint_dir=checkpoint_dir, out_dir=tmp_path / "killed", resume="auto", **settings
    )
    resumed = train_state(tmp_path / "killed")
    assert resumed["step"] == 16
    assert_same_history(resumed["history"], whole["history"], atol=1e-5)
    for name, tensor in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-5)


def test_ddp_on_two_cpu_processes_gives_the_loss_of_one_process(checkpoint_dir, data_dir, tmp_path):
    settings = {
        **QUICK,
        "batch_size": 8,
        "micro_batch_size": 2,
        "max_steps": 3,
        "eval_interval": 3,
        "eval_batches": 4,
        "lora_dropout": 0.0,
        "learning_rate": 1e-2,
    }
    finetune(setup, data_dir=data_dir, checkpoint_dir=checkpoint_dir, out_dir=tmp_path / "one", **settings)
    two_processes = command(
        "finetune_lora.py", data_dir, checkpoint_dir, tmp_path / "two", devices=2, strategy="ddp", **settings
    )
    result = run_command(two_processes, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 device(s)" in result.stdout
    one, two = train_state(tmp_path / "one"), train_state(tmp_path / "two")
    assert two["step"] == 3 and len(two["rng"]) == 2
    assert_same_history(two["history"], one["history"], atol=1e-4)  # validation: after the third update
    assert losses(one)[-1] < losses(one)[0]  # three steps that change something


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(checkpoint_dir, eight_records, tmp_path):
    with pytest.raises(FloatingPointError) as raised:  # a learning rate that blows the LoRA weights up in a step or two
        finetune(
            setup,
            data_dir=eight_records,
            checkpoint_dir=checkpoint_dir,
            out_dir=tmp_path,
            **{
                **QUICK,
                "max_steps": 10,
                "save_interval": 1,
                "learning_rate": 1e30,
                "lora_targets": ["query", "value", "head"],
            },
        )
    state = train_state(tmp_path)
    message = str(raised.value)
    assert message.startswith("the loss (") and "is not finite at step" in message
    assert message.endswith(
        f"The last good checkpoint is {tmp_path / 'train_state.pt'}: resume from it with a lower --train.learning_rate"
    )
    assert f"at step {state['step'] + 1};" in message and "\n" not in message
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(torch.isfinite(torch.tensor(losses(state))))


def test_a_blow_up_to_a_uniform_guess_without_nan_stops_with_one_line(checkpoint_dir, eight_records, tmp_path):
    """Issue 25's case: at learning rate 1e30 LoRA on query and value leaves every logit equal after one update, loss
    ln(32000) with a gradient of exactly 0, which used to run to the end, save that adapter and exit 0."""
    with pytest.raises(FloatingPointError) as raised:
        finetune(
            setup, data_dir=eight_records, checkpoint_dir=checkpoint_dir, out_dir=tmp_path, **QUICK, learning_rate=1e30
        )
    assert str(raised.value) == (
        "the loss at step 2 (10.3735) is no better than a uniform guess over the vocabulary (ln 32000 = 10.3735) "
        "and its gradient is 0: the output no longer depends on the weights; stopped before updating the weights. "
        "Nothing was saved; try a lower --train.learning_rate"
    )
    assert not (tmp_path / finetune_lora.ADAPTER_NAME).exists()


def link_checkpoint(source: Path, destination: Path, **changes) -> Path:
    """A copy of a checkpoint directory (weights linked, not copied) with changed files."""
    destination.mkdir()
    for path in source.iterdir():
        (destination / path.name).symlink_to(path)
    for name, content in changes.items():
        (destination / name).unlink()
        (destination / name).write_bytes(content)
    return destination


def test_bad_input_stops_with_one_line(checkpoint_dir, eight_records, overfit, tmp_path):
    def error(**settings) -> str:
        arguments = {
            "data_dir": eight_records,
            "checkpoint_dir": checkpoint_dir,
            "out_dir": tmp_path / "out",
            **QUICK,
            **settings,
        }
        with pytest.raises((ValueError, OSError)) as raised:
            finetune(setup, **arguments)
        assert "\n" not in str(raised.value)
        return str(raised.value)

    assert error(data_dir=tmp_path / "missing") == (
        f"{tmp_path / 'missing'} has no metadata.json; prepare the data with prepare_alpaca.py first"
    )
    tokenizer = (checkpoint_dir / "tokenizer.model").read_bytes()
    other_tokenizer = link_checkpoint(
        checkpoint_dir, tmp_path / "other_tokenizer", **{"tokenizer.model": tokenizer + b"\0"}
    )
    assert error(checkpoint_dir=other_tokenizer).startswith(
        f"{eight_records} was tokenized with another tokenizer than {other_tokenizer / 'tokenizer.model'}"
    )
    config = json.loads((checkpoint_dir / "model_config.json").read_text())
    small_vocab = link_checkpoint(
        checkpoint_dir,
        tmp_path / "small_vocab",
        **{"model_config.json": json.dumps({**config, "vocab_size": 1000}).encode()},
    )
    assert error(checkpoint_dir=small_vocab) == (
        f"{eight_records} holds token ids up to 31999, but the model's vocabulary has 1000; "
        "prepare the data with this checkpoint's tokenizer"
    )
    assert error(checkpoint_dir=tmp_path / "nothing").startswith(
        f"checkpoint directory {tmp_path / 'nothing'} does not exist"
    )
    assert (
        error(batch_size=4, micro_batch_size=8)
        == "--train.micro_batch_size 8 must be between 1 and --train.batch_size 4"
    )
    assert error(batch_size=6, micro_batch_size=4) == (
        "--train.batch_size 6 must be a multiple of --train.micro_batch_size 4 x 1 devices"
    )
    assert error(resume=str(tmp_path / "nope.pt")) == (
        f"--resume {tmp_path / 'nope.pt'}: no such file (use --resume auto for the latest in --out_dir)"
    )

    out_dir, _ = overfit  # a state of LoRA r=8 on query, value and the head, batches of 8
    fitting = dict(
        resume=str(out_dir / "train_state.pt"), batch_size=8, lora_targets=["query", "value", "head"], lora_dropout=0.0
    )
    assert error(**{**fitting, "lora_r": 4}) == (
        f"--resume {out_dir / 'train_state.pt'} was saved by a run with other settings: "
        "lora={'r': 8, 'alpha': 16, 'dropout': 0.0, 'targets': ('query', 'value', 'head'), 'rslora': False, "
        "'dora': False, 'ranks': {}, 'alphas': {}} (now: {'r': 4, 'alpha': 16, 'dropout': 0.0, "
        "'targets': ('query', 'value', 'head'), 'rslora': False, 'dora': False, 'ranks': {}, 'alphas': {}}); "
        "resume with the same checkpoint, data, LoRA and batch settings"
    )
    assert error(**{**fitting, "batch_size": 4}).endswith(
        "batch_size=8 (now: 4); resume with the same checkpoint, data, LoRA and batch settings"
    )
    assert error(**{**fitting, "resume": str(out_dir / "lit_model_lora_finetuned.safetensors")}).startswith(
        f"--resume {out_dir / 'lit_model_lora_finetuned.safetensors'} is not a train_state.pt of a fine-tuning script ("
    )


def test_command_line_errors_are_one_line_on_stderr_with_nonzero_exit(checkpoint_dir, tmp_path):
    result = run_command(
        command("finetune_lora.py", tmp_path / "missing", checkpoint_dir, tmp_path / "out"), timeout=120
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {tmp_path / 'missing'} has no metadata.json; prepare the data with prepare_alpaca.py first\n"
    )
    assert not (tmp_path / "out").exists()


def test_help_lists_every_flag_with_its_explanation():
    result = subprocess.run(
        [sys.executable, "finetune_lora.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    train_flags = (
        "micro_batch_size",
        "batch_size",
        "learning_rate",
        "weight_decay",
        "warmup_steps",
        "max_steps",
        "epochs",
        "max_seq_length",
        "eval_interval",
        "eval_batches",
        "save_interval",
        "seed",
        "gradient_checkpointing",
        "optimizer",
        "grad_clip",
        "compile",
    )
    for flag in (
        "--devices",
        "--num_nodes",
        "--strategy",
        "--precision",
        "--quantize",
        "--lora_r",
        "--lora_alpha",
        "--lora_dropout",
        "--lora_targets",
        "--lora_rslora",
        "--lora_dora",
        "--resume",
        *(f"--train.{name}" for name in train_flags),
    ):
        assert f"  {flag} " in result.stdout, flag
    assert "Fine-tune a checkpoint with LoRA on data prepared by prepare_alpaca.py." in result.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda path: path.write_bytes(b"not a torch file"), "is not data prepared by prepare_alpaca.py ("),
        (
            lambda path: torch.save([argparse.Namespace(input_ids=1)], path),
            "is not data prepared by prepare_alpaca.py (",
        ),
        (
            lambda path: torch.save({"input_ids": torch.ones(3)}, path),
            "does not hold a list of input_ids/labels records",
        ),
    ],
    ids=["not torch.save", "a pickled object", "not records"],
)
def test_a_damaged_train_pt_is_one_line_and_nothing_is_written(
    checkpoint_dir, eight_records, tmp_path, content, message
):
    """train.pt is read with weights_only=True: a pickled object other than tensors is refused, in one line."""
    data_dir = tmp_path / "data"
    shutil.copytree(eight_records, data_dir)
    content(data_dir / "train.pt")
    result = run_command(command("finetune_lora.py", data_dir, checkpoint_dir, tmp_path / "out", **QUICK), timeout=120)
    assert result.returncode == 1
    assert result.stderr == f"error: {data_dir / 'train.pt'} {message}" + result.stderr.partition(message)[2]
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_dora_and_rslora_train_their_parameters_and_the_adapter_records_them(checkpoint_dir, eight_records, tmp_path):
    """--lora_dora --lora_rslora with per-projection targets: the magnitudes learn and are saved, the adapter records
    the settings, and the model it loads to computes what the trained one did."""
    from lora import load_lora_model

    with pytest.MonkeyPatch.context() as monkeypatch, caught_models(monkeypatch, finetune_lora) as models:
        finetune(
            setup,
            data_dir=eight_records,
            checkpoint_dir=checkpoint_dir,
            out_dir=tmp_path,
            **{
                **QUICK,
                "learning_rate": 1e-2,
                "lora_targets": ["value", "down"],
                "lora_rslora": True,
                "lora_dora": True,
            },
        )
    adapter = tmp_path / finetune_lora.ADAPTER_NAME
    config, _ = read_lora_config(adapter)
    assert config.dora and config.rslora and config.targets == ("value", "down")
    magnitude = load_file(adapter)["blocks.0.mlp.down_proj.lora.magnitude"]
    trained = models[0].eval()
    start = trained.blocks[0].mlp.down_proj.weight.norm(dim=1)  # ‖W‖, where the magnitude starts
    assert (magnitude - start).abs().max() > 1e-4
    idx = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_lora_model(checkpoint_dir, adapter).eval()(idx), trained(idx))


def test_lora_targets_take_one_name_or_a_list_on_the_command_line():
    for flag, expected in [("mlp", "lora_targets: mlp"), ("[all_linear, head]", "lora_targets:\n- all_linear\n- head")]:
        result = subprocess.run(
            [sys.executable, "finetune_lora.py", "--lora_targets", flag, "--print_config"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        assert expected in result.stdout


def test_lora_on_multi_turn_conversations_lowers_the_validation_loss_and_generate_lora_prompts_in_their_template(
    llama3_checkpoint_dir, tmp_path, capsys, monkeypatch
):
    import re

    import generate_lora
    from lora import read_lora_chat_template
    from prepare_chat import setup as prepare_chat
    from tokenizer import Tokenizer

    things = ["sky", "sea", "grass", "snow", "coal", "sun", "blood", "milk", "leaf", "night", "cloud", "ice"]
    conversations = [
        {
            "messages": [
                {"role": "system", "content": "Answer in three words."},
                {"role": "user", "content": f"What colour is the {thing}?"},
                {"role": "assistant", "content": f"The {thing} colour."},
                {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": f"The {thing} colour."},
            ]
        }
        for thing in things
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    prepare_chat(
        destination_path=tmp_path / "data",
        checkpoint_dir=llama3_checkpoint_dir,
        data_file_path=tmp_path / "chats.jsonl",
        test_split_fraction=0.25,
    )
    finetune(
        setup,
        data_dir=tmp_path / "data",
        checkpoint_dir=llama3_checkpoint_dir,
        out_dir=tmp_path / "out",
        batch_size=8,
        micro_batch_size=4,
        max_steps=30,
        warmup_steps=2,
        learning_rate=1e-2,  # 2e-2 overshot to 5.83 > 0.5 x 11.58 on an Intel Xeon; 1e-2 ends at 4.67
        lora_dropout=0.0,
        lora_targets=["query", "value", "head"],
        eval_interval=1,
        eval_batches=1,
        save_interval=1000,
        max_seq_length=128,
    )
    losses = [float(x) for x in re.findall(r"validation loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]

    tokenizer = Tokenizer(llama3_checkpoint_dir)
    adapter = tmp_path / "out" / "lit_model_lora_finetuned.safetensors"
    assert read_lora_chat_template(adapter) == tokenizer.chat_template  # the checkpoint's, recorded by prepare_chat
    prompts = []
    monkeypatch.setattr(decode, "generate", lambda model, ids, *args, **kwargs: prompts.append(ids) or ids)
    generate_lora.main(
        checkpoint_dir=llama3_checkpoint_dir,
        lora_path=adapter,
        prompt="What colour is the sky?",
        temperature=0.0,
        max_new_tokens=5,
    )
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(llama3_checkpoint_dir).apply_chat_template(
        [{"role": "user", "content": "What colour is the sky?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert prompts[0].tolist() == list(expected)
