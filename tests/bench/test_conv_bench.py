"""`python -m hybridjax.bench conv` on the CPU at a tiny shape: the XLA path and the Pallas
kernels (interpret mode) print a row each with the same output and gradients, the table and the log go
to --out; no timing is asserted."""

import re

import jax.numpy as jnp
import numpy as np

from hybridjax.bench import conv as conv_bench
from hybridjax.bench.__main__ import main as bench_main


def test_tiny_shape_prints_rows_and_writes_the_table(capsys, tmp_path):
    argv = ["conv", "--shapes", "b2,l70,c24,k4", "--block-l", "16", "--block-c", "16"]
    argv += ["--warmup", "1", "--repeats", "1", "--batch", "1", "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| b2 l70 c24 k4 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["xla", "pallas"]
    assert all(float(r.split("|")[4]) > 0 for r in rows)  # fwd+bwd ms
    errs = re.findall(r"(y|dx|dkernel|dbias) ([0-9.e+-]+)", rows[1])
    assert [n for n, _ in errs] == ["y", "dx", "dkernel", "dbias"], rows[1]
    assert max(float(e) for _, e in errs) < 1e-2, rows[1]
    assert (tmp_path / "conv.md").read_text().splitlines()[2:] == rows
    assert "pallas: fwd" in (tmp_path / "conv.log").read_text()


def test_inputs_have_the_documents_asked_for():
    x, kernel, bias, seg, dy = conv_bench.make_inputs(
        {"b": 3, "l": 50, "c": 8, "k": 4}, jnp.bfloat16, docs=4
    )
    seg = np.asarray(seg)
    runs = 1 + (np.diff(seg, axis=1) != 0).sum(axis=1)
    assert runs.tolist() == [4, 4, 4]
    assert x.dtype == dy.dtype == jnp.bfloat16 and kernel.shape == (4, 8) and bias.shape == (8,)
