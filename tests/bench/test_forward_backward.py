"""`bench.ssd.forward_backward`, the kernel benchmarks' forward+backward: it returns the output
with the gradients (equal to jit and vjp apart), so the compiled program keeps the forward's
output computation, which a gradients-only program drops; fixed inputs take no gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax.bench.grouped_matmul import make_inputs as matmul_inputs
from hybridjax.bench.ssd import forward_backward, make_inputs
from hybridjax.ops import ssd
from hybridjax.ops.grouped_matmul import grouped_matmul


def _scan(x, dt, A, B, C, D):
    return ssd(x, dt, A, B, C, D=D, chunk_size=32, impl="chunked")


def test_output_and_gradients_equal_the_separate_calls_and_the_forward_is_kept():
    args = make_inputs({"b": 1, "l": 128, "h": 2, "p": 16, "n": 16, "g": 1}, jnp.float32)
    dy = jax.random.normal(jax.random.key(1), args[0].shape, jnp.float32)
    fwd_bwd = forward_backward(_scan)
    y, grads = fwd_bwd(args, dy)
    np.testing.assert_allclose(y, jax.jit(_scan)(*args), rtol=1e-6, atol=1e-6)
    want = jax.jit(lambda a, dy: jax.vjp(_scan, *a)[1](dy))(args, dy)
    for g, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

    def flops(fn, *a):
        analysis = fn.lower(*a).compile().cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    gradients_only = jax.jit(lambda a, dy: jax.vjp(_scan, *a)[1](dy))
    assert flops(fwd_bwd, args, dy) > 1.1 * flops(gradients_only, args, dy)


def test_fixed_inputs_are_traced_and_take_no_gradient():
    lhs, rhs, sizes, d_out = matmul_inputs({"m": 64, "k": 16, "n": 8, "e": 4}, jnp.float32)
    matmul = lambda a, b, s: grouped_matmul(a, b, s, impl="ragged_dot")
    y, grads = forward_backward(matmul)((lhs, rhs), d_out, sizes)
    assert len(grads) == 2
    np.testing.assert_allclose(y, matmul(lhs, rhs, sizes), rtol=1e-6, atol=1e-6)
    _, vjp = jax.vjp(lambda a, b: matmul(a, b, sizes), lhs, rhs)
    for g, w in zip(grads, vjp(d_out), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # other group sizes run through the same compiled program (sizes are an input, not a constant)
    other = jnp.asarray([16, 16, 16, 16], jnp.int32)
    np.testing.assert_allclose(
        forward_backward(matmul)((lhs, rhs), d_out, other)[0],
        matmul(lhs, rhs, other),
        rtol=1e-6,
        atol=1e-6,
    )
