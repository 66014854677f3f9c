"""MLP: against transformers' NemotronHMLP (float64) for relu2/silu/gelu, swiglu against its
formula, the activation table, the shared-expert constructor and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from hybridjax.config import HybridConfig
from hybridjax.layers.mlp import MLP, Dense, activation, is_gated

CFG = HybridConfig(d_model=24, ffn=40, dtype="float64", param_dtype="float64", pattern="-")


def _x(shape=(2, 7, 24), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


@pytest.mark.parametrize("act", ["relu2", "silu", "gelu"])
def test_matches_transformers(act):
    torch = pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    from _torch_f64 import keep_float64, rel_err, set_linear, t
    from transformers import NemotronHConfig

    mlp = MLP(CFG, act=act, rngs=nnx.Rngs(0))
    hf_cfg = NemotronHConfig(
        hidden_size=CFG.d_model,
        intermediate_size=CFG.ffn,
        mlp_hidden_act=act,
        layers_block_type=["mlp"],
        vocab_size=16,
    )
    hf = mod.NemotronHMLP(hf_cfg).double().eval()
    set_linear(hf.up_proj, mlp.up_proj)
    set_linear(hf.down_proj, mlp.down_proj)
    x = _x()
    with torch.no_grad(), keep_float64():
        want = hf(t(x)).numpy()
    got = mlp(x)
    assert got.dtype == jnp.float64
    assert rel_err(got, want) < 1e-12


def test_swiglu_formula():
    mlp = MLP(CFG.replace(mlp_act="swiglu"), rngs=nnx.Rngs(0))
    x = np.asarray(_x())
    g = x @ np.asarray(mlp.gate_proj.kernel[...])
    u = x @ np.asarray(mlp.up_proj.kernel[...])
    want = (g / (1 + np.exp(-g)) * u) @ np.asarray(mlp.down_proj.kernel[...])
    np.testing.assert_allclose(mlp(x), want, rtol=1e-12, atol=1e-14)


def test_activation_table():
    z = np.linspace(-4, 4, 33)
    np.testing.assert_allclose(activation("relu2")(z), np.maximum(z, 0) ** 2, rtol=1e-15)
    np.testing.assert_allclose(activation("silu")(z), z / (1 + np.exp(-z)), rtol=1e-12)
    np.testing.assert_allclose(
        activation("gelu")(z), 0.5 * z * (1 + erf(z / np.sqrt(2))), rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(activation("swiglu")(z), z / (1 + np.exp(-z)), rtol=1e-12)
    assert is_gated("swiglu") and not is_gated("relu2")
    with pytest.raises(ValueError, match="activation: 'tanh'.*relu2"):
        activation("tanh")


def test_shared_expert_shape_and_names():
    mlp = MLP(CFG, d_ff=12, act="swiglu", rngs=nnx.Rngs(0))
    shapes = {
        ".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(mlp, nnx.Param))
    }
    assert shapes == {
        "gate_proj.kernel": (24, 12),
        "up_proj.kernel": (24, 12),
        "down_proj.kernel": (12, 24),
    }
    plain = MLP(CFG, rngs=nnx.Rngs(0))
    assert plain.gate_proj is None and plain.up_proj.kernel.shape == (24, 40)


def test_dtypes_and_init():
    cfg = CFG.replace(dtype="bfloat16", param_dtype="float32", ffn=2000, d_model=200)
    mlp = MLP(cfg, rngs=nnx.Rngs(0))
    assert mlp.up_proj.kernel[...].dtype == jnp.float32
    assert abs(float(jnp.std(mlp.up_proj.kernel[...])) - cfg.initializer_range) < 1e-3
    assert mlp(jnp.ones((1, 3, 200), jnp.float32)).dtype == jnp.bfloat16


def test_bad_inputs():
    with pytest.raises(ValueError, match="d_ff"):
        MLP(CFG, d_ff=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation"):
        MLP(CFG, act="relu", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("act", ["relu2", "swiglu"])
def test_token_chunks_equal_the_whole_row(act):
    """layer_chunk_size runs the same function chunk by chunk (a length that is not a multiple of
    the chunk): values and gradients equal the whole-row MLP in float64."""
    cfg = HybridConfig(d_model=16, ffn=40, dtype="float64", param_dtype="float64", mlp_act=act)
    whole, chunked = (MLP(cfg.replace(layer_chunk_size=c), rngs=nnx.Rngs(0)) for c in (0, 7))
    x = jax.random.normal(jax.random.key(1), (2, 23, 16), jnp.float64)
    np.testing.assert_allclose(chunked(x), whole(x), rtol=1e-13, atol=1e-15)
    grad = nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))
    for a, b in zip(jax.tree.leaves(grad(chunked, x)), jax.tree.leaves(grad(whole, x))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_chunk_size_must_not_be_negative():
    with pytest.raises(ValueError, match="layer_chunk_size"):
        HybridConfig(layer_chunk_size=-1)


@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_part_is_the_projection_onto_one_slice(n_in):
    """Dense.part(x, i) equals the whole projection's i-th slice of its first output axis, in
    value and in the kernel's gradient (float64 einsum oracle)."""
    with jax.enable_x64(True):
        kx, kk = jax.random.split(jax.random.key(0))
        in_shape = (3, 4) if n_in == 2 else (5,)
        x = jax.random.normal(kx, (2, 7, *in_shape), jnp.float64)
        kernel = jax.random.normal(kk, (*in_shape, 3, 2, 6), jnp.float64)
        dense = Dense(kernel, n_in=n_in, dtype=jnp.float64)
        letters = "ab"[:n_in]
        oracle = jnp.einsum(f"...{letters},{letters}ipq->...ipq", x, kernel)
        for i in range(3):
            np.testing.assert_allclose(dense.part(x, i), oracle[..., i, :, :], rtol=1e-12)

        def grad(f):
            return jax.grad(lambda k: jnp.sum(jnp.sin(f(Dense(k, n_in=n_in, dtype=jnp.float64)))))(
                kernel
            )

        parts = grad(lambda d: d.part(x, 1))
        whole = grad(lambda d: d(x)[..., 1, :, :])
        np.testing.assert_allclose(parts, whole, rtol=1e-12, atol=1e-14)
