"""A thin wrapper over the sentencepiece model that ships with LLaMA checkpoints (`tokenizer.model`)."""

from pathlib import Path
from typing import Union

import sentencepiece as spm
import torch


class Tokenizer:
    def __init__(self, path: Union[str, Path]) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} not found; a checkpoint directory needs its tokenizer.model")
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a sentencepiece model ({e}); LLaMA checkpoints need tokenizer.model") from None
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        self.vocab_size = self.processor.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1) -> torch.Tensor:
        ids = self.processor.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Plain ids (no BOS/EOS) of many texts at once, encoded on several threads by sentencepiece."""
        return self.processor.encode(texts)

    def decode(self, ids: Union[torch.Tensor, list[int]]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.processor.decode(ids)
