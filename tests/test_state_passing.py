"""State passing between consecutive chunks (truncated BPTT): `HybridLM.hidden_from` over two
chunks equals one forward over their concatenation (Mamba-2 stacks), a new document resets the
carried state, the remat modes agree, and no gradient reaches the previous chunk."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridjax.model import HybridLM, continue_states
from tests.tiny import tiny, tokens

B, L, CUT = 2, 23, 11  # the second chunk is 12 tokens; chunk_size 8 divides neither


def packed_segments():
    """Row 0: one document over both chunks, another starting inside the second. Row 1: a
    document boundary inside the first chunk and one exactly at the chunk edge."""
    row0 = [1] * 17 + [2] * (L - 17)
    row1 = [1] * 4 + [2] * (CUT - 4) + [3] * (L - CUT)
    return jnp.array([row0, row1], jnp.int32)


def continues_at_cut(segment_ids):
    """(B,) 1 where the second chunk's first token continues the first chunk's last document."""
    return (segment_ids[:, CUT] == segment_ids[:, CUT - 1]).astype(jnp.int32)


@pytest.fixture(scope="module")
def mamba():
    """A float64 Mamba-2 + MLP stack (two periods, so the states are stacked over repeats)."""
    return HybridLM(tiny(pattern="M-M-"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def mamba3():
    """A float64 Mamba-3 + Mamba-2 + MLP stack."""
    return HybridLM(tiny(pattern="3-M-3-M-", mamba3_rope_fraction=1.0), rngs=nnx.Rngs(1))


def with_remat(model, remat):
    """`model`'s parameters under another remat mode (no new initialisation)."""
    config = dataclasses.replace(model.config, remat=remat)
    graphdef = nnx.split(nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0))))[0]
    return nnx.merge(graphdef, nnx.state(model))


def jitted(model, fn, *args):
    """fn(model, *args) under one jit (eager nnx dispatch is slow on the CPU)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))(state, *args)


def two_chunks(model, x, seg):
    """hidden states of the two chunks run one after the other, the state passed between."""
    h1, _, states = model.hidden_from(model.init_states(B), x[:, :CUT], seg[:, :CUT])
    states = continue_states(states, continues_at_cut(seg))
    h2, _, final = model.hidden_from(states, x[:, CUT:], seg[:, CUT:])
    return jnp.concatenate([h1, h2], axis=1), final


@pytest.mark.parametrize(
    "stack, remat",
    [("mamba", "none"), ("mamba", "full"), ("mamba", "block"), ("mamba3", "block")],
)
def test_two_chunks_equal_one_forward(stack, remat, request):
    """Packed documents, boundaries inside the chunks and at their edge; the final states are
    the ones one forward over the whole row reaches."""
    model = with_remat(request.getfixturevalue(stack), remat)
    x, seg = tokens(0, B, L), packed_segments()

    def run(model, x, seg):
        whole = model.hidden_from(model.init_states(B), x, seg)
        return model.hidden(x, seg)[0], two_chunks(model, x, seg), whole[2]

    want, (got, final), whole = jitted(model, run, x, seg)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(final))


def test_states_are_stacked_over_repeats_and_float32():
    config = tiny(pattern="M*M*", dtype="bfloat16", param_dtype="float32")
    model = nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0)))
    states, (h, _, after) = nnx.eval_shape(
        lambda m: (m.init_states(3), m.hidden_from(m.init_states(3), tokens(1, 3, 9))), model
    )
    ssm_layers, attention = states
    assert attention is None  # attention carries nothing between chunks
    assert ssm_layers.ssm.shape == (2, 3, 4, 8, 8) and ssm_layers.ssm.dtype == jnp.float32
    assert ssm_layers.conv.shape == (2, 3, 3, 4 * 8 + 2 * 2 * 8)
    assert ssm_layers.conv.dtype == jnp.float32
    assert h.dtype == jnp.bfloat16
    assert jax.tree.map(lambda a: (a.shape, a.dtype), after) == jax.tree.map(
        lambda a: (a.shape, a.dtype), states
    )


def test_hybrid_chunk_after_a_document_edge_equals_a_fresh_forward():
    """With attention (which sees its chunk alone by design), a chunk whose rows start new
    documents is a fresh forward exactly; a continuing row is not."""
    model = HybridLM(tiny(pattern="M*-M"), rngs=nnx.Rngs(2))
    x = tokens(3, B, L)

    def run(model, x):
        _, _, states = model.hidden_from(model.init_states(B), x[:, :CUT])
        starts = continue_states(states, jnp.array([0, 1]))
        return model.hidden_from(starts, x[:, CUT:])[0], model.hidden(x[:, CUT:])[0]

    h, fresh = jitted(model, run, x)
    np.testing.assert_array_equal(h[0], fresh[0])
    assert not np.allclose(h[1], fresh[1])


def test_no_gradient_reaches_the_previous_chunk(mamba):
    """The chunk's loss has no gradient with respect to the states the previous chunk ended
    with once they pass `continue_states` (so none reaches that chunk's computation); it has
    one without the cut."""
    x = tokens(4, B, L)
    keep = jnp.ones((B,), jnp.int32)

    def grads(model, x):
        _, _, states = model.hidden_from(model.init_states(B), x[:, :CUT])

        graphdef, params = nnx.split(model)

        def loss(states, params, cut):  # params are arguments too: nnx needs them traced
            states = continue_states(states, keep) if cut else states
            h = nnx.merge(graphdef, params).hidden_from(states, x[:, CUT:])[0]
            return jnp.sum(h**2)

        grad = jax.grad(loss, argnums=(0, 1))
        return grad(states, params, True)[0], grad(states, params, False)[0]

    cut, through = jitted(mamba, grads, x)
    assert all(not np.any(g) for g in jax.tree.leaves(cut))
    assert all(np.any(g) for g in jax.tree.leaves(through))
