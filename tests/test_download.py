"""scripts/download.py with huggingface_hub's network calls replaced by fakes that record what is asked."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

import download
from conftest import ROOT

LLAMA_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 32000,
    "rope_theta": 10000.0,
}
# What meta-llama/Llama-2-7b-hf holds: both weight formats, sharded
LLAMA_2_FILES = [
    ".gitattributes",
    "LICENSE.txt",
    "README.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
]


class FakeHub:
    """Stands in for list_repo_files, hf_hub_download and snapshot_download; writes the files asked for."""

    def __init__(self, monkeypatch, files, config=LLAMA_CONFIG, error=None, error_in="snapshot_download"):
        self.files, self.config, self.error, self.error_in = files, config, error, error_in
        self.calls = []
        for name in ("list_repo_files", "hf_hub_download", "snapshot_download"):
            monkeypatch.setattr(download, name, getattr(self, name))

    def _call(self, name, **kwargs):
        self.calls.append((name, kwargs))
        if self.error is not None and name == self.error_in:
            raise self.error

    def list_repo_files(self, repo_id, token=None):
        self._call("list_repo_files", repo_id=repo_id, token=token)
        return self.files

    def hf_hub_download(self, repo_id, filename, local_dir, token=None):
        self._call("hf_hub_download", repo_id=repo_id, filename=filename, token=token)
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / filename).write_text(json.dumps(self.config))
        return str(Path(local_dir) / filename)

    def snapshot_download(self, repo_id, allow_patterns, local_dir, token=None):
        self._call("snapshot_download", repo_id=repo_id, allow_patterns=allow_patterns, token=token)
        for name in allow_patterns:
            (Path(local_dir) / name).touch()
        return str(local_dir)


def http_error(cls, status_code, reason="Client Error"):
    return cls(f"{status_code} {reason}", response=SimpleNamespace(status_code=status_code, headers={}, request=None))


def test_downloads_safetensors_when_the_repo_has_both_formats(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = FakeHub(monkeypatch, LLAMA_2_FILES)
    download.download("meta-llama/Llama-2-7b-hf", access_token="hf_abc", checkpoint_dir=tmp_path)
    assert [name for name, _ in hub.calls] == ["list_repo_files", "hf_hub_download", "snapshot_download"]
    assert hub.calls[0][1] == {"repo_id": "meta-llama/Llama-2-7b-hf", "token": "hf_abc"}
    assert hub.calls[1][1] == {"repo_id": "meta-llama/Llama-2-7b-hf", "filename": "config.json", "token": "hf_abc"}
    assert hub.calls[2][1]["allow_patterns"] == [
        "config.json",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert (tmp_path / "meta-llama/Llama-2-7b-hf/model.safetensors.index.json").is_file()
    err = capsys.readouterr().err
    assert f"python scripts/convert_hf_checkpoint.py --checkpoint_dir {tmp_path / 'meta-llama/Llama-2-7b-hf'}" in err


def test_falls_back_to_bin_weights(tmp_path, monkeypatch):
    files = ["config.json", "tokenizer.model", "pytorch_model.bin", "consolidated.00.pth", "README.md"]
    hub = FakeHub(monkeypatch, files)
    download.download("openlm-research/open_llama_3b", checkpoint_dir=tmp_path)
    assert hub.calls[-1][1]["allow_patterns"] == ["config.json", "tokenizer.model", "pytorch_model.bin"]


def test_token_comes_from_hf_token_when_not_passed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    hub = FakeHub(monkeypatch, ["config.json", "tokenizer.model", "model.safetensors"])
    download.download("org/name", checkpoint_dir=tmp_path)
    assert {kwargs["token"] for _, kwargs in hub.calls} == {"hf_from_env"}


def test_llama_3_repo_without_tokenizer_model(tmp_path, monkeypatch):
    # what meta-llama/Llama-3.1-8B-Instruct holds (original/ is Meta's own format), plus a chat_template.jinja as
    # transformers 5 writes it
    files = [
        ".gitattributes",
        "LICENSE",
        "README.md",
        "USE_POLICY.md",
        "config.json",
        "generation_config.json",
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
        "model.safetensors.index.json",
        "original/consolidated.00.pth",
        "original/params.json",
        "original/tokenizer.model",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ]
    hub = FakeHub(monkeypatch, files)
    download.download("meta-llama/Llama-3.1-8B-Instruct", checkpoint_dir=tmp_path)
    assert hub.calls[-1][1]["allow_patterns"] == [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        *[f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)],
        "model.safetensors.index.json",
    ]


def test_refuses_repo_without_a_tokenizer(tmp_path, monkeypatch):
    hub = FakeHub(
        monkeypatch, ["config.json", "tokenizer_config.json", "original/tokenizer.model", "model.safetensors"]
    )
    with pytest.raises(
        ValueError, match="^org/name has no tokenizer.model or tokenizer.json; this toolkit needs one"
    ) as exc:
        download.download("org/name", checkpoint_dir=tmp_path)
    assert "\n" not in str(exc.value)
    assert [name for name, _ in hub.calls] == ["list_repo_files"]  # nothing downloaded


def test_refuses_repo_without_hub_format_weights(tmp_path, monkeypatch):
    FakeHub(monkeypatch, ["config.json", "tokenizer.model", "consolidated.00.pth", "params.json"])
    with pytest.raises(ValueError, match="no model\\*.safetensors or pytorch_model\\*.bin weights"):
        download.download("meta-llama/Llama-2-7b", checkpoint_dir=tmp_path)


def test_refuses_unsupported_config_before_downloading_weights(tmp_path, monkeypatch):
    config = {**LLAMA_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}}
    hub = FakeHub(monkeypatch, ["config.json", "tokenizer.model", "model.safetensors"], config=config)
    with pytest.raises(ValueError, match="not a model this toolkit can run: .*rope scaling 'yarn'"):
        download.download("org/name", checkpoint_dir=tmp_path)
    assert "snapshot_download" not in [name for name, _ in hub.calls]


@pytest.mark.parametrize(
    "token, error, message",
    [
        (
            None,
            http_error(GatedRepoError, 401),
            "org/name is gated: accept its license on https://huggingface.co/org/name, then pass --access_token",
        ),
        ("hf_abc", http_error(GatedRepoError, 403), "org/name is gated and your token has no access to it yet"),
        (
            None,
            http_error(RepositoryNotFoundError, 404),
            "org/name was not found on the Hub; check the name, or it is private or gated",
        ),
        (
            "hf_abc",
            http_error(RepositoryNotFoundError, 404),
            "org/name was not found on the Hub; check the name, or your token cannot see it",
        ),
        ("hf_bad", http_error(HfHubHTTPError, 401), "the Hub refused the access token"),
        (None, http_error(HfHubHTTPError, 500, "Server Error"), "the Hub answered 500 Server Error"),
        (
            None,
            LocalEntryNotFoundError("cannot find the requested files"),
            "cannot reach the Hugging Face Hub \\(LocalEntryNotFoundError\\)",
        ),
        (None, download.TransportError("[Errno -2] Name or service not known"), "cannot reach the Hugging Face Hub"),
    ],
)
def test_hub_errors_become_one_line(tmp_path, monkeypatch, token, error, message):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    FakeHub(monkeypatch, ["config.json", "tokenizer.model", "model.safetensors"], error=error)
    with pytest.raises(ValueError, match=f"^{message}") as exc:
        download.download("org/name", access_token=token, checkpoint_dir=tmp_path)
    assert "\n" not in str(exc.value)


def test_no_network_while_listing(tmp_path, monkeypatch):
    error = download.TransportError("[Errno -2] Name or service not known")
    FakeHub(monkeypatch, [], error=error, error_in="list_repo_files")
    with pytest.raises(ValueError, match="cannot reach the Hugging Face Hub .*howto/download_weights.md"):
        download.download("org/name", checkpoint_dir=tmp_path)


def test_files_missing_after_download_are_reported(tmp_path, monkeypatch):
    # offline, snapshot_download hands back an existing local_dir without fetching anything
    hub = FakeHub(monkeypatch, ["config.json", "tokenizer.model", "model.safetensors"])
    monkeypatch.setattr(download, "snapshot_download", lambda repo_id, allow_patterns, local_dir, token: str(local_dir))
    with pytest.raises(ValueError, match="tokenizer.model did not arrive in"):
        download.download("org/name", checkpoint_dir=tmp_path)
    assert hub.calls[0][0] == "list_repo_files"


@pytest.mark.parametrize(
    "args, env, message",
    [
        (
            ["--repo_id", "org/name"],
            {"HF_HUB_OFFLINE": "1"},
            "error: huggingface_hub is in offline mode (HF_HUB_OFFLINE is set); unset it to download",
        ),
        (
            ["--repo_id", "Llama-2-7b-hf"],
            {},
            "error: --repo_id must look like <org>/<name> (e.g. meta-llama/Llama-2-7b-hf), not 'Llama-2-7b-hf'",
        ),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, env, message):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/download.py"), *args, "--checkpoint_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "org").exists()
