"""`python -m hybridjax.export`: a trainer checkpoint to a transformers NemotronH checkpoint."""

import dataclasses

import jax
import ml_dtypes
import numpy as np
import optax
import pytest
import yaml
from flax import nnx
from nemotron_models import PARITY, config

from hybridjax.checkpoint import Checkpointer
from hybridjax.config import HybridConfig
from hybridjax.export import from_hf
from hybridjax.export.__main__ import main
from hybridjax.model import flat_params
from hybridjax.train_step import init_state

transformers = pytest.importorskip("transformers")


def fake_run(run_dir, cfg: HybridConfig, steps=(2, 4)):
    """A run directory as `python -m hybridjax.train` leaves it: config.yaml (the model section
    is what export reads) and orbax checkpoints of the train state, parameters moved per step."""
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg)}))
    graphdef, state = init_state(cfg, optax.adamw(1e-3), seed=0)
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    saved = {}
    for step in steps:
        params = jax.tree.map(lambda p, s=step: p + s * 1e-3, state.params)
        state = state._replace(step=np.int32(step), params=params)
        ckpt.save(step, state, {"position": step})
        saved[step] = flat_params(nnx.merge(graphdef, state.params, state.model_state))
    ckpt.close()
    return saved


def test_cli_exports_latest_and_chosen_step(tmp_path, capsys):
    cfg = config(**PARITY["all_letters"])
    saved = fake_run(tmp_path / "run", cfg)
    assert main([str(tmp_path / "run"), str(tmp_path / "latest")]) == 0
    assert "exported step 4" in capsys.readouterr().out
    step_dir = tmp_path / "run" / "checkpoints" / "2"
    assert main([str(step_dir), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    for out, step in (("latest", 4), ("bf16", 2)):
        _, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / out, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"]
        imported = flat_params(from_hf(tmp_path / out))
        for name, value in saved[step].items():
            router = name.endswith(("e_score_correction_bias", "mixer.gate.weight"))
            if out == "bf16" and not router:  # the router stays float32, as in transformers
                value = value.astype(ml_dtypes.bfloat16).astype(value.dtype)
            np.testing.assert_array_equal(imported[name], value, err_msg=name)


def test_cli_errors(tmp_path, capsys):
    cfg = config(**PARITY["all_letters"], rope_theta=10000.0)
    fake_run(tmp_path / "run", cfg, steps=(1,))
    assert main([str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert "rope_theta" in capsys.readouterr().err
    assert main([str(tmp_path / "run"), str(tmp_path / "out"), "--step", "7"]) == 2
    assert "no checkpoint for step 7" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
