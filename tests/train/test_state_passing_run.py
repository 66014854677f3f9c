"""trainer.state_passing (truncated BPTT): the train step carries each row's Mamba-2 states to
the row's next chunk, a run stopped and resumed equals the straight run bit for bit (carry and
data streams in the checkpoint), data parallel meshes split the carry's rows, bad settings are
refused by name."""

import contextlib

import jax
import numpy as np
import pytest
from flax import nnx

from hybridjax.checkpoint import Checkpointer
from hybridjax.metrics_log import read_metrics
from hybridjax.model import continue_states
from hybridjax.train import TrainBatches, build
from hybridjax.train_config import TrainerConfig, resolve
from hybridjax.train_step import MODEL_INPUTS, batch_shardings

TEXT = "\n\n".join(f"document {i} " + "words and more words " * (1 + i % 9) for i in range(40))


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    return [
        "data=text",
        f"data.paths=[{tmp_path / 'c.txt'}]",
        "data.doc_separator='\n\n'",
        "model.vocab_size=null",
        "trainer.state_passing=true",
    ]


@pytest.mark.parametrize(
    "layout",
    [
        ["trainer.grad_accum=2"],
        ["trainer.mesh.data=2", "trainer.mesh.fsdp=2", "trainer.mesh.context=2"],
    ],
    ids=["micro_batches", "data_fsdp_context"],
)
def test_step_carries_each_rows_state_to_its_next_chunk(corpus, tiny_compose, layout):
    """Two steps over consecutive chunks, in two micro-batches or on a mesh that splits rows and
    sequence: the carry after each is what the model's own hidden_from reaches on one device
    over the whole batch from the carry before (zeroed where a row starts a document), with the
    step's parameters."""
    overrides = [*corpus, "trainer.seq_len=16", "model.pattern=M-", *layout]
    run = resolve(tiny_compose(overrides))
    setup = build(run, "unused")
    state = setup.state
    assert set(state.carry) == {"seq_len=16"}

    class Loop:  # what TrainBatches reads of the training loop
        t, lengths = run.trainer, __import__("hybridjax.train").train.LengthSchedule(run.trainer)

        def dataset(self, split, seed, batch_size, seq_len):
            from hybridjax.data import make_dataset

            return make_dataset(
                run.data,
                split=split,
                seed=seed,
                batch_size=batch_size,
                seq_len=seq_len,
                streams=True,
            )

    @jax.jit
    def carried(state, batch):
        model = nnx.merge(setup.graphdef, state.params, state.model_state)
        states = continue_states(state.carry["seq_len=16"], batch["continues"])
        return model.hidden_from(states, batch["tokens"], batch["segment_ids"])[2]

    batches = TrainBatches(Loop())
    for step in range(2):
        batch = {k: v for k, v in batches.next(step).items() if k in MODEL_INPUTS}
        want = carried(jax.device_get(state), batch)
        if setup.mesh is not None:
            batch = jax.device_put(batch, batch_shardings(setup.mesh, batch))
        with jax.set_mesh(setup.mesh) if setup.mesh is not None else contextlib.nullcontext():
            state, _ = setup.train_step(state, batch)
        for a, b in zip(jax.tree.leaves(state.carry["seq_len=16"]), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
        assert all(np.any(np.asarray(a)) for a in jax.tree.leaves(state.carry))
    assert batch["continues"].any()  # the second chunk continues some rows' documents


def test_resume_is_bit_for_bit(corpus, tmp_path, tiny_run, tiny_compose):
    """4 steps straight equal 2 steps, stop, resume to 4: losses, parameters, carried states and
    stream positions."""
    common = [*corpus, "trainer.steps=4", "trainer.eval_batches=1"]
    tiny_run(tmp_path / "straight", common)
    tiny_run(tmp_path / "resumed", [*common, "trainer.stop_at=2"])
    tiny_run(tmp_path / "resumed", common)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 5))
    for a, b in zip(straight, resumed, strict=True):
        for key in ("loss", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)
    like = build(resolve(tiny_compose(common)), "unused").state
    ckpts = [Checkpointer(tmp_path / name / "checkpoints") for name in ("straight", "resumed")]
    (a, a_data), (b, b_data) = (c.restore(4, like=like) for c in ckpts)
    for c in ckpts:
        c.close()
    assert a_data == b_data and len(a_data["rows"]) == 4
    assert set(a.carry) == {"seq_len=32"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert all(np.any(np.asarray(x)) for x in jax.tree.leaves(a.carry))


def test_data_parallel_splits_the_carry_rows(corpus, tiny_compose):
    """One carry per scheduled length, its rows split like the batch's."""
    overrides = [
        *corpus,
        "trainer.mesh.data=4",
        "trainer.mesh.fsdp=2",
        "trainer.batch_size=8",
        "trainer.seq_len_schedule=[{seq_len:32},{seq_len:16,batch_size:16}]",
    ]
    carry = build(resolve(tiny_compose(overrides)), "unused").state.carry
    assert set(carry) == {"seq_len=32", "seq_len=16"}
    for key, rows in (("seq_len=32", 8), ("seq_len=16", 16)):
        for x in jax.tree.leaves(carry[key]):  # (repeats, rows, ...)
            assert x.sharding.spec[0] is None and {"data", "fsdp"} <= set(x.sharding.spec[1])
            assert x.shape[1] == rows and len(x.sharding.device_set) == 8


@pytest.mark.parametrize(
    "trainer, message",
    [
        ({"state_passing": "yes"}, "state_passing: must be true or false, got 'yes'"),
    ],
)
def test_bad_settings_name_the_field(trainer, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**trainer)


def test_the_experiments_extension_stage_passes_states(tiny_compose):
    """experiments.long_context with name=long_context_tbptt: its extension stage streams needle
    examples of 1 to 8 rows at the short run's row length, with state passing."""
    job = ["+experiment=long_context", "name=long_context_tbptt", "model.pattern=MMMM", "data=niah"]
    short = resolve(tiny_compose(job))
    extend = resolve(
        tiny_compose([*job, "+experiment/extension=long_context_tbptt", "trainer.init_from=x"])
    )
    assert not short.trainer.state_passing and extend.trainer.state_passing
    assert extend.trainer.seq_len == short.trainer.seq_len
    assert extend.data.context_lens == (64, 128, 256, 512)  # the experiment's rows are 64
    assert extend.optimizer.schedule == "constant"
