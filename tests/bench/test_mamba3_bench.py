"""`python -m hybridjax.bench mamba3` on the CPU at a tiny shape: chunked and the Pallas path (in
interpret mode) print a row each, their y agrees, the table and the log go to --out; no timing
is asserted."""

from hybridjax.bench.__main__ import main as bench_main


def test_tiny_shape_prints_rows_and_writes_the_table(capsys, tmp_path):
    argv = [
        "mamba3",
        "--shapes",
        "b1,l40,h2,p16,n16,g1",
        "--impls",
        "chunked",
        "pallas",
        "mamba_ssm",
    ]
    argv += ["--interpret", "--warmup", "1", "--repeats", "1", "--batch", "1"]
    assert bench_main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mamba_ssm: skipped" in out  # no CUDA here; the bench goes on without the peer
    rows = [line for line in out.splitlines() if line.startswith("| b1 l40 h2 p16 n16 g1 s4 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["chunked", "pallas"]
    fwd, fwd_bwd = (float(c) for c in rows[1].split("|")[3:5])
    assert fwd > 0 and fwd_bwd > 0
    assert "y vs chunked: rel.err" in rows[1] and "MISMATCH" not in out
    table = (tmp_path / "mamba3.md").read_text()
    assert table.splitlines()[2:] == rows
    assert "pallas: fwd" in (tmp_path / "mamba3.log").read_text()
