"""Config validation: a misspelt key or a bad value fails before training, naming the key."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from hybridjax.config import HybridConfig
from hybridjax.train_config import resolve, schemas


def test_default_config_resolves(tiny_compose):
    run = resolve(tiny_compose())
    assert run.model.pattern == "M*"
    assert run.data.num_pairs == (2, 4)  # lists from YAML become the library's tuples
    assert run.trainer.resume == "auto" and run.logger.name == "none"


def test_model_schema_is_hybrid_config():
    fields = set(HybridConfig.__dataclass_fields__)
    assert set(schemas()["model"].__dataclass_fields__) == fields


@pytest.mark.parametrize(
    "override,named",
    [
        ("trainer.stepz=3", "stepz"),
        ("model.d_modle=16", "d_modle"),
        ("data.num_pair=[3]", "num_pair"),
        ("optimizer.learning_rate=1.0", "learning_rate"),
    ],
)
def test_misspelt_key_fails_naming_it(tiny_compose, override, named):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        tiny_compose([override])
    assert named in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    "override,named",
    [
        ("trainer.steps=many", "trainer.steps"),
        ("model.d_model=1.5", "model.d_model"),
        ("trainer.progress=maybe", "trainer.progress"),
    ],
)
def test_mistyped_value_fails_naming_it(tiny_compose, override, named):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        tiny_compose([override])
    assert named in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.pattern=MX*", "model.pattern: 'X' is not allowed"),
        ("model.kv_heads=3", "model.kv_heads"),
        ("trainer.resume=sometimes", "trainer.resume: 'sometimes' is not allowed"),
        ("trainer.grad_accum=3", "trainer.grad_accum: must divide batch_size"),
        ("trainer.steps=0", "trainer.steps: must be > 0"),
        ("optimizer.schedule=linear", "optimizer.schedule: 'linear' is not allowed"),
        ("logger.mode=sometimes", "logger.mode"),
        ("data.num_pairs=[40]", "num_pairs"),
        ("data.vocab_size=128", "model.vocab_size: 64 is smaller than the data's vocabulary"),
    ],
)
def test_bad_value_fails_in_resolve_naming_it(tiny_compose, override, message):
    cfg = tiny_compose([override])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve(cfg)


def test_data_kinds_switch_schema(tiny_compose):
    run = resolve(tiny_compose(["data=niah", "data.depths=[0.0,1.0]"]))
    assert type(run.data).__name__ == "NIAHConfig" and run.data.depths == (0.0, 1.0)
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        tiny_compose(["data=niah", "data.num_pairs=[3]"])  # an MQAR key on NIAH data
