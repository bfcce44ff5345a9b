"""--strategy fsdp (FSDP2: training.make_fabric, shard_model; train_state.save_train_state, load_train_state) on 2 CPU
processes over gloo, against one process: the same losses with gradient accumulation (2 micro-batches per process per
step), each process holding half of every Block's weights, a run killed with SIGKILL and resumed continuing exactly,
on 2 processes and on 1, and LoRA on 2 "nodes" of 1 process each, launched by torchrun through its c10d rendezvous.
The tiny config of conftest.make_checkpoint, fp32, the 8 records of conftest.eight_records."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import finetune_full
import finetune_lora
from conftest import ROOT, command, finetune, run_command
from train_state import find_resume

# 8 records a step in micro-batches of 2: on 2 processes, 2 micro-batches each, accumulated
SETTINGS = dict(
    batch_size=8,
    micro_batch_size=2,
    max_steps=6,
    warmup_steps=1,
    eval_interval=3,
    eval_batches=2,
    save_interval=2,
    max_seq_length=128,
)
FULL = dict(SETTINGS, learning_rate=1e-3)  # with gradient checkpointing, finetune_full.py's default
LORA = dict(SETTINGS, learning_rate=1e-2, lora_dropout=0.0, lora_targets="all_linear")


def history(out_dir: Path) -> dict:
    """The (step, loss) history of a run's newest train state (--resume auto's), either kind."""
    path = find_resume("auto", out_dir)
    return torch.load(path / "meta.pt" if path.is_dir() else path, weights_only=True)["history"]


def assert_same_history(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    for split in ("train", "val"):
        assert [step for step, _ in actual[split]] == [step for step, _ in expected[split]], split
        assert [loss for _, loss in actual[split]] == pytest.approx([loss for _, loss in expected[split]], abs=atol)


def assert_same_tensors(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=atol)


def shards(directory: Path) -> dict[str, list[torch.Size]]:
    """Each weight of a sharded train state: the size of the part each process wrote (torch.distributed.checkpoint's
    metadata, one chunk per process)."""
    saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    return {
        name.removeprefix("model."): [chunk.sizes for chunk in meta.chunks]
        for name, meta in saved.items()
        if name.startswith("model.")
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, checkpoint_dir, eight_records) -> dict[str, Path]:
    """The reference: each script's run on one process, uninterrupted."""
    out = tmp_path_factory.mktemp("one")
    finetune(finetune_full.setup, data_dir=eight_records, checkpoint_dir=checkpoint_dir, out_dir=out / "full", **FULL)
    finetune(finetune_lora.setup, data_dir=eight_records, checkpoint_dir=checkpoint_dir, out_dir=out / "lora", **LORA)
    return {"full": out / "full", "lora": out / "lora"}


def test_full_fine_tuning_on_two_processes_killed_and_resumed_on_two_or_one_gives_the_losses_of_one(
    one_process, checkpoint_dir, eight_records, tmp_path
):
    killed = tmp_path / "two"
    args = command("finetune_full.py", eight_records, checkpoint_dir, killed, devices=2, strategy="fsdp", **FULL)
    process = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not (killed / "train_state").exists():  # the link appears once the first state is complete
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # both processes at once, as when a machine goes down
    process.wait()
    stopped_at = torch.load(killed / "train_state" / "meta.pt", weights_only=True)["step"]
    assert stopped_at in (2, 4)
    shutil.copytree(killed, tmp_path / "one", symlinks=True)

    # each process wrote half of every weight: a Block's weights are split by rows between the two
    weights = load_file(one_process["full"] / "lit_model.safetensors")
    blocks = {name: sizes for name, sizes in shards(killed / "train_state").items() if name.startswith("blocks.")}
    assert len(blocks) == 2 * 9  # 2 layers: 2 norms, q, k, v, projection, gate, up, down
    for name, sizes in blocks.items():
        assert len(sizes) == 2 and sizes[0] == sizes[1] and 2 * sizes[0][0] == weights[name].shape[0], name

    # resumed on 2 processes: the losses and weights of the uninterrupted run on one
    result = run_command([*args, "--resume", "auto"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {killed / 'train_state'} at step {stopped_at}" in result.stdout
    assert_same_history(history(killed), history(one_process["full"]))
    assert_same_tensors(
        load_file(killed / "lit_model.safetensors"), load_file(one_process["full"] / "lit_model.safetensors")
    )
    assert sorted(p.name for p in killed.glob(".train_state-*")) == [(killed / "train_state").resolve().name]

    # the state 2 processes saved, resumed on 1 (no FSDP): the same again
    finetune(
        finetune_full.setup,
        data_dir=eight_records,
        checkpoint_dir=checkpoint_dir,
        out_dir=tmp_path / "one",
        resume="auto",
        **FULL,
    )
    assert_same_history(history(tmp_path / "one"), history(one_process["full"]))
    assert_same_tensors(
        load_file(tmp_path / "one" / "lit_model.safetensors"), load_file(one_process["full"] / "lit_model.safetensors")
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_lora_on_two_nodes_of_one_process_through_torchrun_gives_the_losses_and_adapter_of_one(
    one_process, checkpoint_dir, eight_records, tmp_path
):
    """Two torchrun agents on this machine meet at a c10d rendezvous on localhost, as two machines would at the first
    one's address; each starts one process of a 2-node FSDP run."""
    out_dir = tmp_path / "two_nodes"
    script = command("finetune_lora.py", eight_records, checkpoint_dir, out_dir, **LORA)[1:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    torchrun += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{free_port()}", "--rdzv_id", "test"]
    flags = ["--num_nodes", "2", "--devices", "1", "--strategy", "fsdp"]
    nodes = [
        subprocess.Popen(
            [*torchrun, *script, *flags],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    assert sum("2 device(s)" in stdout for stdout, _ in outputs) == 2  # each node's first process prints

    assert_same_history(history(out_dir), history(one_process["lora"]))
    adapter = finetune_lora.ADAPTER_NAME
    # AdamW divides by the root of each element's squared gradients: where a gradient is near 0, the rounding of the
    # sum over two processes moves the weight by a part of the learning rate (1e-2); 7e-5 measured
    assert_same_tensors(load_file(out_dir / adapter), load_file(one_process["lora"] / adapter), atol=1e-4)
    # the state holds LoRA's A and B only, each split by rows between the 2 processes
    lora_shards = shards(out_dir / "train_state")
    assert len(lora_shards) == 2 * 2 * 7 and all(".lora." in name for name in lora_shards)
    assert all(len(sizes) == 2 and sizes[0] == sizes[1] for sizes in lora_shards.values())


@pytest.mark.parametrize("script", ["finetune_adapter.py", "finetune_dpo.py", "finetune_grpo.py"])
def test_the_other_fine_tuning_scripts_on_two_processes_give_the_losses_of_one(
    script, checkpoint_dir, eight_records, llama3_checkpoint_dir, tmp_path
):
    """finetune_adapter.py (v2: prompts, biases, scales and norms, every kind of tensor it trains), finetune_dpo.py
    (the reference under lora_disabled, a forward pass more per micro-batch on every process) and finetune_grpo.py
    (every process samples the same completions, whose update's micro-batches are shared out) shard as the others."""
    import finetune_adapter
    import finetune_dpo
    import finetune_grpo
    from test_finetune_dpo import CONVERSATIONS, prepare_pairs
    from test_finetune_grpo import RUN, prepare_prompts

    if script == "finetune_adapter.py":
        setup, flags = finetune_adapter.setup, dict(SETTINGS, adapter_version=2, adapter_layers=2, learning_rate=1e-2)
        data_dir, base = eight_records, checkpoint_dir
    elif script == "finetune_grpo.py":  # 2 prompts x 4 completions a step in micro-batches of 4: one per process
        setup, flags, base = finetune_grpo.setup, RUN, checkpoint_dir
        data_dir = prepare_prompts(tmp_path / "prompts", checkpoint_dir)
    else:  # 4 pairs to train: 2 a step in micro-batches of 1, one each per process
        setup, base = finetune_dpo.setup, llama3_checkpoint_dir
        flags = dict(SETTINGS, batch_size=2, micro_batch_size=1, max_steps=4, learning_rate=3e-2, max_seq_length=256)
        data_dir = prepare_pairs(base, tmp_path / "pairs", CONVERSATIONS)
    finetune(setup, data_dir=data_dir, checkpoint_dir=base, out_dir=tmp_path / "one", **flags)
    args = command(script, data_dir, base, tmp_path / "two", devices=2, strategy="fsdp", **flags)
    result = run_command(args, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_history(history(tmp_path / "two"), history(tmp_path / "one"))
