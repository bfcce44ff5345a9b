"""How fast prepare_alpaca.py turns an Alpaca-sized data set into train.pt and test.pt.

    python benchmarks/prepare_speed.py

Repeats the 999 shared records of ../shared/data/alpaca_en_demo.json up to `records` (52k, the size of the
cleaned Alpaca set) and times a whole preparation with the shared LLaMA tokenizer: reading the JSON, checking
the records, batch tokenization, building the tensors, the split and writing the files. The target is under
60 s on 2 CPU cores. The shared records are GPT-4 answers, about twice as long as cleaned Alpaca's, so the
real download prepares faster than this.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from jsonargparse import CLI

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
from prepare_alpaca import setup

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main(records: int = 52_000, max_seq_length: int = 256) -> None:
    """Prepares `records` records once and prints the time and records per second.

    Args:
        records: how many records to prepare (the shared 999, repeated).
        max_seq_length: passed on to prepare_alpaca.py.
    """
    demo = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text())
    data = [demo[i % len(demo)] for i in range(records)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "checkpoint").mkdir()
        shutil.copy(SHARED_DATA / "tokenizer.model", tmp / "checkpoint" / "tokenizer.model")
        (tmp / "data.json").write_text(json.dumps(data))

        start = time.perf_counter()
        setup(
            destination_path=tmp / "out",
            checkpoint_dir=tmp / "checkpoint",
            data_file_path=tmp / "data.json",
            max_seq_length=max_seq_length,
        )
        elapsed = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (tmp / "out").iterdir())

    print(
        f"\n{records} records in {elapsed:.1f} s on {os.cpu_count()} CPU cores: {records / elapsed:,.0f} records/s "
        f"({size / 1e6:.0f} MB written)"
    )


if __name__ == "__main__":
    CLI(main)
