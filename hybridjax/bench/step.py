"""`python -m hybridjax.bench step`: training-step time of a hybrid LM, by SSD implementation.

One jitted train step exactly as `python -m hybridjax.train` builds it (`init_state`,
`make_optimizer`, `make_train_step`: forward, cross-entropy + MoE aux losses, backward, clipped
AdamW update, state donated on accelerators), on a fixed packed batch of random tokens (4
documents per row, so segment ids reset the SSD state and mask attention as packed text does).
Every implementation starts from the same initial parameters and sees the same batch, so the
losses agree up to rounding. Per implementation: compile time, median step time after warm-up,
tokens/s, model TFLOP/s and MFU (`flops_per_token` at one document's length, the trainer's peak
table), peak device memory and XLA's temporary buffer size. With several implementations each runs in its own process, so
peak memory is its own and a crash (e.g. out of memory) costs only its row.

  python -m hybridjax.bench step                       # ~1B hybrid, b4 x l4096, chunked vs pallas
  python -m hybridjax.bench step --preset tiny --impls chunked --steps 2 --warmup 1  # CPU smoke
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax.config import REMAT_POLICIES, SSD_IMPLS, HybridConfig
from hybridjax.data.packing import row_to_example
from hybridjax.model import flops_per_token, param_counts, pattern_period
from hybridjax.optim import OptimConfig, make_optimizer
from hybridjax.train import CONFIG_DIR, PEAK_TFLOPS, peak_memory_bytes
from hybridjax.train_config import LossConfig
from hybridjax.train_step import init_state, make_train_step

BENCH_VOCAB = 32768  # the GPU presets' vocabulary (their model configs take the data's)


def model_preset(name: str) -> HybridConfig:
    """configs/model/<name>.yaml as a HybridConfig, with the benchmark's vocabulary."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(
        OmegaConf.load(os.path.join(CONFIG_DIR, "model", f"{name}.yaml"))
    )
    return HybridConfig(**{**values, "vocab_size": BENCH_VOCAB})


PRESETS = {
    # the GPU hybrid of configs/model/hybrid_1b.yaml (1.03B parameters)
    "1b": {"config": model_preset("hybrid_1b"), "batch": 4, "seq_len": 4096},
    # the Nemotron-3-style MoE hybrid of configs/model/moe_hybrid_2b.yaml (2.4B, 0.75B active)
    "moe": {"config": model_preset("moe_hybrid_2b"), "batch": 4, "seq_len": 4096},
    # Each layer kind, scanned over two periods, at toy sizes: a CPU smoke test.
    "tiny": {
        "config": HybridConfig(
            vocab_size=256,
            d_model=64,
            pattern="M*-" * 2,
            dtype="bfloat16",
            param_dtype="float32",
            remat="full",
            mamba_heads=4,
            mamba_head_dim=16,
            ssm_state=16,
            n_groups=2,
            chunk_size=32,
            attn_heads=4,
            kv_heads=2,
            head_dim=16,
            ffn=128,
        ),
        "batch": 2,
        "seq_len": 128,
    },
}
DOCS_PER_ROW = 4
GIB = 2**30


def add_step_args(ap, *, batch_help, steps, steps_help="timed steps", warmup, lengths=False):
    """The options every train-step benchmark takes: the preset, its batch, sequence length (several
    with `lengths`), remat, and the steps run; `finish_step_args` fills the preset's defaults."""
    ap.add_argument("--preset", choices=list(PRESETS), default="1b")
    ap.add_argument("--batch", type=int, default=None, help=f"{batch_help} (default: the preset's)")
    ap.add_argument(
        "--seq-len",
        type=int,
        nargs="+" if lengths else None,
        default=None,
        help=("one or more sequence lengths, a row each" if lengths else "sequence length")
        + " (default: the preset's)",
    )
    ap.add_argument(
        "--remat",
        choices=REMAT_POLICIES,
        default=None,
        help="HybridConfig.remat (default: the preset's)",
    )
    ap.add_argument(
        "--model",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="HybridConfig fields over the preset's, e.g. attn_max_documents=2 attn_impl=blockwise",
    )
    ap.add_argument("--steps", type=int, default=steps, help=f"{steps_help} (default: %(default)s)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=warmup,
        help="untimed steps after compiling (default: %(default)s)",
    )


def add_peak_arg(ap):
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: the trainer's table by device kind)",
    )


def finish_step_args(ap, args, *, lengths=False):
    """Checks the step counts and fills batch, seq_len and remat from the preset."""
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    preset = PRESETS[args.preset]
    args.batch = args.batch or preset["batch"]
    args.seq_len = args.seq_len or ([preset["seq_len"]] if lengths else preset["seq_len"])
    try:
        args.config = preset["config"].replace(**_model_overrides(args.model))
    except ValueError as e:
        ap.error(f"--model: {e}")
    args.remat = args.remat or args.config.remat
    return args


def _model_overrides(items) -> dict:
    """["field=value", ...] -> {field: value}, each value parsed as the field's type."""
    fields = {f.name: f for f in dataclasses.fields(HybridConfig)}
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"{item!r} is not FIELD=VALUE with a HybridConfig field")
        default = fields[name].default
        if isinstance(default, bool):
            if text not in ("true", "false"):
                raise ValueError(f"{name}: expected true or false, got {text!r}")
            overrides[name] = text == "true"
        elif isinstance(default, (int, float)):
            try:
                overrides[name] = type(default)(text)
            except ValueError:
                kind = "an integer" if isinstance(default, int) else "a number"
                raise ValueError(f"{name}: expected {kind}, got {text!r}") from None
        else:
            overrides[name] = None if text == "null" else text
    return overrides


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m hybridjax.bench step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_step_args(ap, batch_help="sequences per step", steps=10, warmup=3)
    ap.add_argument(
        "--impls",
        nargs="+",
        choices=SSD_IMPLS,
        default=["chunked", "pallas"],
        help="SSD implementations (HybridConfig.ssd_impl) (default: %(default)s)",
    )
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="compute dtype; parameters stay float32",
    )
    add_peak_arg(ap)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)  # a child's JSON row
    return finish_step_args(ap, ap.parse_args(argv))


def make_batch(vocab_size, batch, seq_len, seed=0):
    """Random tokens packed DOCS_PER_ROW documents to a row, in the trainer's batch contract."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        starts = np.sort(rng.choice(np.arange(1, seq_len), DOCS_PER_ROW - 1, replace=False))
        seg = 1 + np.searchsorted(starts, np.arange(seq_len), side="right")
        toks = rng.integers(0, vocab_size, seq_len)
        rows.append(row_to_example({"tokens": toks, "tokens_segment_ids": seg}, pad_id=0))
    return jax.device_put({k: np.stack([r[k] for r in rows]) for k in rows[0]})


def skip_reason(config, batch, seq_len):
    """Why this config's SSD cannot run here, or None (only the Pallas kernel has limits)."""
    if config.ssd_impl != "pallas":
        return None
    from hybridjax.kernels import pallas_unsupported_reason

    x = jax.ShapeDtypeStruct(
        (batch, seq_len, config.mamba_heads, config.mamba_head_dim), jnp.dtype(config.dtype)
    )
    B = jax.ShapeDtypeStruct((batch, seq_len, config.n_groups, config.ssm_state), x.dtype)
    return pallas_unsupported_reason(x, None, None, B, B, chunk_size=config.chunk_size)


def peak_tflops(args):
    kind = jax.devices()[0].device_kind
    return args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def packed_flops_per_token(config, seq_len):
    """Model FLOPs per token of a `make_batch` row: attention spans one document (seq_len over
    DOCS_PER_ROW tokens), not the row."""
    return flops_per_token(config, max(seq_len // DOCS_PER_ROW, 1))


def build_step(config, sizes, batch, seq_len, impl, remat, total_steps, *, dtype=None):
    """(compiled train step, state, batch, compile seconds) of the model `config` (compute `dtype`,
    default the config's) on the mesh `sizes` ({} = one device, no mesh), exactly as the trainer
    builds it: `init_state`, `make_optimizer`, `make_train_step` (state donated off the CPU)."""
    from hybridjax.sharding import batch_sharding, make_mesh

    config = config.replace(ssd_impl=impl, remat=remat, dtype=dtype or config.dtype)
    n = math.prod(sizes.values()) if sizes else 1
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
            donate=jax.default_backend() != "cpu",
            mesh=mesh,
            state=state,
        )
        data = make_batch(config.vocab_size, batch, seq_len)
        if mesh is not None:
            data = jax.device_put(data, batch_sharding(mesh))
        t0 = time.perf_counter()
        compiled = step.lower(state, data).compile()
    return compiled, state, data, time.perf_counter() - t0


def measure(impl, args):
    """One row of the table: {"impl", ...measurements} or {"impl", "error"}."""
    config = args.config.replace(ssd_impl=impl, dtype=args.dtype, remat=args.remat)
    total, active = param_counts(config)
    flops = packed_flops_per_token(config, args.seq_len)
    peak = peak_tflops(args)
    period = pattern_period(config.pattern)
    print(
        f"[{impl}] jax {jax.__version__} on {jax.default_backend()}: "
        f"{jax.devices()[0].device_kind}; preset {args.preset}: {config.n_layers} layers "
        f"{period!r} x {config.n_layers // len(period)}, d_model {config.d_model}, "
        f"{total:,} params ({active:,} active), {flops / 1e9:.3g} GFLOP/token ({DOCS_PER_ROW} documents per row); "
        f"batch {args.batch} x {args.seq_len}, {config.dtype} compute / {config.param_dtype} "
        f"params, remat {config.remat}, layers {'scanned' if config.scan_layers else 'unscanned'}",
        flush=True,
    )
    row = {"impl": impl, "peak_tflops": peak}
    reason = skip_reason(config, args.batch, args.seq_len)
    if reason is not None:
        print(f"[{impl}] skipped: {reason}", flush=True)
        return {**row, "error": f"skipped: {reason}"}
    try:
        compiled, state, batch, row["compile_s"] = build_step(
            args.config,
            {},
            args.batch,
            args.seq_len,
            impl,
            args.remat,
            args.warmup + args.steps,
            dtype=args.dtype,
        )
        print(f"[{impl}] compiled in {row['compile_s']:.1f} s", flush=True)
        times, losses, _ = run_steps(compiled, state, batch, args.warmup, args.steps)
    except Exception as e:  # noqa: BLE001 - one failing impl must not end the table
        msg = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        print(f"[{impl}] failed ({msg})", flush=True)
        return {**row, "error": msg}
    step_s = statistics.median(times)
    tokens_per_s = args.batch * args.seq_len / step_s
    mem = compiled.memory_analysis()
    row.update(
        step_ms=1e3 * step_s,
        tokens_per_s=tokens_per_s,
        tflops=flops * tokens_per_s / 1e12,
        peak_gib=peak_memory_bytes() / GIB,
        temp_gib=None if mem is None else mem.temp_size_in_bytes / GIB,
        loss_first=losses[0],
        loss_last=losses[-1],
    )
    row["mfu"] = None if peak is None else row["tflops"] / peak
    print(
        f"[{impl}] step {row['step_ms']:.1f} ms (median of {len(times)}), "
        f"{tokens_per_s:,.0f} tokens/s, loss {losses[0]:.4f} -> {losses[-1]:.4f}",
        flush=True,
    )
    return row


def run_steps(compiled, state, batch, warmup, steps):
    """(times of the `steps` timed calls in s, every call's loss, the last state): `warmup` untimed
    calls first. The state is donated to each call and replaced by its output."""
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    return times, losses, state


def run_in_child(argv, failed: dict) -> dict:
    """`python -m hybridjax.bench *argv` in a fresh process, which writes its one JSON row to
    --result: its own peak memory, and a crash costs only its row (`failed`, with the exit code)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        cmd = [sys.executable, "-m", "hybridjax.bench", *argv, "--result", path]
        rc = subprocess.run(cmd, check=False).returncode
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return {**failed, "error": f"its process exited with code {rc}"}


def run_child(argv, impl):
    """measure(impl) in a fresh process (`run_in_child`)."""
    row = run_in_child(["step", *argv, "--impls", impl], {"impl": impl})
    if "error" in row and "exited" in row["error"]:
        print(f"[{impl}] failed ({row['error']})", flush=True)
    return row


def print_table(rows):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    done = [r for r in rows if "error" not in r]
    base = next((r for r in done if r["impl"] == "chunked"), None)
    peak = next((r["peak_tflops"] for r in rows if r.get("peak_tflops")), None)
    print(
        f"\nMFU against a dense bf16 peak of {fmt(peak, '.0f')} TFLOP/s per device; "
        f"peak mem: device peak (CPU: process RSS); temp: XLA's temporary buffers of the step"
    )
    print(
        "| impl | compile s | step ms | tokens/s | TFLOP/s | MFU | peak mem GiB | temp GiB | "
        "loss first | loss last | step / chunked |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in done:
        ratio = f"{r['step_ms'] / base['step_ms']:.3f}" if base else "-"
        print(
            f"| {r['impl']} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflops']:.4g} | {fmt(r['mfu'], '.1%')} | {r['peak_gib']:.2f} | "
            f"{fmt(r['temp_gib'], '.2f')} | {r['loss_first']:.4f} | {r['loss_last']:.4f} | "
            f"{ratio} |"
        )
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['error']} |")
    pallas = next((r for r in done if r["impl"] == "pallas"), None)
    if base and pallas:
        ratio = pallas["step_ms"] / base["step_ms"]
        print(
            f"\npallas / chunked step time: {ratio:.3f} ({(1 - ratio) * 100:+.1f}% time saved, "
            f"{1 / ratio:.3f}x throughput); peak memory {pallas['peak_gib']:.2f} vs "
            f"{base['peak_gib']:.2f} GiB"
        )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    impls = list(dict.fromkeys(args.impls))
    if len(impls) == 1:
        rows = [measure(impls[0], args)]
    else:  # the parent touches no device, so each child has the accelerator to itself
        print(f"running {', '.join(impls)} one process each", flush=True)
        rows = [run_child(argv, impl) for impl in impls]
    if args.result:
        with open(args.result, "w") as f:
            json.dump(rows[0], f)
        return 0
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
