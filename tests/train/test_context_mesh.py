"""trainer.mesh.context: the trainer's mesh splits each row's sequence; lengths that do not split
evenly are refused by name."""

import re

import numpy as np
import pytest

from hybridjax.sharding import batch_sharding
from hybridjax.train import build
from hybridjax.train_config import resolve


def test_context_axis_splits_the_batch_sequence(tiny_compose):
    run = resolve(tiny_compose(["trainer.mesh.data=2", "trainer.mesh.context=4"]))
    mesh = build(run, "unused").mesh
    assert dict(mesh.shape)["context"] == 4
    assert batch_sharding(mesh).spec[1] == "context"


@pytest.mark.parametrize(
    "overrides,name",
    [
        (["trainer.seq_len=126"], "trainer.seq_len: 126"),
        (
            ["trainer.seq_len_schedule=[{seq_len:130,batch_size:2,steps:1}]"],
            "trainer.seq_len_schedule[0].seq_len: 130",
        ),
    ],
)
def test_lengths_must_split_over_the_context_axis(tiny_compose, overrides, name):
    run = resolve(tiny_compose(["trainer.mesh.data=2", "trainer.mesh.context=4", *overrides]))
    message = f"{name} does not split into trainer.mesh.context=4"
    with pytest.raises(ValueError, match=re.escape(message)):
        build(run, "unused")


def test_context_parallel_step_moves_only_kv_ids_and_states():
    """The compiled forward of a tiny hybrid (Mamba-2, attention with RoPE, MLP)
    on (data 2, context 4) hold only the collectives context parallelism needs: all-gathers of
    the attention's kv heads, of the ids and of one value per row and shard (never of a
    d_model-wide activation), no all-to-all (the conv's halo is a neighbour send), and no
    reduce-window wider than a shard (segment cumsums carried across shards, not left to XLA as
    O(L^2 / shards) windows). The backward's gathers are tested with the attention op
    (tests/ops/test_attention_context.py: K and V gathered inside its shard_map)."""
    import jax
    from flax import nnx

    from hybridjax.bench.mesh import collective_counts
    from hybridjax.model import HybridLM
    from hybridjax.sharding import make_mesh, tree_shardings
    from tests.test_sharding import _packed_batch
    from tests.tiny import tiny

    cfg = tiny(pattern="M*-", dtype="float32", param_dtype="float32", ssd_impl="chunked")
    cfg = cfg.replace(rope_theta=1e4)
    mesh, rows, length = make_mesh(data=2, context=4), 4, 64
    batch = _packed_batch(0, batch=rows, length=length)
    graphdef, state = nnx.split(HybridLM(cfg, rngs=nnx.Rngs(0)))

    def loss(state, tokens, segment_ids):
        return (nnx.merge(graphdef, state)(tokens, segment_ids) ** 2).mean()

    with jax.set_mesh(mesh):
        args = [jax.device_put(state, tree_shardings(state, mesh))] + [
            jax.device_put(batch[k], batch_sharding(mesh)) for k in ("tokens", "segment_ids")
        ]
        hlo = jax.jit(loss).lower(*args).compile().as_text()
    counts = collective_counts(hlo)
    assert counts["all-to-all"] == 0, counts
    largest = rows // 2 * length * cfg.kv_heads * cfg.head_dim  # K or V of a device's rows
    for shape in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo):
        assert np.prod([int(d) for d in shape.split(",")]) <= largest, (shape, counts)
    # a cumsum's reduce-window (no stride): its widest dimension
    windows = [
        max(int(d) for d in w.split("x"))
        for w in re.findall(r"reduce-window\(.*window=\{size=([\dx]+)(?: pad=\S*)?\}", hlo)
    ]
    assert max(windows, default=0) <= length // 4, windows
