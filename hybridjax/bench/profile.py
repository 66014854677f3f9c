"""`python -m hybridjax.bench profile`: where the train step's time goes, as a per-op table.

Builds the step of `python -m hybridjax.bench mesh` (a preset, one layout, one sequence length),
runs warm-up steps, then traces `--steps` steps with `jax.profiler` and reads the trace back:
every device-0 kernel of the step is attributed through its HLO instruction to

  * a layer kind: the jax name scope it was traced under (mamba2, attention, moe, mlp, loss,
    optimizer; "other" for the embedding, final norm and residual adds);
  * a pass: "forward", "recompute" (remat's second forward inside the backward pass) or
    "backward" (transposed ops);
  * a kind of work: matmul (dots, cuBLAS / Triton GEMMs), kernel (Pallas, cuDNN and other
    custom calls), collective, or elementwise (every other fusion, copy, reduction).

The table gives milliseconds per step and the share of device-busy time per (layer, pass,
kind), then the most expensive single ops with their jax names, then the largest non-matmul
groups by jax name (one name sums the same op of every layer). Busy time adds kernels of all
streams, so overlapped collectives can make it exceed the step's wall time. CUDA graphs are
turned off while profiling (each graph would be one opaque kernel), so the step runs a little
slower than in `bench step`. The trace stays in
`--out` for TensorBoard / Perfetto (`perfetto_trace.json.gz`).

  python -m hybridjax.bench profile --out prof                        # 1B preset, one GPU
  python -m hybridjax.bench profile --layout context=2 --seq-len 65536 --batch 1 --out prof
  python -m hybridjax.bench profile --preset tiny --steps 1 --warmup 1 --out prof     # CPU
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time

SCOPES = ("mamba2", "mamba3", "attention", "moe", "mlp", "loss", "optimizer")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
CONTROL_FLOW = ("while", "conditional", "call")
MATMUL = re.compile(r"gemm|cublas|matmul|nvjet|xmma|cutlass", re.IGNORECASE)


def parse_args(argv):
    from hybridjax.bench.mesh import parse_layout
    from hybridjax.bench.step import add_step_args, finish_step_args

    ap = argparse.ArgumentParser(
        prog="python -m hybridjax.bench profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_step_args(ap, batch_help="rows", steps=3, steps_help="traced steps", warmup=2)
    ap.add_argument("--layout", default="1", help="'1' (one device) or mesh sizes, e.g. context=2")
    ap.add_argument("--impl", default="auto", help="SSD implementation (default: %(default)s)")
    ap.add_argument("--top", type=int, default=15, help="single ops listed (default: 15)")
    ap.add_argument(
        "--groups", type=int, default=6, help="non-matmul groups detailed (default: %(default)s)"
    )
    ap.add_argument(
        "--group-names",
        type=int,
        default=6,
        help="jax names listed per detailed group (default: %(default)s)",
    )
    ap.add_argument("--out", required=True, help="directory for the trace and profile.md")
    args = ap.parse_args(argv)
    try:
        args.sizes = parse_layout(args.layout)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    return finish_step_args(ap, args)


# ------------------------------------------------------------------------------- HLO side
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")


def hlo_ops(hlo_text: str) -> dict:
    """{instruction name: (opcode, jax op_name, text after the shape)} for every instruction of
    the compiled module (all computations: kernels inside loops name their own instruction)."""
    ops = {}
    for line in hlo_text.splitlines():
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, rest = m.groups()
        body = _after_shape(rest)
        opcode = body.split("(", 1)[0].strip()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        ops[name] = (opcode, op_name.group(1) if op_name else "", body)
    return ops


def _after_shape(rest: str) -> str:
    """The instruction text after its result shape (a tuple shape is parenthesised)."""
    if not rest.startswith("("):
        return rest.split(" ", 1)[-1]
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[i + 1 :].lstrip()
    return rest


def classify(opcode: str, op_name: str, body: str, kernel: str) -> tuple[str, str, str]:
    """(layer scope, pass, kind of work) of one kernel."""
    parts = re.split(r"[/()]", op_name)
    scope = next((p for p in parts if p in SCOPES), "other")
    pass_ = (
        "recompute"
        if "rematted_computation" in op_name
        else "backward"
        if "transpose(" in op_name
        else "forward"
    )
    base = opcode.removesuffix("-start").removesuffix("-done")
    if base in COLLECTIVES or any(c in kernel for c in ("nccl", "AllReduce", "AllGather")):
        kind = "collective"
    elif (
        opcode in ("dot", "convolution")
        or MATMUL.search(kernel)
        or (opcode in ("fusion", "custom-call") and "gemm" in body)
    ):
        kind = "matmul"
    elif opcode == "custom-call":
        kind = "kernel"
    else:
        kind = "elementwise"
    return scope, pass_, kind


# ----------------------------------------------------------------------------- trace side
def device_kernels(trace_dir: str, module: str):
    """[(instruction name, kernel name, microseconds)] of device 0's kernels of `module` in the
    newest Perfetto trace under `trace_dir` (GPU streams; the host executor on a CPU)."""
    path = max(
        glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
        key=os.path.getmtime,
    )
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu0 = {pid for pid, n in names.items() if re.search(r"/device:GPU:0\b", n)}
    kernels = []
    for e in events:
        args = e.get("args", {})
        if e.get("ph") != "X" or not str(args.get("hlo_module", "")).startswith(module):
            continue
        if e["name"].split(".")[0] in CONTROL_FLOW:  # a CPU thunk spanning its body's kernels
            continue
        if gpu0 and e["pid"] not in gpu0:
            continue
        if not gpu0 and args.get("device_ordinal", "0") != "0":
            continue
        kernels.append((args.get("hlo_op", e["name"]), e["name"], float(e.get("dur", 0))))
    return kernels


def tables(
    kernels, ops, n_steps: int, step_ms: float, top: int, groups_shown: int, names_shown: int
):
    groups = collections.defaultdict(float)
    singles = collections.defaultdict(float)  # (group, op, opcode, jax name) -> us
    for op, kernel, us in kernels:
        opcode, op_name, body = ops.get(op, ("?", "", ""))
        group = classify(opcode, op_name, body, kernel)
        groups[group] += us
        singles[(group, op, opcode, op_name)] += us
    busy = sum(groups.values()) / n_steps / 1e3
    lines = [
        (
            f"step {step_ms:.1f} ms (median of {n_steps} traced), device 0 busy "
            f"{busy:.1f} ms ({len(kernels) // n_steps} kernels per step)"
        ),
        "",
        "| layer | pass | work | ms/step | share of busy |",
        "|---|---|---|---|---|",
    ]
    for (scope, pass_, kind), us in sorted(groups.items(), key=lambda kv: -kv[1]):
        ms = us / n_steps / 1e3
        lines.append(f"| {scope} | {pass_} | {kind} | {ms:.2f} | {ms / busy:.1%} |")
    by_layer = collections.defaultdict(float)
    for (scope, _, _), us in groups.items():
        by_layer[scope] += us / n_steps / 1e3
    lines += ["", "| layer | ms/step | share of busy |", "|---|---|---|"]
    lines += [
        f"| {s} | {ms:.2f} | {ms / busy:.1%} |"
        for s, ms in sorted(by_layer.items(), key=lambda kv: -kv[1])
    ]
    lines += ["", f"| top {top} ops | opcode | ms/step | jax name |", "|---|---|---|---|"]
    for (_, op, opcode, op_name), us in sorted(singles.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {op} | {opcode} | {us / n_steps / 1e3:.2f} | {op_name[-120:]} |")
    # The matmuls are one op each; the rest of a group is often many small ops worth naming.
    # One jax name covers the same op of every layer: its ops are summed.
    lines += [
        "",
        "| largest non-matmul groups: top jax names | ops | ms/step |",
        "|---|---|---|",
    ]
    others = [(g, us) for g, us in groups.items() if g[2] != "matmul"]
    for group, _ in sorted(others, key=lambda kv: -kv[1])[:groups_shown]:
        lines.append(f"| **{' / '.join(group)}** | | |")
        by_name = collections.defaultdict(lambda: [0, 0.0])  # jax name -> [ops, us]
        for (g, _, opcode, op_name), us in singles.items():
            if g == group:
                by_name[op_name or opcode][0] += 1
                by_name[op_name or opcode][1] += us
        for name, (count, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:names_shown]:
            lines.append(f"| {name[-120:]} | {count} | {us / n_steps / 1e3:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    # CUDA graphs ("command buffers") would show up as one opaque kernel per graph: off, before
    # the backend starts. The step then launches kernels one by one, slightly slower.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    import jax

    from hybridjax.bench.step import build_step, run_steps

    compiled, state, data, compile_s = build_step(
        args.config,
        args.sizes,
        args.batch,
        args.seq_len,
        args.impl,
        args.remat,
        args.warmup + args.steps,
    )
    hlo = compiled.as_text()
    module = re.search(r"HloModule\s+([\w.\-]+)", hlo).group(1)
    _, _, state = run_steps(compiled, state, data, args.warmup, 0)
    os.makedirs(args.out, exist_ok=True)
    times = []
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, _ = jax.block_until_ready(compiled(state, data))
            times.append(time.perf_counter() - t0)
    kernels = device_kernels(args.out, module)
    if not kernels:
        print(f"the trace under {args.out} holds no kernel of {module}", file=sys.stderr)
        return 1
    text = (
        f"preset {args.preset}, layout {args.layout}, batch {args.batch} x {args.seq_len}, "
        f"SSD {args.impl}, remat {args.remat}, jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}; compiled in {compile_s:.0f} s\n\n"
        + tables(
            kernels,
            hlo_ops(hlo),
            args.steps,
            1e3 * statistics.median(times),
            args.top,
            args.groups,
            args.group_names,
        )
    )
    print(text)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
