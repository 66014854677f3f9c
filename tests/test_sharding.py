"""The same model code on one device and sharded over 8 forced CPU devices."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hybridjax.model import HybridLM
from hybridjax.sharding import batch_sharding, make_mesh, param_spec, shard_model
from tests.tiny import tiny


def test_mesh_sizes_and_errors():
    mesh = make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    with pytest.raises(ValueError, match="mesh sizes"):
        make_mesh(data=3, fsdp=2)
    with pytest.raises(ValueError, match="mesh sizes"):
        make_mesh(data=-1, fsdp=-1)


def test_param_spec_rules():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert param_spec("periods.blocks.0.mixer.in_proj.kernel", (3, 32, 96), mesh) == \
        P(None, "fsdp", "tensor")
    assert param_spec("periods.blocks.1.mixer.o_proj.kernel", (3, 32, 32), mesh) == \
        P(None, "tensor", "fsdp")
    assert param_spec("periods.blocks.2.mixer.experts.down_proj", (3, 4, 16, 32), mesh) == \
        P(None, "expert", "tensor", "fsdp")
    assert param_spec("periods.blocks.0.mixer.in_proj.kernel", (3, 32, 7), mesh) == \
        P(None, "fsdp", None)  # 7 is not divisible by the tensor axis: kept whole
    assert param_spec("periods.blocks.0.mixer.A_log", (3, 4), mesh) == P()


@pytest.mark.parametrize("sizes", [dict(data=2, fsdp=2, tensor=2), dict(data=2, expert=4)])
def test_sharded_forward_and_grads_equal_single_device(sizes):
    cfg = tiny(pattern="M*E-M*E-")
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)

    def loss(m, x):
        logits, aux = m(x, return_aux=True)
        return (logits ** 2).mean() + aux.lb_loss

    want_loss, want_grads = nnx.jit(nnx.value_and_grad(loss))(model, x)
    mesh = make_mesh(**sizes)
    shard_model(model, mesh)
    with jax.set_mesh(mesh):
        got_loss, got_grads = nnx.jit(nnx.value_and_grad(loss))(
            model, jax.device_put(x, batch_sharding(mesh)))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
