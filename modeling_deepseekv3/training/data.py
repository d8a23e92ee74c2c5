"""Text data for pretraining: files, tokenizer, one token stream, deterministic batches with a resumable position.

The corpus is read from text files, folders or globs, tokenized once, and concatenated into one token stream
(documents joined by EOS). Training samples are the ``n = (len - 1) // seq_len`` non-overlapping windows of
``seq_len + 1`` tokens (inputs and shifted labels); each epoch visits every window once, in an order drawn
from the run's seed and the epoch number, so the same command gives the same batches and a resumed run
continues exactly where it stopped (:class:`WindowSampler` state is ``(epoch, cursor)``).

Evaluation uses the same windows in file order, every token after the first predicted once, so the summed
negative log-likelihood divided by the UTF-8 bytes of the predicted tokens is the held-out bits per byte.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DataError",
    "TokenStream",
    "WindowSampler",
    "bits_per_byte",
    "describe",
    "eval_windows",
    "resolve_files",
    "token_byte_lengths",
]


class DataError(ValueError):
    """Training data that cannot make a single batch; the message says which files and what to do."""


def resolve_files(specs: list[str]) -> list[Path]:
    """``--data`` arguments (files, folders -- every ``*.txt`` in them, recursively -- or globs) -> sorted files."""
    files: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not found:
            raise DataError(f"{spec}: no such file, no *.txt in that folder, or nothing matches that glob.")
        files.update(p.resolve() for p in found)
    return sorted(files)


@dataclass
class TokenStream:
    """All documents tokenized and joined by EOS: ``tokens`` (int64 ``[N]``), the files they came from, the
    UTF-8 size of the text, and a fingerprint that identifies data + tokenizer (checked on ``--resume``)."""

    tokens: torch.Tensor
    files: list[Path]
    text_bytes: int
    fingerprint: str

    @classmethod
    def from_files(cls, files: list[Path], tokenizer) -> TokenStream:
        ids: list[int] = []
        digest = hashlib.sha256()
        total = 0
        for file in files:
            text = file.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue
            data = text.encode("utf-8")
            total += len(data)
            digest.update(file.name.encode() + b"\0" + hashlib.sha256(data).digest())
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
            ids.append(tokenizer.eos_token_id)
        digest.update(repr((len(tokenizer), tokenizer.eos_token_id)).encode())
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
        if not ids:
            raise DataError(f"the data files ({', '.join(str(f) for f in files[:3])}...) hold no text.")
        return cls(torch.tensor(ids, dtype=torch.long), files, total, digest.hexdigest()[:16])

    def num_windows(self, seq_len: int) -> int:
        return (len(self.tokens) - 1) // seq_len


class WindowSampler:
    """Batches of ``[B, seq_len + 1]`` windows of a token stream, every window once per epoch, the order of
    epoch ``e`` a permutation drawn from ``seed + e``. ``state_dict()`` / ``load_state_dict()`` carry the
    position, so resuming continues with the very next batch."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int):
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.n = stream.num_windows(seq_len)
        if self.n < 1:
            raise DataError(
                f"the training data has {len(stream.tokens)} tokens, fewer than one sequence of --seq-len {seq_len} "
                "plus one; add data or lower --seq-len."
            )
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def next_batch(self, batch: int) -> torch.Tensor:
        """``[batch, seq_len + 1]`` token windows (an epoch boundary may fall inside a batch)."""
        rows = []
        for _ in range(batch):
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            start = int(self._order[self.cursor]) * self.seq_len
            rows.append(self.stream.tokens[start : start + self.seq_len + 1])
            self.cursor += 1
        return torch.stack(rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def eval_windows(stream: TokenStream, seq_len: int) -> torch.Tensor:
    """``[W, seq_len + 1]`` windows in order, overlapping by one token, so every token after the first is
    predicted exactly once (a shorter last window is dropped when it has fewer than 2 tokens)."""
    tokens = stream.tokens
    out = []
    for start in range(0, len(tokens) - 1, seq_len):
        w = tokens[start : start + seq_len + 1]
        if len(w) >= 2:
            out.append(torch.nn.functional.pad(w, (0, seq_len + 1 - len(w)), value=-100))
    return torch.stack(out)


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """``[vocab]`` UTF-8 bytes each token id stands for (byte-level BPE: one byte per symbol of its string;
    added special tokens: the bytes of their text) -- the denominator of bits per byte."""
    byte_of = _bytes_to_unicode_inverse()
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    specials = set(tokenizer.all_special_ids)
    for token, idx in tokenizer.get_vocab().items():
        if idx >= len(lengths):
            continue
        if idx in specials or any(ch not in byte_of for ch in token):
            lengths[idx] = 0 if idx in specials else len(token.encode("utf-8"))
        else:
            lengths[idx] = len(token)
    return lengths


def _bytes_to_unicode_inverse() -> dict[str, int]:
    """The byte-level alphabet of GPT-2-style BPE: printable characters standing for the 256 bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def bits_per_byte(nll_sum: float, num_bytes: int) -> float:
    """Summed natural-log likelihood over the predicted tokens -> bits per UTF-8 byte of their text."""
    return nll_sum / math.log(2) / max(num_bytes, 1)


def describe(files: list[Path]) -> str:
    return f"{len(files)} files, {sum(os.path.getsize(f) for f in files) / 1e6:.2f} MB"
