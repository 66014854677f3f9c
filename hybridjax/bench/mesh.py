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
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

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
    from hybridjax.bench.step import PRESETS
    from hybridjax.config import REMAT_POLICIES

    ap = argparse.ArgumentParser(
        prog="python -m hybridjax.bench mesh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", choices=list(PRESETS), default="1b")
    ap.add_argument("--layouts", nargs="+", default=["1", "data=2", "fsdp=2"])
    ap.add_argument(
        "--impl", default="auto", help="SSD implementation (default: %(default)s: Pallas on a GPU)"
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="rows per data-parallel replica (default: the preset's batch)",
    )
    ap.add_argument(
        "--same-batch",
        action="store_true",
        help="one global batch (--batch rows) for every layout, to compare losses",
    )
    ap.add_argument(
        "--seq-len",
        type=int,
        nargs="+",
        default=None,
        help="one or more sequence lengths, each a row per layout (default: the preset's)",
    )
    ap.add_argument(
        "--remat",
        choices=REMAT_POLICIES,
        default=None,
        help="HybridConfig.remat (default: the preset's)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: the trainer's table by device kind)",
    )
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    ap.add_argument("--out", default=None, help="directory for the table (mesh.md) and rows")
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)  # a child's JSON row
    args = ap.parse_args(argv)
    for layout in args.layouts:
        try:
            parse_layout(layout)
        except argparse.ArgumentTypeError as e:
            ap.error(str(e))
    preset = PRESETS[args.preset]
    args.batch = args.batch or preset["batch"]
    args.seq_len = args.seq_len or [preset["seq_len"]]
    args.remat = args.remat or preset["config"].remat
    return args


def build_step(
    preset: str, sizes: dict, batch: int, seq_len: int, impl: str, remat: str, total_steps: int
):
    """(compiled train step, state, batch, mesh, compile seconds) of the preset's model on the
    mesh `sizes` ({} = one device, no mesh), as the trainer builds it."""
    import jax

    from hybridjax.bench.step import PRESETS, make_batch
    from hybridjax.optim import OptimConfig, make_optimizer
    from hybridjax.sharding import batch_sharding, make_mesh
    from hybridjax.train_config import LossConfig
    from hybridjax.train_step import init_state, make_train_step

    n = math.prod(sizes.values()) if sizes else 1
    config = PRESETS[preset]["config"].replace(ssd_impl=impl, remat=remat)
    mesh = make_mesh(**{"data": 1, **sizes}, devices=jax.devices()[:n]) if sizes else None
    tx, schedule = make_optimizer(OptimConfig(), total_steps)
    coefs = LossConfig()
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        graphdef, state = init_state(config, tx, seed=0, mesh=mesh)
        step = make_train_step(
            graphdef,
            tx,
            schedule,
            lb_coef=coefs.lb_coef,
            z_coef=coefs.z_coef,
            router_bias_rate=coefs.router_bias_rate,
            has_moe=config.has("E"),
            donate=True,
            mesh=mesh,
            state=state,
        )
        data = make_batch(config.vocab_size, batch, seq_len)
        if mesh is not None:
            data = jax.device_put(data, batch_sharding(mesh))
        t0 = time.perf_counter()
        compiled = step.lower(state, data).compile()
    return compiled, state, data, mesh, time.perf_counter() - t0


def measure(layout: str, seq_len: int, args) -> dict:
    """One layout's row at one sequence length (in this process)."""
    import jax

    from hybridjax.bench.step import PRESETS, packed_flops_per_token, peak_tflops, run_steps

    sizes = parse_layout(layout)
    n = math.prod(sizes.values()) if sizes else 1
    replicas = math.prod(sizes.get(a, 1) for a in BATCH_AXES)
    batch = args.batch if args.same_batch else args.batch * replicas
    row = {"layout": layout, "devices": n, "batch": batch, "seq_len": seq_len}
    if n > len(jax.devices()):
        return {**row, "error": f"needs {n} devices, this host has {len(jax.devices())}"}
    compiled, state, data, _, row["compile_s"] = build_step(
        args.preset, sizes, batch, seq_len, args.impl, args.remat, args.warmup + args.steps
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
    config = PRESETS[args.preset]["config"]
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
    """measure(layout, seq_len) in a fresh process: its own peak memory; a crash costs only its row."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        cmd = [
            sys.executable,
            "-m",
            "hybridjax.bench",
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
            "--result",
            path,
        ] + (["--same-batch"] if args.same_batch else [])
        rc = subprocess.run(cmd, check=False).returncode
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return {"layout": layout, "seq_len": seq_len, "error": f"its process exited with code {rc}"}


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
