"""Long-context extension: a run started from another run's parameters (trainer.init_from), the
constant lr, and per-step sequence-length schedules (deterministic, resumed exactly)."""

import hashlib
import os
import shutil

import jax
import numpy as np
import pytest
import yaml

from hybridjax.checkpoint import Checkpointer, find_checkpoint
from hybridjax.metrics_log import read_metrics
from hybridjax.optim import OptimConfig, make_schedule
from hybridjax.train import LengthSchedule, build, init_from
from hybridjax.train_config import TrainerConfig, resolve

MOE = ["model.pattern=M*E"]  # router biases: model state that init_from must carry too
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
SCHEDULE = "trainer.seq_len_schedule=[{seq_len:64,batch_size:2,steps:2},{seq_len:32}]"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished MoE run with checkpoints at steps 2 and 4 (router biases moved)."""
    from tests.train.conftest import run

    run_dir = tmp_path_factory.mktemp("source")
    run(run_dir, [*MOE, "trainer.steps=4", "trainer.checkpoint_every=2"])
    return run_dir


def snapshot(directory):
    """Every file under `directory` (relative path -> sha256) and every directory's path."""
    files, dirs = {}, set()
    for root, dirnames, filenames in os.walk(directory):
        dirs.update(os.path.relpath(os.path.join(root, d), directory) for d in dirnames)
        for name in filenames:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return files, dirs


def saved(run_dir, step, like):
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        return ckpt.restore(step, like=like)[0]
    finally:
        ckpt.close()


def equal_trees(a, b):
    same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


@pytest.mark.parametrize("checkpoint_dir", [False, True])
def test_init_from_copies_the_parameters_exactly(source, tiny_compose, checkpoint_dir):
    """Another length, batch, data and runtime fields; a run dir means its latest checkpoint, a
    checkpoint dir that step. Step 0, the new run's RNG, a fresh optimizer state."""
    step = 2 if checkpoint_dir else 4
    path = source / "checkpoints" / "2" if checkpoint_dir else source
    assert find_checkpoint(path) == str(source / "checkpoints" / str(step))
    overrides = [
        *MOE,
        "trainer.seq_len=64",
        "trainer.batch_size=2",
        "trainer.seed=5",
        "model.remat=full",
        "model.ssd_impl=reference",
        "data=niah",
        f"trainer.init_from={path}",
    ]
    run = resolve(tiny_compose(overrides))
    fresh = build(run, "unused").state
    state = init_from(run, fresh)
    source_state = saved(source, step, fresh)
    assert equal_trees(state.params, source_state.params)
    assert equal_trees(state.model_state, source_state.model_state)
    assert np.any(np.asarray(jax.tree.leaves(state.model_state)[0]) != 0)  # biases came along
    assert not equal_trees(state.params, fresh.params)
    assert int(state.step) == 0
    assert equal_trees(state.rng, fresh.rng)
    assert equal_trees(state.opt_state, fresh.opt_state)
    mu = state.opt_state[1][0].mu  # clip, then AdamW's (scale_by_adam, ...): zero moments
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(mu))
    assert int(state.opt_state[1][0].count) == 0


def test_init_from_restores_into_the_mesh_layout(source, tiny_compose):
    run = resolve(
        tiny_compose(
            [*MOE, "trainer.mesh.data=2", "trainer.mesh.fsdp=4", f"trainer.init_from={source}"]
        )
    )
    fresh = build(run, "unused").state
    state = init_from(run, fresh)
    shardings = jax.tree.map(lambda x: x.sharding, (fresh.params, fresh.model_state))
    assert jax.tree.map(lambda x: x.sharding, (state.params, state.model_state)) == shardings
    assert any(
        len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
        for x in jax.tree.leaves(state.params)
    )
    assert equal_trees(state.params, saved(source, 4, fresh).params)


@pytest.mark.parametrize(
    "model, expected",
    [
        (
            ["model.pattern=M*"],
            [
                "params.periods.blocks.2.mixer.gate.weight: saved (1, 4, 32), not in this model",
                "model_state.periods.blocks.2.mixer.gate.e_score_correction_bias: saved (1, 4), not in",
                "pattern 'M*E' -> 'M*'",
            ],
        ),
        (
            [*MOE, "model.moe_ffn=32"],
            [
                (
                    "params.periods.blocks.2.mixer.experts.up_proj: saved (1, 4, 32, 16), this model "
                    "(1, 4, 32, 32)"
                ),
                "moe_ffn 16 -> 32",
            ],
        ),
    ],
)
def test_init_from_refuses_another_model_naming_the_mismatches(
    source, tiny_compose, model, expected
):
    run = resolve(tiny_compose([*model, f"trainer.init_from={source}"]))
    with pytest.raises(ValueError) as err:
        init_from(run, build(run, "unused").state)
    text = str(err.value)
    assert text.startswith("trainer.init_from: the model does not fit the parameters saved in")
    for part in expected:
        assert part in text


def test_init_from_needs_a_checkpoint(tmp_path, tiny_compose):
    run = resolve(tiny_compose([f"trainer.init_from={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match="trainer.init_from: .* holds no checkpoint"):
        init_from(run, None)


def test_constant_schedule_is_the_peak_from_step_0():
    lr = make_schedule(OptimConfig(lr=3e-4, schedule="constant", warmup_steps=0), 100)
    assert [float(lr(s)) for s in (0, 1, 50, 100, 10_000)] == [3e-4] * 5
    with open(os.path.join(CONFIG_DIR, "optimizer", "adamw_constant.yaml")) as f:
        optimizer = OptimConfig(**yaml.safe_load(f))
    assert (optimizer.schedule, optimizer.warmup_steps) == ("constant", 0)


def test_length_schedule_cycles_by_step(tiny_compose):
    run = resolve(tiny_compose([SCHEDULE, "trainer.batch_size=8"]))
    lengths = LengthSchedule(run.trainer)
    assert [lengths.at(s) for s in range(7)] == [(64, 2), (64, 2), (32, 8)] * 2 + [(64, 2)]
    assert lengths.at(3001) == lengths.at(3001 % 3)
    assert lengths.describe() == "2 x (2 x 64), then 1 x (8 x 32), repeated"
    plain = LengthSchedule(TrainerConfig(seq_len=16, batch_size=4))
    assert not plain.scheduled and {plain.at(s) for s in range(5)} == {(16, 4)}


@pytest.mark.parametrize(
    "schedule, message",
    [
        (
            [{"seq_len": 64}, {"seq_len": 64, "steps": 2}],
            "seq_len_schedule: each seq_len may appear",
        ),
        (
            [{"seq_len": 64, "batch_size": 3}],
            r"seq_len_schedule\[0\].batch_size: must be divisible",
        ),
        ([{"seq_len": 64, "steps": 0}], r"seq_len_schedule\[0\].steps: must be > 0"),
    ],
)
def test_length_schedule_errors_name_the_entry(schedule, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(batch_size=4, grad_accum=2, seq_len_schedule=schedule)


def test_extension_resumes_bit_for_bit_from_its_own_checkpoints(
    source, tmp_path, tiny_run, tiny_compose
):
    """From the source at a constant lr and mixed lengths: 6 steps straight == 3 steps, stop,
    resume to 6 with the source gone (the run's own checkpoint wins over init_from); each
    length has its own data stream in the checkpoint; the source's files stay as they were."""
    before = snapshot(source)
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    common = [
        *MOE,
        "optimizer=adamw_constant",
        "optimizer.lr=2e-3",
        "optimizer.warmup_steps=0",
        SCHEDULE,
        f"trainer.init_from={copy}",
        "trainer.steps=6",
    ]
    tiny_run(tmp_path / "straight", common)
    tiny_run(tmp_path / "resumed", [*common, "trainer.stop_at=3"])
    assert snapshot(copy) == snapshot(source) == before
    shutil.rmtree(copy)
    tiny_run(tmp_path / "resumed", common)

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["seq_len"] for r in straight] == [64, 64, 32, 64, 64, 32]
    assert [r["lr"] for r in straight] == [np.float32(2e-3)] * 6  # the peak from step 1
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed, strict=True):
        for key in ("loss", "grad_norm", "seq_len", "moe/load_max"):
            assert a[key] == b[key], (a["step"], key)
    like = build(resolve(tiny_compose(common)), "unused").state
    ckpts = [Checkpointer(tmp_path / name / "checkpoints") for name in ("straight", "resumed")]
    (a, a_data), (b, b_data) = (c.restore(6, like=like) for c in ckpts)
    for c in ckpts:
        c.close()
    assert a_data == b_data and set(a_data) == {"seq_len=64", "seq_len=32"}
    assert equal_trees(a, b)
