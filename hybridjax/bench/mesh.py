"""`python -m hybridjax.bench mesh`: the train step on device meshes, side by side.

Each layout (`1` = one device, no mesh; else mesh sizes such as `data=2` or `fsdp=2,tensor=2`)
runs the step of `python -m hybridjax.bench step` in its own process, on the first devices of
the host, with the global batch scaled by the layout's data-like axes (`--batch` rows per
data-parallel replica), so every layout sees the same per-device work. Per layout: median step
time, tokens/s in total and per device, scaling against the one-device layout (tokens/s over
n_devices x one device's at the same length), MFU, the parameter + optimizer bytes that device 0
holds, the peak memory of the busiest device, and the first and last losses (equal layouts give
equal losses up to rounding when their global batches are equal: use `--same-batch`). Several
`--seq-len` values give a row per length and layout: the long-context table.

  python -m hybridjax.bench mesh --layouts 1 data=2 fsdp=2                 # 1B preset, 2 GPUs
  python -m hybridjax.bench mesh --preset moe --layouts data=2 expert=2 --same-batch
  python -m hybridjax.bench mesh --layouts 1 context=2 --same-batch --seq-len 65536 --batch 1
  python -m hybridjax.bench mesh --layouts 1 --seq-len 32768 131072 524288 --batch 1 --remat block
  python -m hybridjax.bench mesh --preset tiny --layouts 1 data=2 --steps 2 --warmup 1  # CPU
"""

import argparse
import json
import math
import os
import statistics
import sys

from hybridjax.sharding import AXES, BATCH_AXES

GIB = 2**30


def parse_layout(text: str) -> dict:
    """ "1" -> {} (one device); "data=2,fsdp=2" -> {"data": 2, "fsdp": 2}."""
    if text == "1":
        return {}
    sizes = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis not in AXES or not size.isdigit():
            raise argparse.ArgumentTypeError(
                f"layout {text!r}: give '1' or axis=size pairs over {', '.join(AXES)} "
                f"joined by commas, e.g. 'fsdp=2,tensor=2'"
            )
        sizes[axis] = int(size)
    return sizes


def parse_args(argv):
    from hybridjax.bench.step import add_peak_arg, add_step_args, finish_step_args

    ap = argparse.ArgumentParser(
        prog="python -m hybridjax.bench mesh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_step_args(ap, batch_help="rows per data-parallel replica", steps=5, warmup=2, lengths=True)
    ap.add_argument("--layouts", nargs="+", default=["1", "data=2", "fsdp=2"])
    ap.add_argument(
        "--impl", default="auto", help="SSD implementation (default: %(default)s: Pallas on a GPU)"
    )
    ap.add_argument(
        "--same-batch",
        action="store_true",
        help="one global batch (--batch rows) for every layout, to compare losses",
    )
    add_peak_arg(ap)
    ap.add_argument("--out", default=None, help="directory for the table (mesh.md) and rows")
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)  # a child's JSON row
    args = ap.parse_args(argv)
    for layout in args.layouts:
        try:
            parse_layout(layout)
        except argparse.ArgumentTypeError as e:
            ap.error(str(e))
    return finish_step_args(ap, args, lengths=True)


def measure(layout: str, seq_len: int, args) -> dict:
    """One layout's row at one sequence length (in this process)."""
    import jax

    from hybridjax.bench.step import (
        build_step,
        packed_flops_per_token,
        peak_tflops,
        run_steps,
    )

    sizes = parse_layout(layout)
    n = math.prod(sizes.values()) if sizes else 1
    replicas = math.prod(sizes.get(a, 1) for a in BATCH_AXES)
    batch = args.batch if args.same_batch else args.batch * replicas
    row = {"layout": layout, "devices": n, "batch": batch, "seq_len": seq_len}
    if n > len(jax.devices()):
        return {**row, "error": f"needs {n} devices, this host has {len(jax.devices())}"}
    compiled, state, data, row["compile_s"] = build_step(
        args.config, sizes, batch, seq_len, args.impl, args.remat, args.warmup + args.steps
    )
    row["collectives"] = collective_counts(compiled.as_text())
    row["state_gib_per_device"] = (
        sum(
            x.addressable_shards[0].data.nbytes
            for x in jax.tree.leaves((state.params, state.opt_state))
        )
        / GIB
    )
    times, losses, _ = run_steps(compiled, state, data, args.warmup, args.steps)
    config = args.config
    step_s = statistics.median(times)
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.devices()[:n]]
    peak = peak_tflops(args)
    row.update(
        step_ms=1e3 * step_s,
        tokens_per_s=batch * seq_len / step_s,
        peak_gib=None if None in peaks else max(peaks) / GIB,
        loss_first=losses[0],
        loss_last=losses[-1],
    )
    row["mfu"] = (
        None
        if peak is None
        else (packed_flops_per_token(config, seq_len) * row["tokens_per_s"] / n / (peak * 1e12))
    )
    print(
        f"[{layout}, {seq_len}] step {row['step_ms']:.1f} ms, {row['tokens_per_s']:,.0f} tokens/s, "
        f"state {row['state_gib_per_device']:.2f} GiB/device, losses {losses}",
        flush=True,
    )
    return row


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collective_counts(hlo: str) -> dict:
    """How many of each collective the compiled step's HLO holds (async pairs count once)."""
    return {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in COLLECTIVES}


def run_child(args, layout, seq_len):
    """measure(layout, seq_len) in a fresh process (`bench.step.run_in_child`)."""
    from hybridjax.bench.step import run_in_child

    argv = [
        "mesh",
        "--preset",
        args.preset,
        "--impl",
        args.impl,
        "--batch",
        str(args.batch),
        "--seq-len",
        str(seq_len),
        "--remat",
        args.remat,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--layouts",
        layout,
    ]
    argv += ["--same-batch"] if args.same_batch else []
    argv += ["--model", *args.model] if args.model else []
    return run_in_child(argv, {"layout": layout, "seq_len": seq_len})


def table(rows, args) -> str:
    from hybridjax.bench.step import DOCS_PER_ROW

    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    ones = {r["seq_len"]: r for r in rows if r.get("devices") == 1 and "error" not in r}
    lines = [
        (
            f"preset {args.preset}, SSD {args.impl}, remat {args.remat}, {DOCS_PER_ROW} "
            f"documents per row, median of {args.steps} steps after {args.warmup} warm-up "
            f"steps; scaling: tokens/s per device over one device's at the same length"
        ),
        (
            "| layout | devices | batch | sequence | step ms | tokens/s | tokens/s per device | "
            "scaling | MFU | params+opt GiB/device | peak GiB (busiest device) | loss first | "
            "loss last |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | | | {r['seq_len']} | {r['error']} |")
            continue
        per_device = r["tokens_per_s"] / r["devices"]
        one = ones.get(r["seq_len"])
        scaling = "-" if one is None else f"{per_device / one['tokens_per_s']:.1%}"
        lines.append(
            f"| {r['layout']} | {r['devices']} | {r['batch']} | {r['seq_len']} | "
            f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {per_device:,.0f} | {scaling} | "
            f"{fmt(r['mfu'], '.1%')} | "
            f"{r['state_gib_per_device']:.3f} | {fmt(r['peak_gib'], '.2f')} | "
            f"{r['loss_first']:.5f} | {r['loss_last']:.5f} |"
        )
    lines.append(
        "\ncollectives in the compiled step: "
        + "; ".join(
            f"{r['layout']} at {r['seq_len']}: "
            + ", ".join(f"{k} {v}" for k, v in r["collectives"].items() if v)
            for r in rows
            if "error" not in r
        )
    )
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.result:
        try:
            row = measure(args.layouts[0], args.seq_len[0], args)
        except Exception as e:  # noqa: BLE001 - one failing layout must not end the table
            row = {
                "layout": args.layouts[0],
                "seq_len": args.seq_len[0],
                "error": f"{type(e).__name__}: {str(e).strip()[:1000]}",
            }
        with open(args.result, "w") as f:
            json.dump(row, f)
        return 0
    rows = [run_child(args, layout, seq_len) for seq_len in args.seq_len for layout in args.layouts]
    text = table(rows, args)
    print("\n" + text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"mesh_{args.preset}.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
