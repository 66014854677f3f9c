"""The Mamba-3 SISO scan through the Pallas SSD kernels (`hybridjax.kernels.mamba3`), in
interpret mode on the CPU, against the float64 lax.scan reference of `hybridjax.ops.mamba3_siso`:
values and gradients with respect to every input (q, k, v, adt, dt, trap, both biases, angles, D,
z and the four arrays of the initial state), float32 and bfloat16, with poisoned kernel outputs
(an element a kernel never writes stays NaN); odd lengths, groups, segment resets (at a chunk's
first position, a superchunk's, mid-chunk), two halves against the whole, per device under a
mesh, the calls it refuses, and the lowering for CUDA (forward and backward), from the CPU."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax.kernels import mamba3 as pallas_mamba3
from hybridjax.kernels import mamba3_pallas_unsupported_reason, mamba3_siso_pallas
from hybridjax.ops import Mamba3State, mamba3_mimo, mamba3_siso
from hybridjax.sharding import make_mesh
from tests.kernels._lowering import triton_operand_shapes
from tests.kernels.test_ssd_pallas import segments

F32, BF16, F64 = jnp.float32, jnp.bfloat16, jnp.float64
# Relative error bounds (norm of the difference over the reference's norm) per input dtype.
# Measured worst cases over these cases: float32 1.2e-6, bfloat16 5.3e-3 (d q_bias).
TOL = {F32: 2e-5, BF16: 1e-2}
# In bfloat16 the gradients that flow through the cumulative angle are further off (measured
# 2.2e-2 for d angles, 1.5e-2 for the initial angle, 1.3e-2 for d dt): y depends on angle
# differences only, so the per-step terms dq~ . J q~ + dk~ . J k~ cancel pairwise in the reverse
# cumulative sum that gives d angles, and the kernels' bfloat16 operands leave dq~ and dk~
# rounded apart. mamba_ssm's Triton kernel forms it the same way (dtheta = dq.Jq + dk.Jk, then a
# reverse cumsum); float32 shows the formula itself is exact (1e-6).
THROUGH_ANGLE = ("d['angles']", "d['dt']", "d['initial_state'].angle")
TOL_THROUGH_ANGLE = {F32: 2e-5, BF16: 5e-2}
# Inputs that run in the layer's compute dtype (the rest stay float32, as the layer passes them).
LOW = ("q", "k", "v", "z")


def make_inputs(seed, b, l, h, p, g, n, s, dtype, *, with_D=True, with_z=True, with_init=True):
    """Float inputs of mamba3_siso as a dict (the initial state a Mamba3State) and cotangents
    for y and the final state. q, k, v, z in dtype, the rest in float32. k and q get a shared
    component so that q~ . k~ is large, as with the layer's RMS-normed B, C plus bias 1: the
    diagonal correction then removes a large term."""
    rng = np.random.default_rng(seed)
    arr = lambda a, name="": jnp.asarray(a, F32).astype(dtype if name in LOW else F32)
    normal = lambda *shape: rng.standard_normal(shape)
    dt = np.log1p(np.exp(normal(b, l, h) - 1.0))
    fl = {
        "q": arr(normal(b, l, g, n) + 0.5, "q"),
        "k": arr(normal(b, l, g, n) + 0.5, "k"),
        "v": arr(normal(b, l, h, p), "v"),
        "adt": arr(-np.exp(rng.uniform(-1.0, 1.0, (b, l, h))) * dt),
        "dt": arr(dt),
        "trap": arr(2.0 * normal(b, l, h)),
        "q_bias": arr(normal(h, n)),
        "k_bias": arr(normal(h, n)),
        "angles": arr(normal(b, l, h, s)),
    }
    if with_D:
        fl["D"] = arr(normal(h))
    if with_z:
        fl["z"] = arr(normal(b, l, h, p), "z")
    if with_init:
        fl["initial_state"] = Mamba3State(
            arr(rng.uniform(0, 2 * np.pi, (b, h, s))),
            arr(normal(b, h, p, n)),
            arr(normal(b, h, n)),
            arr(normal(b, h, p)),
        )
    cots = (
        arr(normal(b, l, h, p), "v"),
        Mamba3State(
            arr(normal(b, h, s)),
            arr(normal(b, h, p, n)),
            arr(normal(b, h, n)),
            arr(normal(b, h, p)),
        ),
    )
    return fl, cots


def value_and_grads(fn, fl, seg, cots):
    out, vjp = jax.vjp(lambda fl: fn(**fl, segment_ids=seg, return_final_state=True), fl)
    (grads,) = vjp(cots)
    return out, grads


def up(tree):
    return jax.tree.map(lambda a: a.astype(F64), tree)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


def angle_err(got, want):
    """Distance on the circle (a final angle may wrap on either side of 2 pi)."""
    return float(np.abs(np.angle(np.exp(1j * (np.asarray(got) - np.asarray(want))))).max())


def named(tree, prefix):
    """{"prefix.path": leaf} of a dict / Mamba3State tree, to name errors."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {prefix + jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def errors(out, grads, out_r, grads_r):
    (y, final), (y_r, final_r) = out, out_r
    errs = {"y": rel_err(y, y_r), "final.angle": angle_err(final.angle, final_r.angle)}
    for name in ("ssm", "k", "v"):
        errs[f"final.{name}"] = rel_err(getattr(final, name), getattr(final_r, name))
    g, g_r = named(grads, "d"), named(grads_r, "d")
    errs.update({k: rel_err(g[k], g_r[k]) for k in g_r})
    return errs


# id: (b, l, h, p, g, n, s), dtype, segment starts per row (None: no segment_ids), tuning.
# chunk_size=16 gives chunks of 16 positions.
CASES = {
    # l=77 pads to 2 superchunks of 64 with windows of 32; resets at position 1, at a chunk's
    # first position (16), a window's (32), the second superchunk's (64), mid-chunk (50, 70);
    # two heads per group; s < n/2 leaves channels unrotated
    "f32_all": (
        (2, 77, 4, 16, 2, 32, 5),
        F32,
        [[1, 16, 64], [32, 50, 70]],
        {"chunk_size": 16, "superchunks": 2, "window": 32},
    ),
    "bf16_all": (
        (2, 77, 4, 32, 2, 16, 8),
        BF16,
        [[1, 16, 64], [32, 50, 70]],
        {"chunk_size": 16, "superchunks": 2, "window": 32},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case):
    (b, l, h, p, g, n, s), dtype, starts, kw = CASES[case]
    fl, cots = make_inputs(zlib.crc32(case.encode()), b, l, h, p, g, n, s, dtype)
    seg = None if starts is None else segments(b, l, starts)
    kern = functools.partial(mamba3_siso_pallas, interpret=True, poison=True, **kw)
    ref = functools.partial(mamba3_siso, chunk_size=16, impl="reference")
    out, grads = jax.jit(lambda fl, seg, cots: value_and_grads(kern, fl, seg, cots))(fl, seg, cots)
    out_r, grads_r = jax.jit(lambda fl, seg, cots: value_and_grads(ref, fl, seg, cots))(
        up(fl), seg, up(cots)
    )
    y, final = out
    assert y.dtype == dtype and y.shape == (b, l, h, p)
    assert all(t.dtype == F32 for t in final)
    assert [t.shape for t in final] == [t.shape for t in out_r[1]]
    for k, leaf in named(fl, "d").items():
        got = named(grads, "d")[k]
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, k
    nonfinite = [k for k, v in named((out, grads), "").items() if not bool(jnp.isfinite(v).all())]
    assert not nonfinite, f"non-finite (unwritten) elements in {nonfinite}"
    errs = errors(out, grads, out_r, grads_r)
    shown = {k: f"{v:.1e}" for k, v in errs.items()}
    assert all(errs.pop(k) < TOL_THROUGH_ANGLE[dtype] for k in THROUGH_ANGLE), shown
    assert max(errs.values()) < TOL[dtype], shown


def test_two_halves_equal_the_whole():
    """The second call started from the first's final state equals one call over the whole
    sequence and the float64 reference (documents crossing the cut; the default chunk, 64, so
    each half is one padded chunk; one group for all heads; every pair rotated)."""
    b, l, h, p, g, n, s = 2, 70, 4, 16, 1, 16, 8
    fl, _ = make_inputs(3, b, l, h, p, g, n, s, F32)
    seg = segments(b, l, [[5, 50], [12]])
    kern = jax.jit(
        lambda fl, seg: mamba3_siso_pallas(
            **fl, segment_ids=seg, interpret=True, poison=True, return_final_state=True
        )
    )
    y, final = kern(fl, seg)
    y_r, final_r = mamba3_siso(**up(fl), segment_ids=seg, return_final_state=True, impl="reference")
    assert rel_err(y, y_r) < TOL[F32] and rel_err(final.ssm, final_r.ssm) < TOL[F32]
    cut = l // 2  # halves of one shape: one compile for both
    half = lambda a, sl: a[:, sl] if a.shape[:2] == (b, l) else a
    first, second = (
        jax.tree.map(lambda a, sl=sl: half(a, sl), fl) for sl in (np.s_[:cut], np.s_[cut:])
    )
    y1, mid = kern(first, seg[:, :cut])
    y2, final2 = kern({**second, "initial_state": mid}, seg[:, cut:])
    assert rel_err(jnp.concatenate([y1, y2], 1), y) < 1e-5
    assert angle_err(final2.angle, final.angle) < 1e-5
    for got, want in zip(final2[1:], final[1:]):
        assert rel_err(got, want) < 1e-5


def test_per_device_under_a_mesh_equals_whole_arrays():
    """Rows over data and fsdp, heads over tensor (one group: each device takes it from the
    whole q and k; the lowering test below splits groups with the heads): values and gradients
    as close to the float64 reference as without a mesh."""
    b, l, h, p, g, n, s = 4, 40, 4, 16, 1, 16, 4
    fl, cots = make_inputs(4, b, l, h, p, g, n, s, F32)
    seg = segments(b, l, [[3, 20]] * b)
    kern = functools.partial(mamba3_siso_pallas, chunk_size=16, interpret=True, superchunks=1)
    ref = functools.partial(mamba3_siso, chunk_size=16, impl="reference")
    out_r, grads_r = jax.jit(lambda fl, seg, cots: value_and_grads(ref, fl, seg, cots))(
        up(fl), seg, up(cots)
    )
    with jax.set_mesh(make_mesh(data=2, tensor=2, fsdp=2)):
        out, grads = jax.jit(lambda fl, seg, cots: value_and_grads(kern, fl, seg, cots))(
            fl, seg, cots
        )
    errs = errors(out, grads, out_r, grads_r)
    assert max(errs.values()) < TOL[F32], {k: f"{v:.1e}" for k, v in errs.items()}


def test_refusals():
    fl, _ = make_inputs(0, 1, 20, 2, 16, 1, 16, 2, F32)
    # the CPU: supported by the kernels, but no GPU backend
    with pytest.raises(ValueError, match="impl='pallas'.*needs a GPU backend"):
        mamba3_siso(**fl, impl="pallas")
    assert mamba3_pallas_unsupported_reason(fl["q"], fl["v"], interpret=True) is None
    bad = {
        "float64": (fl["q"], fl["v"].astype(F64), "v dtype float64 is not supported"),
        "p24": (fl["q"], jnp.zeros((1, 20, 2, 24), F32), "head_dim p=24 is not supported"),
        "n8": (jnp.zeros((1, 20, 1, 8), F32), fl["v"], "d_state n=8 is not supported"),
    }
    for q, v, message in bad.values():
        assert message in mamba3_pallas_unsupported_reason(q, v, interpret=True)
    with jax.set_mesh(make_mesh(data=2, context=4)):
        reason = mamba3_pallas_unsupported_reason(
            jnp.zeros((2, 64, 1, 16), F32), jnp.zeros((2, 64, 2, 16), F32), interpret=True
        )
    assert "splits the sequence" in reason
    mimo = (jnp.zeros((1, 4, 1, 1, 16)),) * 2 + (jnp.zeros((1, 4, 2, 16)),)
    mimo += (jnp.zeros((1, 4, 2)),) * 3 + (jnp.zeros((2, 1, 16)),) * 2 + (jnp.zeros((1, 4, 2, 2)),)
    mimo += (jnp.ones((2, 1, 16)),) * 3
    with pytest.raises(ValueError, match="impl='pallas' is SISO only"):
        mamba3_mimo(*mimo, impl="pallas")


@pytest.mark.parametrize(
    "dtype,p,n,features,mesh",
    [
        (BF16, 64, 128, True, None),  # the benchmark's head and state sizes
        (F32, 32, 64, False, None),
        (BF16, 64, 64, True, {"data": 2, "fsdp": 2, "tensor": 2}),
    ],
)
def test_forward_and_backward_lower_for_cuda(monkeypatch, dtype, p, n, features, mesh):
    # The support check refuses a CPU backend; lowering for CUDA needs no GPU.
    monkeypatch.setattr(pallas_mamba3, "backend_reason", lambda *a, **k: None)
    b, l, h, g, s = 8, 500, 4, 2, n // 4
    arrays = {
        "q": jnp.zeros((b, l, g, n), dtype),
        "k": jnp.zeros((b, l, g, n), dtype),
        "v": jnp.zeros((b, l, h, p), dtype),
        "adt": jnp.full((b, l, h), -0.1),
        "dt": jnp.full((b, l, h), 0.1),
        "trap": jnp.zeros((b, l, h)),
        "q_bias": jnp.ones((h, n)),
        "k_bias": jnp.ones((h, n)),
        "angles": jnp.zeros((b, l, h, s)),
    }
    seg = None
    if features:
        arrays |= {"D": jnp.ones((h,)), "z": jnp.zeros((b, l, h, p), dtype)}
        arrays["initial_state"] = Mamba3State(
            jnp.zeros((b, h, s)),
            jnp.zeros((b, h, p, n)),
            jnp.zeros((b, h, n)),
            jnp.zeros((b, h, p)),
        )
        seg = jnp.zeros((b, l), jnp.int32)

    def loss(arrays):
        y, final = mamba3_siso(
            **arrays, segment_ids=seg, chunk_size=64, return_final_state=True, impl="pallas"
        )
        return y.astype(F32).sum() + sum(t.sum() for t in final)

    def lower():
        return jax.jit(jax.grad(loss)).trace(arrays).lower(lowering_platforms=("cuda",)).as_text()

    if mesh is None:
        text = lower()
    else:
        mesh = make_mesh(**mesh)
        rows = NamedSharding(mesh, P(("data", "fsdp", "expert")))
        by_row = lambda v: jax.device_put(v, rows) if v.shape[:1] == (b,) else v
        arrays = jax.tree.map(by_row, arrays)
        with jax.set_mesh(mesh):
            text = lower()
        # every kernel sees its device's 2 rows (of 8) and 2 heads (of 4), never the whole batch
        shapes = triton_operand_shapes(text)
        assert shapes and all(s.startswith("2x") for s in shapes), shapes
        assert f"2x512x2x{p}" in shapes  # v's local block, padded to whole chunks
    # one custom call per kernel launch: forward, state, dc and dx kernels all lowered
    assert text.count("__gpu$xla.gpu.triton") >= 4
