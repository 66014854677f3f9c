"""Mamba3Mixer and the `3` layer letter: the mixer against a float64 NumPy port of mamba_ssm's
`Mamba3.forward` (its in_proj split, B/C norms, A, dt and the step recurrence; the torch module
itself imports Triton and cannot run here), decode against the forward, packed documents,
inits, config errors; a model with Mamba-3 layers trains a step, decodes, shards, counts its
parameters and FLOPs, and export refuses it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _layer_calls import decode_each, prefill, random_x
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.export.hf import check_exportable
from hybridjax.layers.mamba3 import Mamba3Mixer, heavy_tail
from hybridjax.model import HybridLM, flops_per_token, param_counts
from hybridjax.ops.cross_entropy import head_logits
from hybridjax.optim import decays
from hybridjax.sharding import logical_axes, make_mesh, param_spec
from tests.ops.test_mamba3 import numpy_loop, rel_err
from tests.tiny import tiny, tokens

SISO = HybridConfig(
    d_model=24,
    mamba_heads=4,
    mamba_head_dim=3,
    ssm_state=8,
    n_groups=2,
    chunk_size=4,
    dtype="float64",
    param_dtype="float64",
    pattern="3-",
)
MIMO = SISO.replace(mamba3_mimo=True, mamba3_mimo_rank=2, mamba3_rope_fraction=1.0)
CONFIGS = {
    "siso": SISO,
    "mimo-heavy-tail": MIMO.replace(mamba3_a_act="heavy_tail"),
}


def _mixer(cfg, seed=0):
    """A mixer whose constant inits are perturbed, so the comparison exercises every parameter."""
    m = Mamba3Mixer(cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 100)
    for name in ("D", "B_bias", "C_bias", "B_norm", "C_norm", "mimo_x", "mimo_z", "mimo_o"):
        if not hasattr(m, name):
            continue
        var = getattr(m, name)
        var = var.weight if name.endswith("norm") else var
        key, sub = jax.random.split(key)
        var[...] = var[...] + 0.3 * jax.random.normal(sub, var.shape, var.dtype)
    return m


@nnx.jit
def fwd(m, x, segment_ids=None):
    return m(x, segment_ids=segment_ids)


# --- against mamba_ssm's module, ported to NumPy -------------------------------------------------
def reference_forward(cfg, m, u, segment_ids=None):
    """mamba_ssm `Mamba3.forward` in float64 NumPy: one in_proj in the torch layout, split as
    [z, x, B, C, dd_dt, dd_A, trap, angles], B/C rearranged "(r g n)" and RMS-normed, then the
    recurrence (`numpy_loop`, the port of its step references) and out_proj."""
    a = lambda t: np.asarray(t[...], np.float64)
    h, p, g, n = cfg.mamba_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state
    R = cfg.mamba3_mimo_rank if cfg.mamba3_mimo else 1
    d = cfg.d_model
    w_in = np.concatenate(  # (d, 2 d_inner + 2 R G N + 3 H + S): torch's in_proj.weight.T
        [
            a(m.zx_proj.kernel).reshape(d, -1),
            a(m.bc_rank_proj.kernel)[:, 0].reshape(d, -1),
            a(m.bc_rank_proj.kernel)[:, 1].reshape(d, -1),
            a(m.dt_proj.kernel),
            a(m.a_proj.kernel),
            a(m.trap_proj.kernel),
            a(m.angle_proj.kernel),
        ],
        -1,
    )
    proj = np.asarray(u, np.float64) @ w_in
    d_inner, s = h * p, cfg.mamba3_angles
    sizes = [d_inner, d_inner, R * g * n, R * g * n, h, h, h, s]
    z, x, B, C, dd_dt, dd_A, trap, angles = np.split(proj, np.cumsum(sizes)[:-1], -1)
    b, l = u.shape[:2]
    z, x = z.reshape(b, l, h, p), x.reshape(b, l, h, p)
    B, C = B.reshape(b, l, R, g, n), C.reshape(b, l, R, g, n)

    def rms(t, w):
        return t / np.sqrt(np.mean(t**2, -1, keepdims=True) + cfg.norm_eps) * w

    B, C = rms(B, a(m.B_norm.weight)), rms(C, a(m.C_norm.weight))
    act = (
        (lambda t: np.log1p(np.exp(t)))
        if cfg.mamba3_a_act == "softplus"
        else (lambda t: np.where(t >= 0, 1 + t, 1 / (1 - t)))
    )
    A = np.minimum(-act(dd_A), -cfg.mamba3_a_floor)
    DT = np.log1p(np.exp(dd_dt + a(m.dt_bias)))
    angles = np.broadcast_to(angles[:, :, None], (b, l, h, s))
    args = [C, B, x, A * DT, DT, trap, a(m.C_bias), a(m.B_bias), angles]
    if cfg.mamba3_mimo:
        args += [a(m.mimo_x), a(m.mimo_z), a(m.mimo_o)]
    else:
        args = [C[:, :, 0], B[:, :, 0], *args[2:6], args[6][:, 0], args[7][:, 0], angles]
    y, _ = numpy_loop(*args, D=a(m.D), z=z, segment_ids=segment_ids)
    return y.reshape(b, l, d_inner) @ a(m.out_proj.kernel).reshape(d_inner, d)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_matches_mamba_ssm_module(name, impl):
    cfg = CONFIGS[name].replace(mamba3_impl=impl)
    m = _mixer(cfg)
    u = random_x((2, 11, cfg.d_model))
    seg = jnp.asarray([[0] * 4 + [1] * 7, [5] * 11])
    want = reference_forward(cfg, m, u, np.asarray(seg))
    assert rel_err(fwd(m, u, seg), want) < 1e-12


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_equals_forward(name):
    """prefill + one-token decode steps give the full forward's outputs; prefill with
    segment_ids continues the row's last document."""
    cfg = CONFIGS[name]
    m = _mixer(cfg, seed=1)
    u = random_x((2, 10, cfg.d_model), seed=2)
    seg = jnp.asarray([[0] * 3 + [1] * 7, [2] * 10])
    full = fwd(m, u, seg)
    y0, cache = prefill(m, u[:, :6], m.init_cache(2), seg[:, :6])
    y1, cache = decode_each(m, u[:, 6:], cache)
    assert rel_err(jnp.concatenate([y0, y1], 1), full) < 1e-12
    assert cache.ssm.shape == (2, 4, 3, 8) and cache.ssm.dtype == jnp.float64


def test_packed_documents_equal_separate_rows():
    m = _mixer(SISO, seed=3)
    u = random_x((1, 12, SISO.d_model), seed=4)
    packed = fwd(m, u, jnp.asarray([[1] * 6 + [2] * 6]))
    alone = jnp.concatenate([fwd(m, u[:, :6]), fwd(m, u[:, 6:])], 1)
    assert rel_err(packed, alone) < 1e-13


def test_init():
    cfg = MIMO.replace(d_model=64, param_dtype="float32", dtype="float32")
    m = Mamba3Mixer(cfg, rngs=nnx.Rngs(0))
    bound = 1 / math.sqrt(64)
    for proj in (m.zx_proj, m.bc_rank_proj, m.dt_proj, m.a_proj, m.trap_proj, m.angle_proj):
        k = np.asarray(proj.kernel[...])
        assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    assert m.bc_rank_proj.kernel.shape == (64, 2, 2, 2, 8)
    assert m.angle_proj.kernel.shape == (64, 4)  # rope_fraction 1: ssm_state / 2 angles
    np.testing.assert_array_equal(m.B_bias[...], 1.0)
    np.testing.assert_array_equal(m.mimo_x[...], 0.5)
    np.testing.assert_array_equal(m.mimo_z[...], 1.0)
    dt = np.log1p(np.exp(np.asarray(m.dt_bias[...])))
    assert (dt >= cfg.time_step_min * 0.99).all() and (dt <= cfg.time_step_max * 1.01).all()
    assert Mamba3Mixer(SISO, rngs=nnx.Rngs(0)).angle_proj.kernel.shape == (24, 2)
    np.testing.assert_allclose(heavy_tail(jnp.asarray([-1.0, 0.0, 2.0])), [0.5, 1.0, 3.0])
    mixer = "periods.blocks.0.mixer."
    for name in ("B_bias", "C_bias", "mimo_x", "mimo_o", "B_norm.weight", "dt_bias", "D"):
        assert not decays(mixer + name), name
    assert decays(mixer + "bc_rank_proj.kernel") and decays(mixer + "angle_proj.kernel")


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"ssm_state": 7}, "ssm_state"),
        ({"mamba3_rope_fraction": 0.25}, "mamba3_rope_fraction"),
        ({"mamba3_a_act": "relu"}, "mamba3_a_act"),
        ({"mamba3_impl": "triton"}, "mamba3_impl"),
        ({"mamba3_mimo_rank": 0}, "mamba3_mimo_rank"),
        ({"n_groups": 3}, "n_groups"),
        ({"ssm_state": 2}, "ssm_state"),  # half of 2 channels rounds to no pair
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SISO.replace(**changes)


# --- the `3` letter in a model ------------------------------------------------------------------
def test_model_trains_a_step():
    cfg = tiny(pattern="33", mamba3_mimo=True, mamba3_mimo_rank=2)  # a scan over 2 repeats
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    x = tokens(0, 2, 13)
    seg = jnp.asarray([[1] * 6 + [2] * 7, [3] * 13])

    def loss_fn(model):
        h, _ = model.hidden(x[:, :-1], seg[:, :-1])
        weight, vocab_major = model.head()
        logits = head_logits(h, weight, vocab_major=vocab_major)
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss, grads

    loss, grads = step(model, opt)
    assert np.isfinite(loss)
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(grads)}
    mamba3 = {k: v for k, v in flat.items() if "mixer" in k}
    assert {"zx_proj", "bc_rank_proj", "mimo_x", "B_bias", "angle_proj"} <= {
        k.split(".")[4] for k in mamba3
    }
    for name, g in mamba3.items():
        assert np.abs(np.asarray(g.get_value())).max() > 0, name
    loss2, _ = step(model, opt)
    assert loss2 < loss


@nnx.jit(static_argnames="prefill")
def model_step(model, seq, cache, prefill):
    return model.step(seq, cache, prefill=prefill)


def test_model_decode_equals_forward():
    cfg = tiny(pattern="3-")
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    seq = tokens(1, 2, 12)
    full = nnx.jit(lambda m, s: m(s))(model, seq)
    logits, cache = model_step(model, seq[:, :7], model.init_cache(2, 12), True)
    outs = [logits]
    for t in range(7, 12):
        logits, cache = model_step(model, seq[:, t : t + 1], cache, False)
        outs.append(logits)
    assert rel_err(jnp.concatenate(outs, 1), full) < 1e-11


def test_param_counts_flops_and_export_refusal():
    siso, mimo = tiny(pattern="3-"), tiny(pattern="3-", mamba3_mimo=True, mamba3_mimo_rank=2)
    h, p, g, n, d, s = 4, 8, 2, 8, 32, siso.mamba3_angles
    for cfg, R in ((siso, 1), (mimo, 2)):
        mixer = d * (2 * h * p + 2 * R * g * n + 3 * h + s) + 2 * h + 2 * h * R * n + 2 * n
        mixer += 3 * h * R * p * (R > 1) + h * p * d
        mlp = 2 * d * cfg.ffn
        total = 2 * 64 * d + 3 * d + mixer + mlp  # embeddings, lm_head, 3 norms
        assert param_counts(cfg) == (total, total)
    assert flops_per_token(siso, 64) > flops_per_token(siso.replace(pattern="--"), 64)
    with pytest.raises(ValueError) as err:
        check_exportable(siso.replace(mamba3_mimo=True))
    message = str(err.value)
    assert "pattern letter '3' (Mamba-3)" in message and "M (Mamba-2)" in message
    assert "mamba3_mimo" not in message  # the letter is the reason, not its fields
    check_exportable(tiny(pattern="M-", mamba3_mimo=True))  # no 3: its fields mean nothing


@pytest.mark.parametrize("mimo", [False, True])
def test_every_parameter_has_a_sharding_rule(mimo):
    model = HybridLM(tiny(pattern="3-3-", mamba3_mimo=mimo), rngs=nnx.Rngs(0))
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    specs = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, shape = ".".join(map(str, path)), var.get_value().shape
        assert logical_axes(name, len(shape)) is not None, name
        specs[name.removeprefix("periods.blocks.0.mixer.")] = param_spec(name, shape, mesh)
    P = jax.sharding.PartitionSpec
    assert specs["bc_rank_proj.kernel"] == P(None, "fsdp", None, None, "tensor", None)
    assert specs["B_bias"] == P(None, "tensor", None, None)
    assert specs["out_proj.kernel"] == P(None, "tensor", None, "fsdp")


@pytest.mark.parametrize("name", CONFIGS)
def test_layer_chunks_and_state_equal_the_whole_row(name):
    """layer_chunk_size 5 over 17 tokens (three chunks and a tail), from a random state: the
    output, the state after the row and every gradient equal the whole-row mixer in float64;
    row 0 starts documents inside a chunk and exactly at a chunk start (token 10)."""
    cfg = CONFIGS[name]
    whole, chunked = _mixer(cfg), _mixer(cfg.replace(layer_chunk_size=5))
    x = random_x((2, 17, cfg.d_model), 6)
    seg = jnp.array([[1] * 3 + [2] * 7 + [3] * 7, [4] * 17])
    zeros = whole.init_cache(2)
    keys = jax.random.split(jax.random.key(5), len(zeros))
    state = type(zeros)(*(jax.random.normal(k, z.shape, z.dtype) for k, z in zip(keys, zeros)))

    def loss(m, x, state):
        y, after = m(x, segment_ids=seg, state=state)
        return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(a)) for a in after)

    run = nnx.jit(lambda m, x, s: m(x, segment_ids=seg, state=s))
    for got, want in zip(
        jax.tree.leaves(run(chunked, x, state)), jax.tree.leaves(run(whole, x, state))
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))
    got, want = grad(chunked, x, state), grad(whole, x, state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
