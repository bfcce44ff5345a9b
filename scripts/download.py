"""Downloads a LLaMA-family checkpoint from the Hugging Face Hub.

    python scripts/download.py --repo_id meta-llama/Llama-2-7b-hf --access_token hf_...

Fetches only what scripts/convert_hf_checkpoint.py and tokenizer.py read: config.json, the tokenizer's files
(tokenizer.model and/or tokenizer.json, and tokenizer_config.json, chat_template.jinja, generation_config.json when the
repository has them) and the weights (safetensors when the repository has them, else PyTorch .bin), with their index
when sharded, into
checkpoints/<org>/<name>. Then run the converter on that directory.
"""

import fnmatch
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent))
from convert_hf_checkpoint import config_from_hf
from utils import TOKENIZER_FILES, cli, one_line

try:  # the HTTP client's "cannot connect" errors: httpx2 from huggingface_hub 2.0, httpx in 1.x
    from httpx2 import TransportError
except ImportError:
    try:
        from httpx import TransportError
    except ImportError:  # requests, before 1.0: its connection errors are OSErrors
        TransportError = OSError

# The weights, in order of preference: a single file, or shards listed by an index
WEIGHT_PATTERNS = (
    ("model*.safetensors", "model.safetensors.index.json"),
    ("pytorch_model*.bin", "pytorch_model.bin.index.json"),
)


def download(repo_id: str, access_token: Optional[str] = None, checkpoint_dir: Path = Path("checkpoints")) -> None:
    """Downloads config.json, the tokenizer's files and the weights of a Hub repository.

    Args:
        repo_id: the repository on huggingface.co, as <org>/<name>, e.g. meta-llama/Llama-2-7b-hf.
        access_token: a Hugging Face token (https://huggingface.co/settings/tokens), needed for gated
            repositories such as meta-llama's; by default the HF_TOKEN environment variable, or the
            token saved by `hf auth login`.
        checkpoint_dir: the files go into <checkpoint_dir>/<org>/<name>.
    """
    if repo_id.count("/") != 1:
        raise ValueError(f"--repo_id must look like <org>/<name> (e.g. meta-llama/Llama-2-7b-hf), not {repo_id!r}")
    token = access_token or os.environ.get("HF_TOKEN")
    local_dir = Path(checkpoint_dir) / repo_id

    with explain_hub_errors(repo_id, token):
        repo_files = list_repo_files(repo_id, token=token)
        files = files_to_download(repo_id, repo_files)
        # config.json first: an unsupported architecture is refused before gigabytes of weights are fetched
        config_path = hf_hub_download(repo_id, "config.json", local_dir=local_dir, token=token)
        try:
            config_from_hf(config_path)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{repo_id} is not a model this toolkit can run: {e}") from None
        print(f"Downloading {len(files)} files of {repo_id} into {local_dir}", file=sys.stderr)
        snapshot_download(repo_id, allow_patterns=files, local_dir=local_dir, token=token)

    # offline, snapshot_download returns an existing local_dir as it is instead of failing
    missing = [name for name in files if not (local_dir / name).is_file()]
    if missing:
        raise ValueError(f"{missing[0]} did not arrive in {local_dir}; check your connection and run the command again")
    print(f"Done. Next: python scripts/convert_hf_checkpoint.py --checkpoint_dir {local_dir}", file=sys.stderr)


def files_to_download(repo_id: str, repo_files: list[str]) -> list[str]:
    """config.json, the tokenizer's files the repository has (utils.TOKENIZER_FILES) and one format of the weights
    (with its index if sharded)."""
    if "config.json" not in repo_files:
        raise ValueError(f"{repo_id} has no config.json; this toolkit needs a repository in Hugging Face format")
    if "tokenizer.model" not in repo_files and "tokenizer.json" not in repo_files:
        raise ValueError(
            f"{repo_id} has no tokenizer.model or tokenizer.json; this toolkit needs one of them beside config.json"
        )
    tokenizer = [name for name in TOKENIZER_FILES if name in repo_files]
    for weights, index in WEIGHT_PATTERNS:
        matches = sorted(name for name in repo_files if fnmatch.fnmatch(name, weights))
        if matches:
            return ["config.json", *tokenizer, *matches, *([index] if index in repo_files else [])]
    raise ValueError(
        f"{repo_id} has no model*.safetensors or pytorch_model*.bin weights; pick the repository in "
        "Hugging Face format (for Meta's models, the one whose name ends in -hf)"
    )


@contextmanager
def explain_hub_errors(repo_id: str, token: Optional[str]) -> Iterator[None]:
    """Turns huggingface_hub's exceptions into one line that says what to do."""
    url = f"https://huggingface.co/{repo_id}"
    try:
        yield
    except GatedRepoError:  # before RepositoryNotFoundError, its parent class
        if token is None:
            raise ValueError(
                f"{repo_id} is gated: accept its license on {url}, then pass --access_token "
                "(or set HF_TOKEN) with a token from https://huggingface.co/settings/tokens"
            ) from None
        raise ValueError(
            f"{repo_id} is gated and your token has no access to it yet: accept its license on {url} "
            "with the account the token belongs to (approval can take a while)"
        ) from None
    except RepositoryNotFoundError:
        hint = "your token cannot see it" if token else "it is private or gated and needs --access_token"
        raise ValueError(f"{repo_id} was not found on the Hub; check the name, or {hint}") from None
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) == 401:
            raise ValueError(
                "the Hub refused the access token; create a new one at https://huggingface.co/settings/tokens"
            ) from None
        raise ValueError(f"the Hub answered {one_line(e)}") from None
    except OfflineModeIsEnabled:
        raise ValueError("huggingface_hub is in offline mode (HF_HUB_OFFLINE is set); unset it to download") from None
    except (LocalEntryNotFoundError, TransportError, ConnectionError) as e:
        raise ValueError(
            f"cannot reach the Hugging Face Hub ({type(e).__name__}); check your connection, or without "
            "network copy a Hub-format directory over and convert it (see howto/download_weights.md)"
        ) from None


if __name__ == "__main__":
    cli(download, as_positional=False)  # --repo_id, not a bare positional argument
