"""Whole tiny training runs: the run directory's contents, exact resume, NaN stops."""

import json
import os

import jax
import numpy as np
import pytest

from hybridjax.checkpoint import Checkpointer
from hybridjax.metrics_log import read_metrics
from hybridjax.train import NonFiniteLoss, build
from hybridjax.train_config import resolve


def test_run_dir_contents(tmp_path, tiny_run):
    summary = tiny_run(
        tmp_path,
        [
            "trainer.steps=4",
            "trainer.eval_every=2",
            "trainer.checkpoint_every=2",
            "trainer.keep_checkpoints=1",
            "model.pattern=M*E",
            "logger=wandb",
        ],
    )
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one record per logged step
    for r in records:
        for key in ("loss", "ce", "lr", "grad_norm", "moe/load_max", "moe/lb_loss"):
            assert np.isfinite(r[key]), key
        assert "mfu" in r  # null on a CPU: no peak FLOP/s to compare with
    assert records[0]["tokens_per_sec"] is None  # step 1 compiles: no throughput yet
    assert all(r["tokens_per_sec"] > 0 for r in records[1:])
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {
        "eval/loss",
        "eval/perplexity",
        "eval/accuracy/pairs=2,len=32",
        "eval/accuracy/pairs=4,len=32",
    } <= set(evals[0])
    assert 0.0 <= evals[0]["eval/accuracy"] <= 1.0
    assert records[0]["lr"] < records[1]["lr"]  # warming up

    assert os.listdir(tmp_path / "checkpoints") == ["4"]  # keep_checkpoints=1
    assert summary["step"] == 4 and summary["params_total"] > 0
    assert (
        json.loads((tmp_path / "summary.json").read_text())["eval/accuracy"]
        == evals[-1]["eval/accuracy"]
    )
    assert "pattern: M*E" in (tmp_path / "config.yaml").read_text()
    wandb_runs = os.listdir(tmp_path / "wandb")
    assert any(name.startswith("offline-run-") for name in wandb_runs), wandb_runs


def final_params(run_dir, tiny_compose, overrides):
    run = resolve(tiny_compose(overrides))
    state = build(run, str(run_dir)).state
    ckpt = Checkpointer(run_dir / "checkpoints")
    restored, data_state = ckpt.restore(ckpt.latest_step(), like=state)
    ckpt.close()
    return restored, data_state


def test_resume_is_exact(tmp_path, tiny_run, tiny_compose):
    """20 steps straight == 10 steps, stop, resume to 20: same losses and parameters, bitwise.
    MoE (router bias state), gradient accumulation and an eval in between all take part."""
    common = ["model.pattern=M*E", "trainer.grad_accum=2", "trainer.eval_every=10"]
    tiny_run(tmp_path / "straight", [*common, "trainer.steps=20", "trainer.checkpoint_every=7"])
    tiny_run(tmp_path / "resumed", [*common, "trainer.steps=20", "trainer.stop_at=10"])
    tiny_run(tmp_path / "resumed", [*common, "trainer.steps=20", "trainer.checkpoint_every=7"])

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 21))  # no duplicate records
    for a, b in zip(straight, resumed):
        for key in ("loss", "grad_norm", "lr", "moe/load_max"):
            assert a[key] == b[key], (a["step"], key)
        assert a.get("eval/accuracy") == b.get("eval/accuracy")

    a, a_data = final_params(tmp_path / "straight", tiny_compose, common)
    b, b_data = final_params(tmp_path / "resumed", tiny_compose, common)
    assert a_data == b_data
    assert int(a.step) == int(b.step) == 20
    same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
    assert all(jax.tree.leaves(same))
    assert np.any(np.asarray(jax.tree.leaves(a.model_state)[0]) != 0)  # biases did move


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_run):
    tiny_run(tmp_path, ["trainer.steps=2"])
    with pytest.raises(
        NonFiniteLoss,
        match=r"at step \d+: stopping; the last good checkpoint "
        r"\(step 2\) is intact",
    ):
        tiny_run(
            tmp_path,
            [
                "trainer.steps=8",
                "trainer.checkpoint_every=4",
                "optimizer.lr=1e30",
                "optimizer.warmup_steps=0",
            ],
        )
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == 2
    ckpt.close()


def test_resume_never_refuses_an_existing_run(tmp_path, tiny_run):
    tiny_run(tmp_path, ["trainer.steps=1"])
    with pytest.raises(RuntimeError, match="trainer.resume=never"):
        tiny_run(tmp_path, ["trainer.steps=2", "trainer.resume=never"])
