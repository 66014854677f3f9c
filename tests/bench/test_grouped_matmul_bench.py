"""`python -m hybridjax.bench grouped_matmul` on the CPU at a tiny shape: ragged_dot and padded
print a row each with the same output, a peer that is not installed is skipped with its pip
name, the table and the log go to --out; no timing is asserted."""

import jax.numpy as jnp
import numpy as np

from hybridjax.bench import grouped_matmul as gm_bench
from hybridjax.bench.__main__ import main as bench_main


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
