"""The Pallas SSD kernels in interpret mode on the CPU against the float64 lax.scan reference:
values and gradients for float32 and bfloat16 inputs with poisoned outputs (an element a kernel
never writes stays NaN), and the errors for calls the kernels do not support."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.kernels import pallas_unsupported_reason, ssd_pallas
from hybridjax.kernels.check import dA_term_size
from hybridjax.kernels.ssd import prepare
from hybridjax.ops import ssd

F32, BF16, F64 = jnp.float32, jnp.bfloat16, jnp.float64
# Relative error bounds (the norm of the difference over the norm of the reference) per input
# dtype. Measured worst cases over these cases: float32 7e-7, bfloat16 3e-3 (dB, dC).
TOL = {F32: 1e-5, BF16: 1e-2}


def segments(b, l, starts):
    """(b, l) int32 segment ids with a new document at each position in starts[row]; ids cycle
    through 0..2 so a later document can reuse an earlier id."""
    new = np.zeros((b, l), bool)
    for row, s in enumerate(starts):
        new[row, s] = True
    return jnp.asarray(np.cumsum(new, axis=1) % 3, jnp.int32)


def make_inputs(seed, b, l, h, p, g, n, dtype, with_D, with_init):
    """Float inputs as the Mamba-2 layer passes them: x, B, C in dtype, dt, A, D and the initial
    state in float32."""
    rng = np.random.default_rng(seed)
    arr = lambda a, to=F32: jnp.asarray(a, F32).astype(to)
    fl = {
        "x": arr(rng.standard_normal((b, l, h, p)), dtype),
        "dt": arr(np.log1p(np.exp(rng.standard_normal((b, l, h)) - 2.0))),  # softplus > 0
        "A": arr(-np.exp(rng.uniform(-1.0, 1.5, h))),
        "B": arr(rng.standard_normal((b, l, g, n)) / np.sqrt(n), dtype),
        "C": arr(rng.standard_normal((b, l, g, n)) / np.sqrt(n), dtype),
    }
    if with_D:
        fl["D"] = arr(rng.standard_normal(h))
    if with_init:
        fl["initial_state"] = arr(rng.standard_normal((b, h, p, n)))
    # cotangents: dy in the output dtype (the kernel computes with dy in x.dtype)
    cots = (arr(rng.standard_normal((b, l, h, p)), dtype), arr(rng.standard_normal((b, h, p, n))))
    return fl, cots


def value_and_grads(fn, fl, seg, cots, final):
    def f(fl):
        return fn(**fl, segment_ids=seg, return_final_state=final)

    out, vjp = jax.vjp(f, fl)
    (grads,) = vjp(cots if final else cots[0])
    return out, grads


def rel_err(got, want, scale=None):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.linalg.norm(want) if scale is None else scale
    return np.linalg.norm(got - want) / max(scale, 1e-300)


# id: (b, l, h, p, g, n), dtype, D, initial_state, segment starts per row (None: no segment_ids),
# return_final_state, ssd_pallas keywords. chunk_size=16 gives chunks of Q=16 positions.
CASES = {
    # one superchunk, nothing optional, p != n (a transposed state would show)
    "f32_plain": ((1, 48, 2, 16, 1, 32), F32, False, False, None, False, {"superchunks": 1}),
    # l=77 pads to 2 superchunks of 64 with 2 windows of 32 each; forward chunks of 32, backward
    # chunks of 16; resets at position 1, at a backward chunk boundary (16), a window boundary
    # (32), the superchunk boundary (64), mid-chunk
    "f32_all": (
        (2, 77, 4, 32, 2, 16),
        F32,
        True,
        True,
        [[1, 16, 64], [32, 50, 70]],
        True,
        {"superchunks": 2, "window": 32, "chunk_size": 32, "block_q_bwd": 16},
    ),
    # 4 heads per group in blocks of 2 (dB/dC summed in the kernels, then over the blocks)
    "f32_head_blocks": (
        (1, 64, 8, 16, 2, 32),
        F32,
        True,
        False,
        [[20]],
        False,
        {"heads_per_program": 2},
    ),
    # 4 superchunks with no resets: the initial state crosses every superchunk boundary
    "f32_K4_init": ((1, 100, 2, 16, 1, 16), F32, False, True, None, True, {"superchunks": 4}),
    # the GPU's head_dim 64 (d_state 64 here), chunks of 32 positions
    "f32_p64_n64": (
        (1, 96, 2, 64, 2, 64),
        F32,
        True,
        True,
        [[1, 48]],
        True,
        {"superchunks": 2, "chunk_size": 32},
    ),
    "bf16_all": (
        (2, 77, 4, 32, 2, 16),
        BF16,
        True,
        True,
        [[1, 16, 64], [32, 50, 70]],
        True,
        {"superchunks": 2, "window": 32},
    ),
    # the default plan (at b*h = 4 one chunk per superchunk); a document at position 0 (no
    # reset there), one of a single position (1), one starting at a superchunk boundary (48)
    "bf16_default_plan": ((2, 128, 2, 16, 2, 16), BF16, True, False, [[0, 1, 2], [48]], False, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case):
    (b, l, h, p, g, n), dtype, with_D, with_init, starts, final, kw = CASES[case]
    fl, cots = make_inputs(zlib.crc32(case.encode()), b, l, h, p, g, n, dtype, with_D, with_init)
    seg = None if starts is None else segments(b, l, starts)
    kw = {"chunk_size": 16, **kw}
    kern = lambda **a: ssd_pallas(**a, interpret=True, poison=True, **kw)
    ref = lambda **a: ssd(**a, impl="reference")
    out, grads = jax.jit(lambda fl, seg, cots: value_and_grads(kern, fl, seg, cots, final))(
        fl, seg, cots
    )
    up = lambda t: jax.tree.map(lambda a: a.astype(F64), t)
    out_r, grads_r = jax.jit(lambda fl, seg, cots: value_and_grads(ref, fl, seg, cots, final))(
        up(fl), seg, up(cots)
    )

    outs = dict(zip(["y", "final"], out if final else [out]))
    outs_r = dict(zip(["y", "final"], out_r if final else [out_r]))
    assert outs["y"].dtype == dtype and outs["y"].shape == (b, l, h, p)
    if final:
        assert outs["final"].dtype == F32 and outs["final"].shape == (b, h, p, n)
    for k in fl:
        assert grads[k].dtype == fl[k].dtype and grads[k].shape == fl[k].shape, k
    nonfinite = [k for k, v in {**outs, **grads}.items() if not bool(jnp.isfinite(v).all())]
    assert not nonfinite, f"non-finite (unwritten) elements in {nonfinite}"
    errs = {k: rel_err(outs[k], outs_r[k]) for k in outs}
    errs.update({"d" + k: rel_err(grads[k], grads_r[k]) for k in fl})
    # dA sums terms that cancel: its error is measured against their size
    size = dA_term_size(
        *(up(fl)[k] for k in ("x", "dt", "A")), grads_r["x"], grads_r["dt"], fl.get("D"), cots[0]
    )
    errs["dA"] = rel_err(grads["A"], grads_r["A"], size)
    assert max(errs.values()) < TOL[dtype], {k: f"{v:.1e}" for k, v in errs.items()}


def small_inputs(p=16, n=16, dtype=F32):
    fl, _ = make_inputs(0, 1, 40, 2, p, 1, n, dtype, True, False)
    return fl


@pytest.mark.parametrize(
    "change,message",
    [
        ({"p": 48}, "head_dim p=48 is not supported"),
        ({"n": 8}, "d_state n=8 is not supported"),
        ({"p": 256, "n": 256}, "register budget"),
        ({"dtype": F64}, "float64 is not supported"),
        ({}, "needs a GPU backend"),  # supported by the kernels, but this is the CPU
    ],
    ids=["p48", "n8", "p256_n256", "float64", "cpu"],
)
def test_pallas_impl_refuses_unsupported_calls(change, message):
    fl = small_inputs(**change)
    with pytest.raises(ValueError, match=f"impl='pallas'.*{message}"):
        ssd(**fl, impl="pallas")
    if change:  # the shape or dtype itself: refused in interpret mode too
        assert message in pallas_unsupported_reason(
            fl["x"], fl["dt"], fl["A"], fl["B"], fl["C"], interpret=True
        )
        with pytest.raises(ValueError, match=message):
            ssd_pallas(**fl, interpret=True)


@pytest.mark.parametrize(
    "dtype,p,n,warps", [(F32, 64, 128, 4), (F32, 128, 128, 8), (BF16, 128, 128, 4)]
)
def test_launch_widens_for_large_float32_states(dtype, p, n, warps):
    fl, _ = make_inputs(0, 1, 64, 2, p, 1, n, dtype, False, False)
    cfg = prepare(fl["x"], fl["dt"], fl["B"], fl["C"], interpret=True)[0]
    assert {k: w for k, (w, _) in cfg.launch} == dict.fromkeys(("dc", "dx", "fwd", "state"), warps)
    # an override still wins
    cfg = prepare(fl["x"], fl["dt"], fl["B"], fl["C"], interpret=True, launch=(("fwd", (2, 1)),))[0]
    assert dict(cfg.launch)["fwd"] == (2, 1)


def test_auto_on_cpu_is_chunked():
    fl = small_inputs()
    assert jax.default_backend() == "cpu"
    y, final = ssd(**fl, chunk_size=16, return_final_state=True)
    y_c, final_c = ssd(**fl, chunk_size=16, return_final_state=True, impl="chunked")
    np.testing.assert_array_equal(y, y_c)
    np.testing.assert_array_equal(final, final_c)


def test_initial_state_gradient_against_finite_differences():
    """The kernels' gradient with respect to the initial state (what context parallelism and
    state passing between chunks differentiate through) against central differences of the
    float64 reference, along random directions."""
    fl, cots = make_inputs(11, 2, 70, 4, 16, 2, 16, F32, True, True)
    seg = segments(2, 70, [[30], [5, 64]])

    def loss(fn, fl):
        y, final = fn(**fl, segment_ids=seg, return_final_state=True)
        return jnp.sum(y.astype(F64) * cots[0].astype(F64)) + jnp.sum(
            final.astype(F64) * cots[1].astype(F64)
        )

    kernel = lambda **kw: ssd_pallas(**kw, chunk_size=16, interpret=True, superchunks=2)
    grad = jax.grad(lambda s: loss(kernel, {**fl, "initial_state": s}))(fl["initial_state"])
    ref64 = {k: v.astype(F64) for k, v in fl.items()}
    reference = lambda **kw: ssd(**kw, chunk_size=16, impl="reference")
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = jnp.asarray(rng.standard_normal(fl["initial_state"].shape))
        eps = 1e-3
        plus = loss(reference, {**ref64, "initial_state": ref64["initial_state"] + eps * v})
        minus = loss(reference, {**ref64, "initial_state": ref64["initial_state"] - eps * v})
        fd = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(jnp.sum(grad.astype(F64) * v), fd, rtol=1e-4)
