"""`python -m hybridjax.bench grouped_matmul`: median forward and forward+backward times of the
MoE layer's grouped matmul (M, K) x (E, K, N) -> (M, N), ours against the JAX peers.

Ours: `hybridjax.ops.grouped_matmul` with impl ragged_dot (`jax.lax.ragged_dot`), mgpu (jax's
Mosaic GPU kernels with our VJP), persistent (mgpu with our persistent forward kernel) and padded
(one batched matmul over capacity buffers; only when named). Peers, when importable on a Hopper
GPU: jax-linear-attention's Mosaic GPU `ragged_dot` (pip install jax-linear-attention) and tokamax's `ragged_dot` with its Mosaic GPU implementation
(pip install tokamax). Every impl gets the same bf16 operands and group sizes: rows routed to
experts as a router does (a multinomial draw over E equally likely experts, so sizes differ by a
few percent), sorted by expert. Forward+backward is one vjp with a random cotangent and
gradients for both matrices, the output returned with them. TFLOP/s counts 2MKN per matmul
(three in forward+backward). Each row's note gives its output's relative error against the
first impl's.

  python -m hybridjax.bench grouped_matmul                         # the default shapes
  python -m hybridjax.bench grouped_matmul --shapes m512,k64,n32,e8 # CPU smoke test
  python -m hybridjax.bench grouped_matmul --out bench_out
  python -m hybridjax.bench grouped_matmul --sweep --shapes m98304,k2048,n768,e64   # tilings
"""

import argparse
import functools
import importlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax.bench.grouped_matmul_sweep import sweep
from hybridjax.bench.grouped_matmul_sweep import table as sweep_table
from hybridjax.bench.ssd import (
    BenchLog,
    add_timing_args,
    forward_backward,
    median_ms,
    parse_shape,
    rel_err,
)
from hybridjax.ops.grouped_matmul import IMPLS as OP_IMPLS
from hybridjax.ops.grouped_matmul import grouped_matmul, is_hopper

# m131072 k2048 n1024 e64: a 64-expert layer's up projection; then the MoE preset's (b4 l4096,
# top-6, d_model 2048, moe_ffn 768) up/gate and down projections.
DEFAULT_SHAPES = ["m131072,k2048,n1024,e64", "m98304,k2048,n768,e64", "m98304,k768,n2048,e64"]
OURS = tuple(i for i in OP_IMPLS if i != "auto")
# peer name -> (module, function, keyword arguments)
PEERS = {
    "jax-linear-attention": ("jla.ops.mosaic_gpu.ragged_dot", "ragged_dot", {}),
    "tokamax": ("tokamax", "ragged_dot", {"implementation": "mosaic"}),
}
IMPLS = (*OURS, *PEERS)


def make_inputs(s, dtype, seed=0):
    """lhs (M, K), rhs (E, K, N) ~ N(0, 1) / sqrt(K) scale, group sizes of a uniform router."""
    m, k, n, e = (s[c] for c in "mkne")
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(k0, (m, k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(k1, (e, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    sizes = np.random.default_rng(seed).multinomial(m, np.full(e, 1.0 / e)).astype(np.int32)
    d_out = jax.random.normal(k2, (m, n), jnp.float32).astype(dtype)
    return jax.block_until_ready((lhs, rhs, jnp.asarray(sizes), d_out))


def _case(s, dtype):
    """(the shape's name, its inputs (lhs, rhs, group sizes, d_out), FLOPs of one matmul)."""
    return "m{m} k{k} n{n} e{e}".format(**s), make_inputs(s, dtype), 2 * s["m"] * s["k"] * s["n"]


def load_peer(name):
    """The peer's function with its keyword arguments bound, or a string saying why not."""
    module, fn, kwargs = PEERS[name]
    try:
        return functools.partial(getattr(importlib.import_module(module), fn), **kwargs)
    except Exception as e:  # noqa: BLE001 - report and go on without the peer
        return f"not importable ({type(e).__name__}: {str(e)[:200]}; pip install {name})"


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m hybridjax.bench grouped_matmul",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--shapes", nargs="+", default=DEFAULT_SHAPES, help="like m131072,k2048,n1024,e64"
    )
    ap.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=None,
        help="default: ragged_dot, mgpu and persistent on a Hopper GPU, and the importable peers",
    )
    add_timing_args(ap)
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="time impl mgpu's kernels over candidate tilings instead (Hopper GPU; "
        "hybridjax.bench.grouped_matmul_sweep)",
    )
    ap.add_argument(
        "--sweep-seconds",
        type=float,
        default=60.0,
        help="time spent on the candidates of each kernel and shape (default: %(default)s)",
    )
    ap.add_argument(
        "--out", default=None, metavar="DIR", help="write DIR/grouped_matmul.md (table), .log"
    )
    args = ap.parse_args(argv)

    log = BenchLog()

    shapes = [parse_shape(t, "mkne", "", "m131072,k2048,n1024,e64") for t in args.shapes]
    dtype = jnp.dtype(args.dtype)
    gpu = jax.default_backend() == "gpu"
    log(f"jax {jax.__version__}: {jax.devices()[0].device_kind}; dtype {dtype.name}")
    timing = (args.warmup, args.repeats, args.batch)
    if args.sweep:
        return _sweep(args, shapes, dtype, timing, log)
    impls = args.impls or ["ragged_dot", *["mgpu", "persistent"] * gpu, *list(PEERS) * gpu]
    fns = {}
    for impl in impls:
        if impl in PEERS:
            fn = load_peer(impl)
            if isinstance(fn, str):
                log(f"{impl}: skipped, {fn}")
                continue
        else:
            fn = functools.partial(grouped_matmul, impl=impl)
        fns[impl] = (jax.jit(fn), forward_backward(fn))

    rows = []
    for s in shapes:
        name, (lhs, rhs, sizes, d_out), flop = _case(s, dtype)
        first = None
        for impl, (fwd, fwd_bwd) in fns.items():
            try:
                t0 = time.perf_counter()
                call = functools.partial(fwd, lhs, rhs, sizes)
                y = jax.block_until_ready(call())
                compile_s = time.perf_counter() - t0
                f_ms = median_ms(call, jax.block_until_ready, *timing)
                fb_ms = None
                if not args.no_backward:
                    # the output and the gradients of both matrices
                    call = functools.partial(fwd_bwd, (lhs, rhs), d_out, sizes)
                    jax.block_until_ready(call())
                    fb_ms = median_ms(call, jax.block_until_ready, *timing)
            except Exception as e:  # noqa: BLE001 - one failing impl must not end the table
                log(f"{name}  {impl}: failed ({type(e).__name__}: {str(e)[:300]})")
                continue
            y = np.asarray(y.astype(jnp.float32))
            if first is None:
                first, y_first, note = impl, y, "the output the others are compared with"
            else:
                rel = rel_err(y, y_first)
                note = f"vs {first}: rel.err {rel:.1e}" + (" MISMATCH" if rel > 1e-2 else "")
            f_tf = flop / f_ms * 1e-9
            fb_tf = None if fb_ms is None else 3 * flop / fb_ms * 1e-9
            rows.append((name, impl, f_ms, f_tf, fb_ms, fb_tf, note))
            log(
                f"{name}  {impl}: fwd {f_ms:.3f} ms ({f_tf:.0f} TFLOP/s)  fwd+bwd "
                + ("-" if fb_ms is None else f"{fb_ms:.3f} ms ({fb_tf:.0f} TFLOP/s)")
                + f"  (first call {compile_s:.1f} s)  {note}"
            )

    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"
    best_peer = {}
    for name, impl, _, _, fb_ms, _, _ in rows:
        if impl in PEERS and fb_ms is not None:
            best_peer[name] = min(best_peer.get(name, float("inf")), fb_ms)
    lines = [
        "| shape | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
        + "| fwd+bwd / best peer | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, impl, f_ms, f_tf, fb_ms, fb_tf, note in rows:
        peer = best_peer.get(name)
        ratio = f"{fb_ms / peer:.2f}x" if peer and fb_ms is not None else "-"
        lines.append(
            f"| {name} | {impl} | {fmt(f_ms)} | {fmt(f_tf, 0)} | {fmt(fb_ms)} | {fmt(fb_tf, 0)} "
            f"| {ratio} | {note} |"
        )
    log.table(lines, args.out, "grouped_matmul")
    return 0


def _sweep(args, shapes, dtype, timing, log):
    if not is_hopper():
        print(
            "grouped_matmul --sweep: times jax's Mosaic GPU kernels, which need an sm_90 GPU "
            f"(H100 / H200); this machine's device is {jax.devices()[0].device_kind}",
            file=sys.stderr,
        )
        return 2
    rows = []
    for s in shapes:
        rows += sweep(*_case(s, dtype), timing, args.sweep_seconds, log)
    log.table(sweep_table(rows), args.out, "grouped_matmul_sweep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
