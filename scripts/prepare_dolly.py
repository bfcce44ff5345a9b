"""Turns databricks-dolly-15k into token ids for fine-tuning: the same template and files as prepare_alpaca.py.

    python scripts/prepare_dolly.py --destination_path data/dolly --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Dolly's records (JSONL: instruction, context, response, category) map context -> input and response -> output;
the category is not used. Everything else (template, masking, split, checks, output files) is prepare_alpaca.py's:
both run `data.prepare_instructions`, each on its own keys.
"""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
from data import prepare_instructions
from utils import cli

# our keys -> Dolly's keys
DOLLY_FIELDS = {"instruction": "instruction", "input": "context", "output": "response"}


def setup(
    destination_path: Path = Path("data/dolly"),
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    data_file_path: Optional[Path] = None,
    data_repo_id: str = "databricks/databricks-dolly-15k",
    data_file_name: str = "databricks-dolly-15k.jsonl",
    test_split_fraction: float = 0.1,
    max_seq_length: int = 256,
    mask_inputs: bool = True,
    ignore_index: int = -100,
    seed: int = 42,
    skip_invalid: bool = False,
) -> None:
    """Tokenize databricks-dolly-15k (or a file with its keys) into train.pt and test.pt for fine-tuning.

    Args:
        destination_path: directory that receives train.pt, test.pt and metadata.json.
        checkpoint_dir: checkpoint whose tokenizer (tokenizer.model or tokenizer.json) is used (the only files needed
            from it).
        data_file_path: a local JSONL (or JSON array) file of {"instruction", "context", "response"} records;
            when left out, `data_file_name` is downloaded from the Hub dataset `data_repo_id`.
        data_repo_id: Hugging Face Hub dataset repository to download from.
        data_file_name: file to download from `data_repo_id`.
        test_split_fraction: fraction of the records held out as test.pt (rounded down).
        max_seq_length: longer sequences are cut to this many tokens; records whose prompt alone fills it
            are left out and reported. Dolly's contexts are long: check the printed lengths.
        mask_inputs: set the labels of BOS and the prompt to `ignore_index`, so only the response is learned.
        ignore_index: label value the loss skips; must not be a token id.
        seed: seed of the train/test split.
        skip_invalid: leave out records without an instruction or response (and report how many) instead of
            stopping at the first one.
    """
    prepare_instructions(
        destination_path,
        checkpoint_dir,
        data_file_path,
        data_repo_id,
        data_file_name,
        test_split_fraction,
        max_seq_length,
        mask_inputs,
        ignore_index,
        seed,
        skip_invalid,
        fields=DOLLY_FIELDS,
    )


if __name__ == "__main__":
    cli(setup)
