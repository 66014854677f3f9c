"""`python -m hybridjax.bench mamba3`: median forward and forward+backward times of the Mamba-3
SISO scan, ours against mamba_ssm's Triton kernels.

For each shape, `hybridjax.ops.mamba3_siso` with impl chunked (XLA) and pallas (GPU; with
--interpret also on the CPU, in Pallas interpret mode), reference at small shapes or when named,
and, when importable on a CUDA machine, mamba-ssm 2.3.2's official Triton SISO kernel
(`mamba_ssm.ops.triton.mamba3.mamba3_siso_combined`), with the ratio to it. bf16 by default,
with D and z, as the Mamba-3 module calls it: q, k (RMS-normed in the layer, here N(0, 1)) with
one group (its ngroups=1) and biases 1 (their init), rope_fraction 0.5 (n/4 angles per head),
chunk 64 (its default). Every impl gets the same inputs: q, k, v, z, trap and angles in the
dtype (mamba_ssm casts trap and angles to bf16 itself), adt, dt, biases and D in float32 (its
ADT, DT are (b, h, l): the same values transposed). Forward+backward is one vjp with a random
cotangent, the output and gradients for every input (the peer: torch.autograd.grad over the
same inputs).
Each row's note gives its y's relative and largest absolute error against the peer's y (else
against the first impl's): a check that both compute the same scan.

  python -m hybridjax.bench mamba3                                # the default shapes, bf16
  python -m hybridjax.bench mamba3 --shapes b1,l256,h4,p16,n16    # CPU smoke test
  python -m hybridjax.bench mamba3 --impls pallas mamba_ssm --out bench_out
"""

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax.bench.ssd import (
    BenchLog,
    add_timing_args,
    forward_backward,
    load_mamba,
    median_ms,
    parse_shape,
    to_torch,
)
from hybridjax.ops import mamba3_siso

# the peer's figures on one H200 (fwd / fwd+bwd ms): 0.954 / 2.774, 11.83 / 28.51, 1.72 / 5.03
DEFAULT_SHAPES = [
    "b4,l4096,h32,p64,n128",
    "b1,l65536,h32,p64,n128",
    "b4,l4096,h64,p64,n128",
]
IMPLS = ("reference", "chunked", "pallas", "mamba_ssm")
SLOW_LIMIT = 2**22  # b*l*h*p*n above which reference runs only when named
CHUNK = 64
PEER = ("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined", "mamba3_siso_combined")
# The argument order of mamba3_siso, the inputs every impl differentiates.
NAMES = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z")


def make_inputs(s, dtype, seed=0):
    """The scan's inputs as the Mamba-3 layer makes them (module docstring), by name."""
    b, l, h, p, n, g, na = (s[c] for c in "blhpngs")
    k = jax.random.split(jax.random.key(seed), 8)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
    dt = jnp.exp(jax.random.uniform(k[3], (b, l, h), jnp.float32, np.log(1e-3), np.log(0.1)))
    A = -jax.random.uniform(k[4], (b, l, h), jnp.float32, 1.0, 16.0)
    x = {
        "q": normal(k[0], (b, l, g, n)).astype(dtype),
        "k": normal(k[1], (b, l, g, n)).astype(dtype),
        "v": normal(k[2], (b, l, h, p)).astype(dtype),
        "adt": A * dt,
        "dt": dt,
        "trap": normal(k[5], (b, l, h)).astype(dtype),
        "q_bias": jnp.ones((h, n), jnp.float32),
        "k_bias": jnp.ones((h, n), jnp.float32),
        "angles": normal(k[6], (b, l, h, na)).astype(dtype),
        "D": jnp.ones((h,), jnp.float32),
        "z": normal(k[7], (b, l, h, p)).astype(dtype),
    }
    return jax.block_until_ready(x)


def jax_fns(impl, interpret):
    """Jitted forward and forward+backward (the vjp wrt every input) of one impl."""
    if impl == "pallas" and interpret:
        from hybridjax.kernels import mamba3_siso_pallas

        scan = functools.partial(mamba3_siso_pallas, interpret=True)
    else:
        scan = functools.partial(mamba3_siso, impl=impl)

    def f(x):
        return scan(*(x[k] for k in NAMES[:9]), D=x["D"], z=x["z"], chunk_size=CHUNK)

    fwd_bwd = forward_backward(f)
    return jax.jit(f), lambda x, dy: fwd_bwd((x,), dy)


def bench_peer(scan, x, dy, timing):
    """mamba3_siso_combined on the same inputs: (fwd ms, fwd+bwd ms, y as float32 numpy)."""
    import torch

    t = {k: to_torch(v) for k, v in x.items()}
    for name in ("adt", "dt", "trap"):  # mamba_ssm takes these as (b, h, l)
        t[name] = t[name].transpose(1, 2).contiguous()
    dy_t = to_torch(dy)
    sync = lambda _: torch.cuda.synchronize()

    def call(a):
        return scan(
            a["q"], a["k"], a["v"], a["adt"], a["dt"], a["trap"], a["q_bias"], a["k_bias"],
            a["angles"], D=a["D"], Z=a["z"], chunk_size=CHUNK,
        )  # fmt: skip

    with torch.no_grad():
        fwd_ms = median_ms(lambda: call(t), sync, *timing)
        y = call(t).float().cpu().numpy()
    leaves = {k: v.detach().requires_grad_(True) for k, v in t.items()}

    def fwd_bwd():
        return torch.autograd.grad(call(leaves), list(leaves.values()), dy_t)

    return fwd_ms, median_ms(fwd_bwd, sync, *timing), y


def errors(y, want):
    """(relative error, largest absolute error) of y against want, in float64."""
    y, want = np.asarray(y, np.float64), np.asarray(want, np.float64)
    rel = float(np.linalg.norm(y - want) / max(np.linalg.norm(want), 1e-30))
    return rel, float(np.max(np.abs(y - want)))


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m hybridjax.bench mamba3",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=DEFAULT_SHAPES,
        help="shapes like b4,l4096,h32,p64,n128 [,g1 groups] [,s32 angles per head: n/4 unless "
        "given] (default: %(default)s)",
    )
    ap.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=None,
        help="default: chunked, pallas on GPU (or with --interpret), mamba_ssm when importable, "
        f"and reference when b*l*h*p*n <= {SLOW_LIMIT}",
    )
    ap.add_argument(
        "--interpret", action="store_true", help="pallas in Pallas interpret mode (CPU tests)"
    )
    add_timing_args(ap)
    ap.add_argument(
        "--out", default=None, metavar="DIR", help="write DIR/mamba3.md (table), mamba3.log"
    )
    args = ap.parse_args(argv)

    log = BenchLog()

    shapes = []
    for text in args.shapes:
        s = parse_shape(text, "blhpn", "gs", "b4,l4096,h32,p64,n128")
        shapes.append({"g": 1, "s": s["n"] // 4, **s})
    dtype = jnp.dtype(args.dtype)
    backend = jax.default_backend()
    log(f"jax {jax.__version__} on {backend}: {jax.devices()[0].device_kind}; dtype {dtype.name}")
    peer_fn = None
    if args.impls is None or "mamba_ssm" in args.impls:
        peer_fn = load_mamba(*PEER)
        if isinstance(peer_fn, str):
            log(f"mamba_ssm: skipped ({peer_fn})")
            peer_fn = None

    timing = (args.warmup, args.repeats, args.batch)
    rows = []
    for s in shapes:
        name = "b{b} l{l} h{h} p{p} n{n} g{g} s{s}".format(**s)
        x = make_inputs(s, dtype)
        dy = jax.random.normal(jax.random.key(1), x["v"].shape, dtype)
        impls = args.impls
        if impls is None:
            small = s["b"] * s["l"] * s["h"] * s["p"] * s["n"] <= SLOW_LIMIT
            impls = ["reference"] * small + ["chunked"]
            impls += ["pallas"] * (backend == "gpu" or args.interpret) + ["mamba_ssm"]
        y_first, first = None, None
        if peer_fn is not None and "mamba_ssm" in impls:
            try:
                f_ms, fb_ms, y_first = bench_peer(peer_fn, x, dy, timing)
                first = "mamba_ssm"
                fb_ms = None if args.no_backward else fb_ms
                rows.append((name, "mamba_ssm", f_ms, fb_ms, "the peer"))
                log(f"{name}  mamba_ssm: fwd {f_ms:.3f} ms  fwd+bwd {fb_ms:.3f} ms")
            except Exception as e:  # noqa: BLE001 - one failing impl must not end the table
                log(f"{name}  mamba_ssm: failed ({type(e).__name__}: {str(e)[:300]})")
        for impl in impls:
            if impl == "mamba_ssm":
                continue
            try:
                fwd, fwd_bwd = jax_fns(impl, args.interpret)
                t0 = time.perf_counter()
                y = jax.block_until_ready(fwd(x))
                compile_s = time.perf_counter() - t0
                f_ms = median_ms(functools.partial(fwd, x), jax.block_until_ready, *timing)
                fb_ms = None
                if not args.no_backward:
                    jax.block_until_ready(fwd_bwd(x, dy))
                    fb_ms = median_ms(
                        functools.partial(fwd_bwd, x, dy), jax.block_until_ready, *timing
                    )
            except Exception as e:  # noqa: BLE001
                log(f"{name}  {impl}: failed ({type(e).__name__}: {str(e)[:300]})")
                continue
            y = np.asarray(y.astype(jnp.float32))
            if y_first is None:
                y_first, first, note = y, impl, "the y the others are compared with"
            else:
                rel, worst = errors(y, y_first)
                flag = "" if rel < 2e-2 else " MISMATCH"
                note = f"y vs {first}: rel.err {rel:.1e}, max abs err {worst:.1e}{flag}"
            rows.append((name, impl, f_ms, fb_ms, note))
            fb_text = "-" if fb_ms is None else f"{fb_ms:.3f} ms"
            log(
                f"{name}  {impl}: fwd {f_ms:.3f} ms  fwd+bwd {fb_text}  "
                f"(first call {compile_s:.1f} s)  {note}"
            )
        del x, dy

    peers = {r[0]: r for r in rows if r[1] == "mamba_ssm"}
    lines = [
        "| shape | impl | fwd ms | fwd+bwd ms | fwd / mamba_ssm | fwd+bwd / mamba_ssm | note |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for name, impl, f_ms, fb_ms, note in rows:
        p = peers.get(name)
        rf = f"{f_ms / p[2]:.2f}x" if p else "-"
        rfb = f"{fb_ms / p[3]:.2f}x" if p and fb_ms is not None and p[3] else "-"
        lines.append(f"| {name} | {impl} | {fmt(f_ms)} | {fmt(fb_ms)} | {rf} | {rfb} | {note} |")
    log.table(lines, args.out, "mamba3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
