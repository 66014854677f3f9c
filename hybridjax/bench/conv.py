"""`python -m hybridjax.bench conv`: median forward and forward+backward times of the Mamba-2
short convolution with its SiLU, `causal_conv1d(..., activation="silu")`, per implementation.

Impls: xla (the shifted-window sum left to XLA) and pallas (`hybridjax.kernels.conv1d`, the
fused conv + SiLU kernels; on a CPU backend in Pallas interpret mode, for smoke tests only).
Inputs: x ~ N(0, 1) in --dtype, kernel (K, C) and bias (C,) float32 as the model's parameters,
segment ids with --docs documents per row (boundaries drawn at random), no initial state.
Forward+backward is one vjp with a random cotangent, gradients for x, kernel and bias, the
output returned with them (`forward_backward`). Each row's note gives the relative error of its
output and gradients against the first impl's.

  python -m hybridjax.bench conv                                 # the 1B model's two convs
  python -m hybridjax.bench conv --shapes b1,l300,c40,k4 --batch 1 --repeats 1   # CPU smoke
  python -m hybridjax.bench conv --block-l 32 --block-c 256 --out bench_out
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
    median_ms,
    parse_shape,
    rel_err,
)
from hybridjax.ops.conv1d import causal_conv1d

# the 1B preset's convs: the x channels (d_inner 4096) and the B/C channels (2 * G * N = 2048)
DEFAULT_SHAPES = ["b4,l4096,c4096,k4", "b4,l4096,c2048,k4"]
IMPLS = ("xla", "pallas")


def make_inputs(s, dtype, docs, seed=0):
    """x, kernel, bias, segment ids (B, L) with `docs` documents per row, and a cotangent."""
    b, l, c, k = (s[ch] for ch in "blck")
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (b, l, c), jnp.float32).astype(dtype)
    bound = 1.0 / np.sqrt(k)
    kernel = jax.random.uniform(keys[1], (k, c), jnp.float32, -bound, bound)
    bias = jax.random.uniform(keys[2], (c,), jnp.float32, -bound, bound)
    dy = jax.random.normal(keys[3], (b, l, c), jnp.float32).astype(dtype)
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, l), np.int32)
    for row in range(b):
        n = min(docs, l) - 1
        for start in rng.choice(np.arange(1, l), size=n, replace=False) if n > 0 else ():
            seg[row, start:] += 1
    return jax.block_until_ready((x, kernel, bias, jnp.asarray(seg), dy))


def conv_fn(impl, tuning):
    """f(x, kernel, bias, segment_ids) for one impl."""
    if impl == "pallas":
        from hybridjax.kernels.conv1d import causal_conv1d_silu_pallas
        from hybridjax.ops.segments import document_index

        interpret = jax.default_backend() != "gpu"

        def f(x, kernel, bias, seg):
            doc = document_index(seg)
            return causal_conv1d_silu_pallas(
                x, kernel, bias, doc=doc, interpret=interpret, **tuning
            )

        return f
    return lambda x, kernel, bias, seg: causal_conv1d(
        x, kernel, bias, segment_ids=seg, activation="silu", impl=impl
    )


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m hybridjax.bench conv",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=DEFAULT_SHAPES,
        help="shapes like b4,l4096,c4096,k4 (default: %(default)s)",
    )
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=None, help="default: both")
    ap.add_argument("--docs", type=int, default=4, help="documents per row (default 4)")
    ap.add_argument("--block-l", type=int, default=None, help="pallas: positions per block")
    ap.add_argument("--block-c", type=int, default=None, help="pallas: channels per block")
    ap.add_argument(
        "--blocks-per-program", type=int, default=None, help="pallas: blocks per backward program"
    )
    ap.add_argument(
        "--warps",
        type=int,
        nargs=2,
        default=None,
        metavar=("FWD", "BWD"),
        help="pallas: num_warps of the forward and backward kernels",
    )
    add_timing_args(ap)
    ap.add_argument("--out", default=None, metavar="DIR", help="write DIR/conv.md (table), .log")
    args = ap.parse_args(argv)

    log = BenchLog()
    shapes = [parse_shape(t, "blck", "", "b4,l4096,c4096,k4") for t in args.shapes]
    dtype = jnp.dtype(args.dtype)
    tuning = {
        "block_l": args.block_l,
        "block_c": args.block_c,
        "blocks_per_program": args.blocks_per_program,
    }
    if args.warps:
        tuning["launch"] = (("fwd", (args.warps[0], 2)), ("bwd", (args.warps[1], 2)))
    log(
        f"jax {jax.__version__}: {jax.devices()[0].device_kind}; dtype {dtype.name}; "
        f"{args.docs} documents per row; pallas tuning {tuning}"
    )
    impls = args.impls or list(IMPLS)
    timing = (args.warmup, args.repeats, args.batch)
    rows = []
    for s in shapes:
        name = "b{b} l{l} c{c} k{k}".format(**s)
        x, kernel, bias, seg, dy = make_inputs(s, dtype, args.docs)
        first = None
        for impl in impls:
            f = conv_fn(impl, tuning)
            fwd, fwd_bwd = jax.jit(f), forward_backward(f)
            try:
                t0 = time.perf_counter()
                y = jax.block_until_ready(fwd(x, kernel, bias, seg))
                compile_s = time.perf_counter() - t0
                f_ms = median_ms(
                    functools.partial(fwd, x, kernel, bias, seg), jax.block_until_ready, *timing
                )
                fb_ms, grads = None, None
                if not args.no_backward:
                    call = functools.partial(fwd_bwd, (x, kernel, bias), dy, seg)
                    _, grads = jax.block_until_ready(call())
                    fb_ms = median_ms(call, jax.block_until_ready, *timing)
            except Exception as e:  # noqa: BLE001 - one failing impl must not end the table
                log(f"{name}  {impl}: failed ({type(e).__name__}: {str(e)[:300]})")
                continue
            outs = [y] + list(grads or ())
            outs = [np.asarray(v.astype(jnp.float32)) for v in outs]
            if first is None:
                first, outs_first = impl, outs
                note = "the output the others are compared with"
            else:
                errs = [rel_err(a, b) for a, b in zip(outs, outs_first)]
                note = f"vs {first}: rel.err " + ", ".join(
                    f"{n} {e:.1e}" for n, e in zip(("y", "dx", "dkernel", "dbias"), errs)
                )
            rows.append((name, impl, f_ms, fb_ms, note))
            log(
                f"{name}  {impl}: fwd {f_ms:.3f} ms  fwd+bwd "
                + ("-" if fb_ms is None else f"{fb_ms:.3f} ms")
                + f"  (first call {compile_s:.1f} s)  {note}"
            )

    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    base = {}
    for name, impl, f_ms, fb_ms, _ in rows:
        base.setdefault(name, (f_ms, fb_ms))
    lines = [
        "| shape | impl | fwd ms | fwd+bwd ms | fwd / first | fwd+bwd / first | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, impl, f_ms, fb_ms, note in rows:
        bf, bfb = base[name]
        rf = f"{f_ms / bf:.2f}x"
        rfb = "-" if fb_ms is None or bfb is None else f"{fb_ms / bfb:.2f}x"
        lines.append(f"| {name} | {impl} | {fmt(f_ms)} | {fmt(fb_ms)} | {rf} | {rfb} | {note} |")
    log.table(lines, args.out, "conv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
