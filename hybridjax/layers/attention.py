"""Causal GQA attention (transformers `NemotronHAttention` semantics).

    q = q_proj(x) (B, L, Hq, hd), k = k_proj(x), v = v_proj(x) (B, L, Hk, hd); no biases
    query head h reads kv head h // (Hq / Hk)   (transformers repeat_kv)
    out = o_proj(softmax(q k^T * hd^-0.5 + causal/segment mask) v)

NoPE by default (as NemotronH); RoPE on q and k when config.rope_theta is set, with the scalings of
`hybridjax.ops.rope` (rope_scaling / rope_factor / rope_original_max_len) at the given positions.

Parameters keep the heads as an axis (tensor parallelism splits them whole): q_proj.kernel
(d, Hq, hd), k_proj.kernel / v_proj.kernel (d, Hk, hd), o_proj.kernel (Hq, hd, d); flattened,
(in, out) = torch weight transposed; init normal(0, initializer_range).

Implementations (config.attn_impl; `hybridjax.ops.attention` has the details):
  "auto"       the default: "cudnn" on a GPU in bf16/fp16, else "blockwise".
  "blockwise"  flash attention in XLA loops: O(L) memory forward and backward, packed documents.
  "pallas"     jax's Pallas Triton flash attention (GPU), packed documents included.
  "cudnn"      cuDNN's flash attention (NVIDIA GPUs, bf16/fp16); packed rows through its document
               offsets, up to config.attn_max_documents per row (more: the blockwise kernel).
  "xla"        dense (B, H, L, L) scores in float32 (float64 for a float64 model): the oracle of
               the tests; quadratic memory.

Decoding: `init_cache(batch, max_len, dtype)` -> `KVCache(k, v (B, max_len, Hk, hd), pos, start)`.
`prefill(x, cache)` starts a new sequence: it writes the prompt's K/V at slots [0, L) and sets
pos = L; with segment_ids, `start` (B,) marks where each row's last document begins, so decoding
continues that document only. `decode(x (B, 1, d), cache)` writes slot `pos` and attends to slots
[start, pos]. RoPE positions default to positions within the document (0 at each document start,
`hybridjax.ops.segments.document_positions`), i.e. pos - start while decoding. Prefill and decode
always use the dense formula for the decode step (one query); prefill uses config.attn_impl.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.layers.mlp import Dense
from hybridjax.ops.attention import attention, dense_attention
from hybridjax.ops.rope import apply_rope
from hybridjax.ops.segments import document_positions


class KVCache(NamedTuple):
    k: jax.Array  # (B, max_len, Hk, hd)
    v: jax.Array  # (B, max_len, Hk, hd)
    pos: jax.Array  # () int32: the next slot to write = tokens cached so far
    start: jax.Array  # (B,) int32: first slot of each row's current document


class Attention(nnx.Module):
    """`Attention(config, *, rngs)(x, segment_ids=None, positions=None) -> (B, L, d_model)`."""

    def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.n_heads, self.n_kv, self.head_dim = config.attn_heads, config.kv_heads, config.head_dim
        if self.n_heads % self.n_kv:
            raise ValueError(f"kv_heads: {self.n_kv} must divide attn_heads ({self.n_heads})")
        self.impl = config.attn_impl
        self.max_documents = config.attn_max_documents
        self.scale = self.head_dim**-0.5
        self.dtype = jnp.dtype(config.dtype)
        d, hd = config.d_model, self.head_dim
        init = nnx.initializers.normal(config.initializer_range)
        pdt = jnp.dtype(config.param_dtype)

        def dense(shape, n_in=1):
            return Dense(init(rngs.params(), shape, pdt), n_in=n_in, dtype=self.dtype)

        self.q_proj = dense((d, self.n_heads, hd))
        self.k_proj = dense((d, self.n_kv, hd))
        self.v_proj = dense((d, self.n_kv, hd))
        self.o_proj = dense((self.n_heads, hd, d), n_in=2)

    def _qkv(self, x, positions):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        c = self.config
        if c.rope_theta is not None:
            kw = {
                "theta": c.rope_theta,
                "scaling": c.rope_scaling,
                "factor": c.rope_factor,
                "original_max_len": c.rope_original_max_len,
            }
            q, k = apply_rope(q, positions, **kw), apply_rope(k, positions, **kw)
        return q, k, v

    def _check(self, x, segment_ids, positions):
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"Attention: x has shape {x.shape}, expected (batch, length, {self.config.d_model})"
            )
        for name, t in (("segment_ids", segment_ids), ("positions", positions)):
            if t is not None and t.shape != x.shape[:2]:
                raise ValueError(f"Attention: {name} has shape {t.shape}, expected {x.shape[:2]}")

    def _attend(self, q, k, v, segment_ids):
        out = attention(
            q,
            k,
            v,
            segment_ids=segment_ids,
            scale=self.scale,
            impl=self.impl,
            max_documents=self.max_documents,
            kv_heads_per_call=self.config.attn_kv_heads_per_call,
        )
        return self.o_proj(out)

    def __call__(self, x, *, segment_ids=None, positions=None):
        """x (B, L, d_model); segment_ids (B, L) int | None; positions (B, L) int | None (RoPE
        only; default: positions within each document)."""
        self._check(x, segment_ids, positions)
        b, l, _ = x.shape
        if positions is None:
            positions = document_positions(segment_ids, b, l)
        q, k, v = self._qkv(x, positions)
        return self._attend(q, k, v, segment_ids)

    # --- decoding -------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        shape = (batch, max_len, self.n_kv, self.head_dim)
        return KVCache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            pos=jnp.zeros((), jnp.int32),
            start=jnp.zeros((batch,), jnp.int32),
        )

    def prefill(self, x, cache: KVCache, *, segment_ids=None, positions=None):
        """A new sequence: x (B, L, d) -> (y, cache holding the prompt's K/V at [0, L))."""
        self._check(x, segment_ids, positions)
        b, l, _ = x.shape
        if l > cache.k.shape[1]:
            raise ValueError(
                f"Attention.prefill: prompt length {l} exceeds the cache's max_len "
                f"{cache.k.shape[1]}"
            )
        if positions is None:
            positions = document_positions(segment_ids, b, l)
        q, k, v = self._qkv(x, positions)
        y = self._attend(q, k, v, segment_ids)
        new_k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, 0, 0, 0))
        new_v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, 0, 0, 0))
        if segment_ids is None:
            start = jnp.zeros((b,), jnp.int32)
        else:
            start = (l - 1 - document_positions(segment_ids, b, l)[:, -1]).astype(jnp.int32)
        return y, KVCache(new_k, new_v, jnp.asarray(l, jnp.int32), start)

    def decode(self, x, cache: KVCache, *, positions=None):
        """One token per row at slot cache.pos: x (B, 1, d) -> (y (B, 1, d), updated cache)."""
        self._check(x, None, positions)
        if x.shape[1] != 1:
            raise ValueError(f"Attention.decode: x must hold one token per row, got {x.shape}")
        pos = cache.pos.astype(jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        if positions is None:
            positions = (pos - cache.start)[:, None]
        q, k, v = self._qkv(x, positions)
        at = (zero, pos, zero, zero)
        new_k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at)
        new_v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at)
        slots = jnp.arange(cache.k.shape[1])
        mask = (slots[None] <= pos) & (slots[None] >= cache.start[:, None])  # (B, S)
        out = dense_attention(
            q, new_k.astype(q.dtype), new_v.astype(q.dtype), mask[:, None], scale=self.scale
        )
        y = self.o_proj(out)
        return y, KVCache(new_k, new_v, pos + 1, cache.start)
