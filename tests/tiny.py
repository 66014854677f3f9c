"""A tiny float64 hybrid config shared by the model-level tests."""

import jax

from hybridjax.config import HybridConfig

TINY = {
    "vocab_size": 64,
    "d_model": 32,
    "mamba_heads": 4,
    "mamba_head_dim": 8,
    "ssm_state": 8,
    "n_groups": 2,
    "chunk_size": 8,
    "attn_heads": 4,
    "kv_heads": 2,
    "head_dim": 8,
    "n_experts": 4,
    "top_k": 2,
    "moe_ffn": 16,
    "shared_ffn": 16,
    "ffn": 32,
    "dtype": "float64",
    "param_dtype": "float64",
}


def tiny(**kw):
    return HybridConfig(**{**TINY, **kw})


def tokens(key, batch, length, vocab=64):
    return jax.random.randint(jax.random.key(key), (batch, length), 0, vocab)
