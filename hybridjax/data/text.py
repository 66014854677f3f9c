"""Language-modelling data: local text files (tokenized on the fly) and pre-tokenized memmaps."""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from hybridjax.data._checks import as_tuple, check_fraction, check_positive

HOLDOUT_SEED = 0  # fixed, so every training seed is evaluated on the same held-out documents


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Local UTF-8 text files -> documents -> tokens -> packed rows.

    paths, eval_paths: files or glob patterns. Without eval_paths, a fixed `eval_fraction` of the
      documents (at least one) is held out for eval and never trained on.
    doc_separator: None = one document per file; else files are split on it (empty pieces dropped).
    tokenizer: "byte" (UTF-8 bytes + PAD/BOS/EOS) or the local path of a `tokenizers`
      tokenizer.json (or of a folder holding one); bos/eos/pad_token name its special tokens.
      Each document is framed [BOS] tokens [EOS] with the ones the tokenizer has.
    """

    paths: tuple[str, ...] = ()
    eval_paths: tuple[str, ...] = ()
    eval_fraction: float = 0.05
    doc_separator: str | None = None
    tokenizer: str = "byte"
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "paths", as_tuple("TextConfig.paths", self.paths, str))
        object.__setattr__(self, "eval_paths", tuple(self.eval_paths or ()))
        if not self.eval_paths:
            check_fraction(
                "TextConfig.eval_fraction", self.eval_fraction, closed_low=False, closed_high=False
            )
        if self.doc_separator == "":
            raise ValueError("TextConfig.doc_separator: must be None or a non-empty string")
        if not self.tokenizer:
            raise ValueError("TextConfig.tokenizer: give 'byte' or the path of a tokenizer.json")


@dataclasses.dataclass(frozen=True)
class MemmapConfig:
    """A flat stream of token ids on disk: a .npy file, or a raw binary file of `dtype`.

    Rows are consecutive windows of the stream (tokens = stream[i*L : i*L+L], targets shifted by
    one). Without eval_path the last `eval_fraction` of the stream is held out for eval.
    eos_id: when set, documents end at this token: segment ids restart after it and its own target
      (the next document's first token) gets loss_mask 0.
    """

    path: str = ""
    vocab_size: int = 0
    dtype: str | None = None
    eval_path: str | None = None
    eval_fraction: float = 0.01
    eos_id: int | None = None

    def __post_init__(self):
        if not self.path:
            raise ValueError("MemmapConfig.path: must name a .npy or raw token file")
        check_positive("MemmapConfig.vocab_size", self.vocab_size)
        for name in ("path", "eval_path"):
            path = getattr(self, name)
            if path is not None and not path.endswith(".npy") and self.dtype is None:
                raise ValueError(
                    f"MemmapConfig.dtype: needed for the raw token file {name}="
                    f"{path!r}, e.g. 'uint16' or 'int32' (.npy files carry theirs)"
                )
        if self.dtype is not None:
            try:
                kind = np.dtype(self.dtype).kind
            except TypeError as e:
                raise ValueError(f"MemmapConfig.dtype: {self.dtype!r} is not a numpy dtype") from e
            if kind not in "iu":
                raise ValueError(
                    f"MemmapConfig.dtype: must be an integer dtype, got {self.dtype!r}"
                )
        if self.eval_path is None:
            check_fraction(
                "MemmapConfig.eval_fraction",
                self.eval_fraction,
                closed_low=False,
                closed_high=False,
            )
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(
                f"MemmapConfig.eos_id: must be in [0, vocab_size={self.vocab_size}), "
                f"got {self.eos_id}"
            )


# --- text files --------------------------------------------------------------------------------


def expand_paths(field: str, patterns: tuple[str, ...]) -> list[str]:
    """Files named by paths or glob patterns, each pattern sorted; a pattern matching nothing fails."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ValueError(f"{field}: {pattern!r} matches no file")
        files.extend(matches)
    return files


def read_documents(files: list[str], separator: str | None) -> list[str]:
    docs = []
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            text = f.read()
        pieces = [text] if separator is None else text.split(separator)
        docs.extend(p for p in pieces if p)
    return docs


def text_documents(config: TextConfig, split: str) -> list[str]:
    """The documents of one split; train and eval never share a document."""
    docs = read_documents(expand_paths("TextConfig.paths", config.paths), config.doc_separator)
    if config.eval_paths:
        if split == "eval":
            return read_documents(
                expand_paths("TextConfig.eval_paths", config.eval_paths), config.doc_separator
            )
        return docs
    if len(docs) < 2:
        raise ValueError(
            f"TextConfig.paths: found {len(docs)} document(s), too few to hold some "
            "out for eval; set doc_separator to split files, or give eval_paths"
        )
    n_eval = min(len(docs) - 1, max(1, round(config.eval_fraction * len(docs))))
    held_out = np.zeros(len(docs), bool)
    held_out[np.random.default_rng(HOLDOUT_SEED).permutation(len(docs))[:n_eval]] = True
    return [d for d, h in zip(docs, held_out) if h == (split == "eval")]


# --- memmaps -----------------------------------------------------------------------------------


def open_tokens(path: str, dtype: str | None, field: str = "MemmapConfig.path") -> np.ndarray:
    """A read-only 1-D memmap of a .npy file or of a raw file of `dtype`."""
    if not os.path.isfile(path):
        raise ValueError(f"{field}: no file at {path!r}")
    if path.endswith(".npy"):
        tokens = np.load(path, mmap_mode="r")
        if dtype is not None and tokens.dtype != np.dtype(dtype):
            raise ValueError(f"MemmapConfig.dtype: {path!r} holds {tokens.dtype}, not {dtype}")
    else:
        tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if tokens.ndim != 1:
        raise ValueError(
            f"{field}: {path!r} must hold a 1-D token stream, got shape {tokens.shape}"
        )
    return tokens


class TokenWindows:
    """Random-access rows over a span of a token file; picklable (the memmap opens lazily)."""

    def __init__(
        self,
        path: str,
        dtype: str | None,
        start: int,
        stop: int,
        seq_len: int,
        vocab_size: int,
        eos_id: int | None,
    ):
        self.path, self.dtype, self.start, self.stop = path, dtype, start, stop
        self.seq_len, self.vocab_size, self.eos_id = seq_len, vocab_size, eos_id
        self._len = max(0, (stop - start - 1) // seq_len)  # each row needs seq_len + 1 tokens
        self._tokens = None

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}

    def token(self, offset: int) -> int:
        """The token `offset` positions into the span."""
        if self._tokens is None:
            self._tokens = open_tokens(self.path, self.dtype)
        return int(self._tokens[self.start + offset])

    def __getitem__(self, index: int) -> dict:
        if self._tokens is None:
            self._tokens = open_tokens(self.path, self.dtype)
        lo = self.start + index * self.seq_len
        window = np.asarray(self._tokens[lo : lo + self.seq_len + 1]).astype(np.int32)
        if window.min() < 0 or window.max() >= self.vocab_size:
            bad = window[(window < 0) | (window >= self.vocab_size)][0]
            raise ValueError(
                f"MemmapConfig.vocab_size: token id {bad} in {self.path!r} near "
                f"position {lo} is outside [0, {self.vocab_size})"
            )
        tokens, targets = window[:-1], window[1:]
        if self.eos_id is None:
            segment_ids = np.ones(self.seq_len, np.int32)
            loss_mask = np.ones(self.seq_len, np.float32)
        else:
            is_eos = tokens == self.eos_id
            segment_ids = 1 + np.concatenate([[0], np.cumsum(is_eos[:-1])]).astype(np.int32)
            loss_mask = (~is_eos).astype(np.float32)
        return {
            "tokens": tokens,
            "targets": targets,
            "loss_mask": loss_mask,
            "segment_ids": segment_ids,
        }


def memmap_windows(config: MemmapConfig, split: str, seq_len: int) -> TokenWindows:
    """The rows of one split: eval_path, or the last eval_fraction of the stream (disjoint)."""
    own_file = split == "eval" and config.eval_path is not None
    path, field = (
        (config.eval_path, "MemmapConfig.eval_path")
        if own_file
        else (config.path, "MemmapConfig.path")
    )
    n = len(open_tokens(path, config.dtype, field))
    start, stop = 0, n
    if config.eval_path is None:
        cut = n - round(config.eval_fraction * n)
        start, stop = (cut, n) if split == "eval" else (0, cut)
    windows = TokenWindows(
        path, config.dtype, start, stop, seq_len, config.vocab_size, config.eos_id
    )
    if not len(windows):
        raise ValueError(
            f"{field}: the {split} span of {path!r} ({stop - start} tokens) is "
            f"shorter than one row of seq_len + 1 = {seq_len + 1} tokens"
        )
    return windows
