"""The Pallas kernels lower to Triton for a CUDA target, on the CPU: GPU-only lowering errors
(types the interpret mode accepts but Triton does not) show up here instead of on the GPU."""

import jax
import jax.numpy as jnp
import pytest

from hybridjax.kernels import ssd as pallas_ssd


@pytest.mark.parametrize(
    "dtype,p,n,g,features",
    [
        (jnp.bfloat16, 64, 128, 1, False),
        (jnp.bfloat16, 128, 128, 2, True),
        (jnp.float32, 64, 64, 4, True),
        (jnp.float32, 128, 128, 1, False),  # the 8-warp launch of large float32 states
    ],
)
def test_forward_and_backward_lower_for_cuda(monkeypatch, dtype, p, n, g, features):
    # The support check refuses a CPU backend; lowering for CUDA needs no GPU.
    monkeypatch.setattr(pallas_ssd, "pallas_unsupported_reason", lambda *a, **k: None)
    b, l, h = 2, 1000, 4
    x = jnp.zeros((b, l, h, p), dtype)
    dt = jnp.full((b, l, h), 0.1)
    A = -jnp.ones((h,))
    B = jnp.zeros((b, l, g, n), dtype)
    kw, seg = {}, None
    if features:
        kw = {"D": jnp.ones((h,)), "initial_state": jnp.zeros((b, h, p, n))}
        seg = jnp.zeros((b, l), jnp.int32)

    def loss(x, dt, A, B, C, kw):
        y, final = pallas_ssd.ssd_pallas(
            x, dt, A, B, C, superchunks=3, return_final_state=True, segment_ids=seg, **kw
        )
        return y.astype(jnp.float32).sum() + final.sum()

    lowered = (
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
        .trace(x, dt, A, B, B, kw)
        .lower(lowering_platforms=("cuda",))
    )
    text = lowered.as_text()
    # one custom call per kernel launch: forward, state, dc and dx kernels all lowered
    assert text.count("__gpu$xla.gpu.triton") >= 4
