"""Turns instruction data (Alpaca, or any JSON/JSONL file with the same keys) into token ids for fine-tuning.

    python prepare_alpaca.py --destination_path data/alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Each record becomes BOS + prompt + response + EOS, where the prompt is the Alpaca template (`data.generate_prompt`)
and BOS is there when the tokenizer adds one (Llama 2 and 3.1 do, SmolLM2 does not). The labels repeat the ids, with
`ignore_index` over BOS + prompt (when `mask_inputs`), so the loss only teaches the model to answer. Writes `train.pt`
and `test.pt` (lists of {"input_ids", "labels"} LongTensors) and `metadata.json` (tokenizer hash, template,
settings), which fine-tuning checks with `data.check_prepared_data`. The steps (read, check, split, tokenize, write)
are `data.prepare_instructions`, which scripts/prepare_dolly.py runs on Dolly's keys. See howto/prepare_dataset.md.
"""

from pathlib import Path
from typing import Optional

from data import prepare_instructions
from utils import cli

# our keys -> the keys in the data file; scripts/prepare_dolly.py has its own
ALPACA_FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}


def setup(
    destination_path: Path = Path("data/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    data_file_path: Optional[Path] = None,
    data_repo_id: str = "yahma/alpaca-cleaned",
    data_file_name: str = "alpaca_data_cleaned.json",
    test_split_fraction: float = 0.03865,  # 2000 of the 51760 cleaned Alpaca records
    max_seq_length: int = 256,
    mask_inputs: bool = True,
    ignore_index: int = -100,
    seed: int = 42,
    skip_invalid: bool = False,
) -> None:
    """Tokenize Alpaca-style instruction data into train.pt and test.pt for fine-tuning.

    Args:
        destination_path: directory that receives train.pt, test.pt and metadata.json.
        checkpoint_dir: checkpoint whose tokenizer (tokenizer.model or tokenizer.json, with tokenizer_config.json)
            is used (the only files needed from it, so the weights need not be converted yet).
        data_file_path: a local JSON array or JSONL file of {"instruction", "input", "output"} records;
            when left out, `data_file_name` is downloaded from the Hub dataset `data_repo_id`.
        data_repo_id: Hugging Face Hub dataset repository to download from.
        data_file_name: file to download from `data_repo_id`.
        test_split_fraction: fraction of the records held out as test.pt (rounded down).
        max_seq_length: longer sequences are cut to this many tokens; records whose prompt alone fills it
            are left out and reported, since nothing of their response would remain.
        mask_inputs: set the labels of BOS and the prompt to `ignore_index`, so only the response is learned.
        ignore_index: label value the loss skips; must not be a token id.
        seed: seed of the train/test split.
        skip_invalid: leave out records without an instruction or output (and report how many) instead of
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
        fields=ALPACA_FIELDS,
    )


if __name__ == "__main__":
    cli(setup)
