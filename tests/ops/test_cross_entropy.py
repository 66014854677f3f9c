"""Chunked cross-entropy against full logits (float64 values and grads), memory, meshes, eval;
the fused weighted sum (gradients formed in the forward pass) likewise, and its matmul count."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend.core import subjaxprs
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax.ops.cross_entropy import (
    chunked_answer_losses,
    chunked_cross_entropy,
    chunked_cross_entropy_sum,
    head_logits,
)
from hybridjax.sharding import batch_sharding, make_mesh


def _data(seed, shape, d=16, vocab=37, dtype=jnp.float64):
    kh, kw, kt = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(kh, (*shape, d), dtype)
    head = jax.random.normal(kw, (d, vocab), dtype)
    return h, head, jax.random.randint(kt, shape, 0, vocab)


def _full(h, head, targets):
    return optax.softmax_cross_entropy_with_integer_labels(h @ head, targets)


@pytest.mark.parametrize(
    "shape, chunk", [((2, 13), 5), ((2, 13), 26), ((2, 13), 100), ((4, 16), 8), ((7,), 1)]
)
@pytest.mark.parametrize("vocab_major", [False, True])
def test_equals_full_logits_values_and_grads(shape, chunk, vocab_major):
    h, head, targets = _data(0, shape)
    weights = jax.random.uniform(jax.random.key(1), shape, jnp.float64)
    w = head.T if vocab_major else head

    def chunked(h, w):
        ce = chunked_cross_entropy(h, w, targets, chunk_size=chunk, vocab_major=vocab_major)
        return jnp.sum(ce * weights), ce

    def full(h, w):
        ce = _full(h, w.T if vocab_major else w, targets)
        return jnp.sum(ce * weights), ce

    (_, ce), grads = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(h, w)
    (_, ref), ref_grads = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(h, w)
    assert ce.shape == shape and ce.dtype == jnp.float64
    np.testing.assert_allclose(ce, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


def test_bfloat16_matmul_with_float32_logits():
    """A bfloat16 matmul accumulated in float32, never rounded to bfloat16 logits; bfloat16
    gradients close to the float64 ones."""
    h, head, targets = _data(2, (3, 10), dtype=jnp.bfloat16)
    ce = chunked_cross_entropy(h, head, targets, chunk_size=4)
    assert ce.dtype == jnp.float32 and head_logits(h, head).dtype == jnp.float32
    wide = h.astype(jnp.float64), head.astype(jnp.float64)
    np.testing.assert_allclose(ce, _full(*wide, targets), rtol=1e-5)
    grads = jax.grad(
        lambda h, w: jnp.sum(chunked_cross_entropy(h, w, targets, chunk_size=4)), argnums=(0, 1)
    )
    for g, r in zip(grads(h, head), grads(*wide)):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=2e-2, atol=2e-2)


def test_backward_never_holds_the_logits():
    """XLA's planned temporaries of value-and-grad are a few chunks of logits, far below the
    (N, V) float32 logits that the full computation plans."""
    n, d, vocab, chunk = 16384, 32, 8192, 512
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    head = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    targets = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp(loss):
        step = jax.jit(jax.value_and_grad(lambda h, w, t: jnp.sum(loss(h, w, t)), argnums=(0, 1)))
        return step.lower(h, head, targets).compile().memory_analysis().temp_size_in_bytes

    chunked = temp(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size=chunk))
    full = temp(_full)
    assert full >= n * vocab * 4  # the logits (512 MiB)
    assert chunked < 2 * chunk * vocab * 4, (chunked, full)  # about one chunk (16 MiB)


def _answer_data(seed, batch=3, length=29):
    h, head, targets = _data(seed, (batch, length))
    mask = jax.random.uniform(jax.random.key(seed + 1), (batch, length)) > 0.8
    mask = mask.at[1].set(False).at[2, -3:].set(True)  # a row without answers, late answers
    return h, head, targets, mask.astype(jnp.float32)


@pytest.mark.parametrize("chunk", [1, 6, 40, 1000])
@pytest.mark.parametrize("vocab_major", [False, True])
def test_answer_losses_equal_full_logits_at_answers(chunk, vocab_major):
    h, head, targets, mask = _answer_data(3)
    w = head.T if vocab_major else head
    ce, pred = jax.jit(
        lambda *a: chunked_answer_losses(*a, chunk_size=chunk, vocab_major=vocab_major)
    )(h, w, targets, mask)
    answer = np.asarray(mask) > 0
    np.testing.assert_allclose(ce, np.where(answer, _full(h, head, targets), 0), rtol=1e-12)
    np.testing.assert_array_equal(pred, np.where(answer, jnp.argmax(h @ head, -1), -1))
    assert pred.dtype == jnp.int32


@pytest.mark.parametrize(
    "sizes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "context": 2, "tensor": 2}]
)
def test_on_a_mesh_tokens_and_vocab_split(sizes):
    """Tokens laid out as batches are (rows over the batch axes, the sequence over "context"),
    the head's vocab dimension over "tensor": the same values and grads as on one device."""
    mesh = make_mesh(**sizes)
    h, head, targets, mask = _answer_data(4, batch=4, length=24)
    head = jnp.concatenate([head, head[:, :3]], axis=1)  # vocab 40: divisible by tensor
    tokens, vocab = batch_sharding(mesh), NamedSharding(mesh, P(None, "tensor"))

    def train(h, w, t):
        return jax.value_and_grad(
            lambda h, w: jnp.sum(chunked_cross_entropy(h, w, t, chunk_size=16) * mask),
            argnums=(0, 1),
        )(h, w)

    def answers(h, w, t, m):
        return chunked_answer_losses(h, w, t, m, chunk_size=16)

    args = (jax.device_put(h, tokens), jax.device_put(head, vocab), jax.device_put(targets, tokens))
    with jax.set_mesh(mesh):
        got = jax.jit(train)(*args), jax.jit(answers)(*args, jax.device_put(mask, tokens))
    want = jax.jit(train)(h, head, targets), jax.jit(answers)(h, head, targets, mask)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    assert got[0][1][1].sharding.spec == vocab.spec


def test_errors_name_the_argument():
    h, head, targets = _data(5, (2, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, head, targets, chunk_size=0)
    with pytest.raises(ValueError, match="head"):
        chunked_cross_entropy(h, head, targets, chunk_size=4, vocab_major=True)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(h, head, targets[:, :3], chunk_size=4)
    with pytest.raises(ValueError, match="chunked_answer_losses"):
        chunked_answer_losses(h[0], head, targets, targets, chunk_size=4)
    weights = jnp.ones(targets.shape)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy_sum(h, head, targets, weights, chunk_size=2.5)
    with pytest.raises(ValueError, match="weights"):
        chunked_cross_entropy_sum(h, head, targets, weights[:, :3], chunk_size=4)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy_sum(h, head, targets[:, :3], weights[:, :3], chunk_size=4)
    with pytest.raises(ValueError, match="head"):
        chunked_cross_entropy_sum(h, head, targets, weights, chunk_size=4, vocab_major=True)


# --- the fused sum: sum(weights * cross-entropy), its gradients formed in the forward pass -------
def _dense_sum(h, head, targets, weights):
    """The oracle: full logits, logsumexp minus the target's logit, weighted and summed."""
    logits = h @ head
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(weights * (jax.nn.logsumexp(logits, axis=-1) - target))


@pytest.mark.parametrize(
    "shape, chunk",
    [((2, 13), 5), ((3, 13), 8), ((2, 13), 100), ((4, 16), 8), ((7,), 1), ((2, 3, 11), 7)],
)
@pytest.mark.parametrize("vocab_major", [False, True])
def test_sum_equals_full_logits_value_and_grads(shape, chunk, vocab_major):
    h, head, targets = _data(6, shape)
    weights = jax.random.uniform(jax.random.key(7), shape, jnp.float64) / 3
    w = head.T if vocab_major else head
    fused = jax.value_and_grad(
        lambda h, w, x: chunked_cross_entropy_sum(
            h, w, targets, x, chunk_size=chunk, vocab_major=vocab_major
        ),
        argnums=(0, 1, 2),
    )
    dense = jax.value_and_grad(
        lambda h, w, x: _dense_sum(h, w.T if vocab_major else w, targets, x), argnums=(0, 1, 2)
    )
    (value, grads), (ref, ref_grads) = fused(h, w, weights), dense(h, w, weights)
    assert value.shape == () and value.dtype == jnp.float64
    np.testing.assert_allclose(value, ref, rtol=1e-10)
    for g, r, x in zip(grads, ref_grads, (h, w, weights)):
        assert g.shape == x.shape and g.dtype == x.dtype
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def test_sum_bfloat16_within_its_rounding():
    """bfloat16 h and head against a float32 oracle on the same values: the value and the
    weights' gradient to float32 rounding; the h and head gradients, rounded twice to bfloat16
    (softmax minus one-hot, then the matmul's result), within 1/128 of the magnitudes they sum."""
    h, head, targets = _data(8, (3, 21), d=24, vocab=50, dtype=jnp.bfloat16)
    weights = jax.random.uniform(jax.random.key(9), targets.shape, jnp.float32)
    grad = jax.value_and_grad(
        lambda h, w, x: chunked_cross_entropy_sum(h, w, targets, x, chunk_size=8),
        argnums=(0, 1, 2),
    )
    value, (dh, dhead, dweights) = grad(h, head, weights)
    assert (value.dtype, dh.dtype, dhead.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
    h32, head32 = h.astype(jnp.float32), head.astype(jnp.float32)
    ref, (rh, rhead, rweights) = jax.value_and_grad(_dense_sum, argnums=(0, 1, 3))(
        h32, head32, targets, weights
    )
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    np.testing.assert_allclose(dweights, rweights, rtol=1e-5, atol=1e-6)
    logits = h32 @ head32  # |d loss / d logits| bounds each term of the two gradient matmuls
    dlogits = jnp.abs(jax.nn.softmax(logits) - jax.nn.one_hot(targets, 50)) * weights[..., None]
    scales = dlogits @ jnp.abs(head32).T, jnp.einsum("btd,btv->dv", jnp.abs(h32), dlogits)
    for got, want, scale in zip((dh, dhead), (rh, rhead), scales):
        assert np.all(np.abs(np.asarray(got, np.float32) - want) <= scale / 128)


def test_sum_backward_never_holds_the_logits():
    """XLA's planned temporaries of value-and-grad stay at a few chunks of logits (the
    gradients themselves are outputs), far below the (N, V) float32 logits."""
    n, d, vocab, chunk = 16384, 32, 8192, 512
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, vocab), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )

    def temp(loss):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    fused = temp(lambda h, w, t, x: chunked_cross_entropy_sum(h, w, t, x, chunk_size=chunk))
    full = temp(_dense_sum)
    assert full >= n * vocab * 4  # the logits (512 MiB)
    assert fused < 3 * chunk * vocab * 4, (fused, full)  # about two chunks (16 MiB each)


def _dot_generals(jaxpr) -> int:
    """dot_general equations in a jaxpr and its sub-jaxprs (a scan's body counted once)."""
    own = sum(eqn.primitive.name == "dot_general" for eqn in jaxpr.eqns)
    return own + sum(_dot_generals(sub) for sub in subjaxprs(jaxpr))


def test_sum_runs_the_head_matmul_once():
    """Grad of the fused sum: logits, then the two gradient matmuls (3); the per-token losses'
    backward recomputes the logits (4)."""
    h, head, targets = _data(10, (2, 13))
    weights = jnp.ones(targets.shape)

    def dots(loss):
        return _dot_generals(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, head).jaxpr)

    fused = dots(lambda h, w: chunked_cross_entropy_sum(h, w, targets, weights, chunk_size=8))
    per_token = dots(
        lambda h, w: jnp.sum(chunked_cross_entropy(h, w, targets, chunk_size=8) * weights)
    )
    assert (fused, per_token) == (3, 4)


@pytest.mark.parametrize(
    "sizes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "context": 2, "tensor": 2}]
)
def test_sum_on_a_mesh_tokens_and_vocab_split(sizes):
    """Rows (and the sequence) split as batches are, the head's vocab over "tensor": the same
    value and gradients (h, head, weights) as on one device."""
    mesh = make_mesh(**sizes)
    h, head, targets, mask = _answer_data(11, batch=4, length=24)
    head = jnp.concatenate([head, head[:, :3]], axis=1)  # vocab 40: divisible by tensor
    weights = mask + 0.5
    tokens, vocab = batch_sharding(mesh), NamedSharding(mesh, P(None, "tensor"))

    def step(h, w, t, x):
        return jax.value_and_grad(
            lambda h, w, x: chunked_cross_entropy_sum(h, w, t, x, chunk_size=16), argnums=(0, 1, 2)
        )(h, w, x)

    args = (h, head, targets, weights)
    placed = [jax.device_put(x, vocab if x is head else tokens) for x in args]
    with jax.set_mesh(mesh):
        got = jax.jit(step)(*placed)
    want = jax.jit(step)(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    assert got[1][1].sharding.spec == vocab.spec
