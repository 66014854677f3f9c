"""Placement on a mesh of 8 forced CPU devices: the specs and bytes each device holds, the
placement report, and train steps on meshes equal to the one-device run (checkpoints included)."""

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hybridjax.checkpoint import Checkpointer
from hybridjax.model import HybridLM
from hybridjax.pytree import dotted
from hybridjax.sharding import (
    batch_sharding,
    logical_axes,
    make_mesh,
    placement_report,
    unmatched_params,
)
from hybridjax.train_step import init_state, make_train_step
from tests.tiny import tiny


def test_mesh_sizes_and_errors():
    mesh = make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "context": 1, "tensor": 2}
    with pytest.raises(ValueError, match="mesh sizes"):
        make_mesh(data=3, fsdp=2)
    with pytest.raises(ValueError, match="mesh sizes"):
        make_mesh(data=-1, fsdp=-1)


@pytest.mark.parametrize(
    "options",
    [
        {"pattern": "M*E-"},
        {"pattern": "ME", "expert_act": "swiglu", "mlp_act": "swiglu"},
        {"pattern": "E-", "moe_latent": 8, "tie_embeddings": True},
        {"pattern": "*-", "shared_ffn": 0},
    ],
)
def test_every_parameter_has_a_rule(options):
    _, state = init_state(tiny(**options), optax.adamw(1e-3), seed=0)
    assert unmatched_params(state.params) == []
    assert unmatched_params(state.model_state) == []


def _device0_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def _total_bytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_fsdp8_splits_every_matrix_and_its_moments():
    cfg = tiny(
        pattern="M*E-M*E-",
        d_model=64,
        vocab_size=128,
        dtype="float32",
        param_dtype="float32",
        n_groups=2,
    )
    _, state = init_state(cfg, optax.adamw(1e-3), seed=0, mesh=make_mesh(data=1, fsdp=8))
    matrices = 0
    for tree in (state.params, state.opt_state):
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if "embed" in (logical_axes(dotted(path), x.ndim) or ()):  # every d_model matrix
                assert "fsdp" in x.sharding.spec, (dotted(path), x.sharding.spec)
                matrices += 1
    assert matrices == 3 * 17  # 17 matrices (with the scanned stacks), their mu and nu
    for tree in (state.params, state.opt_state):
        # one device holds about 1/8 of the bytes (vectors such as norms stay replicated)
        assert _device0_bytes(tree) < 0.15 * _total_bytes(tree)
        assert _device0_bytes(tree) > 0.12 * _total_bytes(tree)


def test_tensor_parallel_splits_whole_heads_groups_and_ffn():
    cfg = tiny(pattern="M*E-", dtype="float32", param_dtype="float32")
    _, state = init_state(cfg, optax.sgd(1e-3), seed=0, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    blocks = state.params["periods"]["blocks"]
    specs = {
        (0, "zx_proj", "kernel"): P(None, "fsdp", None, "tensor", None),
        (0, "bc_proj", "kernel"): P(None, "fsdp", None, "tensor", None),
        (0, "dt_proj", "kernel"): P(None, "fsdp", "tensor"),
        (0, "conv_x", "kernel"): P(None, None, "tensor", None),
        (0, "conv_bc", "bias"): P(None, None, "tensor", None),
        (0, "norm", "weight"): P(None, "tensor", None),
        (0, "out_proj", "kernel"): P(None, "tensor", None, "fsdp"),
        (1, "q_proj", "kernel"): P(None, "fsdp", "tensor", None),
        (1, "k_proj", "kernel"): P(None, "fsdp", "tensor", None),
        (1, "o_proj", "kernel"): P(None, "tensor", None, "fsdp"),
        (2, "experts", "up_proj"): P(None, None, "fsdp", "tensor"),
        (2, "experts", "down_proj"): P(None, None, "tensor", "fsdp"),
        (3, "up_proj", "kernel"): P(None, "fsdp", "tensor"),
        (3, "down_proj", "kernel"): P(None, "tensor", "fsdp"),
    }
    for (j, module, name), want in specs.items():
        got = blocks[j]["mixer"][module][name].sharding.spec
        assert got == want, (j, module, name, got)
    assert state.params["embeddings"]["embedding"].sharding.spec == P("tensor", "fsdp")
    # a device holds one tensor shard of each head: half of zx_proj's heads, a quarter overall
    zx = blocks[0]["mixer"]["zx_proj"]["kernel"]
    assert zx.addressable_shards[0].data.shape == (1, 16, 2, 2, 8)


def test_dimensions_the_mesh_does_not_divide_are_reported(caplog):
    cfg = tiny(pattern="M*", mamba_heads=6, n_groups=3, attn_heads=6, kv_heads=3, vocab_size=66)
    mesh = make_mesh(data=2, tensor=4)
    with caplog.at_level(logging.WARNING, logger="hybridjax.sharding"):
        _, state = init_state(cfg, optax.sgd(1e-3), seed=0, mesh=mesh)
    report = placement_report(state.params, mesh)
    assert any("zx_proj.kernel: heads dimension of 6" in r for r in report)
    assert any("k_proj.kernel: kv_heads dimension of 3" in r for r in report)
    assert any("embeddings.embedding: vocab dimension of 66" in r for r in report)
    assert len(caplog.records) == len(report)
    blocks = state.params["periods"]["blocks"]
    assert blocks[0]["mixer"]["zx_proj"]["kernel"].sharding.spec == P(None, None, None, None, None)


def test_sharded_forward_and_grads_equal_single_device():
    cfg = tiny(pattern="M*E-M*E-")
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)

    def loss(m, x):
        logits, aux = m(x, return_aux=True)
        return (logits**2).mean() + aux.lb_loss

    want_loss, want_grads = nnx.jit(nnx.value_and_grad(loss))(model, x)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = nnx.split(model)
    from hybridjax.sharding import tree_shardings

    sharded = nnx.merge(graphdef, jax.device_put(state, tree_shardings(state, mesh)))
    with jax.set_mesh(mesh):
        got_loss, got_grads = nnx.jit(nnx.value_and_grad(loss))(
            sharded, jax.device_put(x, batch_sharding(mesh))
        )
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


# --- train steps on meshes equal the one-device run ---------------------------------------------
def _packed_batch(seed, batch=8, length=24, vocab=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length + 1))
    cuts = np.sort(rng.integers(1, length, (batch, 2)), axis=1)  # three documents per row
    pos = np.arange(length)
    segment_ids = (pos >= cuts[:, :1]).astype(np.int32) + (pos >= cuts[:, 1:]).astype(np.int32)
    return {
        "tokens": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "loss_mask": jnp.asarray(rng.random((batch, length)) < 0.9),
        "segment_ids": jnp.asarray(segment_ids),
    }


def _run(cfg, tx, mesh, batches, steps, ckpt_dir=None):
    """Losses of `steps` train steps on `mesh` (None = one device); with ckpt_dir, the state is
    saved after the first half and restored from disk (onto the mesh) before the rest."""
    graphdef, state = init_state(cfg, tx, seed=0, mesh=mesh)
    step = make_train_step(
        graphdef,
        tx,
        optax.constant_schedule(1e-2),
        lb_coef=0.01,
        z_coef=0.001,
        router_bias_rate=0.01,
        has_moe=cfg.has("E"),
        mesh=mesh,
        state=state,
    )
    losses = []
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for i in range(steps):
            batch = batches[i]
            if mesh is not None:
                batch = jax.device_put(batch, batch_sharding(mesh))
            state, metrics = step(state, batch)
            losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
            if ckpt_dir is not None and i == steps // 2 - 1:
                ckpt = Checkpointer(ckpt_dir, async_save=False)
                ckpt.save(i + 1, state)
                like = jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
                )
                state, _ = ckpt.restore(i + 1, like)
                ckpt.close()
                assert jax.tree.map(lambda x: x.sharding, state) == jax.tree.map(
                    lambda x: x.sharding, like
                )
    return np.array(losses), state


@pytest.mark.parametrize(
    "sizes",
    [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "expert": 4}, {"data": 2, "context": 4}],
)
def test_train_steps_on_a_mesh_equal_one_device(sizes, tmp_path):
    cfg = tiny(pattern="M*E-", dtype="float32", param_dtype="float32", ssd_impl="chunked")
    tx = optax.adamw(1e-2)
    batches = [_packed_batch(i) for i in range(4)]
    want, want_state = _run(cfg, tx, None, batches, 4)
    got, got_state = _run(cfg, tx, make_mesh(**sizes), batches, 4, ckpt_dir=tmp_path / "ckpt")
    np.testing.assert_allclose(got, want, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)  # float32 after 4 steps of lr 1e-2
