"""finetune_adapter.py: v1 and v2 lower the held-out loss of the real SmolLM2-135M-Instruct on real Alpaca records (the
starting loss computed by transformers), a run stopped after a checkpoint resumes to the losses and tensors of an
unbroken one, bf16-mixed keeps the residual stream in bf16, and bad input stops with one line (training.py's parts:
tests/test_training.py; the method itself: tests/test_adapter.py).

The short runs are on the tiny config of conftest.make_checkpoint, fp32 on CPU, with records of
../shared/data/alpaca_en_demo.json prepared by prepare_alpaca.py."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune_adapter
import training
from adapter import adapter_state_dict, load_adapter_model, read_adapter_config
from conftest import caught_models, finetune, shared_file
from finetune_adapter import setup
from finetune_lora import setup as lora_setup
from test_finetune_lora import QUICK, assert_same_history, command, link_checkpoint, losses, run_command, train_state


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, tmp_path_factory) -> tuple[Path, Path, float]:
    """The real SmolLM2-135M-Instruct, converted (the session's directory, shared with other tests), the 24 shortest
    real Alpaca records prepared for its tokenizer (20 to train on, 4 held out), and the base model's held-out loss
    (`transformers_held_out_loss`)."""
    from convert_hf_checkpoint import convert_hf_checkpoint
    from prepare_alpaca import setup as prepare

    if not (smollm2_dir / "lit_model.safetensors").is_file():  # the session's directory, converted by another test
        convert_hf_checkpoint(smollm2_dir)
    directory = tmp_path_factory.mktemp("smollm2_alpaca")
    records = json.loads(shared_file("alpaca_en_demo.json").read_text())
    records = sorted(records, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:24]
    (directory / "records.json").write_text(json.dumps(records))
    prepare(
        destination_path=directory,
        checkpoint_dir=smollm2_dir,
        data_file_path=directory / "records.json",
        test_split_fraction=4 / 24,
        max_seq_length=128,
    )
    return smollm2_dir, directory, transformers_held_out_loss(smollm2_dir, directory)


def transformers_held_out_loss(checkpoint_dir: Path, data_dir: Path) -> float:
    """The base model's loss per target token over the held-out records, by transformers' LlamaForCausalLM from the
    Hub-format weights: where training starts (a fresh adapter is the base model exactly)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    total, targets = 0.0, 0
    with torch.no_grad():
        for record in torch.load(data_dir / "test.pt", weights_only=True):
            labels = record["labels"][None]
            loss = model(input_ids=record["input_ids"][None], labels=labels).loss  # mean over the shifted targets
            n = int((labels[:, 1:] != -100).sum())
            total, targets = total + loss.item() * n, targets + n
    return total / targets


@pytest.mark.parametrize("version", [1, 2])
def test_training_lowers_the_held_out_loss_of_real_smollm2_on_real_alpaca_records(smollm2, tmp_path, version):
    checkpoint_dir, data_dir, base_loss = smollm2
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(training, "generate", lambda model, prompt, *args, **kwargs: prompt)  # no sample answers
        finetune(
            setup,
            data_dir=data_dir,
            checkpoint_dir=checkpoint_dir,
            out_dir=tmp_path,
            adapter_version=version,
            batch_size=4,
            micro_batch_size=4,
            max_steps=6,
            warmup_steps=1,
            eval_interval=6,
            eval_batches=1,
            save_interval=1000,
            max_seq_length=128,
        )
    (_, val_loss), *_ = train_state(tmp_path)["history"]["val"]
    print(f"v{version}: held-out loss {base_loss:.4f} -> {val_loss:.4f}")
    assert val_loss < base_loss - 0.1, (val_loss, base_loss)
    config, _ = read_adapter_config(tmp_path / finetune_adapter.ADAPTER_NAME)
    assert (config.version, config.adapter_len, config.adapter_layers) == (version, 10, 28)  # all but the first 2


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory, checkpoint_dir, eight_records):
    """4 steps of v2 on the 8 records, a checkpoint every 2, with the model finetune_adapter.py trained."""
    out_dir = tmp_path_factory.mktemp("v2")
    with pytest.MonkeyPatch.context() as monkeypatch, caught_models(monkeypatch, finetune_adapter) as models:
        finetune(
            setup,
            data_dir=eight_records,
            checkpoint_dir=checkpoint_dir,
            out_dir=out_dir,
            adapter_version=2,
            adapter_len=4,
            **{**QUICK, "max_steps": 4, "save_interval": 2, "eval_interval": 2, "eval_batches": 1},
        )
    return out_dir, models[0]


def test_v2_trains_its_tensors_alone_and_saves_them_with_their_settings(v2_run, checkpoint_dir):
    out_dir, model = v2_run
    trained = dict(model.named_parameters())
    expected = adapter_state_dict(model)  # prompts, gates, biases, scales, norms
    assert {name for name, param in trained.items() if param.requires_grad} == set(expected)
    base = load_file(checkpoint_dir / "lit_model.safetensors")
    for name, weight in base.items():
        if name not in expected:
            assert torch.equal(trained[name], weight), name  # the frozen base, bitwise
    assert not torch.equal(trained["norm.weight"], base["norm.weight"])  # v2 trains the norms

    adapter_path = out_dir / finetune_adapter.ADAPTER_NAME
    for path in (adapter_path, out_dir / "adapter_step-000002.safetensors"):
        assert set(load_file(path)) == set(expected)
    assert set(train_state(out_dir)["model"]) == set(expected)  # the resumable state: no base weights either
    config, _ = read_adapter_config(adapter_path)
    assert (config.version, config.adapter_len, config.adapter_layers) == (2, 4, 1)  # max(2 layers - 2, 1)
    idx = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_adapter_model(checkpoint_dir, adapter_path).eval()(idx), model.eval()(idx))


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_losses_of_an_unbroken_one(
    v2_run, checkpoint_dir, eight_records, tmp_path
):
    whole = train_state(v2_run[0])
    save = finetune_adapter.save

    def save_then_stop(fabric, model, optimizer, state, *args, **kwargs):
        save(fabric, model, optimizer, state, *args, **kwargs)
        raise KeyboardInterrupt  # as if killed right after the checkpoint of step 2

    flags = dict(
        data_dir=eight_records,
        checkpoint_dir=checkpoint_dir,
        out_dir=tmp_path,
        adapter_version=2,
        adapter_len=4,
        **{**QUICK, "max_steps": 4, "save_interval": 2, "eval_interval": 2, "eval_batches": 1},
    )
    with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(finetune_adapter, "save", save_then_stop)
        finetune(setup, **flags)
    assert train_state(tmp_path)["step"] == 2
    finetune(setup, resume="auto", **flags)
    resumed = train_state(tmp_path)
    assert resumed["step"] == 4
    assert_same_history(resumed["history"], whole["history"], atol=1e-5)
    for name, tensor in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-5)


def test_bf16_mixed_keeps_the_residual_stream_in_bf16_and_the_adapter_in_fp32(checkpoint_dir, eight_records, tmp_path):
    """v2's bias and scale are fp32 parameters: multiplied into bf16 outputs as they are, they would make every
    projection's output, and so the whole residual stream, fp32."""
    losses_by_precision = {}
    with pytest.MonkeyPatch.context() as monkeypatch, caught_models(monkeypatch, finetune_adapter) as models:
        monkeypatch.setattr(training, "generate", lambda model, prompt, *args, **kwargs: prompt)  # bf16 decoding: slow
        for precision in ("bf16-mixed", "32-true"):
            finetune(
                setup,
                data_dir=eight_records,
                checkpoint_dir=checkpoint_dir,
                out_dir=tmp_path / precision,
                precision=precision,
                adapter_version=2,
                **{**QUICK, "batch_size": 2, "max_steps": 2, "max_seq_length": 64, "learning_rate": 1e-2},
            )
            losses_by_precision[precision] = losses(train_state(tmp_path / precision))
    model = models[0]
    adapter = adapter_state_dict(model)
    assert {p.dtype for name, p in model.named_parameters() if name in adapter} == {torch.float32}
    assert {p.dtype for name, p in model.named_parameters() if name not in adapter} == {torch.bfloat16}
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, output: outputs.append(output.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([[1, 2, 3]]))
    assert outputs == [torch.bfloat16] * len(model.blocks)
    assert losses_by_precision["bf16-mixed"] == pytest.approx(losses_by_precision["32-true"], abs=0.05)


def test_bad_input_stops_with_one_line_before_anything_is_written(checkpoint_dir, eight_records, v2_run, tmp_path):
    def error(**settings) -> str:
        arguments = {"data_dir": eight_records, "checkpoint_dir": checkpoint_dir, "out_dir": tmp_path / "out"}
        with pytest.raises((ValueError, OSError)) as raised:
            finetune(setup, **{**arguments, **QUICK, **settings})
        assert "\n" not in str(raised.value)
        assert not (tmp_path / "out").exists()
        return str(raised.value)

    assert error(adapter_layers=3) == "adapter_layers 3 is more than the model's 2 layers; pass 2 or fewer"
    assert error(adapter_len=0) == "adapter_len, the prompt's length, must be a whole number of at least 1, not 0"
    assert (
        error(adapter_layers=0) == "adapter_layers must be a whole number of at least 1 (v1 learns nothing else), not 0"
    )

    # --resume: a train_state.pt of the other kind, of other adapter settings, of another base
    out_dir, _ = v2_run  # v2, adapter_len 4, batches of 4
    state = out_dir / "train_state.pt"
    fitting = dict(resume=str(state), adapter_version=2, adapter_len=4)
    lora_dir = tmp_path / "lora"
    finetune(
        lora_setup,
        data_dir=eight_records,
        checkpoint_dir=checkpoint_dir,
        out_dir=lora_dir,
        **{**QUICK, "max_steps": 1},
    )
    assert error(**{**fitting, "resume": str(lora_dir / "train_state.pt")}) == (
        f"--resume {lora_dir / 'train_state.pt'} was saved by another fine-tuning script (its own settings: lora; "
        "this script's: adapter); resume it with the script that saved it"
    )
    assert error(**{**fitting, "adapter_version": 1}).startswith(
        f"--resume {state} was saved by a run with other settings: adapter={{'version': 2, 'adapter_len': 4, "
        "'adapter_layers': 1} (now: {'version': 1, 'adapter_len': 4, 'adapter_layers': 1})"
    )
    config = json.loads((checkpoint_dir / "model_config.json").read_text())
    other_base = link_checkpoint(
        checkpoint_dir,
        tmp_path / "other_base",
        **{"model_config.json": json.dumps({**config, "rope_base": 500000}).encode()},
    )
    assert "model={" in error(**fitting, checkpoint_dir=other_base)
    assert error(**{**fitting, "resume": str(out_dir / finetune_adapter.ADAPTER_NAME)}).startswith(
        f"--resume {out_dir / finetune_adapter.ADAPTER_NAME} is not a train_state.pt of a fine-tuning script ("
    )


def test_command_line_errors_are_one_line_on_stderr_with_exit_status_1(checkpoint_dir, eight_records, tmp_path):
    args = command("finetune_adapter.py", eight_records, checkpoint_dir, tmp_path / "out", adapter_layers=3)
    result = run_command(args, timeout=120)
    assert (result.returncode, result.stderr) == (
        1,
        "error: adapter_layers 3 is more than the model's 2 layers; pass 2 or fewer\n",
    )
    assert not (tmp_path / "out").exists()
