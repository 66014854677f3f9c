"""`python -m hybridjax.bench mesh` on 8 forced CPU devices: layouts side by side, one process
each; with one global batch every layout starts from the same loss."""

import pytest

from hybridjax.bench.__main__ import main as bench_main
from tests.bench.test_step_bench import table_rows


def test_tiny_layouts_print_rows_with_equal_first_losses(capsys, tmp_path):
    assert (
        bench_main(
            [
                "mesh",
                "--preset",
                "tiny",
                "--impl",
                "chunked",
                "--layouts",
                "1",
                "fsdp=2,tensor=2",
                "--same-batch",
                "--batch",
                "4",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert set(rows) >= {"1", "fsdp=2,tensor=2"}
    one, mesh = rows["1"], rows["fsdp=2,tensor=2"]
    assert (one[0], mesh[0]) == ("1", "4")  # devices
    assert abs(float(one[-2]) - float(mesh[-2])) < 1e-4  # loss first
    assert "fsdp=2,tensor=2 at 128: all-gather" in out  # FSDP gathers its weights
    assert (tmp_path / "mesh_tiny.md").exists()


def test_bad_layout_names_the_allowed_axes(capsys):
    with pytest.raises(SystemExit):
        bench_main(["mesh", "--layouts", "pipeline=2"])
    assert "axis=size pairs over data, fsdp, expert, context, tensor" in capsys.readouterr().err
