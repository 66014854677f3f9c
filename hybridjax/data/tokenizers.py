"""Tokenizers for text data: a built-in byte-level one and `tokenizers` files loaded from disk.

Both expose the same small surface: `encode(text) -> int32 array`, `decode(ids) -> str`,
`vocab_size`, and `bos_id` / `eos_id` / `pad_id` (`bos_id`, `eos_id` may be None).
"""

from __future__ import annotations

import os

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then PAD=256, BOS=257, EOS=258 (vocab_size 259)."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Bytes back to text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", "replace")


class HFTokenizer:
    """A `tokenizers` tokenizer read from a local tokenizer.json (or a folder holding one).

    `bos_token` / `eos_token` / `pad_token` name special tokens of its vocabulary; each one that is
    given must exist. Without a pad token, padding uses the EOS id (or 0): padded positions carry
    loss_mask 0, so the id only has to be in range.
    """

    def __init__(
        self,
        path: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        import tokenizers  # the `tokenizers` package that ships with transformers

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(
                f"tokenizer: no tokenizer file at {file!r}; give 'byte' or the path "
                "of a tokenizer.json (or of a folder holding one)"
            )
        self.path = file
        self._tok = tokenizers.Tokenizer.from_file(file)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._token_id("bos_token", bos_token)
        self.eos_id = self._token_id("eos_token", eos_token)
        pad_id = self._token_id("pad_token", pad_token)
        self.pad_id = pad_id if pad_id is not None else (self.eos_id or 0)

    def _token_id(self, field: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{field}: {token!r} is not in the vocabulary of {self.path}")
        return token_id

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids)], skip_special_tokens=True)


def load_tokenizer(
    name: str,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> ByteTokenizer | HFTokenizer:
    """'byte' -> ByteTokenizer (token names must be None); else a local `tokenizers` file."""
    if name == "byte":
        given = {
            k: v
            for k, v in (
                ("bos_token", bos_token),
                ("eos_token", eos_token),
                ("pad_token", pad_token),
            )
            if v is not None
        }
        if given:
            raise ValueError(
                f"{next(iter(given))}: the byte tokenizer has fixed special ids "
                "(PAD=256, BOS=257, EOS=258); leave the token names unset"
            )
        return ByteTokenizer()
    return HFTokenizer(name, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
