"""attn_impl="pallas" (jax's Pallas Triton flash attention) on the CPU: the kernels in interpret
mode against the dense float64 oracle (values and gradients; packed documents, GQA, a length
that is not a multiple of the block, per shard of a mesh), and the forward and backward lowered
to Triton for a CUDA target, per shard under a mesh: GPU-only lowering errors show up here
instead of on the GPU."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax.ops import attention as attn_ops
from hybridjax.ops.attention import attention, causal_mask, dense_attention
from hybridjax.sharding import make_mesh
from tests.kernels._lowering import triton_operand_shapes

TRITON = "__gpu$xla.gpu.triton"


@pytest.fixture
def pallas_on_cpu(monkeypatch):
    """Skip the GPU-backend check (lowering for CUDA needs no GPU); `interpret=True` runs the
    kernels on the CPU."""
    monkeypatch.setattr(attn_ops, "pallas_unsupported_reason", lambda *a, **k: None)

    def interpret(interpret):
        if interpret:
            monkeypatch.setattr(
                attn_ops,
                "pallas_attention",
                functools.partial(attn_ops.pallas_attention, interpret=True),
            )

    return interpret


def _inputs(b, l, hq, hk, d, dtype):
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (
        jax.random.normal(key, (b, l, h, d), dtype) for key, h in zip(ks, (hq, hk, hk, hq))
    )
    return q, k, v, ct


def _pallas_and_oracle(q, k, v, ct, seg):
    def pallas(q, k, v):
        return attention(q, k, v, segment_ids=seg, impl="pallas")

    def oracle(q, k, v):
        b, l, _, d = q.shape
        q, k, v = (t.astype(jnp.float64) for t in (q, k, v))
        return dense_attention(q, k, v, causal_mask(seg, b, l), scale=d**-0.5)

    results = []
    for fn in (jax.jit(pallas), oracle):
        out, vjp = jax.vjp(fn, q, k, v)
        results.append((out, vjp(ct.astype(out.dtype))))
    return results


@pytest.mark.parametrize("mesh", [None, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_interpret_equals_dense(pallas_on_cpu, mesh):
    pallas_on_cpu(interpret=True)
    b, l, hq, hk, d = 4, 150, 4, 2, 16  # GQA; padded to 256 positions inside
    q, k, v, ct = _inputs(b, l, hq, hk, d, jnp.float32)
    seg = jnp.array(
        [
            [0] * 50 + [1] * 60 + [0] * 40,  # id 0 comes back
            [3] * 150,
            [1] * 3 + [2] * 147,
            [5] * 140 + [6] * 10,
        ]
    )
    with jax.set_mesh(make_mesh(**mesh)) if mesh else contextlib.nullcontext():
        (out, grads), (want, want_grads) = _pallas_and_oracle(q, k, v, ct, seg)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=2e-6)
    for name, got, ref in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=name)


def _lower_for_cuda(q, k, v, seg):
    def loss(q, k, v):
        return attention(q, k, v, segment_ids=seg, impl="pallas").astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "dtype,l,hq,hk,d,packed",
    [
        (jnp.bfloat16, 1000, 4, 2, 64, True),
        (jnp.bfloat16, 512, 8, 8, 128, False),
        (jnp.float16, 300, 2, 1, 80, True),  # head_dim padded to 128 inside the kernel
        (jnp.float32, 256, 4, 1, 32, True),
    ],
)
def test_forward_and_backward_lower_for_cuda(pallas_on_cpu, dtype, l, hq, hk, d, packed):
    pallas_on_cpu(interpret=False)
    q, k, v, _ = _inputs(2, l, hq, hk, d, dtype)
    seg = jnp.zeros((2, l), jnp.int32) if packed else None
    text = _lower_for_cuda(q, k, v, seg)
    # forward, the backward's preprocessing (delta) and the fused dq/dk/dv kernel
    assert text.count(TRITON) == 3


def test_under_a_mesh_the_kernels_see_local_operands(pallas_on_cpu):
    pallas_on_cpu(interpret=False)
    b, l, hq, hk, d = 8, 1000, 4, 2, 64
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rows = NamedSharding(mesh, P(("data", "fsdp", "expert"), None, "tensor"))
    q, k, v = (jax.device_put(jnp.zeros((b, l, h, d), jnp.bfloat16), rows) for h in (hq, hk, hk))
    seg = jax.device_put(
        jnp.zeros((b, l), jnp.int32), NamedSharding(mesh, P(("data", "fsdp", "expert")))
    )
    with jax.set_mesh(mesh):
        text = _lower_for_cuda(q, k, v, seg)
    shapes = triton_operand_shapes(text)
    assert text.count(TRITON) == 3
    # each kernel reads its device's 2 rows (of 8) and 2 heads (of 4), padded to 1024 positions;
    # never the whole batch (8x1024x4x64, the operands gathered)
    assert shapes == {"2x1024x2x64", "2x1024", "2x2x1024"}, shapes
