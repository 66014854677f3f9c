"""Tokenizers: the byte tokenizer and a `tokenizers` file built here and loaded from disk."""

import numpy as np
import pytest

from hybridjax.data import ByteTokenizer, HFTokenizer, load_tokenizer

TEXT = "Hello, wörld! ∑ 你好 🙂\nsecond line\t tab"


def test_byte_round_trip():
    tok = load_tokenizer("byte")
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert len(ids) == len(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    framed = np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])
    assert tok.decode(framed) == TEXT, "special ids are dropped on decode"
    assert {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258} and tok.vocab_size == 259


def test_byte_tokenizer_takes_no_token_names():
    with pytest.raises(ValueError, match="bos_token"):
        load_tokenizer("byte", bos_token="<s>")


def _build_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + [TEXT], trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizers_file_round_trip(tmp_path):
    path = _build_tokenizer(tmp_path)
    for where in (str(path), str(tmp_path)):  # the file, or the folder holding it
        tok = load_tokenizer(where, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
        assert isinstance(tok, HFTokenizer)
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        ids = tok.encode(TEXT)
        assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
        assert len(ids) < len(TEXT.encode()), "BPE merges something"
        assert tok.decode(ids) == TEXT
        assert tok.decode(np.concatenate([[1], ids, [2]])) == TEXT


def test_tokenizers_file_without_specials_pads_with_zero(tmp_path):
    tok = load_tokenizer(str(_build_tokenizer(tmp_path)))
    assert tok.bos_id is None and tok.eos_id is None and tok.pad_id == 0


def test_tokenizers_file_errors(tmp_path):
    path = _build_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="eos_token.*'</s>'"):
        load_tokenizer(str(path), eos_token="</s>")
    with pytest.raises(ValueError, match="tokenizer: no tokenizer file"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_byte_tokenizer_is_the_class():
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
