"""hybridjax.ops.ssd: every implementation against the lax.scan reference in float64 (values and
gradients), the reference against a plain numpy loop, low-precision smoke checks, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.ops import ssd

# (b, l, h, p, g, n, chunk, with_D, with_init, with_segments, final_state)
CASES = [
    (2, 37, 4, 3, 2, 5, 8, True, True, True, True),  # length not a chunk multiple, g > 1
    (1, 41, 2, 2, 1, 3, 2, True, True, True, True),  # 21 chunks: blocked carry across chunks
    (3, 9, 2, 5, 2, 3, 4, False, False, False, False),  # h == g, nothing optional
]


def make_case(seed, b, l, h, p, g, n, with_D, with_init, with_segments, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    args = {
        "x": rng.standard_normal((b, l, h, p)),
        "dt": np.log1p(np.exp(rng.standard_normal((b, l, h)) - 1.0)),  # softplus: positive
        "A": -np.exp(rng.uniform(-1.0, 1.0, (h,))),
        "B": rng.standard_normal((b, l, g, n)),
        "C": rng.standard_normal((b, l, g, n)),
    }
    kw = {}
    if with_D:
        kw["D"] = rng.standard_normal((h,))
    if with_init:
        kw["initial_state"] = rng.standard_normal((b, h, p, n))
    args = {k: jnp.asarray(v, dtype) for k, v in args.items()}
    kw = {k: jnp.asarray(v, dtype) for k, v in kw.items()}
    if with_segments:  # random documents, ids both rising and repeating an earlier value
        starts = rng.random((b, l)) < 0.15
        kw["segment_ids"] = jnp.asarray(np.cumsum(starts, axis=1) % 3, jnp.int32)
    return args, kw


def numpy_loop(x, dt, A, B, C, D=None, initial_state=None, segment_ids=None):
    x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    y = np.zeros_like(x)
    final = np.zeros((b, h, p, n))
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            state = np.zeros((p, n)) if initial_state is None else np.array(initial_state[bi, hi])
            for t in range(l):
                if (
                    segment_ids is not None
                    and t > 0
                    and segment_ids[bi, t] != segment_ids[bi, t - 1]
                ):
                    state = np.zeros((p, n))
                state = np.exp(dt[bi, t, hi] * A[hi]) * state + dt[bi, t, hi] * np.outer(
                    x[bi, t, hi], B[bi, t, gi]
                )
                y[bi, t, hi] = state @ C[bi, t, gi]
                if D is not None:
                    y[bi, t, hi] += D[hi] * x[bi, t, hi]
            final[bi, hi] = state
    return y, final


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


def run(impl, args, kw, chunk):
    return ssd(**args, **kw, chunk_size=chunk, return_final_state=True, impl=impl)


@pytest.mark.parametrize("case", CASES[:2])
def test_reference_matches_numpy_loop(case):
    b, l, h, p, g, n, chunk, wD, wI, wS, _ = case
    args, kw = make_case(1, b, l, h, p, g, n, wD, wI, wS)
    y, final = run("reference", args, kw, chunk)
    y_np, final_np = numpy_loop(**args, **kw)
    assert y.dtype == jnp.float64 and final.dtype == jnp.float64
    assert rel_err(y, y_np) < 1e-12
    assert rel_err(final, final_np) < 1e-12


def _value_and_grads(impl, args, kw, chunk, final_state, cot_seed=7):
    """Outputs and the vjp with a fixed random cotangent, wrt every float input."""
    floats = {**args, **{k: v for k, v in kw.items() if k != "segment_ids"}}
    seg = kw.get("segment_ids")

    def f(fl):
        a = {k: fl[k] for k in args}
        o = {k: fl[k] for k in fl if k not in args}
        return ssd(
            **a, **o, segment_ids=seg, chunk_size=chunk, return_final_state=final_state, impl=impl
        )

    out, vjp = jax.vjp(jax.jit(f), floats)
    rng = np.random.default_rng(cot_seed)
    cot = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), out)
    (grads,) = vjp(cot)
    return out, grads


_REFERENCE_RESULTS = {}


@pytest.mark.parametrize("impl", ["assoc", "chunked"])
@pytest.mark.parametrize("case", CASES)
def test_impl_matches_reference(impl, case):
    b, l, h, p, g, n, chunk, wD, wI, wS, wF = case
    args, kw = make_case(2, b, l, h, p, g, n, wD, wI, wS)
    out, grads = _value_and_grads(impl, args, kw, chunk, wF)
    if case not in _REFERENCE_RESULTS:  # computed once per case, shared by both impls
        _REFERENCE_RESULTS[case] = _value_and_grads("reference", args, kw, chunk, wF)
    out_ref, grads_ref = _REFERENCE_RESULTS[case]
    for o, o_ref in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref)):
        assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
        assert rel_err(o, o_ref) < 1e-8
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-8, name


def test_chunked_any_chunk_size():
    args, kw = make_case(3, 2, 23, 4, 3, 2, 4, True, True, True)
    y_ref, final_ref = run("reference", args, kw, 1)
    for chunk in (1, 5, 64):
        y, final = run("chunked", args, kw, chunk)
        assert rel_err(y, y_ref) < 1e-10 and rel_err(final, final_ref) < 1e-10, chunk


def test_reset_at_every_step_and_initial_state_only_feeds_first_segment():
    args, kw = make_case(4, 1, 12, 2, 2, 1, 3, False, True, False)
    kw["segment_ids"] = jnp.arange(12, dtype=jnp.int32)[None]  # every step its own document
    for impl in ("reference", "assoc", "chunked"):
        y, _final = run(impl, args, kw, 4)
        # state after a reset = dt * x (outer) B, so y_t = dt_t * x_t * (B_t . C_t) for t > 0
        a = {k: np.asarray(v) for k, v in args.items()}
        want = a["dt"][..., None] * a["x"] * np.sum(a["B"] * a["C"], -1)[:, :, :, None]
        assert rel_err(y[:, 1:], want[:, 1:]) < 1e-12, impl
        assert rel_err(y[:, :1], want[:, :1]) > 1e-3, impl  # t=0 still sees initial_state


@pytest.mark.parametrize(
    "impl,dtype,tol",
    [
        ("reference", jnp.float32, 1e-4),
        ("assoc", jnp.float32, 1e-4),
        ("chunked", jnp.float32, 1e-4),
        ("chunked", jnp.bfloat16, 5e-2),
    ],
)
def test_low_precision_runs_finite_and_close(impl, dtype, tol):
    args64, kw64 = make_case(5, 2, 40, 4, 8, 2, 16, True, True, True)
    args = {k: v.astype(dtype) for k, v in args64.items()}
    kw = {k: (v if k == "segment_ids" else v.astype(dtype)) for k, v in kw64.items()}
    y, final = run(impl, args, kw, 16)
    assert y.dtype == dtype and final.dtype == jnp.float32
    assert bool(jnp.isfinite(y).all()) and bool(jnp.isfinite(final).all())
    y_ref, final_ref = run("reference", args64, kw64, 16)
    assert rel_err(y, y_ref) < tol and rel_err(final, final_ref) < tol
    loss = lambda a: ssd(**a, **kw, chunk_size=16, impl=impl).astype(jnp.float32).sum()
    grads = jax.jit(jax.grad(loss))(args)
    assert all(bool(jnp.isfinite(g).all()) for g in grads.values())


def test_auto_on_cpu_is_chunked():
    args, kw = make_case(6, 1, 10, 2, 2, 1, 2, True, False, False)
    assert (
        rel_err(ssd(**args, **kw, chunk_size=4), ssd(**args, **kw, chunk_size=4, impl="chunked"))
        == 0
    )


def test_errors():
    args, _kw = make_case(0, 2, 8, 4, 3, 2, 5, False, False, False)
    with pytest.raises(ValueError, match="auto, reference, assoc, chunked, pallas"):
        ssd(**args, impl="nope")
    bad = {
        "x": jnp.zeros((2, 8, 4)),
        "dt": jnp.zeros((2, 8, 3)),
        "A": jnp.zeros((5,)),
        "B": jnp.zeros((2, 8, 3, 5)),  # 3 groups do not divide 4 heads
        "C": jnp.zeros((2, 8, 2, 4)),
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            ssd(**{**args, name: value})
    for name, value in [
        ("D", jnp.zeros((3,))),
        ("initial_state", jnp.zeros((2, 4, 3, 4))),
        ("segment_ids", jnp.zeros((2, 7), jnp.int32)),
        ("segment_ids", jnp.zeros((2, 8))),
    ]:
        with pytest.raises(ValueError, match=name):
            ssd(**args, **{name: value})
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(**args, chunk_size=0)
