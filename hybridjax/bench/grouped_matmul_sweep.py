"""`python -m hybridjax.bench grouped_matmul --sweep`: jax's Mosaic GPU grouped-matmul kernels
over candidate tilings, against the tiling `hybridjax.ops.grouped_matmul` picks (ours).

For each shape it times the three kernels of impl "mgpu" — the forward (out = lhs rhs[e]), the
lhs gradient (d_out rhs[e]^T, the forward kernel on the transposed weight) and the weight
gradient (lhs[group e]^T d_out[group e]) — with ours first, then candidates until
`--sweep-seconds` run out: accumulator tiles of at most 128 x 128 floats per warpgroup, 64- or
128-wide contraction steps, 3 to 6 steps in flight, and the column swizzles that divide the
output's column tiles, within a Hopper block's shared memory. Candidates that do not compile are
counted and skipped. Each row gives the median time, TFLOP/s, the time relative to ours, and the largest
difference from our output relative to its largest magnitude (0 for a tiling that only reorders
the same sums). Hopper GPUs only.
"""

import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax.bench.ssd import median_ms
from hybridjax.ops.grouped_matmul import MGPU_WGRAD_TILING, mgpu_forward_tiling

TILES = ((128, 128), (128, 64), (64, 256), (64, 128), (64, 64))  # (block_m, block_n), largest first
BLOCK_K = (64, 128)
STEPS = (5, 4, 6, 3)
SWIZZLES = (1, 2, 3, 4, 6, 8)
SHOWN = 4  # fastest candidates listed per kernel, besides ours
SMEM_BYTES = 232448  # shared memory a Hopper block may use: candidates past it are not tried


def candidates(ours: dict, out_cols: int, contraction: int, weight_gradient: bool):
    """Kernel parameter dicts: ours first, then the others that tile these sizes. For the weight
    gradient `contraction` is the lhs's width (block_m tiles it) and the swizzle is 1 or 2."""
    yield ours
    for (bm, bn), bk, steps, width in itertools.product(TILES, BLOCK_K, STEPS, SWIZZLES):
        c = {
            "block_m": bm,
            "block_n": bn,
            "block_k": bk,
            "max_concurrent_steps": steps,
            "grid_block_n": width,
        }
        if weight_gradient:
            fits = contraction % bm == 0 and out_cols % bn == 0 and width <= 2
        else:
            fits = contraction % bk == 0 and out_cols % bn == 0 and (out_cols // bn) % width == 0
        smem = 2 * (steps * (bm * bk + bk * bn) + bm * bn)  # 16-bit operand stages, output tile
        if fits and smem <= SMEM_BYTES and c != ours:
            yield c


def kernels(lhs, rhs, sizes, d_out):
    """(name, output columns, contraction, our tiling, is the weight gradient, run(tiling))."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    k, n = rhs.shape[1:]

    def rd(a, transpose, tiling):
        f = functools.partial(ragged_dot_mgpu.ragged_dot, transpose_rhs=transpose, **tiling)
        return functools.partial(jax.jit(lambda x, w, s: f(x, w, group_sizes=s)), a, rhs, sizes)

    def wgrad(tiling):
        f = functools.partial(transposed_ragged_dot_mgpu.transposed_ragged_dot, **tiling)
        return functools.partial(jax.jit(lambda x, g, s: f(x, g, group_sizes=s)), lhs, d_out, sizes)

    return (
        ("forward", n, k, mgpu_forward_tiling(n), False, lambda t: rd(lhs, False, t)),
        ("d lhs", k, n, mgpu_forward_tiling(k), False, lambda t: rd(d_out, True, t)),
        ("d rhs", n, k, MGPU_WGRAD_TILING, True, wgrad),
    )


def sweep(name, inputs, flop, timing, seconds, log):
    """Table rows (shape, kernel, tiling, ms, TFLOP/s, vs ours, max rel. diff) for one shape."""
    rows = []
    for kernel, cols, contraction, ours, is_wgrad, make in kernels(*inputs):
        timed, failed, ref = [], 0, None
        start = time.perf_counter()
        for tiling in candidates(ours, cols, contraction, is_wgrad):
            if timed and time.perf_counter() - start > seconds:
                break
            try:
                call = make(tiling)  # jitted once per tiling
                y = np.asarray(jax.block_until_ready(call()).astype(jnp.float32))
                ms = median_ms(call, jax.block_until_ready, *timing)
            except Exception:  # noqa: BLE001 - a tiling that does not compile is skipped
                failed += 1
                continue
            ref = y if ref is None else ref
            diff = float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))
            timed.append((ms, tiling, diff))
        if not timed:
            log(f"{name}  {kernel}: no tiling ran ({failed} failed)")
            continue
        ours_ms = timed[0][0] if timed[0][1] == ours else None
        log(f"{name}  {kernel}: {len(timed)} tilings timed, {failed} did not compile")
        best = sorted(timed[1:], key=lambda t: t[0])[:SHOWN]
        for i, (ms, tiling, diff) in enumerate(timed[:1] + best):
            label = "ours " if i == 0 and ours_ms is not None else ""
            vs = f"{ms / ours_ms:.2f}x" if ours_ms else "-"
            text = label + " ".join(f"{key}={v}" for key, v in tiling.items())
            rows.append((name, kernel, text, ms, flop / ms * 1e-9, vs, f"{diff:.0e}"))
            log(f"{name}  {kernel}: {ms:.3f} ms ({flop / ms * 1e-9:.0f} TFLOP/s, {vs})  {text}")
    return rows


def table(rows):
    lines = [
        "| shape | kernel | tiling | ms | TFLOP/s | vs ours | max rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, kernel, text, ms, tf, vs, diff in rows:
        lines.append(f"| {name} | {kernel} | {text} | {ms:.3f} | {tf:.0f} | {vs} | {diff} |")
    return lines
