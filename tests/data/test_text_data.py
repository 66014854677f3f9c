"""Language-modelling data: text files (byte and `tokenizers` tokenizers) and token memmaps."""

import numpy as np
import pytest
from test_tokenizers import _build_tokenizer

from hybridjax.data import MemmapConfig, TextConfig, load_tokenizer, make_dataset, vocab_size
from hybridjax.data.text import text_documents

DOCS = [f"document {i}: " + "lorem ipsum dolor " * (i % 7 + 1) for i in range(30)]


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(DOCS[:20]))
    (tmp_path / "b.txt").write_text("\n\n".join(DOCS[20:]))
    return TextConfig(paths=(str(tmp_path / "*.txt"),), doc_separator="\n\n", eval_fraction=0.2)


def _real_tokens(batches):
    return np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])


def test_held_out_documents(corpus):
    train, held_out = text_documents(corpus, "train"), text_documents(corpus, "eval")
    assert len(held_out) == 6 and len(train) == 24
    assert sorted(train + held_out) == sorted(DOCS)
    assert not set(train) & set(held_out)


def test_eval_pass_holds_every_held_out_token_once(corpus):
    tok = load_tokenizer("byte")
    batches = list(make_dataset(corpus, split="eval", seed=0, batch_size=3, seq_len=32))
    expected = np.concatenate(
        [
            np.concatenate([[tok.bos_id], tok.encode(d), [tok.eos_id]])
            for d in text_documents(corpus, "eval")
        ]
    )
    np.testing.assert_array_equal(_real_tokens(batches), expected)
    for b in batches:
        assert b["tokens"].shape == (3, 32) and b["loss_mask"].dtype == np.float32
        # The last token of every document (EOS) never has a target.
        assert not b["loss_mask"][b["tokens"] == tok.eos_id].any()


def test_train_stream_only_trains_on_train_documents(corpus):
    tok = load_tokenizer("byte")
    it = iter(make_dataset(corpus, split="train", seed=3, batch_size=4, seq_len=64))
    text = tok.decode(_real_tokens([next(it) for _ in range(20)]))  # > 2 epochs of bytes
    for doc in text_documents(corpus, "eval"):
        assert doc not in text
    for doc in text_documents(corpus, "train"):
        assert doc in text


def test_no_documents_to_hold_out(tmp_path):
    (tmp_path / "one.txt").write_text("just one document")
    config = TextConfig(paths=(str(tmp_path / "one.txt"),))
    with pytest.raises(ValueError, match="doc_separator.*eval_paths"):
        make_dataset(config, split="train", seed=0, batch_size=1, seq_len=8)
    config = TextConfig(paths=(str(tmp_path / "one.txt"),), eval_paths=(str(tmp_path / "one.txt"),))
    assert next(iter(make_dataset(config, split="eval", seed=0, batch_size=1, seq_len=8)))


def test_missing_files_name_the_field(tmp_path):
    config = TextConfig(paths=(str(tmp_path / "nothing*.txt"),))
    with pytest.raises(ValueError, match="TextConfig.paths.*matches no file"):
        make_dataset(config, split="train", seed=0, batch_size=1, seq_len=8)


def test_tokenizers_file_pipeline(tmp_path, corpus):
    path = str(_build_tokenizer(tmp_path / ".."))
    config = TextConfig(
        paths=corpus.paths,
        doc_separator="\n\n",
        eval_fraction=0.2,
        tokenizer=path,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )
    tok = load_tokenizer(path, bos_token="<bos>", eos_token="<eos>")
    assert vocab_size(config) == tok.vocab_size
    batches = list(make_dataset(config, split="eval", seed=0, batch_size=2, seq_len=16))
    expected = np.concatenate(
        [np.concatenate([[1], tok.encode(d), [2]]) for d in text_documents(config, "eval")]
    )
    np.testing.assert_array_equal(_real_tokens(batches), expected)


# --- memmaps -----------------------------------------------------------------------------------


def _stream(n=1000, vocab=500, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.uint16)


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_memmap_rows(tmp_path, suffix):
    stream = _stream()
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npy":
        np.save(path, stream)
    else:
        stream.tofile(path)
    config = MemmapConfig(path=str(path), vocab_size=500, dtype="uint16", eval_fraction=0.1)
    L = 16
    evals = list(make_dataset(config, split="eval", seed=0, batch_size=2, seq_len=L))
    # The eval span is the last 100 tokens: 6 rows of 16 (+1 target), in order.
    real = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in evals])
    np.testing.assert_array_equal(real, stream[900 : 900 + 6 * L])
    for b in evals:
        assert b["tokens"].dtype == np.int32 and b["targets"].dtype == np.int32
        real_rows = b["segment_ids"][:, 0] > 0
        np.testing.assert_array_equal(
            b["targets"][real_rows][:, :-1], b["tokens"][real_rows][:, 1:]
        )
    # Train rows are windows of the first 900 tokens: each row is stream[i*L : i*L+L].
    train = next(iter(make_dataset(config, split="train", seed=0, batch_size=8, seq_len=L)))
    for tokens, targets in zip(train["tokens"], train["targets"]):
        start = next(s for s in range(0, 900 - L, L) if np.array_equal(stream[s : s + L], tokens))
        np.testing.assert_array_equal(targets, stream[start + 1 : start + L + 1])
        assert start + L + 1 <= 900, "train rows never read the eval span"
    assert train["loss_mask"].all() and (train["segment_ids"] == 1).all()


def test_memmap_eos_segments(tmp_path):
    stream = np.array([5, 6, 0, 7, 8, 9, 0, 4, 0, 3, 2], np.int32)
    np.save(tmp_path / "t.npy", stream)
    config = MemmapConfig(
        path=str(tmp_path / "t.npy"), vocab_size=10, eos_id=0, eval_path=str(tmp_path / "t.npy")
    )
    batch = next(iter(make_dataset(config, split="eval", seed=0, batch_size=1, seq_len=10)))
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 2, 2, 2, 2, 3, 3, 4])
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 0, 1, 1, 1, 0, 1, 0, 1])


def test_memmap_errors(tmp_path):
    with pytest.raises(ValueError, match="MemmapConfig.dtype"):
        MemmapConfig(path=str(tmp_path / "t.bin"), vocab_size=10)
    with pytest.raises(ValueError, match="MemmapConfig.dtype"):
        MemmapConfig(path=str(tmp_path / "t.bin"), vocab_size=10, dtype="float32")
    with pytest.raises(ValueError, match="MemmapConfig.path: no file"):
        make_dataset(
            MemmapConfig(path=str(tmp_path / "t.npy"), vocab_size=10),
            split="train",
            seed=0,
            batch_size=1,
            seq_len=4,
        )
    np.save(tmp_path / "t.npy", np.arange(100, dtype=np.int32))
    config = MemmapConfig(path=str(tmp_path / "t.npy"), vocab_size=50, eval_fraction=0.5)
    with pytest.raises(ValueError, match="MemmapConfig.vocab_size: token id"):
        list(make_dataset(config, split="eval", seed=0, batch_size=1, seq_len=4))
    with pytest.raises(ValueError, match="shorter than one row"):
        make_dataset(config, split="eval", seed=0, batch_size=1, seq_len=64)
    with pytest.raises(ValueError, match="MemmapConfig.dtype.*holds int32"):
        make_dataset(
            MemmapConfig(path=str(tmp_path / "t.npy"), vocab_size=100, dtype="uint16"),
            split="train",
            seed=0,
            batch_size=1,
            seq_len=4,
        )
