"""`python -m hybridjax.bench ssd`: median forward and forward+backward times of the SSD scan.

For each shape, each implementation of `hybridjax.ops.ssd` (chunked, pallas where supported;
reference and assoc only at small shapes or when named) and, when importable on a CUDA machine,
mamba_ssm's Triton kernels (`mamba_chunk_scan_combined`), with the ratio to mamba_ssm.
Forward+backward is one vjp with a random cotangent, gradients for x, dt, A, B, C and D, and
returns the output with them (`forward_backward`), as the peer's autograd computes it.

  python -m hybridjax.bench ssd                                   # the DESIGN.md shapes, bf16
  python -m hybridjax.bench ssd --shapes b1,l256,h4,p16,n16,g1    # CPU smoke test
  python -m hybridjax.bench ssd --impls chunked mamba_ssm --chunk-sizes 128 256
"""

import argparse
import contextlib
import functools
import importlib
import importlib.util
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax.ops import ssd
from hybridjax.ops.ssd import IMPLS as SSD_IMPLS

DEFAULT_SHAPES = [
    "b4,l4096,h64,p64,n128,g1",  # DESIGN.md's figures
    "b1,l65536,h64,p64,n128,g1",  # long context
    "b2,l8192,h128,p64,n128,g8",
]  # Nemotron-Super-like heads and groups
SLOW_IMPLS = ("reference", "assoc")
SLOW_LIMIT = 2**24  # b*l*h*p*n above which reference/assoc run only when named
ALL_IMPLS = (*(i for i in SSD_IMPLS if i != "auto"), "mamba_ssm")  # and the peer


def parse_shape(text, letters="blhpng", optional="", example="b4,l4096,h64,p64,n128,g1"):
    """{"b": 4, "l": 4096, ...} from "b4,l4096,...": every letter of `letters` given, those of
    `optional` allowed."""
    dims = {}
    for tok in text.replace(" ", "").split(","):
        if len(tok) < 2 or tok[0] not in letters + optional or not tok[1:].isdigit():
            raise ValueError(f"--shapes: bad token {tok!r} in {text!r}; want e.g. {example}")
        dims[tok[0]] = int(tok[1:])
    missing = [k for k in letters if k not in dims]
    if missing:
        raise ValueError(
            f"--shapes: {text!r} lacks {', '.join(missing)} (need {', '.join(letters)})"
        )
    return dims


def make_inputs(s, dtype, seed=0):
    """x, B, C ~ N(0, 1) in dtype; dt log-uniform in [1e-3, 0.1], A in -[1, 16], D = 1 (float32)."""
    k = jax.random.split(jax.random.key(seed), 5)
    b, l, h, p, n, g = (s[c] for c in "blhpng")
    x = jax.random.normal(k[0], (b, l, h, p), dtype)
    dt = jnp.exp(jax.random.uniform(k[1], (b, l, h), jnp.float32, np.log(1e-3), np.log(0.1)))
    A = -jax.random.uniform(k[2], (h,), jnp.float32, 1.0, 16.0)
    B = jax.random.normal(k[3], (b, l, g, n), dtype)
    C = jax.random.normal(k[4], (b, l, g, n), dtype)
    D = jnp.ones((h,), jnp.float32)
    return jax.block_until_ready((x, dt, A, B, C, D))


def median_ms(launch, sync, warmup, repeats, batch):
    """Median over `repeats` batches of the mean time of `batch` back-to-back launch() calls,
    synced once per batch: launches overlap the device work as in a training step, so neither
    JAX's nor PyTorch's per-call host overhead is counted. The same method for every impl."""
    for _ in range(warmup):
        sync(launch())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(batch):
            out = launch()
        sync(out)
        times.append((time.perf_counter() - t0) / batch)
    return 1e3 * statistics.median(times)


def forward_backward(f):
    """Jitted (args, dy, *fixed) -> (f(*args, *fixed), the vjp of dy wrt args): the output is
    returned with the gradients, as a training step uses both, so that XLA cannot drop the
    forward's output computation (the gradients alone need only the forward's residuals).
    `fixed` are traced inputs that take no gradient (e.g. integer group sizes)."""

    def run(args, dy, *fixed):
        y, vjp = jax.vjp(lambda *a: f(*a, *fixed), *args)
        return y, vjp(dy)

    return jax.jit(run)


def jax_fns(impl, chunk_size):
    def f(x, dt, A, B, C, D):
        return ssd(x, dt, A, B, C, D=D, chunk_size=chunk_size, impl=impl)

    return jax.jit(f), forward_backward(f)


def load_mamba(module="mamba_ssm.ops.triton.ssd_combined", name="mamba_chunk_scan_combined"):
    """The peer function `name` of mamba_ssm's `module` (default its Triton SSD,
    mamba_chunk_scan_combined), or a string saying why not."""
    try:
        import torch
    except ImportError:
        return "torch is not importable"
    if not torch.cuda.is_available():
        return "no CUDA device for torch"
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return (
            "mamba_ssm is not installed (the peer is the Triton SSD of the mamba-ssm package: "
            "pip install mamba-ssm)"
        )
    if "mamba_ssm" not in sys.modules:  # its __init__ imports a CUDA extension the wheel lacks
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = pkg
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - report and go on without the peer
        return f"mamba_ssm import failed: {type(e).__name__}: {e}"


def to_torch(a):
    import torch

    with contextlib.suppress(Exception):  # else fall back to a host round trip
        return torch.from_dlpack(a).clone()
    t = torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda()
    return t.to(
        torch.bfloat16
        if a.dtype == jnp.bfloat16
        else torch.float16
        if a.dtype == jnp.float16
        else torch.float32
    )


def bench_mamba(scan, inputs, dy, chunk_size, timing):
    import torch

    args = [to_torch(a) for a in inputs]
    dy_t = to_torch(dy)
    sync = lambda _: torch.cuda.synchronize()
    fwd = lambda: scan(*args[:5], chunk_size, D=args[5])
    fwd_ms = median_ms(fwd, sync, *timing)
    leaves = [a.detach().requires_grad_(True) for a in args]

    def fwd_bwd():
        y = scan(*leaves[:5], chunk_size, D=leaves[5])
        return torch.autograd.grad(y, leaves, dy_t)

    fwd_bwd_ms = median_ms(fwd_bwd, sync, *timing)
    with torch.no_grad():
        y = fwd().float().cpu().numpy()
    return fwd_ms, fwd_bwd_ms, y


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class BenchLog:
    """log(text) prints a line and keeps it; `write` puts the table and every line logged into
    DIR/<name>.md and DIR/<name>.log (the benchmarks' --out)."""

    def __init__(self):
        self.lines = []

    def __call__(self, text=""):
        print(text, flush=True)
        self.lines.append(text)

    def table(self, lines, out, name):
        """Log the table's lines after a blank line; with `out`, write both files."""
        self("")
        for line in lines:
            self(line)
        if out:
            os.makedirs(out, exist_ok=True)
            for ext, text in (("md", lines), ("log", self.lines)):
                with open(os.path.join(out, f"{name}.{ext}"), "w") as f:
                    f.write("\n".join(text) + "\n")


def add_timing_args(ap):
    """The options every kernel benchmark shares: dtype, and the timing of `median_ms`."""
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15, help="timed batches (median taken)")
    ap.add_argument("--batch", type=int, default=10, help="back-to-back calls per timed batch")
    ap.add_argument("--no-backward", action="store_true", help="forward only")


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m hybridjax.bench ssd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=DEFAULT_SHAPES,
        help="shapes like b4,l4096,h64,p64,n128,g1 (default: %(default)s)",
    )
    ap.add_argument(
        "--impls",
        nargs="+",
        choices=ALL_IMPLS,
        default=None,
        help="default: chunked, pallas on GPU, mamba_ssm when importable, and "
        f"reference/assoc when b*l*h*p*n <= {SLOW_LIMIT}",
    )
    ap.add_argument(
        "--chunk-sizes",
        nargs="+",
        type=int,
        default=[256],
        help="chunk sizes for chunked/pallas (mamba_ssm always uses 256)",
    )
    add_timing_args(ap)
    ap.add_argument(
        "--dump-hlo",
        default=None,
        metavar="DIR",
        help="write each JAX fwd+bwd program's optimized HLO to DIR",
    )
    ap.add_argument("--out", default=None, metavar="DIR", help="also write the table to DIR/ssd.md")
    args = ap.parse_args(argv)

    shapes = [parse_shape(s) for s in args.shapes]
    dtype = jnp.dtype(args.dtype)
    backend = jax.default_backend()
    print(
        f"jax {jax.__version__} on {backend}: {jax.devices()[0].device_kind}; dtype {dtype.name}",
        flush=True,
    )
    mamba = None
    if args.impls is None or "mamba_ssm" in args.impls:
        mamba = load_mamba()
        if isinstance(mamba, str):
            print(f"mamba_ssm: skipped ({mamba})", flush=True)
            mamba = None

    timing = (args.warmup, args.repeats, args.batch)
    rows = []
    for s in shapes:
        name = "b{b} l{l} h{h} p{p} n{n} g{g}".format(**s)
        inputs = make_inputs(s, dtype)
        dy = jax.random.normal(jax.random.key(1), inputs[0].shape, dtype)
        size = s["b"] * s["l"] * s["h"] * s["p"] * s["n"]
        impls = args.impls
        if impls is None:
            impls = [i for i in ("reference", "assoc") if size <= SLOW_LIMIT] + ["chunked"]
            if backend == "gpu":
                impls.append("pallas")
        peer = None
        if mamba is not None and "mamba_ssm" in (args.impls or ["mamba_ssm"]):
            try:
                f_ms, fb_ms, y_peer = bench_mamba(mamba, inputs, dy, 256, timing)
                peer = (f_ms, None if args.no_backward else fb_ms)
                rows.append((name, "mamba_ssm", 256, f_ms, peer[1], ""))
                print(
                    f"{name}  mamba_ssm  chunk 256: fwd {f_ms:.3f} ms  fwd+bwd {fb_ms:.3f} ms",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                print(f"{name}  mamba_ssm: failed ({type(e).__name__}: {e})", flush=True)
                y_peer = None
        for impl in impls:
            if impl == "mamba_ssm":
                continue
            for cs in args.chunk_sizes if impl in ("chunked", "pallas") else [args.chunk_sizes[0]]:
                try:
                    fwd, fwd_bwd = jax_fns(impl, cs)
                    t0 = time.perf_counter()
                    y = jax.block_until_ready(fwd(*inputs))
                    compile_s = time.perf_counter() - t0
                    f_ms = median_ms(
                        functools.partial(fwd, *inputs), jax.block_until_ready, *timing
                    )
                    fb_ms = None
                    if not args.no_backward:
                        jax.block_until_ready(fwd_bwd(inputs, dy))
                        fb_ms = median_ms(
                            functools.partial(fwd_bwd, inputs, dy), jax.block_until_ready, *timing
                        )
                        if args.dump_hlo:
                            os.makedirs(args.dump_hlo, exist_ok=True)
                            text = fwd_bwd.lower(inputs, dy).compile().as_text()
                            path = os.path.join(
                                args.dump_hlo, f"{impl}_c{cs}_" + name.replace(" ", "_") + ".txt"
                            )
                            with open(path, "w") as fh:
                                fh.write(text)
                    note = ""
                    if peer is not None and y_peer is not None:
                        note = f"rel.err vs mamba_ssm {rel_err(y.astype(jnp.float32), y_peer):.1e}"
                except Exception as e:  # noqa: BLE001 - one failing impl must not end the table
                    print(
                        f"{name}  {impl} chunk {cs}: failed ({type(e).__name__}: {str(e)[:300]})",
                        flush=True,
                    )
                    continue
                rows.append((name, impl, cs, f_ms, fb_ms, note))
                fb_text = "-" if fb_ms is None else f"{fb_ms:.3f} ms"
                print(
                    f"{name}  {impl}  chunk {cs}: fwd {f_ms:.3f} ms  fwd+bwd {fb_text}  "
                    f"(first call {compile_s:.1f} s) {note}",
                    flush=True,
                )
        peers = {r[0]: r for r in rows if r[1] == "mamba_ssm"}
        del inputs, dy

    lines = [
        "| shape | impl | chunk | fwd ms | fwd+bwd ms | fwd / mamba | fwd+bwd / mamba | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for name, impl, cs, f_ms, fb_ms, note in rows:
        p = peers.get(name)
        rf = f"{f_ms / p[3]:.2f}x" if p else "-"
        rfb = f"{fb_ms / p[4]:.2f}x" if p and fb_ms is not None and p[4] else "-"
        lines.append(
            f"| {name} | {impl} | {cs} | {fmt(f_ms)} | {fmt(fb_ms)} | {rf} | {rfb} | {note} |"
        )
    print("\n" + "\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ssd.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
