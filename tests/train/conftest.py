"""Helpers for the trainer tests: compose the real Hydra config tree with a tiny model and run it."""

import os

import pytest

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs")

# A model and task small enough that a step takes milliseconds on the CPU; compile dominates.
TINY = [
    "model.d_model=32",
    "model.pattern=M*",
    "model.mamba_heads=2",
    "model.mamba_head_dim=16",
    "model.ssm_state=8",
    "model.chunk_size=16",
    "model.attn_heads=2",
    "model.kv_heads=1",
    "model.head_dim=16",
    "model.ffn=32",
    "model.n_experts=4",
    "model.top_k=2",
    "model.moe_ffn=16",
    "model.vocab_size=64",
    "trainer.batch_size=4",
    "trainer.seq_len=32",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    "optimizer.warmup_steps=2",
    "logger=none",
]
TINY_MQAR = ["data.num_pairs=[2,4]", "data.num_eval_examples=16"]


def compose(overrides=()):
    """The composed (unresolved) DictConfig for `overrides` on top of the TINY defaults."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hybridjax.train_config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=os.path.abspath(CONFIG_DIR), version_base=None):
        data = [] if any(o.startswith("data=") for o in overrides) else TINY_MQAR
        return hydra_compose(config_name="config", overrides=[*TINY, *data, *overrides])


def run(run_dir, overrides=()):
    """Compose, validate and train in `run_dir`; returns the summary dict."""
    from hybridjax.train import run_from_config

    return run_from_config(compose(overrides), str(run_dir))


@pytest.fixture
def tiny_overrides():
    """The TINY model/trainer overrides plus the tiny MQAR data ones, for command lines."""
    return [*TINY, *TINY_MQAR]


@pytest.fixture
def tiny_compose():
    """compose(overrides) -> DictConfig on the TINY defaults."""
    return compose


@pytest.fixture
def tiny_run():
    """run(run_dir, overrides) -> summary: a whole tiny training run."""
    return run
