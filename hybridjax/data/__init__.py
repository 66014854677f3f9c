"""Data room: grain pipelines for synthetic recall tasks (MQAR, NIAH), state tracking (parity,
modular addition) and language modelling.

ds = make_dataset(MQARConfig(), split="train", seed=0, batch_size=64, seq_len=128)
it = iter(ds); batch = next(it)       # dict of numpy arrays, see pipeline.py
state = it.get_state(); it.set_state(state)
"""

from hybridjax.data.mqar import MQARConfig, mqar_example
from hybridjax.data.niah import NIAHConfig, niah_example
from hybridjax.data.packing import pack_documents
from hybridjax.data.pipeline import (
    CONFIGS,
    DataConfig,
    bucket_names,
    config_from_dict,
    make_dataset,
    vocab_size,
)
from hybridjax.data.state_tracking import StateTrackingConfig, state_tracking_example
from hybridjax.data.text import MemmapConfig, TextConfig
from hybridjax.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "CONFIGS",
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "MQARConfig",
    "MemmapConfig",
    "NIAHConfig",
    "StateTrackingConfig",
    "TextConfig",
    "bucket_names",
    "config_from_dict",
    "load_tokenizer",
    "make_dataset",
    "mqar_example",
    "niah_example",
    "pack_documents",
    "state_tracking_example",
    "vocab_size",
]
