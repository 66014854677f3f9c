"""hybridjax.ops.mamba3_siso / mamba3_mimo: the lax.scan reference against a float64 NumPy loop
of the recurrence (a port of mamba_ssm's pure-torch step references, `mamba3_siso_step_ref`
and `mamba3_MIMO_step_ref` in its tests, which cannot be imported here: their modules import
Triton), every implementation against the reference (values and gradients), state
continuation, MIMO rank 1 against SISO, the SSD special case, input errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from hybridjax.ops import Mamba3State, mamba3_mimo, mamba3_siso, ssd
from hybridjax.ops.mamba3_chunked import running_angle

# (name, b, l, h, p, g, n, s, R (None: SISO), chunk, with_D, with_z, with_init, with_segments)
CASES = [
    ("siso-19-chunks", 2, 37, 4, 3, 2, 8, 3, None, 2, True, True, True, True),  # blocked carry
    ("siso-plain", 2, 9, 2, 4, 2, 6, 1, None, 4, False, False, False, False),
    ("mimo-r3", 2, 23, 4, 3, 2, 8, 2, 3, 4, True, True, True, True),
    ("mimo-r2-one-chunk", 1, 19, 2, 2, 1, 4, 2, 2, 32, False, True, False, True),
]
IDS = [c[0] for c in CASES]


def make_case(seed, b, l, h, p, g, n, s, R, wD, wZ, wI, wS, dtype=jnp.float64):
    """(positional args, keyword args) of mamba3_siso (R None) or mamba3_mimo."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape)
    rank = () if R is None else (R,)
    dt = np.log1p(np.exp(normal(b, l, h) - 1.0))
    args = [
        normal(b, l, *rank, g, n),  # q
        normal(b, l, *rank, g, n),  # k
        normal(b, l, h, p),  # v
        -np.exp(rng.uniform(-1.0, 1.0, (b, l, h))) * dt,  # adt = A dt, A < 0 per step
        dt,
        2.0 * normal(b, l, h),  # trap logit
        normal(h, *rank, n),  # q_bias
        normal(h, *rank, n),  # k_bias
        normal(b, l, h, s),  # raw angles
    ]
    if R is not None:
        args += [normal(h, R, p), normal(h, R, p), normal(h, R, p)]  # mimo_x, mimo_z, mimo_o
    kw = {}
    if wD:
        kw["D"] = normal(h)
    if wZ:
        kw["z"] = normal(b, l, h, p)
    args = [jnp.asarray(a, dtype) for a in args]
    kw = {k: jnp.asarray(v, dtype) for k, v in kw.items()}
    if wI:
        kw["initial_state"] = Mamba3State(
            jnp.asarray(rng.uniform(0, 2 * np.pi, (b, h, s)), dtype),
            jnp.asarray(normal(b, h, p, n), dtype),
            jnp.asarray(normal(b, *rank, h, n), dtype),
            jnp.asarray(normal(b, h, p), dtype),
        )
    if wS:  # random documents, ids both rising and repeating an earlier value
        starts = rng.random((b, l)) < 0.15
        kw["segment_ids"] = jnp.asarray(np.cumsum(starts, axis=1) % 3, jnp.int32)
    return args, kw


def make(seed, case):
    """make_case for a CASES-style tuple (its name and chunk size left out)."""
    return make_case(seed, *case[1:9], *case[10:])


def op_of(R):
    return mamba3_siso if R is None else mamba3_mimo


# --- the NumPy oracle ----------------------------------------------------------------------------
def _rotate_np(x, phi, pairing):
    out, n = x.copy(), x.shape[-1]
    for i, angle in enumerate(phi):
        a, b = (2 * i, 2 * i + 1) if pairing == "adjacent" else (i, i + n // 2)
        c, s = math.cos(angle), math.sin(angle)
        out[a], out[b] = x[a] * c - x[b] * s, x[a] * s + x[b] * c
    return out


def numpy_loop(q, k, v, adt, dt, trap, q_bias, k_bias, angles, *mimo, D=None, z=None,
               initial_state=None, segment_ids=None):  # fmt: skip
    """The recurrence one (row, head, step) at a time in float64: y and the final state."""
    f64 = lambda t: None if t is None else np.asarray(t, np.float64)
    q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z = map(
        f64, (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z)
    )
    init = None if initial_state is None else [f64(t) for t in initial_state]
    siso = not mimo
    if siso:  # one rank, unit projections, adjacent pairs
        q, k, q_bias, k_bias = q[:, :, None], k[:, :, None], q_bias[:, None], k_bias[:, None]
        if init is not None:
            init[2] = init[2][:, None]
    b, l, R, g, n = q.shape
    h, p = v.shape[2:]
    s = angles.shape[-1]
    mx, mz, mo = (np.ones((h, R, p)),) * 3 if siso else map(f64, mimo)
    pairing = "adjacent" if siso else "halves"
    y = np.zeros((b, l, h, p))
    fin = [np.zeros((b, h, s)), np.zeros((b, h, p, n)), np.zeros((b, R, h, n)), np.zeros((b, h, p))]
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            if init is None:
                phi, S, kp, vp = np.zeros(s), np.zeros((p, n)), np.zeros((R, n)), np.zeros(p)
            else:
                phi, S, kp, vp = (init[0][bi, hi], init[1][bi, hi], init[2][bi, :, hi],
                                  init[3][bi, hi])  # fmt: skip
            for t in range(l):
                if segment_ids is not None and t and segment_ids[bi, t] != segment_ids[bi, t - 1]:
                    phi, S, kp, vp = np.zeros(s), np.zeros((p, n)), np.zeros((R, n)), np.zeros(p)
                phi = (phi + math.pi * np.tanh(angles[bi, t, hi]) * dt[bi, t, hi]) % (2 * math.pi)
                qr = [_rotate_np(q[bi, t, r, gi] + q_bias[hi, r], phi, pairing) for r in range(R)]
                kr = [_rotate_np(k[bi, t, r, gi] + k_bias[hi, r], phi, pairing) for r in range(R)]
                lam = 1 / (1 + math.exp(-trap[bi, t, hi]))
                alpha = math.exp(adt[bi, t, hi])
                beta, gamma = (1 - lam) * dt[bi, t, hi] * alpha, lam * dt[bi, t, hi]
                vt = v[bi, t, hi]
                S = alpha * S
                for r in range(R):
                    S = S + beta * np.outer(vp * mx[hi, r], kp[r])
                    S = S + gamma * np.outer(vt * mx[hi, r], kr[r])
                for r in range(R):
                    o = S @ qr[r] + (0 if D is None else D[hi]) * vt * mx[hi, r]
                    if z is not None:
                        zz = z[bi, t, hi] * mz[hi, r]
                        o = o * zz / (1 + np.exp(-zz))
                    y[bi, t, hi] += mo[hi, r] * o
                kp, vp = np.array(kr), vt
            fin[0][bi, hi], fin[1][bi, hi], fin[2][bi, :, hi], fin[3][bi, hi] = phi, S, kp, vp
    if siso:
        fin[2] = fin[2][:, 0]
    return y, fin


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


def angle_err(got, want):
    """Distance of angles on the circle (a final angle may wrap on either side of 2 pi)."""
    d = np.angle(np.exp(1j * (np.asarray(got) - np.asarray(want))))
    return np.abs(d).max()


def run(impl, case, args, kw):
    chunk, R = case[9], case[8]
    return op_of(R)(*args, **kw, chunk_size=chunk, return_final_state=True, impl=impl)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_matches_numpy_loop(case):
    args, kw = make(1, case)
    y, final = run("reference", case, args, kw)
    y_np, final_np = numpy_loop(*args, **kw)
    assert y.dtype == jnp.float64 and all(t.dtype == jnp.float64 for t in final)
    assert rel_err(y, y_np) < 1e-12
    assert angle_err(final.angle, final_np[0]) < 1e-12
    for got, want in zip(final[1:], final_np[1:]):
        assert got.shape == want.shape and rel_err(got, want) < 1e-12


def _value_and_grads(impl, case, args, kw, cot_seed=7):
    """Outputs and the vjp with a fixed random cotangent, wrt every float input (the initial
    state's arrays included)."""
    seg = kw.get("segment_ids")
    floats = {"args": args, **{k: v for k, v in kw.items() if k != "segment_ids"}}

    def f(fl):
        rest = {k: v for k, v in fl.items() if k != "args"}
        chunk, R = case[9], case[8]
        return op_of(R)(
            *fl["args"], **rest, segment_ids=seg, chunk_size=chunk,
            return_final_state=True, impl=impl,
        )  # fmt: skip

    out, vjp = jax.vjp(f, floats)
    rng = np.random.default_rng(cot_seed)
    cot = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), out)
    (grads,) = vjp(cot)
    return out, grads


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_chunked_matches_reference(case):
    args, kw = make(2, case)
    out, grads = _value_and_grads("chunked", case, args, kw)
    out_ref, grads_ref = _value_and_grads("reference", case, args, kw)
    (y, final), (y_ref, final_ref) = out, out_ref
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert rel_err(y, y_ref) < 1e-11
    assert angle_err(final.angle, final_ref.angle) < 1e-11
    for got, want in zip(final[1:], final_ref[1:]):
        assert got.shape == want.shape and rel_err(got, want) < 1e-11
    flat, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert len(flat) == len(flat_ref)
    for i, (g, g_ref) in enumerate(zip(flat, flat_ref)):
        assert rel_err(g, g_ref) < 1e-10, (i, rel_err(g, g_ref))


def test_reference_gradients_match_finite_differences():
    """The oracle's own gradients (what the chunked form is held to) against central
    differences (MIMO, every optional input)."""
    for R in (2,):
        args, kw = make_case(3, 1, 5, 2, 2, 1, 4, 2, R, True, True, True, True)
        seg = kw.pop("segment_ids")
        op = op_of(R)

        def f(args, kw, op=op, seg=seg):
            y, final = op(
                *args, **kw, segment_ids=seg, chunk_size=4, return_final_state=True,
                impl="reference",
            )  # fmt: skip
            return y, final.ssm, final.k, final.v

        check_grads(f, (args, kw), order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


@pytest.mark.parametrize("R", [None, 2])
def test_state_continuation_equals_one_run(R, impl="chunked"):
    """Two calls, the second started from the first's final state, equal one call over the
    whole sequence, documents crossing the split included."""
    case = ("split", 2, 30, 4, 3, 2, 8, 3, R, 4, True, True, True, True)
    args, kw = make(4, case)
    cut = 15  # two halves of one shape: one compile for both
    # documents start before and after the cut (never at it: a start at the second call's
    # position 0 would be the caller's to make, by handing in a zero state)
    kw["segment_ids"] = jnp.asarray([[0] * 5 + [1] * 20 + [2] * 5, [3] * 17 + [1] * 13])
    y, final = run(impl, case, args, kw)
    seg, z = kw.pop("segment_ids"), kw.pop("z")
    timed = lambda a: a.shape[:2] == (2, 30)
    first = [a[:, :cut] if timed(a) else a for a in args]
    second = [a[:, cut:] if timed(a) else a for a in args]
    y1, mid = run(impl, case, first, {**kw, "z": z[:, :cut], "segment_ids": seg[:, :cut]})
    kw2 = {**kw, "z": z[:, cut:], "segment_ids": seg[:, cut:], "initial_state": mid}
    y2, final2 = run(impl, case, second, kw2)
    assert rel_err(jnp.concatenate([y1, y2], 1), y) < 1e-12
    assert angle_err(final2.angle, final.angle) < 1e-12
    for got, want in zip(final2[1:], final[1:]):
        assert rel_err(got, want) < 1e-12


def _halves_order(n):
    """Channel order that turns adjacent pairs (2i, 2i+1) into halves pairs (i, i + n/2)."""
    order = np.empty(n, int)
    order[: n // 2], order[n // 2 :] = np.arange(0, n, 2), np.arange(1, n, 2)
    return order


def test_mimo_rank_one_is_siso(impl="chunked"):
    """MIMO with one rank and unit projections is SISO, up to the order of the state channels
    (SISO rotates adjacent pairs, MIMO the two halves)."""
    case = ("r1", 2, 21, 4, 3, 2, 8, 3, None, 8, True, True, True, True)
    args, kw = make(5, case)
    y, final = run(impl, case, args, kw)
    order = _halves_order(8)
    q, k, v, adt, dt, trap, qb, kb, angles = args
    h, p = v.shape[2:]
    ones = jnp.ones((h, 1, p), v.dtype)
    init = kw["initial_state"]
    mimo_kw = {
        **kw,
        "initial_state": Mamba3State(
            init.angle, init.ssm[..., order], init.k[:, None][..., order], init.v
        ),
    }
    y_m, final_m = mamba3_mimo(
        q[:, :, None][..., order], k[:, :, None][..., order], v, adt, dt, trap,
        qb[:, None][..., order], kb[:, None][..., order], angles, ones, ones, ones,
        **mimo_kw, chunk_size=8, return_final_state=True, impl=impl,
    )  # fmt: skip
    assert rel_err(y_m, y) < 1e-13
    assert rel_err(final_m.ssm, final.ssm[..., order]) < 1e-13
    assert rel_err(final_m.k[:, 0], final.k[..., order]) < 1e-13
    np.testing.assert_array_equal(final_m.angle, final.angle)


def test_no_trapezoid_no_rotation_is_ssd(impl="chunked"):
    """lam = 1 (trap -> +inf) and angles = 0 leave Mamba-2's SSD: B = k + k_bias, C = q +
    q_bias, decay exp(A dt), input weight dt."""
    args, kw = make_case(6, 2, 27, 4, 3, 2, 6, 2, None, True, False, False, True)
    q, k, v, _, dt, _, _, _, angles = args
    A = -jnp.exp(jnp.linspace(-1.0, 1.0, 4))
    zeros_bias = jnp.zeros((4, 6))
    ssm0 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3, 6)))
    init = Mamba3State(jnp.zeros((2, 4, 2)), ssm0, jnp.zeros((2, 4, 6)), jnp.zeros((2, 4, 3)))
    y = mamba3_siso(
        q, k, v, dt * A, dt, jnp.full(dt.shape, 1e3), zeros_bias, zeros_bias,
        jnp.zeros_like(angles), D=kw["D"], segment_ids=kw["segment_ids"], initial_state=init,
        chunk_size=8, impl=impl,
    )  # fmt: skip
    y_ssd = ssd(
        v, dt, A, k, q, D=kw["D"], segment_ids=kw["segment_ids"], initial_state=ssm0,
        impl="reference",
    )  # fmt: skip
    assert rel_err(y, y_ssd) < 1e-13


def test_running_angle_restarts_and_stays_wrapped():
    theta = jnp.full((1, 7, 1, 1), 2.5, jnp.float64)
    starts = jnp.asarray([[False, False, False, True, False, False, False]])
    phi = running_angle(theta, starts, jnp.full((1, 1, 1), 1.0, jnp.float64))
    want = np.mod(np.array([3.5, 6.0, 8.5, 2.5, 5.0, 7.5, 10.0]), 2 * np.pi)
    np.testing.assert_allclose(phi[0, :, 0, 0], want, rtol=0, atol=1e-14)


def test_running_angle_without_angles():
    """No angle per head (Mamba-3 without rotations): an empty running angle."""
    phi = running_angle(jnp.zeros((2, 70, 3, 0)), jnp.zeros((2, 70), bool), None)
    assert phi.shape == (2, 70, 3, 0)


@pytest.mark.parametrize("l, block", [(200, 16), (130, 64), (64, 64)])
def test_running_angle_across_blocks_matches_a_loop(l, block):
    """Blocks of in-block sums plus the prefix over blocks equal the step-by-step wrapped sum
    (random resets, a start angle); the gradient through the wraps is checked numerically (sin
    of the angle is smooth across them)."""
    rng = np.random.default_rng(l)
    theta = rng.uniform(-3, 3, (2, l, 3, 2))
    starts = rng.random((2, l)) < 0.05
    starts[:, 0] = False
    angle0 = rng.uniform(0, 2 * np.pi, (2, 3, 2))
    want, phi = np.zeros_like(theta), angle0.copy()
    for t in range(l):
        phi = np.mod(np.where(starts[:, t, None, None], 0, phi) + theta[:, t], 2 * np.pi)
        want[:, t] = phi
    got = running_angle(jnp.asarray(theta), jnp.asarray(starts), jnp.asarray(angle0), block)
    assert float(jnp.min(got)) >= 0 and float(jnp.max(got)) < 2 * np.pi
    np.testing.assert_allclose(np.exp(1j * np.asarray(got)), np.exp(1j * want), atol=1e-12)
    smooth = lambda t, a0: jnp.sin(running_angle(jnp.asarray(t), jnp.asarray(starts), a0, block))
    check_grads(smooth, (jnp.asarray(theta), jnp.asarray(angle0)), order=1, modes=["rev"])


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_low_precision_chunked_near_reference(dtype, tol):
    """float32 / bfloat16 inputs: y in the input dtype, states in float32, close to the float64
    reference."""
    case = CASES[0]
    args, kw = make(7, case)
    ref_y, ref_final = run("reference", case, args, kw)
    low = lambda t: t.astype(dtype) if t.dtype == jnp.float64 else t
    y, final = run("chunked", case, [low(a) for a in args], jax.tree.map(low, kw))
    assert y.dtype == dtype and final.ssm.dtype == jnp.float32
    assert rel_err(y, ref_y) < tol and rel_err(final.ssm, ref_final.ssm) < tol


def test_auto_is_chunked_on_cpu():
    case = CASES[1]
    args, kw = make(8, case)
    np.testing.assert_array_equal(run("auto", case, args, kw)[0], run("chunked", case, args, kw)[0])


def test_input_errors_name_the_argument():
    args, kw = make_case(9, 1, 5, 2, 2, 1, 4, 2, None, True, True, True, True)
    q, k, v, adt, dt, trap, qb, kb, angles = args

    def call(**over):
        a = {"q": q, "k": k, "v": v, "adt": adt, "dt": dt, "trap": trap}
        a |= {"q_bias": qb, "k_bias": kb, "angles": angles}
        extra = {key: over.pop(key) for key in list(over) if key not in a}
        return mamba3_siso(**{**a, **over}, **extra)

    with pytest.raises(ValueError, match="mamba3_siso: k has shape"):
        call(k=k[..., :2])
    with pytest.raises(ValueError, match="dt has shape"):
        call(dt=dt[:, :, :1])
    with pytest.raises(ValueError, match="q_bias has shape"):
        call(q_bias=qb[:1])
    with pytest.raises(ValueError, match="at most d_state / 2"):
        call(angles=jnp.zeros((1, 5, 2, 3)))
    with pytest.raises(ValueError, match="groups, which must divide"):
        call(q=jnp.zeros((1, 5, 3, 4)), k=jnp.zeros((1, 5, 3, 4)))
    with pytest.raises(ValueError, match="initial_state.ssm has shape"):
        call(initial_state=kw["initial_state"]._replace(ssm=jnp.zeros((1, 2, 2, 3))))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        call(segment_ids=jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="unknown impl 'triton'"):
        call(impl="triton")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        call(chunk_size=0)
    ones = jnp.ones((2, 1, 2))
    with pytest.raises(ValueError, match="mamba3_mimo: q has shape"):
        mamba3_mimo(*args, ones, ones, ones)
    with pytest.raises(ValueError, match="z needs mimo_z"):
        mamba3_mimo(q[:, :, None], k[:, :, None], *args[2:6], qb[:, None], kb[:, None], angles,
                    ones, None, ones, z=kw["z"])  # fmt: skip
