"""`python -m hybridjax.bench step` on the CPU: the tiny preset runs and prints its table."""

import dataclasses
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


@pytest.mark.parametrize(("preset", "model"), [("1b", "hybrid_1b"), ("moe", "moe_hybrid_2b")])
def test_gpu_presets_are_the_model_configs_training_composes(preset, model):
    """`bench step --preset` and `python -m hybridjax.train model=<name>` build the same model
    (the vocabulary aside: the benchmark's 32K, the data's in training)."""
    from hydra import compose, initialize_config_dir

    from hybridjax.train import CONFIG_DIR
    from hybridjax.train_config import register_configs, resolve

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={model}", "logger=none"])
    trained = resolve(cfg).model
    bench = step.PRESETS[preset]["config"]
    assert trained == dataclasses.replace(bench, vocab_size=trained.vocab_size)
    assert bench.vocab_size == 32768 and bench.has("E") == (preset == "moe")
