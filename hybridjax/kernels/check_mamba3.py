"""GPU check of the Mamba-3 SISO Pallas path: `python -m hybridjax.kernels.check_mamba3`.

tests/kernels/test_mamba3_pallas.py runs the kernels in Pallas interpret mode on the CPU; this
runs them compiled, on the GPU, at medium and benchmark shapes: values and gradients of every
input (q, k, v, adt, dt, trap, both biases, angles, D, z, the initial state) of impl="pallas"
(kernel outputs poisoned to NaN first) and, as the yardstick, of impl="chunked" on the same
inputs, each against a float32 oracle (the lax.scan reference, or at long lengths the chunked
path on float32 inputs with float32 matmuls). Prints one line per case and output: relative
error (norm of the difference over the oracle's norm) and the largest absolute error; PASS when
every relative error is under the dtype's bound (the gradients that go through the cumulative
angle get a looser one in bfloat16: tests/kernels/test_mamba3_pallas.py says why) and nothing is
NaN. Also says what impl="auto" picks here.

Options: --out DIR (the log to DIR/check_mamba3.log), --cpu-dry (interpret mode, tiny shapes).
"""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax.kernels import mamba3_siso_pallas
from hybridjax.ops import Mamba3State, mamba3_siso
from hybridjax.ops.mamba3 import _auto_impl

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 2e-4, BF16: 2e-2}
TOL_THROUGH_ANGLE = {F32: 2e-4, BF16: 1e-1}
THROUGH_ANGLE = ("dangles", "ddt", "dinit.angle")
LOW = ("q", "k", "v", "z")  # in the compute dtype; the rest float32, as the layer passes them
# name: (b, l, h, p, g, n, s), dtype, with D / z / initial state / segments, oracle impl
CASES = {
    "f32_feats": ((2, 2048, 8, 64, 2, 128, 32), F32, True, "reference"),
    "bf16_feats": ((2, 2048, 8, 64, 2, 128, 32), BF16, True, "reference"),
    "bf16_bench_b4_l4096_h32": ((4, 4096, 32, 64, 1, 128, 32), BF16, False, "chunked"),
}


def inputs(seed, shape, dtype, feats):
    """Keyword arguments of mamba3_siso (segment_ids included) and cotangents (dy, d final)."""
    b, l, h, p, g, n, s = shape
    ks = iter(jax.random.split(jax.random.key(seed), 32))
    normal = lambda *sh: jax.random.normal(next(ks), sh, F32)
    cast = lambda name, t: t.astype(dtype) if name in LOW else t
    dt = jax.nn.softplus(normal(b, l, h) - 2.0)
    kw = {
        "q": normal(b, l, g, n),
        "k": normal(b, l, g, n),
        "v": normal(b, l, h, p),
        "adt": -jnp.exp(jax.random.uniform(next(ks), (b, l, h), F32, -1.0, 1.5)) * dt,
        "dt": dt,
        "trap": normal(b, l, h),
        "q_bias": 1 + 0.1 * normal(h, n),
        "k_bias": 1 + 0.1 * normal(h, n),
        "angles": normal(b, l, h, s),
    }
    if feats:
        kw |= {"D": normal(h), "z": normal(b, l, h, p)}
        kw["initial_state"] = Mamba3State(
            jax.random.uniform(next(ks), (b, h, s), F32, 0, 2 * np.pi),
            normal(b, h, p, n),
            normal(b, h, n),
            normal(b, h, p),
        )
        kw["segment_ids"] = jnp.cumsum(jax.random.bernoulli(next(ks), 3.0 / l, (b, l)), axis=1)
    kw = {name: cast(name, t) for name, t in kw.items()}
    cots = (
        normal(b, l, h, p).astype(dtype),
        Mamba3State(normal(b, h, s), normal(b, h, p, n), normal(b, h, n), normal(b, h, p)),
    )
    return kw, cots


def value_and_grads(fn, kw, cots):
    """{name: array} of y, the final state and the gradients wrt every float input."""
    seg = kw.pop("segment_ids", None)
    out, vjp = jax.vjp(lambda kw: fn(**kw, segment_ids=seg, return_final_state=True), kw)
    (grads,) = vjp(cots)
    flat = {"y": out[0], **{f"final.{k}": v for k, v in out[1]._asdict().items()}}
    for name, g in grads.items():
        if name == "initial_state":
            flat |= {f"dinit.{k}": v for k, v in g._asdict().items()}
        else:
            flat[f"d{name}"] = g
    return flat


def errors(got, want):
    """{name: (relative error, largest absolute error)}; the final angle on the circle."""
    out = {}
    for name, w in want.items():
        g, w = np.asarray(got[name], np.float64), np.asarray(w, np.float64)
        d = g - w
        if name == "final.angle":
            d = np.angle(np.exp(1j * d))
        out[name] = (np.linalg.norm(d) / max(np.linalg.norm(w), 1e-30), float(np.abs(d).max()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hybridjax.kernels.check_mamba3")
    ap.add_argument("--out", default=None, metavar="DIR")
    ap.add_argument("--cpu-dry", action="store_true", help="interpret mode at tiny shapes")
    args = ap.parse_args(argv)
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    cases = dict(CASES)
    if args.cpu_dry:
        cases = {k: ((2, 77, 2, 16, 1, 16, 4), *v[1:]) for k, v in CASES.items()}
    log(f"jax {jax.__version__} devices {jax.devices()} backend {jax.default_backend()}")
    probe = jnp.zeros((1, 64, 1, 128), BF16), jnp.zeros((1, 64, 2, 64), BF16)
    log(f"impl='auto' here picks {_auto_impl('mamba3_siso', *probe, 64)!r} (bf16 p64 n128)")
    ok = True
    for name, (shape, dtype, feats, oracle_impl) in cases.items():
        t0 = time.time()
        kw, cots = inputs(len(name), shape, dtype, feats)
        up = lambda t: jax.tree.map(
            lambda a: a.astype(F32) if jnp.issubdtype(a.dtype, jnp.floating) else a, t
        )
        pallas = functools.partial(mamba3_siso_pallas, interpret=args.cpu_dry, poison=True)
        chunked = functools.partial(mamba3_siso, impl="chunked")
        oracle = functools.partial(mamba3_siso, impl=oracle_impl)
        run = lambda fn, kw, cots: jax.jit(functools.partial(value_and_grads, fn))(kw, cots)
        got = run(pallas, kw, cots)
        with jax.default_matmul_precision("highest"):
            want = run(oracle, up(kw), up(cots))
        yard = run(chunked, kw, cots)
        errs, yard_errs = errors(got, want), errors(yard, want)
        nan = [k for k, v in got.items() if not bool(jnp.isfinite(v.astype(F32)).all())]
        passed = not nan and all(
            e < (TOL_THROUGH_ANGLE if k in THROUGH_ANGLE else TOL)[dtype]
            for k, (e, _) in errs.items()
        )
        ok &= passed
        log(
            f"{'PASS' if passed else 'FAIL'} {name} {shape} {jnp.dtype(dtype).name} vs "
            f"{oracle_impl} (float32): nan {nan or 'none'} ({time.time() - t0:.0f} s)"
        )
        for k, (rel, worst) in errs.items():
            log(
                f"    {k:<16} pallas rel {rel:.1e} max abs {worst:.1e}   "
                f"chunked rel {yard_errs[k][0]:.1e} max abs {yard_errs[k][1]:.1e}"
            )
    log(f"check_mamba3: {'ALL PASS' if ok else 'SOME FAIL'}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "check_mamba3.log"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
