"""Tokenizers: the built-in byte-level one, and local Hugging Face tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from braid.errors import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus EOS = 256. Works offline everywhere, nothing to download."""

    vocab_size = 257
    eos_id = 256
    name = "bytes"

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """Nothing to save: the byte tokenizer is built in."""


class HFTokenizer:
    """A tokenizer directory loadable by ``transformers.AutoTokenizer`` (local files only)."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.name = str(path)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ConfigError(f"config key 'data.tokenizer' = '{path}' could not be loaded: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        eos = self.tok.eos_token_id
        if eos is None:
            raise ConfigError(f"config key 'data.tokenizer' = '{path}' defines no eos_token (needed between documents)")
        self.eos_id = int(eos)
        self.vocab_size = len(self.tok)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def save(self, directory: str | Path) -> None:
        self.tok.save_pretrained(str(directory))


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``bytes`` or a local tokenizer path (a directory or a ``tokenizer.json``)."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_file():
        path = path.parent
    return HFTokenizer(path)
