"""trainer.mesh.context: the trainer's mesh splits each row's sequence; lengths that do not split
evenly are refused by name."""

import re

import pytest

from hybridjax.sharding import batch_sharding
from hybridjax.train import build
from hybridjax.train_config import resolve


def test_context_axis_splits_the_batch_sequence(tiny_compose):
    run = resolve(tiny_compose(["trainer.mesh.data=2", "trainer.mesh.context=4"]))
    mesh = build(run, "unused").mesh
    assert dict(mesh.shape)["context"] == 4
    assert batch_sharding(mesh).spec[1] == "context"


@pytest.mark.parametrize(
    "overrides,name",
    [
        (["trainer.seq_len=126"], "trainer.seq_len: 126"),
        (
            ["trainer.seq_len_schedule=[{seq_len:130,batch_size:2,steps:1}]"],
            "trainer.seq_len_schedule[0].seq_len: 130",
        ),
    ],
)
def test_lengths_must_split_over_the_context_axis(tiny_compose, overrides, name):
    run = resolve(tiny_compose(["trainer.mesh.data=2", "trainer.mesh.context=4", *overrides]))
    message = f"{name} does not split into trainer.mesh.context=4"
    with pytest.raises(ValueError, match=re.escape(message)):
        build(run, "unused")
