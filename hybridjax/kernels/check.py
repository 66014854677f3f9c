"""GPU check and timing of the Pallas SSD kernels: `python -m hybridjax.kernels.check`.

One program per device call: environment, correctness with poisoned outputs against
the oracles (values and gradients, float32 and bfloat16, every feature), then medians of the
forward and forward+backward times at the benchmark shapes for the default plan and variants,
and optionally the Triton SSD of the mamba-ssm package as the peer (--peer). Prints a short table
last; with --out DIR the whole log also goes to DIR/check.log.

Options: --quick (fewer variants), --peer, --budget SECONDS (no new timing variant after that),
--variants NAME,... (subset of the variant names below), --skip-correct, --cpu-dry (the same
kernels in Pallas interpret mode at tiny shapes, on the CPU).
"""

import argparse
import os
import sys
import time
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax.bench.ssd import forward_backward
from hybridjax.kernels import ssd_pallas as _ssd_pallas

_INTERPRET = False


def ssd_pallas(*a, **k):
    return _ssd_pallas(*a, interpret=_INTERPRET, **k)


SHAPES = {  # name: (b, l, h, p, g, n)
    "b4_l4k_h64": (4, 4096, 64, 64, 1, 128),
    "b1_l64k_h64": (1, 65536, 64, 64, 1, 128),
    "b2_l8k_h128_g8": (2, 8192, 128, 64, 8, 128),
}
# mamba_ssm Triton, measured by this script's --peer on the H200 (README, performance), ms
PEER = {
    "b4_l4k_h64": (0.538, 3.400),
    "b1_l64k_h64": (2.460, 10.062),
    "b2_l8k_h128_g8": (1.107, 5.299),
}
_T0 = time.time()
_LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    _LOG.append(s)


_OUT = None  # --out DIR


def save_log():
    if _OUT:
        os.makedirs(_OUT, exist_ok=True)
        with open(os.path.join(_OUT, "check.log"), "w") as f:
            f.write("\n".join(_LOG) + "\n")


def inputs(key, b, l, h, p, g, n, dtype, feats=False):
    ks = jax.random.split(key, 8)
    x = jax.random.normal(ks[0], (b, l, h, p), F32).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, h), F32) - 2.0)
    A = -jnp.exp(jax.random.uniform(ks[2], (h,), F32, -1.0, 1.5))
    B = (jax.random.normal(ks[3], (b, l, g, n), F32) / np.sqrt(n)).astype(dtype)
    C = (jax.random.normal(ks[4], (b, l, g, n), F32) / np.sqrt(n)).astype(dtype)
    kw = {}
    if feats:
        kw = {
            "D": jax.random.normal(ks[5], (h,), F32),
            "initial_state": jax.random.normal(ks[6], (b, h, p, n), F32),
            "segment_ids": jnp.cumsum(jax.random.bernoulli(ks[7], 2.0 / l * 3, (b, l)), axis=1),
        }
    return (x, dt, A, B, C), kw


F32 = jnp.float32


def rel(a, r):
    a = jnp.asarray(a, F32)
    r = jnp.asarray(r, F32)
    if bool(jnp.isnan(a).any()):
        return float("nan")
    return float(jnp.linalg.norm((a - r).ravel()) / (jnp.linalg.norm(r.ravel()) + 1e-30))


def dA_term_size(x, dt, A, dx, ddt, D=None, dy=None):
    """The size of the terms that dA sums, to judge its error by: dA_h is the sum over (b, t) of
    dt_t g_t, g = d(loss)/d(dt_t A_h), terms of both signs whose sum can be orders of magnitude
    below their absolute sum, so rounding the terms (bfloat16 operands) moves dA by far more than
    its own precision. From an oracle's gradients: ddt = x.v / dt + A g, where dx = dt v + D dy.
    Returns the norm over heads of sum |dt g|."""
    x, dt, A, dx, ddt = (np.asarray(t, np.float64) for t in (x, dt, A, dx, ddt))
    if D is not None:
        dx = dx - np.asarray(D, np.float64)[:, None] * np.asarray(dy, np.float64)
    terms = (dt * ddt - np.sum(x * dx, -1)) / A
    return float(np.linalg.norm(np.abs(terms).sum((0, 1))))


def grads(fn, args, kw, dy, dfin):
    """(y, final) and the gradients wrt x, dt, A, B, C [, D, initial_state]."""
    diff_kw = {k: v for k, v in kw.items() if k in ("D", "initial_state")}
    rest = {k: v for k, v in kw.items() if k not in diff_kw}

    def f(args, dk):
        return fn(*args, **dk, **rest, return_final_state=True)

    out, vjp = jax.vjp(f, args, diff_kw)
    ga, gk = vjp((dy.astype(out[0].dtype), dfin))
    return out, list(ga) + [gk[k] for k in sorted(gk)]


def oracle(impl):
    from hybridjax.ops import ssd

    def fn(*a, **k):
        with jax.default_matmul_precision("highest"):
            up = [t.astype(F32) for t in a]
            k = {kk: (v.astype(F32) if kk in ("D", "initial_state") else v) for kk, v in k.items()}
            return ssd(*up, impl=impl, chunk_size=256, **k)

    return fn


def check_case(name, shape, dtype, feats, ref_impl, tol, pallas_kw=None, yardstick=False):
    """Pallas (poisoned outputs) against the float32 oracle; with yardstick, also the XLA
    "chunked" impl on the same low-precision inputs, to show what error that dtype brings."""
    t = time.time()
    args, kw = inputs(jax.random.key(zlib.crc32(name.encode())), *shape, dtype, feats)
    b, l, h, p, _g, n = shape
    # dy in the input dtype: the kernel and the float32 oracle see the same cotangent
    dy = jax.random.normal(jax.random.key(7), (b, l, h, p), F32).astype(dtype)
    dfin = jax.random.normal(jax.random.key(8), (b, h, p, n), F32)
    pk = dict(poison=True, **(pallas_kw or {}))
    (y, fin), gp = jax.jit(
        lambda a, k: grads(lambda *aa, **kk: ssd_pallas(*aa, **kk, **pk), a, k, dy, dfin)
    )(args, kw)
    (yr, finr), gr = jax.jit(lambda a, k: grads(oracle(ref_impl), a, k, dy, dfin))(args, kw)
    names = ["y", "final", "dx", "ddt", "dA/terms", "dB", "dC"] + (["dD", "dinit"] if feats else [])
    size = dA_term_size(*args[:3], gr[0], gr[1], kw.get("D"), dy)

    def errors(y_, fin_, g_):  # dA against the size of the terms it sums (see dA_term_size)
        errs = [rel(y_, yr), rel(fin_, finr)] + [rel(a, r) for a, r in zip(g_, gr)]
        errs[4] = float(np.linalg.norm(np.asarray(g_[2], np.float64) - np.asarray(gr[2])) / size)
        return errs

    errs = errors(y, fin, gp)
    nan = any(bool(jnp.isnan(jnp.asarray(v, F32)).any()) for v in [y, fin] + list(gp))
    ok = (not nan) and all(e <= tol for e in errs)
    dname = jnp.dtype(dtype).name
    log(
        f"  {'PASS' if ok else 'FAIL'} {name} {dname} vs {ref_impl}: "
        + " ".join(f"{k}={e:.1e}" for k, e in zip(names, errs))
        + f" nan={nan} ({time.time() - t:.1f}s)"
    )
    if yardstick:
        from hybridjax.ops import ssd

        (yc, finc), gc = jax.jit(
            lambda a, k: grads(lambda *aa, **kk: ssd(*aa, impl="chunked", **kk), a, k, dy, dfin)
        )(args, kw)
        errs = errors(yc, finc, gc)
        log(
            f"  (yardstick: XLA chunked, {dname} inputs, vs the same oracle: "
            + " ".join(f"{k}={e:.1e}" for k, e in zip(names, errs))
            + ")"
        )
    return ok


def bench(f, *args, iters=10, reps=7):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(iters):
            out = f(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / iters * 1e3)
    return float(np.median(ts)), float(np.min(ts)), float(np.max(ts))


def time_variant(shape, pallas_kw):
    args, _ = inputs(jax.random.key(3), *shape, jnp.bfloat16)
    b, l, h, p, _g, _n = shape
    dy = jax.random.normal(jax.random.key(4), (b, l, h, p), F32).astype(jnp.bfloat16)
    fwd = jax.jit(lambda a: ssd_pallas(*a, **pallas_kw))

    fwdbwd = forward_backward(lambda *a: ssd_pallas(*a, **pallas_kw))

    t = time.time()
    jax.block_until_ready(fwd(args))
    jax.block_until_ready(fwdbwd(args, dy))
    ct = time.time() - t
    return bench(fwd, args), bench(fwdbwd, args, dy), ct


def stage_times(shape, pallas_kw):
    """Median ms of each kernel and of the whole forward / backward at one shape (bf16, with D):
    where the time goes. The XLA glue is the whole minus its kernels."""
    from hybridjax.kernels import ssd as S
    from hybridjax.kernels import ssd_kernels as K_

    (x, dt, A, B, C), _ = inputs(jax.random.key(3), *shape, jnp.bfloat16)
    b, l, h, p, _g, _n = shape
    D = jnp.ones((h,), F32)
    dy = jax.random.normal(jax.random.key(4), (b, l, h, p), F32).astype(jnp.bfloat16)
    cfg, x, dt, B, C, _ = S.prepare(x, dt, B, C, interpret=_INTERPRET, **pallas_kw)
    ld = dt * A  # the log decay: Mamba-2's weighted scan has weight dt, log decay dt A
    cfgb = S.dataclasses.replace(cfg, Q=cfg.Qb, wq=cfg.Q * cfg.wq // cfg.Qb)
    dy = jnp.pad(dy, [(0, 0), (0, x.shape[1] - l), (0, 0), (0, 0)])
    K = x.shape[1] // cfg.T
    out = {}

    def timed(name, f, *a):
        f = jax.jit(f)
        out[name] = bench(f, *a)[0]
        return f(*a)

    _, _, s_in = timed("fwd: whole", lambda *a: S._forward(cfg, *a, None, None), x, dt, ld, B, C, D)
    dtT, cs, ind, outd, *_ = timed(
        "fwd: decays", lambda dt, ld: S._decays(dt, ld, None, cfg.Q), dt, ld
    )
    if K > 1:
        timed(
            "fwd: state",
            lambda *a: K_.state_call(cfg, *a[:3], outd=a[3], dt=a[4]),
            x,
            B,
            ind,
            outd,
            dtT,
        )
    timed(
        "fwd: fwd kernel",
        lambda *a: K_.fwd_call(cfg, *a[:7], None, a[7], a[8]),
        x,
        B,
        C,
        dtT,
        cs,
        ind,
        outd,
        s_in,
        D,
    )
    timed(
        "bwd: whole",
        lambda *a: S._backward(cfg, *a[:6], None, a[6], a[7], jnp.zeros_like(s_in[:, 0])),
        x,
        dt,
        ld,
        B,
        C,
        D,
        s_in,
        dy,
    )
    dtT, cs, ind, outd, *_ = timed(
        "bwd: decays", lambda dt, ld: S._decays(dt, ld, None, cfgb.Q), dt, ld
    )
    _, s_chunks, s_win = timed(
        "bwd: sweep",
        lambda *a: K_.state_call(cfgb, *a[:3], outd=a[3], dt=a[4], s0=a[5]),
        x,
        B,
        ind,
        outd,
        dtT,
        s_in,
    )
    if K > 1:
        timed("bwd: reverse state", lambda *a: K_.state_call(cfgb, *a), dy, C, ind)
    _, g_chunks, _ = timed(
        "bwd: reverse sweep",
        lambda *a: K_.state_call(cfgb, *a[:3], s0=a[3], s_win=a[4]),
        dy,
        C,
        ind,
        s_in,
        s_win,
    )
    timed(
        "bwd: dc kernel",
        lambda *a: K_.bwd_dc_call(cfgb, *a[:7], None, a[7]),
        dy,
        x,
        B,
        C,
        dtT,
        cs,
        ind,
        s_chunks,
    )
    timed(
        "bwd: dx kernel",
        lambda *a: K_.bwd_dx_call(cfgb, *a[:7], None, *a[7:]),
        dy,
        x,
        B,
        C,
        dtT,
        cs,
        outd,
        g_chunks,
        D,
    )
    for side in ("fwd", "bwd"):
        parts = sum(v for k, v in out.items() if k.startswith(side) and k != f"{side}: whole")
        out[f"{side}: XLA glue"] = out[f"{side}: whole"] - parts
    return out


def peer_times(shape):
    import importlib.util
    import types

    import torch

    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        path = spec.submodule_search_locations[0] if spec else None
        m = types.ModuleType("mamba_ssm")
        m.__path__ = [path]
        sys.modules["mamba_ssm"] = m
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    from triton.testing import do_bench

    b, l, h, p, g, n = shape
    dev = "cuda"
    x = torch.randn(b, l, h, p, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, device=dev) - 2).requires_grad_()
    A = (-torch.exp(torch.rand(h, device=dev) * 2.5 - 1)).requires_grad_()
    B = (torch.randn(b, l, g, n, device=dev) / n**0.5).bfloat16().requires_grad_()
    C = (torch.randn(b, l, g, n, device=dev) / n**0.5).bfloat16().requires_grad_()
    dy = torch.randn(b, l, h, p, device=dev, dtype=torch.bfloat16)
    f = lambda: mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=256)
    fb = lambda: torch.autograd.backward(f(), dy)
    t_f = do_bench(f, warmup=50, rep=300, return_mode="median")
    t_fb = do_bench(fb, warmup=50, rep=300, return_mode="median")
    return t_f, t_fb


VARIANTS = {  # name: ssd_pallas keyword overrides
    "default": {},
    "win128": {"window": 128},
    "win512": {"window": 512},
    "K1": {"superchunks": 1},
    "K4": {"superchunks": 4},
    "K16": {"superchunks": 16},
    "Q32": {"block_q": 32},
    "Qb32": {"block_q_bwd": 32},
    "state8": {"launch": (("state", (8, 2)),)},
    "state_s3": {"launch": (("state", (4, 3)),)},
    "hb1": {"heads_per_program": 1},
    "hb4": {"heads_per_program": 4},
    "hb8": {"heads_per_program": 8},
    "hb16": {"heads_per_program": 16},
    "hb64": {"heads_per_program": 64},
    "dxdc_s1": {"launch": (("dx", (4, 1)), ("dc", (4, 1)))},
    "dxdc_s3": {"launch": (("dx", (4, 3)), ("dc", (4, 3)))},
    "dx8": {"launch": (("dx", (8, 2)),)},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--skip-correct", action="store_true")
    ap.add_argument("--budget", type=float, default=420.0)
    ap.add_argument("--variants", default="")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument(
        "--stages",
        action="store_true",
        help="time each kernel of the default plan (and --variants) at each shape",
    )
    ap.add_argument("--cpu-dry", action="store_true", help="interpret mode at tiny shapes")
    ap.add_argument(
        "--out", default=None, metavar="DIR", help="write the whole log to DIR/check.log"
    )
    a = ap.parse_args()
    global _INTERPRET, _OUT
    _OUT = a.out
    if a.cpu_dry:
        _INTERPRET = True
        for k in SHAPES:
            SHAPES[k] = (1, 128, 2, 16, 1, 16)
    log(f"jax {jax.__version__} devices {jax.devices()} backend {jax.default_backend()}")
    import jaxlib

    log(f"jaxlib {jaxlib.__version__}")
    # The first Pallas call: which warnings does the Triton backend give?
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        args, _ = inputs(jax.random.key(0), 1, 256, 2, 64, 1, 64, jnp.bfloat16)
        t = time.time()
        jax.block_until_ready(ssd_pallas(*args))
        log(
            f"first call {time.time() - t:.1f}s; warnings: "
            + repr(sorted({f"{x.category.__name__}: {x.message}" for x in w}))
        )
    if a.stages:
        log("== stages (ms, median of 7 batches of 10 calls; bf16 with D) ==")
        for s in a.shapes.split(","):
            for v in a.variants.split(",") if a.variants else ["default"]:
                try:
                    st = stage_times(SHAPES[s], VARIANTS[v])
                    log(f"  {s} {v}: " + "  ".join(f"{k} {t:.3f}" for k, t in st.items()))
                except Exception as e:  # noqa: BLE001
                    log(f"  {s} {v}: ERROR {type(e).__name__}: {str(e)[:2000]}")
                save_log()
        return
    results = []
    if not a.skip_correct:
        log("== correctness (poisoned outputs) ==")
        ok = True
        small = a.cpu_dry
        ok &= check_case(
            "f32_feats_l777",
            (2, 77 if small else 777, 4, 16 if small else 64, 2, 16 if small else 64),
            F32,
            True,
            "reference",
            2e-4,
            {"superchunks": 3},
        )
        if not small:
            ok &= check_case(
                "bf16_p128n128_K1", (1, 1000, 2, 128, 1, 128), jnp.bfloat16, True, "reference", 2e-2
            )
            ok &= check_case(
                "f32_p128n128",
                (1, 2048, 4, 128, 1, 128),
                F32,
                True,
                "reference",
                2e-4,
                {"superchunks": 2},
            )
            ok &= check_case(
                "f32_plain_K5",
                (2, 1024, 4, 64, 4, 128),
                F32,
                False,
                "reference",
                2e-4,
                {"superchunks": 5},
            )
            ok &= check_case(
                "bf16_feats",
                (2, 2048, 8, 64, 2, 128),
                jnp.bfloat16,
                True,
                "reference",
                2e-2,
                {"superchunks": 4},
                yardstick=True,
            )
        for s in a.shapes.split(","):
            ok &= check_case(
                "bf16_" + s,
                SHAPES[s],
                jnp.bfloat16,
                False,
                "chunked",
                2e-2,
                yardstick=(s == "b4_l4k_h64"),
            )
        log(f"correctness {'ALL PASS' if ok else 'SOME FAIL'} ({time.time() - _T0:.0f}s)")
        save_log()
    log("== timing (ms; median [min, max] of 7 batches of 10 back-to-back calls) ==")
    names = a.variants.split(",") if a.variants else (["default"] if a.quick else list(VARIANTS))
    shapes = a.shapes.split(",")
    # Defaults at every shape first, then the variants at the first two shapes, within budget.
    plan = [(s, "default") for s in shapes if "default" in names] + [
        (s, v) for v in names if v != "default" for s in shapes[:2]
    ]
    for s, v in plan:
        shape = SHAPES[s]
        if time.time() - _T0 > a.budget and v != "default":
            log(f"  skip {s} {v}: budget")
            continue
        try:
            (tf, tf0, tf1), (tb, tb0, tb1), ct = time_variant(shape, VARIANTS[v])
            pf, pb = PEER.get(s, (float("nan"), float("nan")))
            results.append((s, v, tf, tb, tf / pf, tb / pb))
            log(
                f"  {s} {v}: fwd {tf:.3f} [{tf0:.3f},{tf1:.3f}]  fwd+bwd {tb:.3f} [{tb0:.3f},{tb1:.3f}]"
                f"  compile {ct:.0f}s  vs peer {tf / pf:.2f}x / {tb / pb:.2f}x"
            )
        except Exception as e:  # noqa: BLE001
            log(f"  {s} {v}: ERROR {type(e).__name__}: {str(e)[:2000]}")
        save_log()
    if a.peer and time.time() - _T0 > a.budget + 60:
        log("peer skipped: budget")
    elif a.peer:
        log("== peer: mamba_ssm Triton (do_bench median) ==")
        for s in a.shapes.split(","):
            try:
                pf, pb = peer_times(SHAPES[s])
                log(f"  peer {s}: fwd {pf:.3f}  fwd+bwd {pb:.3f}")
            except Exception as e:  # noqa: BLE001
                log(f"  peer {s}: ERROR {type(e).__name__}: {str(e)[:1000]}")
    log("== summary ==")
    for r in results:
        shape, variant, tf, tb, rf, rb = r
        log(
            f"  {shape:<16} {variant:<8} fwd {tf:.3f}  fwd+bwd {tb:.3f}  (x peer {rf:.2f} / {rb:.2f})"
        )
    log(f"total {time.time() - _T0:.0f}s")
    save_log()


if __name__ == "__main__":
    main()
