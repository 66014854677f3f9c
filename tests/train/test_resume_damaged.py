"""Resuming past damaged checkpoints: files garbled, truncated or with a flipped bit are detected
on restore, the run resumes from the newest checkpoint that restores intact and keeps the damaged
one on disk, out of orbax's rotation; when none restores, the error names the directory and the
steps tried."""

import glob
import logging
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.checkpoint import Checkpointer, NoIntactCheckpoint
from hybridjax.metrics_log import read_metrics

# An attention-only model: the quickest to compile, and resuming does not depend on the mixers.
FAST = ["model.pattern=*", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2"]


def array_files(step_dir) -> list[str]:
    """The files holding a checkpoint's array data (orbax's OCDBT data files)."""
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
    assert files, step_dir
    return sorted(files)


def garble(path) -> None:
    """Overwrite the file with as many bytes of noise."""
    Path(path).write_bytes(np.random.default_rng(0).bytes(os.path.getsize(path)))


def truncate(path) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def snapshot(step_dir) -> dict:
    """Every file under `step_dir`: relative path -> bytes."""
    return {
        str(p.relative_to(step_dir)): p.read_bytes()
        for p in Path(step_dir).rglob("*")
        if p.is_file()
    }


def small_state(i: int) -> dict:
    """A state whose `w` is stored in a data file of its own (not inline: over 1 KiB)."""
    return {
        "w": jnp.arange(1024, dtype=jnp.float32) * i,
        "b": jnp.full((3, 4), i, jnp.bfloat16),
        "step": jnp.int32(i),
    }


@pytest.mark.parametrize("damage", [garble, truncate])
def test_restore_latest_sets_the_damaged_newest_aside_out_of_the_rotation(tmp_path, caplog, damage):
    """keep=2 holds steps 2 and 3; step 3 damaged: step 2 restores and step 3 moves to
    3.damaged, as it was. Saving 3, 4 and 5 again rotates good checkpoints only: orbax keeps 4
    and 5, and neither deletes 3.damaged nor counts it."""
    ckpt = Checkpointer(tmp_path, keep=2)
    for i in (1, 2, 3):
        ckpt.save(i, small_state(i), {"position": i})
    ckpt.close()
    for path in array_files(tmp_path / "3"):
        damage(path)
    damaged = snapshot(tmp_path / "3")

    ckpt = Checkpointer(tmp_path, keep=2)  # a resumed run's
    with caplog.at_level(logging.WARNING, logger="hybridjax.checkpoint"):
        step, state, data = ckpt.restore_latest(small_state(0))
    assert (step, data) == (2, {"position": 2})
    assert np.array_equal(np.asarray(state["w"]), np.arange(1024) * 2)
    assert f"checkpoint step 3 in {tmp_path} is damaged: " in caplog.text
    assert f"kept on disk, out of the rotation: {tmp_path}/3.damaged" in caplog.text
    assert snapshot(tmp_path / "3.damaged") == damaged
    assert ckpt.all_steps() == [2]

    for i in (3, 4, 5):
        ckpt.save(i, small_state(i), {"position": i})
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["3.damaged", "4", "5"]
    assert snapshot(tmp_path / "3.damaged") == damaged


def test_a_flipped_bit_that_orbax_reads_is_caught_by_the_fingerprint(tmp_path, caplog):
    """One bit of the compressed data flipped: the file still decompresses (to other values),
    and only the checkpoint's fingerprint tells."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal(4096), jnp.float32)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"w": -w})
    ckpt.save(2, {"w": w})
    ckpt.wait()
    path = max(array_files(tmp_path / "2"), key=os.path.getsize)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x40
    Path(path).write_bytes(data)

    with caplog.at_level(logging.WARNING, logger="hybridjax.checkpoint"):
        step, state, _ = ckpt.restore_latest({"w": w})
    ckpt.close()
    assert step == 1 and np.array_equal(np.asarray(state["w"]), -np.asarray(w))
    assert "checkpoint step 2 in " in caplog.text
    assert "is damaged: the values read differ from those saved (fingerprint) in w" in caplog.text


def test_another_model_is_an_error_not_damage(tmp_path):
    """A state of other shapes fails naming the leaves, and sets nothing aside."""
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, small_state(1))
    ckpt.wait()
    like = {**small_state(0), "w": jnp.zeros(128, jnp.float32)}
    with pytest.raises(
        ValueError,
        match=r"checkpoint 1 in .* holds another state than this "
        r"run's: w: saved \(1024,\), this model \(128,\)",
    ):
        ckpt.restore_latest(like)
    ckpt.close()
    assert os.listdir(tmp_path) == ["1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 4 steps with checkpoints at steps 2 and 4."""
    from tests.train.conftest import run

    run_dir = tmp_path_factory.mktemp("trained")
    run(run_dir, [*FAST, "trainer.steps=4"])
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4"]
    return run_dir


def test_resume_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path, tiny_run, caplog):
    """Step 4's array files garbled: the run resumes from step 2, trains to 6 (with the progress
    as log lines: not a terminal) and keeps step 4's files as 4.damaged."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    for path in array_files(run_dir / "checkpoints" / "4"):
        garble(path)
    damaged = snapshot(run_dir / "checkpoints" / "4")

    with caplog.at_level(logging.INFO):
        summary = tiny_run(run_dir, [*FAST, "trainer.steps=6", "trainer.progress=true"])
    checkpoints = run_dir / "checkpoints"
    assert f"checkpoint step 4 in {checkpoints} is damaged: " in caplog.text
    assert f"resumed from checkpoint step 2 in {checkpoints}" in caplog.text
    assert "step 6/6 (100%)" in caplog.text and "loss=" in caplog.text
    assert summary["step"] == 6
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))
    assert snapshot(checkpoints / "4.damaged") == damaged
    ckpt = Checkpointer(checkpoints)
    assert ckpt.all_steps() == [4, 6]  # saved anew; step 2 left the rotation as usual
    ckpt.close()


def test_resume_with_every_checkpoint_damaged_fails_naming_them(trained, tmp_path, tiny_run):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    for step in ("2", "4"):
        for path in array_files(run_dir / "checkpoints" / step):
            truncate(path)
    with pytest.raises(
        NoIntactCheckpoint,
        match=rf"no checkpoint in {run_dir}/checkpoints "
        rf"restores intact: tried steps 4, 2 \(step 4: "
        rf".*; step 2: .*\)\. Nothing was changed",
    ):
        tiny_run(run_dir, [*FAST, "trainer.steps=6"])
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4"]
