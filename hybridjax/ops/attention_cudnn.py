"""cuDNN flash attention over packed documents (the "THD" ragged layout), GPU only.

`jax.nn.dot_product_attention` expresses padding, not packing; jax's cuDNN binding underneath
(`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`) also takes each row's
document offsets and lengths, and cuDNN then runs causal attention inside each document only:
the work of the documents, not of the (L x L) band. That binding is private to jax, so its
import is guarded (`unsupported_reason`) and callers fall back to the blockwise kernel.

The offsets are arrays of a static size: at most `max_documents` documents per row. A batch
with a row holding more runs the blockwise kernel instead (`lax.cond`: exact either way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybridjax.ops.segments import document_starts

# Documents per row the offset arrays hold. cuDNN's backward sizes a float32 workspace by rows x
# MAX_DOCUMENTS x length x heads x head_dim (l65536 h16 d128: 0.5 GiB per document slot), so this
# stays small; a batch with a longer row takes the fallback.
MAX_DOCUMENTS = 8


def _binding():
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    return dot_product_attention, MaskType.PADDING_CAUSAL


def unsupported_reason() -> str | None:
    """Why the packed cuDNN path cannot run here, or None."""
    if jax.default_backend() != "gpu":
        return f"needs a GPU (the default backend is {jax.default_backend()!r})"
    try:
        _binding()
    except (ImportError, AttributeError) as e:
        return f"this jax has no cuDNN packed-attention binding ({type(e).__name__}: {e})"
    return None


def document_spans(segment_ids, max_documents: int):
    """(offsets (B, M + 1), lengths (B, M), fits ()) of each row's documents, M = max_documents,
    in the binding's format: the first position of each document, then -1; each document's
    length, then -1. `fits` says every row has at most M documents."""
    l = segment_ids.shape[1]
    starts = document_starts(segment_ids).at[:, 0].set(True)
    first = jax.vmap(lambda s: jnp.nonzero(s, size=max_documents + 1, fill_value=-1)[0])(starts)
    first = first.astype(jnp.int32)
    ends = jnp.where(first[:, 1:] >= 0, first[:, 1:], l)
    lengths = jnp.where(first[:, :-1] >= 0, ends - first[:, :-1], -1)
    fits = jnp.all(jnp.sum(starts, axis=1) <= max_documents)
    offsets = jnp.where(jnp.arange(max_documents + 1) < max_documents, first, -1)
    return offsets, lengths, fits


def cudnn_packed_attention(q, k, v, segment_ids, *, scale: float, max_documents: int, fallback):
    """Causal GQA attention within each document of q (B, L, Hq, D), k / v (B, L, Hk, D):
    cuDNN when every row has at most `max_documents` documents, else `fallback(q, k, v,
    segment_ids)`."""
    sdpa, mask = _binding()
    offsets, lengths, fits = document_spans(segment_ids, max_documents)

    def packed(q, k, v, segment_ids):
        return sdpa(
            q,
            k,
            v,
            q_seqlen=lengths,
            kv_seqlen=lengths,
            q_offsets=offsets,
            kv_offsets=offsets,
            scale=scale,
            mask_type=mask,
            qkv_layout="BTNH",
        )

    return jax.lax.cond(fits, packed, fallback, q, k, v, segment_ids)
