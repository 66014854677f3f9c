"""`python -m hybridjax.bench attention`: median forward and forward+backward times of causal
attention (`hybridjax.ops.attention`), one document per row and packed documents.

Implementations: cudnn (packed rows through its document offsets, `ops.attention_cudnn`),
pallas (GPU) and blockwise under both masks; xla (dense, quadratic memory) only when named.
Timing as `bench ssd`: medians of batches of back-to-back calls; forward+backward is one vjp
with a random cotangent (the output and gradients for q, k and v). TFLOP/s count the mask's
allowed (query, key) pairs only: forward 4 * B * Hq * D * pairs, forward+backward 3.5 times
that (FlashAttention's convention).
"temp GiB" is XLA's planned temporary memory of the compiled forward+backward.

  python -m hybridjax.bench attention --out DIR                     # b1 l16384/65536 h16 kv8 d128
  python -m hybridjax.bench attention --blocks 512 1024 2048 --pallas-bwd-blocks 32 64 128
  python -m hybridjax.bench attention --shapes b1,l1024,h4,k2,d32 --dtype float32   # CPU smoke
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax.bench.ssd import add_timing_args, forward_backward, median_ms, rel_err
from hybridjax.ops.attention import IMPLS, attention, blockwise_attention, pallas_attention

DEFAULT_SHAPES = ["b1,l16384,h16,k8,d128", "b1,l65536,h16,k8,d128"]
ALL_IMPLS = tuple(i for i in IMPLS if i != "auto")
GIB = 2**30


def parse_shape(text):
    dims = {}
    for tok in text.replace(" ", "").split(","):
        if len(tok) < 2 or tok[0] not in "blhkd" or not tok[1:].isdigit():
            raise ValueError(
                f"--shapes: bad token {tok!r} in {text!r}; want e.g. "
                "b1,l16384,h16,k8,d128 (batch, length, heads, kv heads, head_dim)"
            )
        dims[tok[0]] = int(tok[1:])
    missing = [c for c in "blhkd" if c not in dims]
    if missing:
        raise ValueError(f"--shapes: {text!r} lacks {', '.join(missing)} (need b, l, h, k, d)")
    return dims


def segment_ids(s, doc_len):
    """Documents of doc_len tokens (the last one shorter), the same in every row."""
    return jnp.broadcast_to(jnp.arange(s["l"], dtype=jnp.int32) // doc_len, (s["b"], s["l"]))


def allowed_pairs(length, doc_len):
    sizes = [doc_len] * (length // doc_len) + ([length % doc_len] if length % doc_len else [])
    return sum(n * (n + 1) // 2 for n in sizes)


def variants(impls, blocks, pallas_bwd_blocks):
    """(label, impl, keyword arguments of its function) per row."""
    rows = []
    for impl in impls:
        if impl == "blockwise" and blocks:
            rows += [(f"blockwise {n}", impl, {"block_q": n, "block_k": n}) for n in blocks]
        elif impl == "pallas" and pallas_bwd_blocks:
            rows += [(f"pallas bwd {n}", impl, {"block_bwd": n}) for n in pallas_bwd_blocks]
        else:
            rows.append((impl, impl, {}))
    return rows


def jax_fns(impl, kw, seg):
    def f(q, k, v):
        if impl == "blockwise" and kw:
            return blockwise_attention(q, k, v, seg, **kw)
        if impl == "pallas" and kw:
            k, v = (jnp.repeat(t, q.shape[2] // t.shape[2], axis=2) for t in (k, v))
            return pallas_attention(q, k, v, seg, **kw)
        return attention(q, k, v, segment_ids=seg, impl=impl)

    return jax.jit(f), forward_backward(f)


def measure(impl, kw, inputs, dy, seg, timing, with_backward):
    fwd, fwd_bwd = jax_fns(impl, kw, seg)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(*inputs))
    row = {
        "first_call_s": time.perf_counter() - t0,
        "fwd_ms": median_ms(lambda: fwd(*inputs), jax.block_until_ready, *timing),
    }
    if with_backward:
        compiled = fwd_bwd.lower(inputs, dy).compile()
        row["temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / GIB
        jax.block_until_ready(compiled(inputs, dy))
        row["fwd_bwd_ms"] = median_ms(lambda: compiled(inputs, dy), jax.block_until_ready, *timing)
    return row, out


def table(rows):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines = [
        (
            "| shape | mask | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | "
            "temp GiB | note |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['mask']} | {r['impl']} | failed: {r['error']} |")
            continue
        fb = r.get("fwd_bwd_ms")
        lines.append(
            f"| {r['shape']} | {r['mask']} | {r['impl']} | {r['fwd_ms']:.3f} | {fmt(fb, '.3f')} | "
            f"{r['flops'] / r['fwd_ms'] / 1e9:.3g} | "
            f"{fmt(None if fb is None else 3.5 * r['flops'] / fb / 1e9, '.3g')} | "
            f"{fmt(r.get('temp_gib'), '.3f')} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m hybridjax.bench attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=DEFAULT_SHAPES,
        help="shapes like b1,l16384,h16,k8,d128 (default: %(default)s)",
    )
    ap.add_argument(
        "--impls",
        nargs="+",
        choices=ALL_IMPLS,
        default=None,
        help="default: cudnn and pallas on a GPU, blockwise",
    )
    ap.add_argument(
        "--doc-len",
        type=int,
        default=4096,
        help="tokens per packed document (default: %(default)s)",
    )
    ap.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=None,
        help="blockwise: a row per block size (default: one row, its own)",
    )
    ap.add_argument(
        "--pallas-bwd-blocks",
        type=int,
        nargs="+",
        default=None,
        help="pallas: a row per backward block size (default: one row, its own)",
    )
    add_timing_args(ap)
    ap.add_argument("--out", default=None, help="directory for the table (attention.md) and rows")
    args = ap.parse_args(argv)

    shapes = [parse_shape(s) for s in args.shapes]
    dtype = jnp.dtype(args.dtype)
    backend = jax.default_backend()
    impls = args.impls or (["cudnn", "pallas"] if backend == "gpu" else []) + ["blockwise"]
    print(
        f"jax {jax.__version__} on {backend}: {jax.devices()[0].device_kind}; dtype "
        f"{dtype.name}; packed documents of {args.doc_len} tokens",
        flush=True,
    )
    timing = (args.warmup, args.repeats, args.batch)
    rows = []
    for s in shapes:
        name = "b{b} l{l} h{h} kv{k} d{d}".format(**s)
        keys = jax.random.split(jax.random.key(0), 4)
        inputs = tuple(
            jax.random.normal(key, (s["b"], s["l"], h, s["d"]), dtype)
            for key, h in zip(keys, (s["h"], s["k"], s["k"]))
        )
        dy = jax.random.normal(keys[3], inputs[0].shape, dtype)
        for mask, seg, doc in (
            ("one doc", None, s["l"]),
            ("packed", segment_ids(s, args.doc_len), args.doc_len),
        ):
            first = None  # the first impl's output under this mask: the others' reference
            for label, impl, kw in variants(impls, args.blocks, args.pallas_bwd_blocks):
                row = {
                    "shape": name,
                    "mask": mask,
                    "impl": label,
                    "note": "",
                    "flops": 4 * s["b"] * s["h"] * s["d"] * allowed_pairs(s["l"], doc),
                }
                try:
                    result, out = measure(impl, kw, inputs, dy, seg, timing, not args.no_backward)
                except Exception as e:  # noqa: BLE001 - one failing impl must not end the table
                    row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
                    print(f"{name}  {mask}  {label}: {row['error']}", flush=True)
                    rows.append(row)
                    continue
                row.update(result)
                if first is None:
                    first = (label, np.asarray(out.astype(jnp.float32)))
                else:
                    err = rel_err(out.astype(jnp.float32), first[1])
                    row["note"] = f"rel.err vs {first[0]} {err:.1e}"
                rows.append(row)
                fb = row.get("fwd_bwd_ms")
                print(
                    f"{name}  {mask}  {label}: fwd {row['fwd_ms']:.3f} ms  fwd+bwd "
                    f"{'-' if fb is None else f'{fb:.3f} ms'}  (first call "
                    f"{row['first_call_s']:.1f} s) {row['note']}",
                    flush=True,
                )
        del inputs, dy

    text = table(rows)
    print("\n" + text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "attention.md"), "w") as f:
            f.write(
                f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {dtype.name}, "
                f"packed documents of {args.doc_len} tokens\n\n{text}\n"
            )
        with open(os.path.join(args.out, "attention.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
