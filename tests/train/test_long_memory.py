"""The loss without logits, and memory for length: the chunked train and eval steps equal the
full-logits computation (float64), per-block remat plans less memory than none, and a 65,536-token
train step with a 32K vocabulary plans under 2 GiB of temporaries (XLA's memory analysis)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.eval import cross_entropy_sums, recall_counts
from hybridjax.layers.norm import RMSNorm
from hybridjax.model import HybridLM
from hybridjax.ops.norms import rmsnorm
from hybridjax.train_step import init_state, make_eval_step, make_train_step
from tests.tiny import tiny, tokens

GiB = 2**30


def _keep_grads():
    """An optimizer that leaves the parameters alone and keeps the last gradients as its state."""
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    return optax.GradientTransformation(
        zeros, lambda grads, state, params=None: (zeros(grads), grads)
    )


def _batch(seed, rows, length, vocab=64, answers=0.5):
    rng = np.random.default_rng(seed)
    batch = {
        "tokens": rng.integers(0, vocab, (rows, length)),
        "targets": rng.integers(0, vocab, (rows, length)),
        "loss_mask": (rng.random((rows, length)) < answers).astype(np.float32),
        "segment_ids": np.repeat(np.arange(1, 3), length // 2)[None].repeat(rows, 0),
        "bucket": np.arange(rows) % 3,
    }
    batch["loss_mask"][1] = 0  # a row without answers
    return jax.tree.map(jnp.asarray, batch)


def _full_logits_loss(graphdef, model_state, batch, lb_coef, z_coef, grad_accum):
    """The train loss as it was: (B, L, vocab) logits, then softmax cross-entropy (float64)."""
    total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    rows = len(batch["tokens"]) // grad_accum
    parts = [{k: v[i * rows : (i + 1) * rows] for k, v in batch.items()} for i in range(grad_accum)]

    def loss(params):
        out = ce_sum = 0.0
        for part in parts:
            model = nnx.merge(graphdef, params, model_state)
            logits, aux = model(part["tokens"], segment_ids=part["segment_ids"], return_aux=True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, part["targets"])
            ce_sum += jnp.sum(ce * part["loss_mask"])
            out += (lb_coef * aux.lb_loss + z_coef * aux.z_loss) / grad_accum
        return out + ce_sum / total, ce_sum / total

    return loss


@pytest.mark.parametrize("tie, grad_accum", [(False, 1), (True, 2)])
def test_train_step_equals_full_logits(tie, grad_accum):
    config = tiny(pattern="ME", tie_embeddings=tie, loss_chunk_size=7)
    graphdef, state = init_state(config, _keep_grads(), seed=0)
    step = make_train_step(
        graphdef,
        _keep_grads(),
        optax.constant_schedule(0.0),
        lb_coef=0.01,
        z_coef=0.001,
        router_bias_rate=0.0,
        grad_accum=grad_accum,
        has_moe=True,
    )
    batch = _batch(0, 4, 16)
    new, metrics = step(state, batch)
    loss = _full_logits_loss(graphdef, state.model_state, batch, 0.01, 0.001, grad_accum)
    (_, ce), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)
    assert metrics["ce"].dtype == jnp.float64
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-12)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-10)
    for got, want in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("tie", [False, True])
def test_eval_step_equals_full_logits(tie):
    config = tiny(pattern="M*-", tie_embeddings=tie, loss_chunk_size=5)
    graphdef, state = init_state(config, _keep_grads(), seed=1)
    batch = _batch(1, 4, 24, answers=0.2)
    sums = make_eval_step(graphdef, num_buckets=3)(state.params, state.model_state, batch)
    logits = nnx.merge(graphdef, state.params, state.model_state)(
        batch["tokens"], segment_ids=batch["segment_ids"]
    )
    loss_sum, weight_sum = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
    correct, total = recall_counts(logits, batch, 3)
    np.testing.assert_allclose(sums["loss_sum"], loss_sum, rtol=1e-12)
    assert float(sums["weight_sum"]) == float(weight_sum) > 0
    np.testing.assert_array_equal(sums["correct"], correct)
    np.testing.assert_array_equal(sums["total"], total)


def _planned_temp(config: HybridConfig, length: int) -> int:
    """Bytes of temporaries XLA plans for one train step on one (1, length) packed row."""
    tx = optax.adamw(1e-3)
    graphdef, state = init_state(config, tx, seed=0)
    step = make_train_step(
        graphdef, tx, optax.constant_schedule(1e-3), lb_coef=0.0, z_coef=0.0, router_bias_rate=0.0
    )
    row = jax.ShapeDtypeStruct((1, length), jnp.int32)
    batch = {
        "tokens": row,
        "targets": row,
        "segment_ids": row,
        "loss_mask": jax.ShapeDtypeStruct((1, length), jnp.float32),
    }
    return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_block_remat_plans_less_memory_than_none():
    """Per block, the backward pass keeps each block's input and recomputes its internals."""
    config = tiny(pattern="M-M-M-M-", dtype="float32", param_dtype="float32")
    temps = {r: _planned_temp(config.replace(remat=r), 2048) for r in ("none", "block")}
    assert temps["block"] < temps["none"] / 2, temps


@pytest.mark.parametrize(
    "layers",
    [
        pytest.param({"pattern": "--", "ffn": 2048}, id="mlp"),
        pytest.param({"pattern": "MM", "mamba_heads": 16, "mamba_head_dim": 64}, id="mamba2"),
    ],
)
def test_layer_chunks_plan_one_chunk_of_internals(layers):
    """layer_chunk_size: a dense MLP's (L x ffn) hidden activations and a Mamba-2 layer's
    projections, conv, scan and gated norm (L x d_inner wide) live one chunk at a time."""
    config = tiny(dtype="float32", param_dtype="float32", remat="block", **layers)
    temps = {c: _planned_temp(config.replace(layer_chunk_size=c), 16384) for c in (0, 1024)}
    assert temps[1024] < temps[0] / 4, temps


LONG = {
    "vocab_size": 32768,
    "d_model": 64,
    "mamba_heads": 2,
    "mamba_head_dim": 16,
    "ssm_state": 8,
    "n_groups": 1,
    "chunk_size": 64,
    "attn_heads": 2,
    "kv_heads": 1,
    "head_dim": 16,
    "ffn": 128,
    "remat": "block",
}


@pytest.mark.parametrize("pattern", ["M-M-", "M*M-"])
def test_65k_tokens_with_a_32k_vocabulary_plan_under_2_gib(pattern):
    """The full logits alone are 8 GiB (65,536 x 32,768 float32; a full-logits loss plans about
    17 GiB for these layers); the chunked loss plans under a quarter of that for the whole step
    (M*M-: blockwise attention, the default attn_impl on the CPU)."""
    temp = _planned_temp(HybridConfig(pattern=pattern, **LONG), 65536)
    assert temp < 2 * GiB, f"{temp / GiB:.2f} GiB"


def test_a_chunked_hybrid_step_plans_memory_linear_in_length():
    """remat nested + layer_chunk_size over Mamba-2, blockwise attention and an MLP: the planned
    temporaries per token do not grow from 8K to 32K tokens (about 11 and 9 KB/token here, 55 and
    54 without layer chunks): the step's memory is O(L) with a chunk's working set on top."""
    config = HybridConfig(
        pattern="M*M-",
        **{**LONG, "remat": "nested", "mamba_heads": 8, "ffn": 512, "vocab_size": 1024},
        layer_chunk_size=2048,
    )
    per_token = {n: _planned_temp(config, n) / n for n in (8192, 32768)}
    assert per_token[32768] <= 1.02 * per_token[8192], per_token
    assert per_token[8192] < 16_000, per_token


# The 1B preset's layer kinds at toy widths, in the 1B's long-context setting: bfloat16 compute,
# remat nested, layer chunks.
LONG_HYBRID = HybridConfig(
    vocab_size=1024,
    d_model=256,
    pattern="M-M-*-",
    dtype="bfloat16",
    remat="nested",
    layer_chunk_size=1024,
    loss_chunk_size=1024,
    mamba_heads=4,
    mamba_head_dim=32,
    ssm_state=16,
    n_groups=1,
    chunk_size=64,
    attn_heads=4,
    kv_heads=2,
    head_dim=32,
    ffn=512,
)


def _bytes_per_token(config: HybridConfig, lengths=(4096, 8192)) -> float:
    """How much the planned temporaries of a train step grow per token between two lengths."""
    short, long = (_planned_temp(config, n) for n in lengths)
    return (long - short) / (lengths[1] - lengths[0])


def test_block_norms_keep_no_copy_of_the_row_for_the_backward():
    """The Mamba-2 and MLP blocks apply their RMSNorm inside each layer chunk, and the RMSNorm
    module is rematerialised (the attention block's norm and the final norm keep their bfloat16
    input, saved anyway, not float32 copies of the row). Planned growth per token here: 43.9 KB
    with neither, 28.0 KB with the rematerialised norm alone, 23.3 KB with the chunked norms
    alone, 17.7 KB with both; the bound fails if either is lost."""
    assert _bytes_per_token(LONG_HYBRID) < 20_000


def test_layer_chunks_keep_the_values_and_gradients_of_the_plain_model():
    """Layer chunks under remat nested (the block norms inside the chunks, the state carried
    between them, a document boundary inside a chunk, a shorter last chunk) against the plain
    model: the same outputs and gradients in float64, over Mamba-2, Mamba-3, attention and MLP
    blocks."""
    config = tiny(pattern="M3*-M3*-")
    models = [
        HybridLM(c, rngs=nnx.Rngs(0))
        for c in (config, config.replace(remat="nested", layer_chunk_size=5))
    ]
    x = tokens(7, 2, 17)
    seg = jnp.asarray(np.repeat([[1] * 7 + [2] * 10], 2, axis=0))

    def loss(model):
        h, _ = model.hidden(x, seg)
        return jnp.sum(jnp.sin(h)), h

    (grads_a, h_a), (grads_b, h_b) = (nnx.grad(loss, has_aux=True)(m) for m in models)
    np.testing.assert_allclose(h_a, h_b, rtol=1e-12, atol=1e-14)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_rematerialised_rmsnorm_keeps_values_and_gradients():
    """Rematerialising changes what the backward keeps, not what it computes (float64)."""
    graphdef, state = nnx.split(RMSNorm(32, param_dtype=jnp.float64))
    state["weight"][...] = 1.0 + 0.1 * jax.random.normal(jax.random.key(1), (32,), jnp.float64)
    x = jax.random.normal(jax.random.key(0), (2, 5, 32), jnp.float64)
    module = lambda x, state: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))
    plain = lambda x, state: jnp.sum(jnp.sin(rmsnorm(x, state["weight"][...], eps=1e-5)))
    (dx, dw), (want_dx, want_dw) = (jax.grad(f, argnums=(0, 1))(x, state) for f in (module, plain))
    np.testing.assert_allclose(module(x, state), plain(x, state), rtol=1e-14)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dw["weight"][...], want_dw["weight"][...], rtol=1e-12)
