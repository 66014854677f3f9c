"""The fused gated RMSNorm kernels (Pallas interpret mode) against the float64 dense computation:
values and the gradients of y, z and the weight."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax.kernels import conv1d, gated_norm
from hybridjax.kernels.gated_norm import gated_rmsnorm_pallas
from hybridjax.layers.mamba2 import Mamba2Mixer
from hybridjax.ops.norms import gated_rmsnorm
from hybridjax.sharding import make_mesh
from tests.tiny import tiny

F64 = jnp.float64


def _inputs(shape, d, dtype, seed=0):
    ky, kz, kw, kd = jax.random.split(jax.random.key(seed), 4)
    y = jax.random.normal(ky, (*shape, d), F64) * 2.0
    z = jax.random.normal(kz, (*shape, d), F64) * 2.0
    w = 1.0 + 0.5 * jax.random.normal(kw, (d,), F64)
    dout = jax.random.normal(kd, (*shape, d), F64)
    return y.astype(dtype), z.astype(dtype), w.astype(jnp.float32), dout.astype(dtype)


def _oracle(y, z, w, dout, group_size):
    """float64 values and (dy, dz, dw) of the XLA computation on the same (rounded) inputs."""
    f = lambda y, z, w: gated_rmsnorm(y, z, w, group_size=group_size, eps=1e-5, out_dtype=F64)
    out, vjp = jax.vjp(f, *(v.astype(F64) for v in (y, z, w)))
    return out, vjp(dout.astype(F64))


@pytest.mark.parametrize(
    "shape,d,group_size,dtype",
    [
        ((2, 96), 64, 32, jnp.float32),  # 192 rows: whole 8-row blocks, 16 blocks a program
        ((3, 37), 48, 16, jnp.bfloat16),  # 111 rows: one row a block
        ((1, 20), 32, 32, jnp.bfloat16),  # 20 rows: 4-row blocks
    ],
)
def test_values_and_gradients_match_float64(shape, d, group_size, dtype):
    y, z, w, dout = _inputs(shape, d, dtype)
    f = lambda y, z, w: gated_rmsnorm_pallas(
        y, z, w, group_size=group_size, out_dtype=dtype, interpret=True
    )
    out, vjp = jax.vjp(f, y, z, w)
    grads = vjp(dout)
    want_out, want_grads = _oracle(y, z, w, dout, group_size)
    assert out.dtype == dtype and [g.dtype for g in grads] == [dtype, dtype, jnp.float32]
    # float32: products and sums in float32; bfloat16: one rounding of each output (2^-8)
    tol = 2e-5 if dtype == jnp.float32 else 8e-3
    for got, want in zip((out, *grads), (want_out, *want_grads)):
        got, want = np.asarray(got, np.float64), np.asarray(want)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


def test_weight_gradient_sums_every_program():
    # 1024 rows: 8 backward programs, each summing its own 128 rows into one partial
    y, z, w, dout = _inputs((4, 256), 32, jnp.float32, seed=3)
    f = lambda w: gated_rmsnorm_pallas(
        y, z, w, group_size=16, out_dtype=jnp.float32, interpret=True
    )
    got = jax.vjp(f, w)[1](dout)[0]
    want = _oracle(y, z, w, dout, 16)[1][2]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5 * np.abs(want).max())


def test_the_op_dispatches_to_the_kernels(monkeypatch):
    """impl='pallas' through ops.norms gives the kernels' values; refused clearly when it cannot."""
    y, z, w, _ = _inputs((2, 16), 32, jnp.float32)
    monkeypatch.setattr(gated_norm, "backend_reason", lambda *a: None)
    calls = []
    real = gated_norm._forward
    monkeypatch.setattr(gated_norm, "_forward", lambda *a: calls.append(a) or real(*a[:-1], True))
    got = gated_rmsnorm(y, z, w, group_size=16, out_dtype=jnp.float32, impl="pallas")
    want = gated_rmsnorm(y, z, w, group_size=16, out_dtype=jnp.float32, impl="xla")
    assert calls
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="impl='pallas' does not apply.*out_dtype"):
        gated_rmsnorm(y, z, w, group_size=16, impl="pallas")
    with pytest.raises(ValueError, match="power of two"):
        gated_rmsnorm(y, z, w, group_size=8, out_dtype=jnp.float32, impl="pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        gated_rmsnorm(y, z, w, group_size=16, impl="triton")


def test_cpu_backend_is_refused_without_interpret():
    y, z, w, _ = _inputs((1, 8), 32, jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a GPU backend.*interpret=True"):
        gated_rmsnorm_pallas(y, z, w, group_size=32)


def test_forward_and_backward_lower_for_cuda(monkeypatch):
    monkeypatch.setattr(gated_norm, "backend_reason", lambda *a: None)
    y, z, w, dout = _inputs((4, 4096), 4096, jnp.bfloat16)

    def loss(y, z, w):
        out = gated_rmsnorm_pallas(y, z, w, group_size=512, out_dtype=jnp.bfloat16)
        return (out.astype(jnp.float32) * dout).sum()

    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(y, z, w).lower(lowering_platforms=("cuda",))
    assert text.as_text().count("__gpu$xla.gpu.triton") == 2  # forward and backward kernels


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The Mamba-2 glue kernels (this gated norm, and the conv + SiLU) accepted on the CPU and run
    in interpret mode wherever the library calls them."""
    for module, fn in ((gated_norm, "gated_rmsnorm_pallas"), (conv1d, "causal_conv1d_silu_pallas")):
        monkeypatch.setattr(module, "backend_reason", lambda *a: None)
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, functools.partial(real, interpret=True))


def test_per_shard_under_a_mesh_equals_whole_arrays(kernels_on_cpu):
    y, z, w, dout = _inputs((8, 24), 64, jnp.float32, seed=5)
    f = lambda impl: (
        lambda y, z, w: gated_rmsnorm(y, z, w, group_size=16, out_dtype=jnp.float32, impl=impl)
    )
    want, want_vjp = jax.vjp(f("xla"), y, z, w)
    with jax.set_mesh(make_mesh(data=2, tensor=2, fsdp=2)):
        got, got_vjp = jax.vjp(jax.jit(f("pallas")), y, z, w)
        got_grads = got_vjp(dout)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, h in zip(got_grads, want_vjp(dout)):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-4 * np.abs(h).max())


def test_under_a_mesh_each_kernel_sees_its_devices_block(monkeypatch):
    monkeypatch.setattr(gated_norm, "backend_reason", lambda *a: None)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rows = NamedSharding(mesh, P(("data", "fsdp", "expert"), None, "tensor"))
    y = jax.device_put(jnp.zeros((8, 512, 256), jnp.bfloat16), rows)
    w = jnp.ones((256,), jnp.float32)

    def loss(y, z, w):
        out = gated_rmsnorm(y, z, w, group_size=64, out_dtype=jnp.bfloat16, impl="pallas")
        return jnp.square(out.astype(jnp.float32)).sum()

    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(y, y, w)
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    calls = [ln for ln in text.splitlines() if "__gpu$xla.gpu.triton" in ln]
    assert len(calls) == 2
    # 2 of 8 rows, 512 positions, 2 of 4 groups of 64: the device's block, never the whole array
    assert all("tensor<1024x2x64xbf16>" in ln for ln in calls), calls


def test_mamba2_mixer_with_the_glue_kernels_equals_xla(kernels_on_cpu):
    config = tiny(dtype="float32", param_dtype="float32")  # groups of 16 channels
    x = jax.random.normal(jax.random.key(0), (2, 24, 32), jnp.float32)
    results = []
    for impl in ("xla", "pallas"):
        mixer = Mamba2Mixer(config.replace(mamba2_glue_impl=impl), rngs=nnx.Rngs(0))
        loss = lambda m, x: (m(x) ** 2).sum()
        results.append(nnx.value_and_grad(loss, argnums=(0, 1))(mixer, x))
    (want, (want_m, want_x)), (got, (got_m, got_x)) = results
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        got_m.norm.weight[...], want_m.norm.weight[...], rtol=1e-4, atol=1e-6
    )
