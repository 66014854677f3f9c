"""`python -m hybridjax.bench grouped_matmul` on the CPU at a tiny shape: ragged_dot and padded
print a row each with the same output, a peer that is not installed is skipped with its pip
name, the table and the log go to --out; no timing is asserted."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.bench import grouped_matmul as gm_bench
from hybridjax.bench import grouped_matmul_sweep as sweep_mod
from hybridjax.bench.__main__ import main as bench_main
from hybridjax.ops.grouped_matmul import MGPU_WGRAD_TILING, mgpu_forward_tiling


def test_tiny_shape_prints_rows_and_writes_the_table(capsys, tmp_path, monkeypatch):
    # a peer that is missing (also where jax-linear-attention is installed)
    missing = ("no_such_module_for_the_test", "ragged_dot", {})
    monkeypatch.setitem(gm_bench.PEERS, "jax-linear-attention", missing)
    argv = ["grouped_matmul", "--shapes", "m300,k64,n32,e8", "--impls", "ragged_dot", "padded"]
    argv += ["jax-linear-attention", "--warmup", "1", "--repeats", "1", "--batch", "1"]
    assert bench_main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "jax-linear-attention: skipped" in out and "pip install jax-linear-attention" in out
    rows = [line for line in out.splitlines() if line.startswith("| m300 k64 n32 e8 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["ragged_dot", "padded"]
    assert all(float(r.split("|")[5]) > 0 for r in rows)  # fwd+bwd ms
    assert "vs ragged_dot: rel.err" in rows[1] and "MISMATCH" not in out
    assert (tmp_path / "grouped_matmul.md").read_text().splitlines()[2:] == rows
    assert "padded: fwd" in (tmp_path / "grouped_matmul.log").read_text()


def test_inputs_route_every_row_to_one_expert():
    lhs, rhs, sizes, d_out = gm_bench.make_inputs(
        {"m": 1000, "k": 16, "n": 8, "e": 8}, jnp.bfloat16
    )
    sizes = np.asarray(sizes)
    assert sizes.sum() == 1000 and sizes.min() > 0 and len(set(sizes.tolist())) > 1
    assert lhs.shape == (1000, 16) and rhs.shape == (8, 16, 8) and d_out.shape == (1000, 8)


def test_sweep_refuses_without_a_hopper_gpu(capsys):
    argv = ["grouped_matmul", "--sweep", "--shapes", "m256,k128,n128,e4"]
    assert bench_main(argv) == 2
    assert "sm_90 GPU" in capsys.readouterr().err


@pytest.mark.parametrize("wgrad", [False, True])
def test_sweep_candidates_start_with_ours_and_tile_the_sizes(wgrad):
    ours = MGPU_WGRAD_TILING if wgrad else mgpu_forward_tiling(768)
    found = list(sweep_mod.candidates(ours, 768, 2048, wgrad))
    assert found[0] == ours and len(found) > 20
    assert len({tuple(c.items()) for c in found}) == len(found)  # no tiling twice
    for c in found:
        assert 768 % c["block_n"] == 0 and c["block_m"] * c["block_n"] <= 128 * 128
        stages = c["max_concurrent_steps"] * (c["block_m"] + c["block_n"]) * c["block_k"]
        assert 2 * (stages + c["block_m"] * c["block_n"]) <= sweep_mod.SMEM_BYTES
        if wgrad:
            assert 2048 % c["block_m"] == 0 and c["grid_block_n"] <= 2
        else:
            assert 2048 % c["block_k"] == 0 and (768 // c["block_n"]) % c["grid_block_n"] == 0


def test_sweep_table_with_stand_in_kernels(capsys, tmp_path, monkeypatch):
    """The sweep's flow on the CPU: jax.lax.ragged_dot stands in for the three GPU kernels (every
    tiling gives the same output); ours leads each kernel's rows at 1.00x; --out gets the table."""

    def stand_in(lhs, rhs, sizes, d_out):
        k, n = rhs.shape[1:]
        fwd = lambda t: functools.partial(jax.lax.ragged_dot, lhs, rhs, sizes)
        dlhs = lambda t: functools.partial(
            jax.lax.ragged_dot, d_out, jnp.swapaxes(rhs, 1, 2), sizes
        )
        wgrad = lambda t: lambda: jnp.zeros((rhs.shape[0], k, n), lhs.dtype)
        return (
            ("forward", n, k, mgpu_forward_tiling(n), False, fwd),
            ("d lhs", k, n, mgpu_forward_tiling(k), False, dlhs),
            ("d rhs", n, k, MGPU_WGRAD_TILING, True, wgrad),
        )

    two_more = ({"block_m": 64, "grid_block_n": 1}, {"block_m": 64, "grid_block_n": 2})
    monkeypatch.setattr(sweep_mod, "candidates", lambda ours, *_: (ours, *two_more))
    monkeypatch.setattr(sweep_mod, "kernels", stand_in)
    monkeypatch.setattr(gm_bench, "is_hopper", lambda: True)
    argv = ["grouped_matmul", "--sweep", "--shapes", "m256,k128,n256,e4"]
    argv += ["--warmup", "0", "--repeats", "1", "--batch", "1", "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    assert "forward: 3 tilings timed, 0 did not compile" in capsys.readouterr().out
    rows = (tmp_path / "grouped_matmul_sweep.md").read_text().splitlines()[2:]
    assert [r.split("|")[2].strip() for r in rows] == [
        k for k in ("forward", "d lhs", "d rhs") for _ in range(3)
    ]
    for i in (0, 3, 6):
        ours, others = rows[i], rows[i + 1 : i + 3]
        assert "| ours block_m=128 block_n=128 block_k=64 max_concurrent_steps=5" in ours
        assert ours.split("|")[6].strip() == "1.00x"
        assert sorted(o.split("|")[3].strip() for o in others) == [
            "block_m=64 grid_block_n=1",
            "block_m=64 grid_block_n=2",
        ]
        assert {r.split("|")[7].strip() for r in rows[i : i + 3]} == {"0e+00"}
    assert "grid_block_n=2 |" in rows[0]  # 256 columns: two tiles of 128, swizzled by 2
