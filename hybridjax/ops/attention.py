"""`attention`: causal GQA attention over packed documents, one signature, several implementations.

    attention(q, k, v, *, segment_ids=None, scale=None, impl="auto", max_documents=8)
        -> (B, L, Hq, D) in q.dtype
      q (B, L, Hq, D), k / v (B, L, Hk, D) with Hk dividing Hq: query head h reads kv head
      h // (Hq / Hk) (transformers' repeat_kv); scale defaults to D^-0.5
      segment_ids (B, L) int | None: query t attends key s <= t in its own document

A document is a run of equal ids (`hybridjax.ops.segments`, as the SSM and the conv see it):
the masks compare run indices, not ids, so in a row whose ids come back (A B A) the second A
does not read the first.

Implementations (`impl=`):
  "xla"        dense: (B, Hq, L, L) scores and a (B, L, L) mask, softmax in float32 (float64 for
               float64 inputs). The oracle of the tests; a 1B hybrid's step ran out of memory
               at 32K tokens on an H200.
  "blockwise"  flash attention in XLA loops, forward and backward in O(L) memory. Runs anywhere.
  "pallas"     jax's Pallas Triton flash attention (`jax.experimental.pallas.ops.gpu.attention`,
               forward and backward kernels, packed documents included; kv heads repeated to
               the query heads). GPU only; bf16, fp16 or fp32 (Triton's default dot precision).
  "cudnn"      cuDNN's flash attention: `jax.nn.dot_product_attention(..., is_causal=True,
               implementation="cudnn")` for one document per row; with segment_ids cuDNN's
               packed layout (`attention_cudnn`: each row's document offsets, at most
               `max_documents` of them, else the blockwise kernel). GPU only.
  "auto"       on a GPU in bf16/fp16 "cudnn", elsewhere "blockwise". Measured on an H200 (b1
               h16 kv8 d128, bf16, fwd+bwd; docs/measurements/h200_cudnn_packed_attention.log):
               at 64K tokens in 4 documents, cuDNN packed 30 ms, blockwise 134, cuDNN on one
               64K document 107; jax's Pallas kernel walks the whole causal band (409 ms with
               4K documents, docs/measurements/h200_bench_attention.log).
Every implementation but "xla" runs per shard of the current mesh (rows over the batch axes,
heads over "tensor"): XLA cannot partition the kernels, and per shard the blockwise loops skip
blocks by their own rows' documents. A mesh that splits the sequence ("context") runs
`context_attention`: each device's stretch of queries against the keys and values of the whole
row, gathered over the axis, in the blockwise kernel.

Blockwise: queries in blocks of at most `block_q` positions, keys of at most `block_k` (the
length is split into equal blocks, padded by less than one position per block). For each query
block a loop runs over the key blocks it can see, carrying the online-softmax state (running
max, sum and output in float32, float64 for float64 inputs). The loops' bounds are arrays:
causal, a query block reads key blocks up to the diagonal only, and with segment_ids only from
the block holding the first key of its queries' documents, so packed rows skip the blocks
between documents too (bounds taken over the batch rows). Each step has a fixed cost beyond its
matmuls (a handful of kernels, a data-dependent loop condition), so off the CPU the blocks are
large (`default_block`); on the CPU 128 keeps a step's scores in cache (2 cores, fwd+bwd at b1
l4096 h4 d32: 0.5 s, 0.9 s with 512, 4.2 s dense). The backward (a jax.custom_vjp) recomputes
the scores from (q, k, v, out, logsumexp): one scan over key blocks, each looping over the query
blocks that read it, with dK and dV in the loop's carry and dQ added into one (L, D) buffer.
Autodiff through the loops would store every block's probabilities: O(L^2 / block) memory.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from hybridjax.ops.attention_cudnn import MAX_DOCUMENTS, cudnn_packed_attention
from hybridjax.ops.attention_cudnn import unsupported_reason as cudnn_packed_unsupported
from hybridjax.ops.segments import document_index, document_positions, document_starts
from hybridjax.ops.ssd_sharded import mesh_split, splits_sequence

IMPLS = ("auto", "blockwise", "pallas", "cudnn", "xla")
PALLAS_DTYPES = ("bfloat16", "float16", "float32")
SCORE_BYTES = 256 * 2**20  # one blockwise step's float32 scores, off the CPU
# jax's own blocks for its Pallas attention (forward, backward); on an H200 the backward is 4x
# the forward at d128 (cuDNN's: 2.7x): `python -m hybridjax.bench attention --pallas-bwd-blocks
# 32 64 128` compares others
PALLAS_BLOCK_FWD, PALLAS_BLOCK_BWD = 128, 32


def _check(q, k, v, segment_ids):
    if q.ndim != 4:
        raise ValueError(
            f"attention: q has shape {q.shape}, expected (batch, length, heads, head_dim)"
        )
    b, l, hq, d = q.shape
    if k.ndim != 4 or k.shape[:2] != (b, l) or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(
            f"attention: k {k.shape} and v {v.shape} must both be ({b}, {l}, "
            f"kv_heads, {d}) for q of shape {q.shape}"
        )
    if hq % k.shape[2]:
        raise ValueError(f"attention: the {k.shape[2]} kv heads must divide the {hq} query heads")
    if segment_ids is not None:
        if segment_ids.shape != (b, l):
            raise ValueError(
                f"attention: segment_ids has shape {segment_ids.shape}, expected ({b}, {l})"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"attention: segment_ids must be integers, got {segment_ids.dtype}")


def attention(
    q,
    k,
    v,
    *,
    segment_ids=None,
    scale=None,
    impl="auto",
    max_documents: int = MAX_DOCUMENTS,
    kv_heads_per_call: int = 0,
):
    """Causal GQA attention; see the module docstring. `kv_heads_per_call` > 0: the kernel takes
    that many kv heads (with their query heads) at a time, one call after another
    (`by_head_groups`)."""
    if impl not in IMPLS:
        raise ValueError(
            f"attn_impl: {impl!r} is not allowed; choose from {', '.join(map(repr, IMPLS))}"
        )
    _check(q, k, v, segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "auto":
        flash = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
        packed_ok = segment_ids is None or cudnn_packed_unsupported() is None
        impl = "cudnn" if flash and packed_ok else "blockwise"
    if impl == "xla":
        b, l = q.shape[:2]
        dense = lambda q, k, v, seg: dense_attention(q, k, v, causal_mask(seg, b, l), scale=scale)
        if kv_heads_per_call:
            return by_head_groups(dense, q, k, v, segment_ids, kv_heads_per_call=kv_heads_per_call)
        return dense(q, k, v, segment_ids)
    if splits_sequence(q.shape, k.shape[2]):
        return context_attention(q, k, v, segment_ids, scale=scale)
    blockwise = functools.partial(blockwise_attention, scale=scale)
    if impl == "cudnn":
        if segment_ids is None:
            fn = functools.partial(_cudnn_one_document, scale=scale)
        elif (reason := cudnn_packed_unsupported()) is not None:
            raise ValueError(
                f"attn_impl='cudnn' with packed documents: {reason}; use attn_impl='blockwise'"
            )
        else:
            fn = functools.partial(
                cudnn_packed_attention, scale=scale, max_documents=max_documents, fallback=blockwise
            )
    elif impl == "pallas":
        k, v = (_repeat_kv(t, q.shape[2]) for t in (k, v))  # the kernel wants equal heads
        fn = functools.partial(pallas_attention, scale=scale)
    else:
        fn = blockwise
    if kv_heads_per_call:
        fn = functools.partial(by_head_groups, fn, kv_heads_per_call=kv_heads_per_call)
    return attention_per_shard(fn, q, k, v, segment_ids)


def by_head_groups(fn, q, k, v, segment_ids, *, kv_heads_per_call: int):
    """`fn(q, k, v, segment_ids)` over groups of `kv_heads_per_call` kv heads (the largest divisor
    of k's heads up to it) and their query heads, one group after another (lax.map): heads are
    independent, so the result is the same, and a kernel whose buffers grow with its heads holds
    one group's. cuDNN's packed backward sizes its float32 workspace by rows x max_documents x
    length x heads x head_dim (1B, 4 documents: ~64 KiB per token, 32 GiB at 512K tokens); the
    blockwise kernel's dQ and output accumulators grow the same way."""
    hk = k.shape[2]
    per = max(d for d in range(1, min(kv_heads_per_call, hk) + 1) if hk % d == 0)
    groups = hk // per
    if groups == 1:
        return fn(q, k, v, segment_ids)

    def split(t):  # (B, L, H, D) -> (groups, B, L, H / groups, D): group j holds kv heads
        b, l, h, d = t.shape  # j*per .. and the query heads that read them
        return jnp.moveaxis(t.reshape(b, l, groups, h // groups, d), 2, 0)

    out = lax.map(lambda g: fn(*g, segment_ids), (split(q), split(k), split(v)))
    return jnp.moveaxis(out, 0, 2).reshape(q.shape[:3] + out.shape[-1:])


def _cudnn_one_document(q, k, v, segment_ids, *, scale):
    del segment_ids  # None
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, implementation="cudnn"
    )


def context_attention(q, k, v, segment_ids, *, scale):
    """Attention with the sequence split over the mesh's "context" axis: each device keeps its
    stretch of queries and reads the keys and values of the whole row, all-gathered over the
    axis inside the shard_map (GQA keeps them small: Hk of Hq heads; their gradients go back by
    a reduce-scatter), in the blockwise kernel with its queries placed at their positions in the
    row. Rows and heads split as in `attention_per_shard`. Given whole arrays instead (in_specs
    without the axis), XLA gathered the layer's input and formed K and V for the whole row on
    every device, and summed their gradients over the whole row with an all-reduce."""
    mesh, rows, seq, heads, kv_heads = mesh_split(q.shape, k.shape[2])
    if heads is not None and kv_heads is None:
        k, v = (_repeat_kv(t, q.shape[2]) for t in (k, v))
    split = P(rows, seq, heads, None)

    def local(q, k, v, segment_ids):
        k, v = (lax.all_gather(t, seq, axis=1, tiled=True) for t in (k, v))
        if segment_ids is not None:
            segment_ids = lax.all_gather(segment_ids, seq, axis=1, tiled=True)
        q_start = lax.axis_index(seq) * q.shape[1]
        return _blockwise(q, k, v, segment_ids, q_start, scale=scale)

    return jax.shard_map(
        local,
        mesh=mesh,
        out_specs=split,
        check_vma=False,
        in_specs=(split, split, split, None if segment_ids is None else P(rows, seq)),
    )(q, k, v, segment_ids)


def attention_per_shard(fn, q, k, v, segment_ids):
    """`fn(q, k, v, segment_ids)` on each device's rows and heads of the current mesh (the whole
    arrays without one). When "tensor" divides the query heads but not the kv heads, the kv
    heads are repeated to one per query head first, so that both split."""
    split = mesh_split(q.shape, k.shape[2])
    if split is None:
        return fn(q, k, v, segment_ids)
    mesh, rows, *_, heads, kv_heads = split  # the axes over rows, query heads, kv heads
    if rows is None and heads is None:
        return fn(q, k, v, segment_ids)
    if heads is not None and kv_heads is None:
        k, v = (_repeat_kv(t, q.shape[2]) for t in (k, v))
    spec = P(rows, None, heads, None)
    seg_spec = None if segment_ids is None else P(rows, None)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False
    )(q, k, v, segment_ids)


# --- dense -----------------------------------------------------------------------------------
def dense_attention(q, k, v, mask, *, scale: float):
    """q (B, L, Hq, hd), k/v (B, S, Hk, hd), mask (B, L, S) bool (True = attend) -> (B, L, Hq, hd).

    Scores and softmax in float32 (float64 if q is float64); probabilities cast to v.dtype.
    """
    b, l, hq, hd = q.shape
    hk = k.shape[2]
    acc = jnp.result_type(jnp.float32, q.dtype)
    qg = q.reshape(b, l, hk, hq // hk, hd)
    scores = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=acc) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v, preferred_element_type=acc)
    return out.reshape(b, l, hq, hd).astype(q.dtype)


def causal_mask(segment_ids, batch: int, length: int):
    """(B, L, L) bool: key s <= query t and, with segment_ids, the same document."""
    mask = jnp.tril(jnp.ones((length, length), bool))[None]
    if segment_ids is None:
        return jnp.broadcast_to(mask, (batch, length, length))
    doc = document_index(segment_ids)
    return mask & (doc[:, :, None] == doc[:, None, :])


# --- blockwise -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Blocks:
    length: int  # real key positions
    q_length: int  # real query positions: keys q_start .. q_start + q_length - 1
    nq: int  # query blocks of bq positions
    bq: int
    nk: int  # key blocks of bk positions
    bk: int


def _split(length: int, block: int):
    """(blocks, positions per block): equal blocks of at most `block` covering `length`."""
    n = -(-length // block)
    return n, -(-length // n)


def default_block(batch: int, heads: int) -> int:
    """Positions per block: 128 on the CPU (a step's scores stay in cache); elsewhere the largest
    power of two in 128..2048 whose float32 scores (batch, heads, block, block) fit in 256 MiB.
    On an H200 a step costs ~50 us beyond its matmuls (b1 l65536 h16 d128 bf16, blocks of 512:
    8256 steps, fwd 452 ms where the matmuls alone take ~30), so blocks are made large."""
    if jax.default_backend() == "cpu":
        return 128
    block = 2048
    while block > 128 and batch * heads * block * block * 4 > SCORE_BYTES:
        block //= 2
    return block


def blockwise_attention(
    q, k, v, segment_ids=None, *, scale=None, block_q: int | None = None, block_k: int | None = None
):
    """Causal GQA flash attention in XLA loops, O(L) memory forward and backward (see the module
    docstring); same arguments and result as `attention`. Blocks default to `default_block`."""
    _check(q, k, v, segment_ids)
    return _blockwise(q, k, v, segment_ids, 0, scale=scale, block_q=block_q, block_k=block_k)


def _blockwise(q, k, v, segment_ids, q_start, *, scale=None, block_q=None, block_k=None):
    """Blockwise attention of queries q (B, Lq, Hq, D) standing at key positions q_start ..
    q_start + Lq - 1 (an int or a traced scalar) of k / v (B, S, Hk, D); segment_ids (B, S) of
    the keys. Lq == S, q_start == 0 is ordinary causal self-attention."""
    default = default_block(q.shape[0], q.shape[2])
    block_q = default if block_q is None else block_q
    block_k = default if block_k is None else block_k
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"blockwise attention: {name} must be a positive int, got {value!r}")
    b, lq, hq, d = q.shape
    s, hk = k.shape[1:3]
    scale = d**-0.5 if scale is None else scale
    blocks = _Blocks(s, lq, *_split(lq, block_q), *_split(s, block_k))
    q_start = jnp.asarray(q_start, jnp.int32)
    qb = _to_blocks(q.reshape(b, lq, hk, hq // hk, d), blocks.nq, blocks.bq)
    kb, vb = (_to_blocks(t, blocks.nk, blocks.bk) for t in (k, v))
    segq = segk = None
    if segment_ids is not None:
        doc = document_index(segment_ids)
        doc_q = lax.dynamic_slice_in_dim(doc, q_start, lq, axis=1)
        segq = _to_blocks(doc_q[..., None], blocks.nq, blocks.bq)[..., 0]
        segk = _to_blocks(doc[..., None], blocks.nk, blocks.bk)[..., 0]
    ranges = (*_block_ranges(segment_ids, blocks, q_start), q_start)
    out = _flash(blocks, float(scale), qb, kb, vb, segq, segk, ranges)
    return _from_blocks(out, lq).reshape(b, lq, hq, d)


def _to_blocks(x, n: int, block: int):
    """x (B, L, *heads, D) -> (n, B, *heads, block, D), zero-padded at the end."""
    x = jnp.pad(x, [(0, 0), (0, n * block - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], n, block, *x.shape[2:])
    return jnp.moveaxis(x, (1, 2), (0, x.ndim - 2))


def _from_blocks(x, length: int):
    """(n, B, *heads, block, D) -> (B, length, *heads, D)."""
    x = jnp.moveaxis(x, (0, x.ndim - 2), (1, 2))
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _document_spans(segment_ids):
    """(B, L) ids -> (first, last) (B, L): the first and last position of each position's
    document."""
    b, l = segment_ids.shape
    pos = jnp.arange(l)
    ends = jnp.concatenate([document_starts(segment_ids)[:, 1:], jnp.ones((b, 1), bool)], axis=1)
    last = lax.cummin(jnp.where(ends, pos, l - 1), axis=1, reverse=True)
    return pos - document_positions(segment_ids, b, l), last


def _block_ranges(segment_ids, blocks: _Blocks, q_start):
    """(kv_lo, kv_hi) (nq,): the key blocks each query block reads; (q_lo, q_hi) (nk,): the query
    blocks that read each key block. The causal band, narrowed with segment_ids to the blocks
    that hold the documents' first and last positions (over all rows)."""
    s, lq, nq, bq, nk, bk = (
        blocks.length,
        blocks.q_length,
        blocks.nq,
        blocks.bq,
        blocks.nk,
        blocks.bk,
    )
    q_last = q_start + jnp.minimum((jnp.arange(nq) + 1) * bq, lq) - 1  # last real query
    kv_hi = q_last // bk + 1
    first_key = jnp.arange(nk) * bk - q_start  # as a local query position
    q_lo = jnp.where(first_key >= lq, nq, jnp.maximum(first_key, 0) // bq)
    if segment_ids is None:
        kv_lo, q_hi = jnp.zeros((nq,), jnp.int32), jnp.full((nk,), nq)
    else:
        first, last = _document_spans(segment_ids)
        first = lax.dynamic_slice_in_dim(first, q_start, lq, axis=1)
        first = jnp.pad(first.min(0), (0, nq * bq - lq), constant_values=s)
        last = jnp.pad(last.max(0), (0, nk * bk - s), constant_values=-1)
        kv_lo = first.reshape(nq, bq).min(1) // bk
        q_hi = jnp.clip((last.reshape(nk, bk).max(1) - q_start) // bq + 1, 0, nq)
    return tuple(r.astype(jnp.int32) for r in (kv_lo, kv_hi, q_lo, q_hi))


def _scores(blocks: _Blocks, scale, q, k, i, j, sq, sk, q_start):
    """Scaled scores (B, Hk, G, bq, bk) of query block i against key block j, -inf where masked."""
    acc = jnp.result_type(jnp.float32, q.dtype)
    s = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=acc) * scale
    t = q_start + i * blocks.bq + jnp.arange(blocks.bq)
    allowed = (j * blocks.bk + jnp.arange(blocks.bk))[None, :] <= t[:, None]
    if sq is not None:  # (B, 1, 1, bq, bk)
        allowed = (allowed & (sq[:, :, None] == sk[:, None, :]))[:, None, None]
    return jnp.where(allowed, s, -jnp.inf)


def _at(x, i):
    return None if x is None else lax.dynamic_index_in_dim(x, i, keepdims=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(blocks, scale, qb, kb, vb, segq, segk, ranges):
    return _flash_fwd(blocks, scale, qb, kb, vb, segq, segk, ranges)[0]


def _flash_fwd(blocks, scale, qb, kb, vb, segq, segk, ranges):
    acc = jnp.result_type(jnp.float32, qb.dtype)
    kv_lo, kv_hi, q_start = ranges[0], ranges[1], ranges[4]

    def query_block(args):
        i, q, sq, lo, hi = args

        def step(j, carry):
            o, m, total = carry
            s = _scores(blocks, scale, q, _at(kb, j), i, j, sq, _at(segk, j), q_start)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0, m_new)  # rows with nothing seen yet
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            v = _at(vb, j)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v, preferred_element_type=acc)
            return o * corr[..., None] + pv, m_new, total * corr + p.sum(-1)

        init = (
            jnp.zeros(q.shape, acc),
            jnp.full(q.shape[:-1], -jnp.inf, acc),
            jnp.zeros(q.shape[:-1], acc),
        )
        o, m, total = lax.fori_loop(lo, hi, step, init)
        seen = total > 0
        total = jnp.where(seen, total, 1)
        lse = jnp.where(seen, m + jnp.log(total), jnp.inf)  # inf: p = 0 in the backward
        return (o / total[..., None]).astype(q.dtype), lse

    out, lse = lax.map(query_block, (jnp.arange(blocks.nq), qb, segq, kv_lo, kv_hi))
    return out, (qb, kb, vb, segq, segk, ranges, out, lse)


def _flash_bwd(blocks, scale, res, dout):
    qb, kb, vb, segq, segk, ranges, out, lse = res
    acc = lse.dtype
    delta = jnp.einsum("...d,...d->...", dout.astype(acc), out.astype(acc))
    q_lo, q_hi, q_start = ranges[2:]

    def key_block(dq, args):
        j, k, v, sk, lo, hi = args

        def step(i, carry):
            dk, dv, dq = carry
            q, do = _at(qb, i), _at(dout, i)
            s = _scores(blocks, scale, q, k, i, j, _at(segq, i), sk, q_start)
            p = jnp.exp(s - _at(lse, i)[..., None])
            dv = dv + jnp.einsum(
                "bkgqs,bkgqd->bksd", p.astype(do.dtype), do, preferred_element_type=acc
            )
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do, v, preferred_element_type=acc)
            ds = p * (dp - _at(delta, i)[..., None]) * scale
            dk = dk + jnp.einsum(
                "bkgqs,bkgqd->bksd", ds.astype(q.dtype), q, preferred_element_type=acc
            )
            dq_i = _at(dq, i) + jnp.einsum(
                "bkgqs,bksd->bkgqd", ds.astype(k.dtype), k, preferred_element_type=acc
            )
            return dk, dv, lax.dynamic_update_index_in_dim(dq, dq_i, i, 0)

        zeros = jnp.zeros(k.shape, acc)
        dk, dv, dq = lax.fori_loop(lo, hi, step, (zeros, zeros, dq))
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = lax.scan(
        key_block, jnp.zeros(qb.shape, acc), (jnp.arange(blocks.nk), kb, vb, segk, q_lo, q_hi)
    )
    return dq.astype(qb.dtype), dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- Pallas (GPU) ----------------------------------------------------------------------------
def pallas_unsupported_reason(q, k, v, *, interpret: bool = False):
    """None when jax's Pallas flash attention supports this call, else a sentence saying why."""
    del k, v
    dtype = jnp.dtype(q.dtype).name
    if dtype not in PALLAS_DTYPES:
        return (
            f"dtype {dtype} is not supported by the Pallas kernel ({', '.join(PALLAS_DTYPES)}; "
            "use attn_impl='blockwise' for float64)"
        )
    if not 16 <= q.shape[-1] <= 128:
        return f"head_dim={q.shape[-1]} is not supported by the Pallas kernel (16..128)"
    if not interpret and jax.default_backend() != "gpu":
        return (
            f"the Pallas kernel needs a GPU backend (default backend is "
            f"{jax.default_backend()!r}); use attn_impl='blockwise' elsewhere"
        )
    return None


def _triton_attention():
    """jax's Pallas Triton attention module (jax 0.11 deprecates it in favour of tokamax)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention
    return attention


def _repeat_kv(x, heads: int):
    return jnp.repeat(x, heads // x.shape[2], axis=2)


def pallas_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    scale=None,
    block_fwd: int = PALLAS_BLOCK_FWD,
    block_bwd: int = PALLAS_BLOCK_BWD,
    interpret: bool = False,
):
    """jax's Pallas Triton flash attention, causal, with segment_ids: q, k, v (B, L, H, D) with
    equal heads (`attention` repeats GQA's kv heads first). Query and key blocks of `block_fwd`
    positions in the forward, `block_bwd` in the backward's kernel. The length is padded to a
    multiple of the larger; the padded keys lie after every real query, so the causal mask
    hides them."""
    reason = pallas_unsupported_reason(q, k, v, interpret=interpret)
    if reason is not None:
        raise ValueError(f"attn_impl='pallas': {reason}")
    block_sizes = _triton_attention().BlockSizes(block_fwd, block_fwd, *[block_bwd] * 4)
    l = q.shape[1]
    pad = -l % max(block_fwd, block_bwd)
    if segment_ids is not None:  # the kernel masks by id equality: give it run indices
        segment_ids = document_index(segment_ids)
    if pad:
        q, k, v = (jnp.pad(t, [(0, 0), (0, pad), (0, 0), (0, 0)]) for t in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, [(0, 0), (0, pad)], mode="edge")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _triton_mha(q, k, v, segment_ids, scale, block_sizes, interpret)[:, :l]


# The kernels' index arithmetic mixes int32 program ids with Python ints, which jax_enable_x64
# turns into int64 (a TypeError): the forward and the backward are traced with x64 off.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _triton_mha(q, k, v, segment_ids, scale, block_sizes, interpret):
    return _triton_mha_fwd(q, k, v, segment_ids, scale, block_sizes, interpret)[0]


def _triton_mha_fwd(q, k, v, segment_ids, scale, block_sizes, interpret):
    kernel = functools.partial(
        _triton_attention().mha,
        sm_scale=scale,
        causal=True,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    with jax.enable_x64(False):
        return jax.vjp(kernel, q, k, v, segment_ids)  # the vjp function is a pytree


def _triton_mha_bwd(scale, block_sizes, interpret, vjp_fn, dout):
    del scale, block_sizes, interpret
    with jax.enable_x64(False):
        return (*vjp_fn(dout)[:3], None)


_triton_mha.defvjp(_triton_mha_fwd, _triton_mha_bwd)
