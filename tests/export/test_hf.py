"""Export to / import from transformers NemotronH: loading, logits parity, round trips, errors."""

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from nemotron_models import PARITY, config, parity_model, tokens
from safetensors.numpy import load_file

from hybridjax.config import HybridConfig
from hybridjax.export import from_hf, to_hf
from hybridjax.export import hf as hfx
from hybridjax.model import HybridLM, flat_params, load_flat_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_load(path, **kw):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, **kw
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return model.eval()


def hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.as_tensor(toks)).logits.float().numpy()


def assert_close(ours, theirs, rel=1e-4):
    err = np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs))
    assert err <= rel, f"max abs diff / max abs logit = {err:.2e} > {rel:.0e}"


@pytest.fixture(scope="module", params=list(PARITY))
def exported(request, tmp_path_factory):
    """(model, its logits on `tokens`, the directory `to_hf` wrote) for each PARITY config."""
    model = parity_model(request.param)
    out = tmp_path_factory.mktemp(request.param)
    to_hf(model, out)
    return model, np.asarray(model(tokens(model.config))), out


def test_transformers_logits_match(exported):
    model, logits, out = exported
    hf = hf_load(out)
    assert hf.dtype == torch.float32
    assert_close(logits, hf_logits(hf, tokens(model.config)))


def test_dt_clamp_matters():
    """The parity configs really exercise the clamp: without it the logits move."""
    model = parity_model("all_letters")
    cfg = model.config
    unclamped = HybridLM(cfg.replace(clamp_dt=False), rngs=nnx.Rngs(0))
    load_flat_params(unclamped, flat_params(model))
    toks = tokens(cfg)
    assert np.max(np.abs(model(toks) - unclamped(toks))) > 1e-4


def test_hub_names_and_files(exported, tmp_path):
    """The files and tensor names are exactly what transformers' own save_pretrained writes."""
    model, _, out = exported
    pattern = model.config.pattern
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == "nemotron_h"
    assert config_json["architectures"] == ["NemotronHForCausalLM"]
    assert config_json["layers_block_type"] == [hfx.LAYER_TYPES[c] for c in pattern]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    assert hf_cfg.hybrid_override_pattern == pattern
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(tmp_path)
    ours = load_file(out / "model.safetensors")
    theirs = load_file(tmp_path / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    e = pattern.index("E")
    assert f"backbone.layers.{e}.mixer.experts.5.up_proj.weight" in ours


def test_bfloat16_export(tmp_path):
    model = parity_model("all_letters")
    cfg = model.config
    to_hf(model, tmp_path, dtype="bfloat16")
    tensors = load_file(tmp_path / "model.safetensors")
    for name, value in tensors.items():
        router = name.endswith(("e_score_correction_bias", "mixer.gate.weight"))
        want = np.float32 if router else ml_dtypes.bfloat16  # as transformers keeps the router
        assert value.dtype == want, name
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    toks = tokens(cfg)
    hf = hf_load(tmp_path)
    assert hf.dtype == torch.bfloat16
    assert_close(model(toks), hf_logits(hf, toks), rel=5e-2)  # bf16 compute vs fp32
    # the import holds the bf16 values exactly and agrees with transformers run in fp32
    imported = from_hf(tmp_path)
    for name, value in flat_params(imported).items():
        original = flat_params(model)[name]
        if not name.endswith(("e_score_correction_bias", "mixer.gate.weight")):
            original = original.astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(value, original.astype(np.float32), err_msg=name)
    assert_close(imported(toks), hf_logits(hf_load(tmp_path, dtype=torch.float32), toks))


def test_export_import_round_trip_is_exact(exported):
    model, logits, out = exported
    back = from_hf(out)
    assert back.config == model.config
    original, imported = flat_params(model), flat_params(back)
    assert original.keys() == imported.keys()
    for k in original:
        assert imported[k].dtype == original[k].dtype
        np.testing.assert_array_equal(imported[k], original[k], err_msg=k)
    np.testing.assert_array_equal(back(tokens(model.config)), logits)


def test_import_checkpoint_made_by_transformers(tmp_path):
    """A NemotronH that transformers builds from a random config, saved by save_pretrained."""
    hf_config = transformers.NemotronHConfig(
        vocab_size=80,
        hidden_size=48,
        layers_block_type=[
            "linear_attention",
            "moe",
            "full_attention",
            "mlp",
            "linear_attention",
            "moe",
        ],
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=56,
        mamba_num_heads=6,
        mamba_head_dim=10,
        ssm_state_size=12,
        n_groups=3,
        chunk_size=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=20,
        moe_shared_expert_intermediate_size=28,
        moe_latent_size=24,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
        layer_norm_epsilon=1e-6,
        time_step_min=0.01,
    )
    torch.manual_seed(0)
    hf = transformers.NemotronHForCausalLM(hf_config).eval()
    with torch.no_grad():  # the init leaves norms at 1 and biases at 0: make them count
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "conv1d.bias", ".D")):
                p.add_(0.2 * torch.randn_like(p))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(0.05 * torch.randn_like(b))
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    cfg = model.config
    assert (cfg.pattern, cfg.d_model, cfg.moe_latent, cfg.n_groups) == ("ME*-ME", 48, 24, 3)
    assert (cfg.router_groups, cfg.router_topk_groups, cfg.norm_eps) == (2, 1, 1e-6)
    toks = tokens(cfg, length=40)
    assert_close(model(toks), hf_logits(hf, toks))
    # transformers' in-memory naming (model.*, stacked 3D experts) imports to the same model
    from safetensors.torch import save_file

    memory = tmp_path / "state_dict"
    memory.mkdir()
    (memory / "config.json").write_text((tmp_path / "config.json").read_text())
    state = hf.state_dict()
    assert "model.layers.1.mixer.experts.up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, memory / "model.safetensors")
    again = flat_params(from_hf(memory))
    for name, value in flat_params(model).items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_inexpressible_features_listed_in_one_error(tmp_path):
    cfg = config(
        pattern="M*E-",
        rope_theta=10000.0,
        router="softmax",
        expert_act="swiglu",
        mlp_act="gelu",
        shared_ffn=0,
        clamp_dt=False,
        n_experts=6,
        router_groups=6,
    )
    model = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError) as err:
        to_hf(model, tmp_path / "out")
    message = str(err.value)
    for feature in (
        "rope_theta",
        "router='softmax'",
        "expert_act='swiglu'",
        "shared_ffn=0",
        "clamp_dt=False",
        "router_groups=6",
    ):
        assert feature in message, feature
    assert not (tmp_path / "out").exists()


def test_one_activation_for_mlp_and_experts():
    with pytest.raises(ValueError, match="mlp_hidden_act"):
        hfx.check_exportable(config(pattern="E-", mlp_act="gelu", expert_act="relu2"))
    hfx.check_exportable(config(pattern="M-", mlp_act="gelu", expert_act="swiglu"))  # no E


def test_every_config_field_is_classified():
    """A new HybridConfig field must be mapped to NemotronH or declared runtime-only here;
    until then `unsupported_features` reports any non-default value of it."""
    names = {f.name for f in dataclasses.fields(HybridConfig)}
    assert names - hfx.MAPPED_FIELDS - hfx.RUNTIME_FIELDS - hfx.LETTER_ONLY_FIELDS == set()
    assert hfx.MAPPED_FIELDS & hfx.RUNTIME_FIELDS == set()
    assert (hfx.MAPPED_FIELDS | hfx.RUNTIME_FIELDS) & hfx.LETTER_ONLY_FIELDS == set()


def test_import_errors(tmp_path):
    base = hfx.hf_config(config(pattern="M*E-"))
    with pytest.raises(ValueError, match="mlp_hidden_act='gelu_pytorch_tanh'"):
        hfx.hybrid_config({**base, "mlp_hidden_act": "gelu_pytorch_tanh"})
    with pytest.raises(ValueError, match="attention_bias"):
        hfx.hybrid_config({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="not runtime fields"):
        from_hf(tmp_path, d_model=64)


def test_config_translation_round_trip():
    for kw in PARITY.values():
        cfg = config(**kw)
        assert hfx.hybrid_config(hfx.hf_config(cfg)) == cfg
    legacy = {
        k: v
        for k, v in hfx.hf_config(config(pattern="M-")).items()
        if k not in ("layers_block_type", "n_groups")
    }
    legacy["mamba_n_groups"] = 2
    assert hfx.hybrid_config(legacy) == config(pattern="M-")
