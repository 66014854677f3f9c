"""Mamba2Mixer: against transformers' NemotronHMamba2Mixer (torch path, float64), packed-segment
resets, prefill + decode against the full forward, and the init statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _layer_calls import decode_each, prefill, random_x
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.layers.mamba2 import Mamba2Cache, Mamba2Mixer

CFG = HybridConfig(
    d_model=48,
    mamba_heads=6,
    mamba_head_dim=8,
    ssm_state=12,
    n_groups=3,
    conv_kernel=4,
    chunk_size=8,
    dtype="float64",
    param_dtype="float64",
    ssd_impl="reference",
    pattern="M-",
)


def _mixer(cfg=CFG, seed=0):
    m = Mamba2Mixer(cfg, rngs=nnx.Rngs(seed))
    # perturb the deterministic inits so the oracle comparison exercises every parameter
    key = jax.random.key(seed + 100)
    for name in ("D", "conv_x.bias", "conv_bc.bias", "norm.weight"):
        obj, attr = m, name.split(".")
        for a in attr[:-1]:
            obj = getattr(obj, a)
        var = getattr(obj, attr[-1])
        key, sub = jax.random.split(key)
        var[...] = var[...] + 0.3 * jax.random.normal(sub, var.shape, var.dtype)
    return m


# jitted forward (prefill and decode come from _layer_calls)
@nnx.jit
def fwd(m, x, segment_ids=None):
    return m(x, segment_ids=segment_ids)


IMPLS = ["reference", "chunked"]


# --- against transformers ------------------------------------------------------------------------
def _hf_mixer(cfg, mixer):
    pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    from _torch_f64 import t
    from transformers import NemotronHConfig

    hf_cfg = NemotronHConfig(
        hidden_size=cfg.d_model,
        layers_block_type=["linear_attention"],
        mamba_num_heads=cfg.mamba_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        ssm_state_size=cfg.ssm_state,
        n_groups=cfg.n_groups,
        conv_kernel=cfg.conv_kernel,
        chunk_size=cfg.chunk_size,
        layer_norm_epsilon=cfg.norm_eps,
        time_step_min=cfg.time_step_min,
        time_step_max=cfg.time_step_max,
        # the clamp as export writes it (transformers 5.25 clamps at time_step_limit alone)
        time_step_limit=(cfg.time_step_min, float("inf")),
        use_conv_bias=True,
        use_bias=False,
        use_mamba_kernels=False,
        vocab_size=16,
    )
    hf = mod.NemotronHMamba2Mixer(hf_cfg, layer_idx=0).double().eval()
    d, k = cfg.d_model, cfg.conv_kernel

    def flat(param, rows):
        return np.asarray(param[...]).reshape(rows, -1)

    # transformers' single in_proj / conv1d are our parts concatenated: [z | x | B | C | dt]
    in_proj = np.concatenate(
        [
            flat(mixer.zx_proj.kernel, d),
            flat(mixer.bc_proj.kernel, d),
            flat(mixer.dt_proj.kernel, d),
        ],
        axis=1,
    )
    hf.in_proj.weight.data = t(in_proj).T.contiguous()
    hf.out_proj.weight.data = t(flat(mixer.out_proj.kernel, cfg.d_inner)).T.contiguous()
    conv = np.concatenate([flat(mixer.conv_x.kernel, k), flat(mixer.conv_bc.kernel, k)], axis=1)
    hf.conv1d.weight.data = t(conv).T[:, None, :].contiguous()
    hf.conv1d.bias.data = t(
        np.concatenate([flat(mixer.conv_x.bias, 1), flat(mixer.conv_bc.bias, 1)], axis=1)[0]
    )
    for name in ("dt_bias", "A_log", "D"):
        getattr(hf, name).data = t(getattr(mixer, name)[...])
    hf.norm.weight.data = t(flat(mixer.norm.weight, 1)[0])
    return hf


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [37, 5])
def test_matches_transformers(impl, length):
    torch = pytest.importorskip("torch")
    from _torch_f64 import keep_float64, rel_err, t

    cfg = CFG.replace(ssd_impl=impl)
    mixer = _mixer(cfg)
    # large dt_bias spread so some dt fall below time_step_min and the clamp is exercised
    mixer.dt_bias[...] = jnp.linspace(-9.0, 1.0, cfg.mamba_heads)
    hf = _hf_mixer(cfg, mixer)
    x = random_x((2, length, cfg.d_model))
    with torch.no_grad(), keep_float64():
        want = hf(t(x)).numpy()
    got = fwd(mixer, x)
    assert got.dtype == jnp.float64
    assert rel_err(got, want) < 1e-10


def test_clamp_dt_off_differs_only_when_dt_small():
    mixer = _mixer(CFG)
    mixer.dt_bias[...] = jnp.full((CFG.mamba_heads,), -12.0)  # softplus ~ 6e-6 < time_step_min
    x = random_x((1, 9, CFG.d_model))
    unclamped = Mamba2Mixer(CFG.replace(clamp_dt=False), rngs=nnx.Rngs(0))
    nnx.update(unclamped, nnx.state(mixer))
    assert not np.allclose(fwd(mixer, x), fwd(unclamped, x))


# --- packed documents ----------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_segments_equal_separate_documents(impl):
    cfg = CFG.replace(ssd_impl=impl)
    mixer = _mixer(cfg)
    la, lb = 13, 11  # the boundary falls inside a chunk and inside a conv window
    xa, xb = random_x((1, la, cfg.d_model), 2), random_x((1, lb, cfg.d_model), 3)
    packed = jnp.concatenate([xa, xb], axis=1)
    seg = jnp.array([[1] * la + [2] * lb])
    got = fwd(mixer, packed, seg)
    np.testing.assert_allclose(got[:, :la], fwd(mixer, xa), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(got[:, la:], fwd(mixer, xb), rtol=1e-11, atol=1e-13)
    # without segment ids the second document sees the first
    assert not np.allclose(fwd(mixer, packed)[:, la:], fwd(mixer, xb))


# --- decoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [1, 2, 10])
def test_prefill_then_decode_equals_forward(prompt):
    mixer = _mixer(CFG)
    x = random_x((2, 19, CFG.d_model))
    full = fwd(mixer, x)
    cache = mixer.init_cache(2, 19)
    assert isinstance(cache, Mamba2Cache)
    assert cache.ssm.shape == (2, CFG.mamba_heads, CFG.mamba_head_dim, CFG.ssm_state)
    conv_dim = CFG.d_inner + 2 * CFG.n_groups * CFG.ssm_state
    assert cache.conv.shape == (2, CFG.conv_kernel - 1, conv_dim)
    y, cache = prefill(mixer, x[:, :prompt], cache)
    ys, cache = decode_each(mixer, x[:, prompt:], cache)
    np.testing.assert_allclose(jnp.concatenate([y, ys], 1), full, rtol=1e-10, atol=1e-12)


def test_decode_after_packed_prefill_continues_last_document():
    mixer = _mixer(CFG)
    la, lb, extra = 6, 2, 4  # last document shorter than the conv window
    xa, xb = random_x((1, la, CFG.d_model), 4), random_x((1, lb + extra, CFG.d_model), 5)
    seg = jnp.array([[0] * la + [1] * lb])
    _, cache = prefill(mixer, jnp.concatenate([xa, xb[:, :lb]], 1), mixer.init_cache(1), seg)
    np.testing.assert_allclose(
        decode_each(mixer, xb[:, lb:], cache)[0], fwd(mixer, xb)[:, lb:], rtol=1e-10, atol=1e-12
    )


def test_decode_under_jit_float32():
    cfg = CFG.replace(dtype="float32", param_dtype="float32")
    mixer = Mamba2Mixer(cfg, rngs=nnx.Rngs(0))
    x = random_x((2, 7, cfg.d_model), dtype=jnp.float32)

    _, cache = prefill(mixer, x[:, :4], mixer.init_cache(2))
    assert cache.ssm.dtype == jnp.float32 and cache.conv.dtype == jnp.float32
    ys, cache = decode_each(mixer, x[:, 4:7], cache)
    np.testing.assert_allclose(ys, fwd(mixer, x)[:, 4:], rtol=2e-4, atol=2e-5)


# --- init, dtypes, errors ------------------------------------------------------------------------
def test_init_statistics():
    cfg = CFG.replace(
        mamba_heads=4096,
        mamba_head_dim=1,
        n_groups=1,
        d_model=8,
        dtype="float32",
        param_dtype="float32",
        pattern="MMMM",
    )
    m = Mamba2Mixer(cfg, rngs=nnx.Rngs(3))
    A = np.exp(np.asarray(m.A_log[...]))
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert abs(A.mean() - 8.5) < 0.3 and A.min() < 1.1 and A.max() > 15.9  # uniform on [1, 16]
    dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
    lo, hi = cfg.time_step_min, cfg.time_step_max
    assert dt.min() >= lo * (1 - 1e-4) and dt.max() <= hi * (1 + 1e-4)
    log_dt = np.log(dt)  # log-uniform
    assert abs(log_dt.mean() - (math.log(lo) + math.log(hi)) / 2) < 0.1
    np.testing.assert_array_equal(m.D[...], 1.0)
    np.testing.assert_array_equal(m.norm.weight[...], 1.0)
    for proj in (m.zx_proj, m.bc_proj, m.dt_proj):
        assert abs(np.std(proj.kernel[...]) - cfg.initializer_range) < 0.002
    # out_proj: U(+-1/sqrt(d_inner)) / sqrt(n_layers)
    bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layers)
    out = np.asarray(m.out_proj.kernel[...])
    assert np.abs(out).max() <= bound and np.abs(out).max() > 0.95 * bound


def test_conv_init_is_torch_conv1d_default():
    """The depthwise conv starts as torch's own Conv1d(C, C, K, groups=C) (which mamba_ssm keeps),
    not at the 0.02 normal that transformers 5 re-draws: same distribution of kernel and bias."""
    torch = pytest.importorskip("torch")
    from scipy.stats import ks_2samp

    cfg = CFG.replace(
        mamba_heads=512, mamba_head_dim=8, n_groups=1, dtype="float32", param_dtype="float32"
    )
    m = Mamba2Mixer(cfg, rngs=nnx.Rngs(0))
    conv_dim = m.conv_dim
    torch.manual_seed(0)
    ref = torch.nn.Conv1d(conv_dim, conv_dim, cfg.conv_kernel, groups=conv_dim)
    kernel = np.concatenate([np.ravel(m.conv_x.kernel[...]), np.ravel(m.conv_bc.kernel[...])])
    bias = np.concatenate([np.ravel(m.conv_x.bias[...]), np.ravel(m.conv_bc.bias[...])])
    for ours, theirs in ((kernel, ref.weight), (bias, ref.bias)):
        theirs = theirs.detach().numpy().ravel()
        assert ks_2samp(ours, theirs).pvalue > 1e-3
        assert np.abs(ours).max() <= np.abs(theirs).max() * 1.01


def test_state_path_is_live_at_init():
    """At init a token beyond the conv window must reach the output through the SSM state with a
    gain not negligible against the current token's. With the conv drawn from normal(0, 0.02)
    and bias 0, x, B and C are ~3e-3 and that gain was 4e-7..2e-6 for these seeds (a pure Mamba-2
    stack then stayed on the MQAR plateau of accuracy 1/pairs); with torch's Conv1d init it is
    3e-4..7e-4."""
    cfg = CFG.replace(
        d_model=64, mamba_heads=4, mamba_head_dim=16, ssm_state=16, n_groups=1, pattern="MMMM"
    )
    length, window = 16, cfg.conv_kernel
    for seed in range(3):
        m = Mamba2Mixer(cfg, rngs=nnx.Rngs(seed))
        graph, state = nnx.split(m)
        x = random_x((1, length, cfg.d_model), seed=seed)
        last = lambda x, graph=graph, state=state: nnx.merge(graph, state)(x)[0, -1]
        jac = jax.jacrev(last)(x)[:, 0]  # (d, L, d)
        gain = np.linalg.norm(np.asarray(jac), axis=(0, 2))
        beyond_conv = gain[: length - window] / gain[-1]
        assert beyond_conv.max() > 1e-4, (seed, beyond_conv.max())


def test_dt_floor():
    cfg = CFG.replace(time_step_min=1e-6, time_step_max=1e-5, time_step_floor=1e-4)
    m = Mamba2Mixer(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(jax.nn.softplus(m.dt_bias[...]), 1e-4, rtol=1e-8)


def test_bfloat16_compute():
    cfg = CFG.replace(dtype="bfloat16", param_dtype="float32")
    m = Mamba2Mixer(cfg, rngs=nnx.Rngs(0))
    x = random_x((2, 11, cfg.d_model), dtype=jnp.float32)
    y = fwd(m, x)
    assert y.dtype == jnp.bfloat16
    ref = fwd(Mamba2Mixer(cfg.replace(dtype="float32"), rngs=nnx.Rngs(0)), x)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0.1, atol=0.02)
    assert m.A_log[...].dtype == jnp.float32


def test_param_names():
    state = nnx.to_flat_state(nnx.state(_mixer(), nnx.Param))
    names = {".".join(map(str, p)) for p, _ in state}
    assert names == {
        "zx_proj.kernel",
        "bc_proj.kernel",
        "dt_proj.kernel",
        "conv_x.kernel",
        "conv_x.bias",
        "conv_bc.kernel",
        "conv_bc.bias",
        "dt_bias",
        "A_log",
        "D",
        "norm.weight",
        "out_proj.kernel",
    }


def test_bad_inputs():
    m = _mixer()
    with pytest.raises(ValueError, match="d_model|48"):
        m(jnp.zeros((1, 4, 7)))
    with pytest.raises(ValueError, match="segment_ids"):
        m(jnp.zeros((1, 4, CFG.d_model)), segment_ids=jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="one token"):
        m.decode(jnp.zeros((1, 2, CFG.d_model)), m.init_cache(1))


# --- layer_chunk_size: the row in chunks, the state carried between them -------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_chunks_equal_the_whole_row(impl):
    """layer_chunk_size 7 over 23 tokens (three chunks and a tail): values, the state after the
    row and the gradients of every parameter, the input and the initial state equal the whole-row
    layer in float64. Documents start inside a chunk, exactly at a chunk start (row 0, token 14)
    and in the tail; row 1 is one document continuing from the initial state."""
    cfg = CFG.replace(ssd_impl=impl)
    whole, chunked = _mixer(cfg), _mixer(cfg.replace(layer_chunk_size=7))
    x = random_x((2, 23, cfg.d_model), 4)
    seg = jnp.array([[1] * 5 + [2] * 9 + [3] * 8 + [4], [7] * 23])
    key = jax.random.key(9)
    state = Mamba2Cache(
        conv=jax.random.normal(key, whole.init_cache(2).conv.shape, jnp.float64),
        ssm=jax.random.normal(jax.random.fold_in(key, 1), whole.init_cache(2).ssm.shape),
    )

    def loss(m, x, state):
        y, after = m(x, segment_ids=seg, state=state)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(after.ssm)) + jnp.sum(after.conv**2)

    for got, want in zip(
        jax.tree.leaves(nnx.jit(lambda m, x, s: m(x, segment_ids=seg, state=s))(chunked, x, state)),
        jax.tree.leaves(nnx.jit(lambda m, x, s: m(x, segment_ids=seg, state=s))(whole, x, state)),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(fwd(chunked, x), fwd(whole, x), rtol=1e-11, atol=1e-13)
    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))
    got, want = grad(chunked, x, state), grad(whole, x, state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert np.abs(np.asarray(got[2].ssm)).max() > 1e-3  # the initial state does get a gradient
