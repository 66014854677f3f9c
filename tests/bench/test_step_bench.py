"""`python -m hybridjax.bench step` on the CPU: the tiny preset runs and prints its table."""

import math

import pytest

from hybridjax.bench import step
from hybridjax.bench.__main__ import main as bench_main


def table_rows(out):
    """{impl: cells} of the printed markdown table (header and rule left out)."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("impl", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_tiny_chunked_step_prints_a_row_with_finite_loss(capsys):
    assert (
        bench_main(
            ["step", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--impls", "chunked"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| impl | compile s | step ms | tokens/s |" in out
    cells = table_rows(out)["chunked"]
    assert len(cells) == 10
    compile_s, step_ms, loss_first, loss_last = (float(cells[i]) for i in (0, 1, 7, 8))
    assert compile_s > 0 and step_ms > 0
    assert math.isfinite(loss_first) and math.isfinite(loss_last)
    assert cells[9] == "1.000"  # its own step time over chunked's


def test_pallas_on_cpu_is_skipped_with_the_reason(capsys):
    assert step.main(["--preset", "tiny", "--impls", "pallas"]) == 0
    out = capsys.readouterr().out
    assert "[pallas] skipped: the Pallas kernel needs a GPU backend" in out
    assert table_rows(out)["pallas"][0].startswith("skipped: ")


def test_child_process_returns_its_row():
    row = step.run_child(["--preset", "tiny"], "pallas")
    assert row["impl"] == "pallas" and row["error"].startswith("skipped: ")


def test_model_overrides_parse_as_the_fields_types():
    from hybridjax.bench.step import parse_args

    args = parse_args(
        ["--preset", "tiny", "--model", "attn_max_documents=2", "attn_impl=blockwise"]
    )
    assert (args.config.attn_max_documents, args.config.attn_impl) == (2, "blockwise")
    for bad in ("nope=1", "d_model=x", "tie_embeddings=yes"):
        with pytest.raises(SystemExit):
            parse_args(["--preset", "tiny", "--model", bad])
