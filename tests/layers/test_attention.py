"""Attention: against transformers' NemotronHAttention (eager, float64), RoPE against a numpy
reference, packed documents, the blockwise path against the dense one, prefill + decode against
the full forward, the cuDNN call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _layer_calls import decode_each, prefill, random_x
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.layers.attention import Attention, KVCache, document_positions
from hybridjax.ops.rope import rope_frequencies

CFG = HybridConfig(
    d_model=40,
    attn_heads=6,
    kv_heads=2,
    head_dim=10,
    dtype="float64",
    param_dtype="float64",
    pattern="*-",
)


# jitted entry points: one compile per (module structure, shape) instead of one per eager op
@nnx.jit
def fwd(m, x, segment_ids=None, positions=None):
    return m(x, segment_ids=segment_ids, positions=positions)


def _attn(cfg=CFG, seed=0):
    m = Attention(cfg, rngs=nnx.Rngs(seed))
    # larger weights so the softmax is far from uniform
    for lin in (m.q_proj, m.k_proj):
        lin.kernel[...] = lin.kernel[...] * 20
    return m


# --- against transformers ------------------------------------------------------------------------
def _hf_attention(cfg, attn):
    pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    from _torch_f64 import set_linear
    from transformers import NemotronHConfig

    hf_cfg = NemotronHConfig(
        hidden_size=cfg.d_model,
        layers_block_type=["full_attention"],
        num_attention_heads=cfg.attn_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=16,
    )
    hf_cfg._attn_implementation = "eager"
    hf = mod.NemotronHAttention(hf_cfg, layer_idx=0).double().eval()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        set_linear(getattr(hf, name), getattr(attn, name))
    return hf


def _additive_mask(segment_ids, b, l):
    import torch

    allowed = np.tril(np.ones((l, l), bool))[None].repeat(b, 0)
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    mask = np.where(allowed, 0.0, np.finfo(np.float64).min)[:, None]
    return torch.from_numpy(mask)


@pytest.mark.parametrize("packed", [False, True])
def test_matches_transformers(packed):
    torch = pytest.importorskip("torch")
    from _torch_f64 import keep_float64, rel_err, t

    attn = _attn()
    hf = _hf_attention(CFG, attn)
    b, l = 2, 23
    x = random_x((b, l, CFG.d_model))
    seg = jnp.array([[0] * 9 + [1] * 14, [3] * 23]) if packed else None
    with torch.no_grad(), keep_float64():
        want, _ = hf(t(x), attention_mask=_additive_mask(seg, b, l))
    got = fwd(attn, x, seg)
    assert got.dtype == jnp.float64
    assert rel_err(got, want.numpy()) < 1e-11


# --- RoPE ----------------------------------------------------------------------------------------
def _numpy_attention(cfg, attn, x, positions):
    """Causal GQA attention with RoPE written out in numpy, one head and one query at a time."""
    x = np.asarray(x)
    b, l, _ = x.shape
    hq, hk, hd = cfg.attn_heads, cfg.kv_heads, cfg.head_dim
    q = (x @ np.asarray(attn.q_proj.kernel[...]).reshape(cfg.d_model, -1)).reshape(b, l, hq, hd)
    k = (x @ np.asarray(attn.k_proj.kernel[...]).reshape(cfg.d_model, -1)).reshape(b, l, hk, hd)
    v = (x @ np.asarray(attn.v_proj.kernel[...]).reshape(cfg.d_model, -1)).reshape(b, l, hk, hd)
    inv_freq, scale = rope_frequencies(
        hd,
        cfg.rope_theta,
        scaling=cfg.rope_scaling,
        factor=cfg.rope_factor,
        original_max_len=cfg.rope_original_max_len,
    )

    def rot(vec, p):  # pairs (i, i + hd/2) rotate by p * inv_freq_i
        out = np.empty_like(vec)
        for i in range(hd // 2):
            c, s = np.cos(p * inv_freq[i]) * scale, np.sin(p * inv_freq[i]) * scale
            out[i] = vec[i] * c - vec[i + hd // 2] * s
            out[i + hd // 2] = vec[i + hd // 2] * c + vec[i] * s
        return out

    out = np.zeros((b, l, hq, hd))
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hk)
            for i in range(l):
                qi = rot(q[bi, i, h], positions[bi, i])
                scores = np.array([qi @ rot(k[bi, j, kh], positions[bi, j]) for j in range(i + 1)])
                scores = scores * hd**-0.5
                p = np.exp(scores - scores.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, : i + 1, kh]
    return out.reshape(b, l, hq * hd) @ np.asarray(attn.o_proj.kernel[...]).reshape(hq * hd, -1)


@pytest.mark.parametrize("scaling", [None, "linear", "ntk", "yarn"])
def test_rope_matches_numpy(scaling):
    cfg = CFG.replace(
        rope_theta=500.0, rope_scaling=scaling, rope_factor=4.0, rope_original_max_len=16
    )
    attn = _attn(cfg)
    x = random_x((2, 9, cfg.d_model))
    positions = jnp.array([np.arange(9) + 5, np.arange(9) * 3])
    got = fwd(attn, x, positions=positions)
    want = _numpy_attention(cfg, attn, x, np.asarray(positions))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_rope_is_relative():
    cfg = CFG.replace(rope_theta=10000.0)
    attn = _attn(cfg)
    x = random_x((1, 8, cfg.d_model))
    base = fwd(attn, x, positions=jnp.arange(8)[None])
    shifted = fwd(attn, x, positions=jnp.arange(8)[None] + 1000)
    np.testing.assert_allclose(shifted, base, rtol=1e-8, atol=1e-10)
    nope = fwd(_attn(CFG), x)
    assert not np.allclose(base, nope)


# --- packed documents ----------------------------------------------------------------------------
@pytest.mark.parametrize("rope", [None, 100.0])
def test_segments_equal_separate_documents(rope):
    attn = _attn(CFG.replace(rope_theta=rope))
    la, lb = 7, 10
    xa, xb = random_x((1, la, CFG.d_model), 2), random_x((1, lb, CFG.d_model), 3)
    packed = jnp.concatenate([xa, xb], axis=1)
    seg = jnp.array([[5] * la + [9] * lb])
    got = fwd(attn, packed, seg)  # default positions restart at each document
    np.testing.assert_allclose(got[:, :la], fwd(attn, xa), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(got[:, la:], fwd(attn, xb), rtol=1e-11, atol=1e-13)
    assert not np.allclose(fwd(attn, packed)[:, la:], fwd(attn, xb))


def test_document_positions():
    seg = jnp.array([[1, 1, 2, 2, 2, 7], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(
        document_positions(seg, 2, 6), [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    )


# --- implementations -----------------------------------------------------------------------------
def test_default_impl_is_auto():
    assert HybridConfig().attn_impl == "auto"


@pytest.mark.parametrize("rope", [None, 100.0])
def test_blockwise_equals_xla(rope):
    cfg = CFG.replace(rope_theta=rope, attn_impl="xla")
    dense = _attn(cfg)
    blockwise = _attn(cfg.replace(attn_impl="blockwise"))
    nnx.update(blockwise, nnx.state(dense))
    x = random_x((2, 29, CFG.d_model))
    seg = jnp.array(
        [
            [0] * 6 + [1] * 9 + [0] * 4 + [2] * 10,  # id 0 comes back
            [4] * 29,
        ]
    )

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x, segment_ids=seg)))

    grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
    (want, (want_params, want_x)) = grad(dense, x)
    (got, (got_params, got_x)) = grad(blockwise, x)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-10, atol=1e-12)
    for path, ref in nnx.to_flat_state(want_params):
        np.testing.assert_allclose(
            dict(nnx.to_flat_state(got_params))[path][...],
            ref[...],
            rtol=1e-10,
            atol=1e-12,
            err_msg=str(path),
        )


def test_pallas_needs_a_gpu():
    attn = _attn(
        CFG.replace(attn_impl="pallas", dtype="float32", param_dtype="float32", head_dim=16)
    )
    with pytest.raises(ValueError, match="pallas.*GPU.*blockwise"):
        attn(random_x((1, 4, CFG.d_model), dtype=jnp.float32))


# --- decoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["blockwise", "xla"])
@pytest.mark.parametrize("rope", [None, 1000.0])
@pytest.mark.parametrize("prompt", [1, 6])
def test_prefill_then_decode_equals_forward(impl, rope, prompt):
    attn = _attn(CFG.replace(rope_theta=rope, attn_impl=impl))
    b, l = 2, 15
    x = random_x((b, l, CFG.d_model))
    full = fwd(attn, x)
    cache = attn.init_cache(b, 20, jnp.float64)
    assert isinstance(cache, KVCache) and cache.k.shape == (b, 20, CFG.kv_heads, CFG.head_dim)
    y, cache = prefill(attn, x[:, :prompt], cache)
    assert int(cache.pos) == prompt
    ys, cache = decode_each(attn, x[:, prompt:l], cache)
    assert int(cache.pos) == l
    np.testing.assert_allclose(jnp.concatenate([y, ys], 1), full, rtol=1e-10, atol=1e-12)


def test_decode_after_packed_prefill_continues_last_document():
    attn = _attn(CFG.replace(rope_theta=100.0))
    la, lb, extra = 5, 3, 4
    xa, xb = random_x((1, la, CFG.d_model), 4), random_x((1, lb + extra, CFG.d_model), 5)
    seg = jnp.array([[0] * la + [1] * lb])
    _, cache = prefill(attn, jnp.concatenate([xa, xb[:, :lb]], 1), attn.init_cache(1, 16), seg)
    assert int(cache.start[0]) == la
    np.testing.assert_allclose(
        decode_each(attn, xb[:, lb:], cache)[0], fwd(attn, xb)[:, lb:], rtol=1e-10, atol=1e-12
    )


def test_decode_under_jit():
    cfg = CFG.replace(dtype="float32", param_dtype="float32", rope_theta=10000.0)
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    x = random_x((2, 9, cfg.d_model), dtype=jnp.float32)
    _, cache = prefill(attn, x[:, :3], attn.init_cache(2, 9))
    ys, cache = decode_each(attn, x[:, 3:9], cache)
    np.testing.assert_allclose(ys, fwd(attn, x)[:, 3:], rtol=1e-4, atol=1e-5)


# --- cuDNN branch (only the call is checked on CPU) ----------------------------------------------
def test_cudnn_builds_causal_call(monkeypatch):
    calls = []
    real = jax.nn.dot_product_attention

    def fake(q, k, v, bias=None, mask=None, **kw):
        calls.append((q.shape, k.shape, v.shape, bias, mask, kw))
        return real(q, k, v, scale=kw["scale"], is_causal=True, implementation="xla")

    attn = _attn(CFG.replace(attn_impl="cudnn"))
    x = random_x((2, 11, CFG.d_model))
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    got = attn(x)
    monkeypatch.undo()
    ((qs, ks, vs, bias, mask, kw),) = calls
    assert qs == (2, 11, 6, 10) and ks == vs == (2, 11, 2, 10)
    assert bias is None and mask is None
    assert kw == {"scale": 10**-0.5, "is_causal": True, "implementation": "cudnn"}
    xla = Attention(CFG.replace(attn_impl="xla"), rngs=nnx.Rngs(0))
    nnx.update(xla, nnx.state(attn))
    # jax's own xla attention softmaxes in float32 even for float64 inputs
    np.testing.assert_allclose(got, xla(x), rtol=1e-4, atol=1e-7)


def test_cudnn_packed_documents_need_a_gpu():
    attn = _attn(CFG.replace(attn_impl="cudnn"))
    with pytest.raises(ValueError, match="cudnn' with packed documents: needs a GPU"):
        attn(random_x((1, 4, CFG.d_model)), segment_ids=jnp.zeros((1, 4), jnp.int32))


# --- errors, names -------------------------------------------------------------------------------
def test_param_names():
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(_attn(), nnx.Param))}
    assert names == {"q_proj.kernel", "k_proj.kernel", "v_proj.kernel", "o_proj.kernel"}


def test_bad_inputs():
    attn = _attn()
    with pytest.raises(ValueError, match="40"):
        attn(jnp.zeros((1, 4, 7)))
    with pytest.raises(ValueError, match="positions"):
        attn(jnp.zeros((1, 4, CFG.d_model)), positions=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="max_len"):
        attn.prefill(jnp.zeros((1, 6, CFG.d_model)), attn.init_cache(1, 4))
    with pytest.raises(ValueError, match="one token"):
        attn.decode(jnp.zeros((1, 2, CFG.d_model)), attn.init_cache(1, 4))
