"""One factory from a data config to a grain IterDataset of batches (the trainer's contract).

A batch is a dict of numpy arrays, B = batch_size, L = seq_len:
  "tokens" (B, L) int32, "targets" (B, L) int32, "loss_mask" (B, L) float32,
  "segment_ids" (B, L) int32 (0 = padding), and for MQAR / NIAH "bucket" (B,) int32.

split="train" is infinite and shuffled; split="eval" is one finite pass whose last batch is
padded to B with rows of loss_mask 0 (shapes never change). NIAH's eval split may have a grid
of its own (`eval_context_lens`). The two draw from different streams
(synthetic: different seeds; text: disjoint documents; memmap: disjoint spans). Everything is
deterministic for a seed, and `iter(ds).get_state()` / `.set_state()` resume exactly (the states
are JSON-able, as grain's orbax `CheckpointSave` / `CheckpointRestore` store them).

`streams=True` (the trainer's `trainer.state_passing`) makes the train split a chunked stream
instead: each row continues, batch after batch, the documents its previous row was in
(`hybridjax.data.streams`, which adds a "continues" (B,) key).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import sys
from collections.abc import Mapping

import grain
import numpy as np

from hybridjax.data._checks import check_choice, check_positive
from hybridjax.data.mqar import MQARConfig
from hybridjax.data.niah import NIAHConfig
from hybridjax.data.packing import pack_documents
from hybridjax.data.state_tracking import StateTrackingConfig
from hybridjax.data.streams import FIELDS, ChunkedStreams, SpanStreams, text_document
from hybridjax.data.text import (
    MemmapConfig,
    TextConfig,
    TokenWindows,
    memmap_windows,
    text_documents,
)
from hybridjax.data.tokenizers import load_tokenizer

DataConfig = MQARConfig | NIAHConfig | StateTrackingConfig | TextConfig | MemmapConfig
CONFIGS = {
    "mqar": MQARConfig,
    "niah": NIAHConfig,
    "state_tracking": StateTrackingConfig,
    "text": TextConfig,
    "memmap": MemmapConfig,
}
SYNTHETIC = (MQARConfig, NIAHConfig, StateTrackingConfig)
SPLITS = ("train", "eval")
SYNTHETIC_PAD = 0
# One background thread: the 2-core CPU box also runs the training step.
_BATCH_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
_DOC_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=64)


def make_dataset(
    config: DataConfig,
    *,
    split: str,
    seed: int,
    batch_size: int,
    seq_len: int,
    shard_index: int = 0,
    shard_count: int = 1,
    streams: bool = False,
) -> grain.IterDataset:
    """Batches of `config`'s data. With shard_count > 1 (one shard per process), each shard
    yields its own disjoint part of the stream, batch_size rows per batch. `streams`: the train
    split as chunked row streams (module docstring)."""
    check_choice("split", split, SPLITS)
    for name, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("shard_count", shard_count),
    ):
        _check_int(name, value)
        check_positive(name, value)
    _check_int("seed", seed)
    if seed < 0:
        raise ValueError(f"seed: must be >= 0, got {seed}")
    _check_int("shard_index", shard_index)
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard_index: must be in [0, shard_count={shard_count}), got {shard_index}"
        )
    shard = slice(shard_index, None, shard_count)
    stream_seed = int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])
    if streams:
        if split != "train":
            raise ValueError(f"streams: only the train split is streamed, got split={split!r}")
        if isinstance(config, MemmapConfig):
            whole = memmap_windows(config, split, seq_len)
            windows = functools.partial(
                TokenWindows,
                whole.path,
                whole.dtype,
                seq_len=seq_len,
                vocab_size=whole.vocab_size,
                eos_id=whole.eos_id,
            )
            return SpanStreams(
                windows,
                whole.start,
                whole.stop,
                first_row=shard_index * batch_size,
                row_count=shard_count * batch_size,
                batch_size=batch_size,
                seed=stream_seed,
            )
        documents = _train_documents(config, stream_seed, shard, shard_count, seq_len)
        return ChunkedStreams(documents, batch_size, seq_len)

    if isinstance(config, SYNTHETIC):
        buckets = _buckets(config, seq_len, split)
        count = sys.maxsize if split == "train" else config.num_eval_examples
        examples = (
            grain.MapDataset.range(count)
            .seed(stream_seed)
            .random_map(
                functools.partial(
                    _synthetic_example, config=config, buckets=buckets, row_len=seq_len
                )
            )
        )
        return _batched(examples[shard], split, batch_size, SYNTHETIC_PAD, _BATCH_READ)

    if isinstance(config, MemmapConfig):
        rows = grain.MapDataset.source(memmap_windows(config, split, seq_len))[shard]
        _check_shard_nonempty(rows, "rows", shard_count)
        if split == "train":
            rows = rows.seed(stream_seed).shuffle().repeat(None)
        return _batched(rows, split, batch_size, 0, _BATCH_READ)

    if isinstance(config, TextConfig):
        tokenizer = _tokenizer(config)
        docs = grain.MapDataset.source(text_documents(config, split))[shard]
        _check_shard_nonempty(docs, "documents", shard_count)
        if split == "train":
            docs = docs.seed(stream_seed).shuffle().repeat(None)
        token_docs = docs.map(functools.partial(encode_document, tokenizer=tokenizer))
        token_docs = token_docs.filter(lambda d: d.size > 0).to_iter_dataset(_DOC_READ)
        rows = pack_documents(token_docs, seq_len, tokenizer.pad_id)
        return _batched(rows, split, batch_size, tokenizer.pad_id, None)

    raise ValueError(
        f"config: expected one of {', '.join(c.__name__ for c in CONFIGS.values())}, "
        f"got {type(config).__name__}"
    )


def bucket_names(config: DataConfig, seq_len: int | None = None, split: str = "train") -> list[str]:
    """Labels of `split`'s "bucket" ids, e.g. "pairs=16,len=128"; [] for text / memmap data.
    `seq_len` (the row length) is needed when the config leaves example lengths to it."""
    if isinstance(config, SYNTHETIC):
        return [config.bucket_name(b) for b in _buckets(config, seq_len, split)]
    return []


def vocab_size(config: DataConfig) -> int:
    """The smallest model vocabulary that covers every id the data can hold."""
    if isinstance(config, TextConfig):
        return _tokenizer(config).vocab_size
    return config.vocab_size


def config_from_dict(mapping: Mapping) -> DataConfig:
    """{"kind": "mqar" | "niah" | "text" | "memmap", **fields} -> the config (e.g. from Hydra)."""
    fields = dict(mapping)
    kind = fields.pop("kind", None)
    check_choice("kind", kind, CONFIGS)
    cls = CONFIGS[kind]
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in fields:
        if key not in allowed:
            raise ValueError(
                f"{key}: not a field of {cls.__name__}; fields are {', '.join(allowed)}"
            )
    return cls(**fields)


def encode_document(text: str, tokenizer) -> np.ndarray:
    """[BOS] tokens [EOS], with the special tokens the tokenizer has."""
    parts = [tokenizer.encode(text)]
    if tokenizer.bos_id is not None:
        parts.insert(0, np.array([tokenizer.bos_id], np.int32))
    if tokenizer.eos_id is not None:
        parts.append(np.array([tokenizer.eos_id], np.int32))
    return np.concatenate(parts)


# --- internals -----------------------------------------------------------------------------------


def _train_documents(config: DataConfig, seed: int, shard: slice, shard_count: int, seq_len: int):
    """The endless, shuffled training documents of this shard, as stream fields (random access).
    A synthetic task's examples are its documents: their lengths are its own (context_lens,
    seq_lens) and may exceed seq_len, or seq_len when it leaves them to the row."""
    if isinstance(config, SYNTHETIC):
        lengths = {NIAHConfig: "context_lens", StateTrackingConfig: "train_lens"}
        lengths = getattr(config, lengths.get(type(config), "seq_lens"))
        buckets = _buckets(config, None if lengths is not None else seq_len, "train")
        examples = grain.MapDataset.range(sys.maxsize).seed(seed)
        return examples.random_map(
            functools.partial(_synthetic_document, config=config, buckets=buckets)
        )[shard]
    if isinstance(config, TextConfig):
        tokenizer = _tokenizer(config)
        docs = grain.MapDataset.source(text_documents(config, "train"))[shard]
        _check_shard_nonempty(docs, "documents", shard_count)
        return (
            docs.seed(seed)
            .shuffle()
            .repeat(None)
            .map(lambda text: text_document(encode_document(text, tokenizer), tokenizer.pad_id))
        )
    raise ValueError(f"streams: {type(config).__name__} cannot be streamed")


def _synthetic_document(index: int, rng: np.random.Generator, *, config, buckets) -> dict:
    """Example `index` of a synthetic task, unpadded: bucket index % len(buckets)."""
    example = config.generate(rng, buckets[index % len(buckets)])
    return {key: example[key] for key in FIELDS}


def _buckets(config, seq_len: int | None, split: str) -> tuple:
    """A synthetic task's buckets in `split`: NIAH's and state tracking's eval grids may differ
    from their training ones."""
    check_choice("split", split, SPLITS)
    if isinstance(config, (NIAHConfig, StateTrackingConfig)):
        return config.buckets(seq_len, split)
    return config.buckets(seq_len)


def _synthetic_example(index: int, rng: np.random.Generator, *, config, buckets, row_len: int):
    """Example `index` of a synthetic task: bucket index % len(buckets), padded to the row."""
    bucket = index % len(buckets)
    example = config.generate(rng, buckets[bucket])
    length = example["tokens"].shape[0]
    row = {}
    for key, value in example.items():
        row[key] = np.full(row_len, SYNTHETIC_PAD, value.dtype)
        row[key][:length] = value
    row["segment_ids"] = (np.arange(row_len) < length).astype(np.int32)
    row["bucket"] = np.int32(bucket)
    return row


def _batched(rows, split: str, batch_size: int, pad_id: int, read_options):
    """Train: full batches only. Eval: every row once, the last batch padded to batch_size."""
    if split == "train":
        batches = rows.batch(batch_size, drop_remainder=True)
    else:
        batches = rows.batch(batch_size).map(
            functools.partial(_pad_batch, batch_size=batch_size, pad_id=pad_id)
        )
    if isinstance(batches, grain.MapDataset):
        batches = batches.to_iter_dataset(read_options)
    return batches


def _pad_batch(batch: dict, batch_size: int, pad_id: int) -> dict:
    missing = batch_size - batch["tokens"].shape[0]
    if not missing:
        return batch
    padded = {}
    for key, value in batch.items():
        fill = pad_id if key in ("tokens", "targets") else 0
        extra = np.full((missing, *value.shape[1:]), fill, value.dtype)
        padded[key] = np.concatenate([value, extra])
    return padded


@functools.lru_cache(maxsize=8)
def _tokenizer(config: TextConfig):
    return load_tokenizer(
        config.tokenizer,
        bos_token=config.bos_token,
        eos_token=config.eos_token,
        pad_token=config.pad_token,
    )


def _check_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: must be an int, got {value!r}")  # noqa: TRY004


def _check_shard_nonempty(ds, what: str, shard_count: int):
    if len(ds) == 0:
        raise ValueError(f"shard_count: {shard_count} shards leave this shard no {what}")
