"""To and from `transformers` NemotronH checkpoints (the Hub layout that vLLM and SGLang also read).

    OUT_DIR/config.json             model_type "nemotron_h", architectures ["NemotronHForCausalLM"]
    OUT_DIR/model.safetensors       backbone.embeddings.weight, backbone.layers.{i}.norm.weight,
                                    backbone.layers.{i}.mixer.*, per-expert
                                    backbone.layers.{i}.mixer.experts.{e}.up_proj.weight, ...,
                                    backbone.norm_f.weight, lm_head.weight
    OUT_DIR/generation_config.json

The weights go through `hybridjax.model.flat_params` / `load_flat_params`; every tensor has one
rule in `tensor_specs` (rename + transpose: our kernels are (in, out), torch's Linear weights
(out, in); our conv kernel is (K, C), torch's (C, 1, K)). A config that NemotronH cannot express
(RoPE, a softmax router, swiglu, no shared expert, ...) raises ONE ValueError listing every such
feature, before anything is written.

Semantics to know: transformers NemotronH clamps dt below at `time_step_min` (our
`clamp_dt=True`; 5.16 always did, 5.25 does it through `time_step_limit`, which export writes), always builds a shared expert, has one activation (`mlp_hidden_act`) for the
dense MLP, the routed and the shared experts, and runs its MoE dropless (a model trained with
`moe_dispatch="capacity"` is exported as the dropless model it approximates). It ignores
`tie_word_embeddings` (its lm_head is always its own tensor), so a tied model is written with
`lm_head.weight` equal to the embedding table and `tie_word_embeddings: true`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hybridjax.config import HybridConfig

LAYER_TYPES = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
LETTERS = {v: k for k, v in LAYER_TYPES.items()}
LAYER_NAMES = {"3": "Mamba-3"}  # letters NemotronH lacks, named in the refusal
# Ungated activations both sides compute identically (transformers ACT2FN; gelu is the erf form).
HF_ACTIVATIONS = ("relu2", "silu", "gelu")
EXPORT_DTYPES = ("float32", "bfloat16")

# HybridConfig fields by how they reach NemotronH. A field in none of these sets is checked by
# `unsupported_features`: any non-default value is reported as inexpressible, so a feature added
# to the model later can never be dropped silently (tests/export check every field is listed).
MAPPED_FIELDS = frozenset(
    {
        "vocab_size",
        "d_model",
        "pattern",
        "norm_eps",
        "tie_embeddings",
        "initializer_range",
        "mamba_heads",
        "mamba_head_dim",
        "ssm_state",
        "n_groups",
        "conv_kernel",
        "chunk_size",
        "time_step_min",
        "time_step_max",
        "time_step_floor",
        "clamp_dt",
        "attn_heads",
        "kv_heads",
        "head_dim",
        "rope_theta",
        "rope_original_max_len",
        "n_experts",
        "top_k",
        "moe_ffn",
        "shared_ffn",
        "router",
        "router_groups",
        "router_topk_groups",
        "norm_topk_prob",
        "routed_scaling_factor",
        "expert_act",
        "moe_latent",
        "ffn",
        "mlp_act",
    }
)
# Fields of layers NemotronH has no counterpart for at all: the layer's letter is refused itself,
# so these are reported only through it (and mean nothing in a pattern without the letter).
LETTER_ONLY_FIELDS = frozenset(
    {
        "mamba3_mimo",
        "mamba3_mimo_rank",
        "mamba3_rope_fraction",
        "mamba3_a_floor",
        "mamba3_a_act",
    }
)
# How the model is run or trained, not what it computes (or only meaningful with RoPE, which
# `rope_theta` already reports).
RUNTIME_FIELDS = frozenset(
    {
        "dtype",
        "param_dtype",
        "scan_layers",
        "remat",
        "ssd_impl",
        "mamba2_glue_impl",
        "attn_impl",
        "attn_max_documents",
        "attn_kv_heads_per_call",
        "moe_dispatch",
        "capacity_factor",
        "grouped_matmul",
        "rope_scaling",
        "rope_factor",
        "ep_capacity_factor",
        "loss_chunk_size",
        "layer_chunk_size",
        "mamba3_impl",
    }
)


# --- config ---------------------------------------------------------------------------------
def unsupported_features(cfg: HybridConfig) -> list[str]:
    """Every feature of `cfg` that a NemotronH checkpoint cannot express (empty when exportable)."""
    bad = []
    for letter in sorted(set(cfg.pattern) - LAYER_TYPES.keys()):
        bad.append(
            f"pattern letter {letter!r} ({LAYER_NAMES.get(letter, 'unknown')}): NemotronH "
            "layers are only M (Mamba-2), * (attention), E (MoE), - (MLP)"
        )
    if cfg.has("M") and not cfg.clamp_dt:
        bad.append("clamp_dt=False: transformers NemotronH always clamps dt below at time_step_min")
    if cfg.has("*") and cfg.rope_theta is not None:
        bad.append(
            f"rope_theta={cfg.rope_theta}: NemotronH attention has no position encoding "
            "(NoPE); RoPE attention cannot be expressed"
        )
    acts = {}
    if cfg.has("E"):
        acts["expert_act"] = cfg.expert_act
        if cfg.router != "sigmoid":
            bad.append(
                f"router={cfg.router!r}: the NemotronH router is 'sigmoid' "
                "(with e_score_correction_bias)"
            )
        if cfg.shared_ffn <= 0:
            bad.append("shared_ffn=0: every NemotronH MoE layer has a shared expert")
        if cfg.n_experts // cfg.router_groups < 2:
            bad.append(
                f"n_experts={cfg.n_experts} with router_groups={cfg.router_groups}: "
                "transformers scores each expert group by its top-2 experts and needs "
                "at least 2 experts per group"
            )
    if cfg.has("-"):
        acts["mlp_act"] = cfg.mlp_act
    for name, act in acts.items():
        if act not in HF_ACTIVATIONS:
            bad.append(
                f"{name}={act!r}: NemotronH MLPs and experts are ungated; allowed "
                f"{', '.join(repr(a) for a in HF_ACTIVATIONS)}"
            )
    if len(set(acts.values())) > 1 and set(acts.values()) <= set(HF_ACTIVATIONS):
        bad.append(
            f"mlp_act={cfg.mlp_act!r} differs from expert_act={cfg.expert_act!r}: "
            "NemotronH has one mlp_hidden_act for MLP layers and experts"
        )
    default = HybridConfig()
    for field in dataclasses.fields(HybridConfig):
        name = field.name
        if name in MAPPED_FIELDS or name in RUNTIME_FIELDS or name in LETTER_ONLY_FIELDS:
            continue
        if getattr(cfg, name) != getattr(default, name):
            bad.append(f"{name}={getattr(cfg, name)!r}: has no NemotronH counterpart")
    return bad


def check_exportable(cfg: HybridConfig) -> None:
    """Raise one ValueError that lists every feature NemotronH cannot express."""
    bad = unsupported_features(cfg)
    if bad:
        raise ValueError(
            "cannot export to a NemotronH checkpoint; these features have no "
            "NemotronH equivalent:\n  - " + "\n  - ".join(bad)
        )


def hf_config(
    cfg: HybridConfig,
    *,
    dtype: str = "float32",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """The NemotronH `config.json` for `cfg` (raises if `cfg` is not exportable)."""
    check_exportable(cfg)
    _np_dtype(dtype)  # validates the name
    act = cfg.expert_act if cfg.has("E") else cfg.mlp_act if cfg.has("-") else "relu2"
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "dtype": dtype,
        "torch_dtype": dtype,  # the transformers 4.x spelling
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "layers_block_type": [LAYER_TYPES[c] for c in cfg.pattern],
        "hybrid_override_pattern": cfg.pattern,  # the same pattern, for readers before 5.x
        "num_hidden_layers": cfg.n_layers,
        "tie_word_embeddings": cfg.tie_embeddings,
        "layer_norm_epsilon": float(cfg.norm_eps),
        "initializer_range": float(cfg.initializer_range),
        "residual_in_fp32": False,
        "rescale_prenorm_residual": True,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
        "num_logits_to_keep": 1,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        # Mamba-2
        "mamba_num_heads": cfg.mamba_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "ssm_state_size": cfg.ssm_state,
        "n_groups": cfg.n_groups,
        "conv_kernel": cfg.conv_kernel,
        "chunk_size": cfg.chunk_size,
        "expand": max(1, cfg.d_inner // cfg.d_model),  # unused: d_inner = heads * head_dim
        "time_step_min": float(cfg.time_step_min),
        "time_step_max": float(cfg.time_step_max),
        "time_step_floor": float(cfg.time_step_floor),
        # the clamp: transformers 5.25 and mamba_ssm-based engines read it from here (5.16 clamped
        # at time_step_min whatever this said)
        "time_step_limit": [float(cfg.time_step_min), float("inf")],
        "mamba_hidden_act": "silu",
        "use_conv_bias": True,
        "use_bias": False,
        "mamba_proj_bias": False,
        "mamba_ssm_cache_dtype": "float32",
        # attention (NoPE)
        "num_attention_heads": cfg.attn_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "attention_head_dim": cfg.head_dim,  # the spelling of the first Nemotron-H configs
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": cfg.rope_original_max_len,
        "sliding_window": None,
        # dense MLP and MoE (one activation for both)
        "intermediate_size": cfg.ffn,
        "mlp_hidden_act": act,
        "mlp_bias": False,
        "hidden_dropout": 0.0,
        "n_routed_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.moe_ffn,
        "n_shared_experts": 1,
        "moe_shared_expert_intermediate_size": cfg.shared_ffn,
        "moe_latent_size": cfg.moe_latent,
        "n_group": cfg.router_groups,
        "topk_group": cfg.router_topk_groups,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": float(cfg.routed_scaling_factor),
    }


# Older config.json spellings that transformers still accepts (NemotronHConfig.__post_init__).
_ALIASES = {
    "n_groups": "mamba_n_groups",
    "conv_kernel": "mamba_d_conv",
    "chunk_size": "mamba_chunk_size",
    "time_step_min": "mamba_dt_min",
    "time_step_max": "mamba_dt_max",
    "time_step_floor": "mamba_dt_init_floor",
    "use_conv_bias": "mamba_conv_bias",
    "layers_block_type": "layer_types",
    "head_dim": "attention_head_dim",
}
_HF_DEFAULTS = {  # NemotronHConfig defaults for fields a config.json may leave out
    "tie_word_embeddings": False,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "ssm_state_size": 128,
    "n_groups": 8,
    "conv_kernel": 4,
    "chunk_size": 128,
    "time_step_min": 1e-3,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "mamba_hidden_act": "silu",
    "use_conv_bias": True,
    "use_bias": False,
    "mamba_proj_bias": False,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "attention_bias": False,
    "max_position_embeddings": 4096,
    "intermediate_size": 21504,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 7688,
    "moe_shared_expert_intermediate_size": 7688,
    "moe_latent_size": None,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
}


def hybrid_config(hf: dict, **overrides) -> HybridConfig:
    """The HybridConfig of a NemotronH `config.json` dict; `overrides` set runtime fields
    (dtype, ssd_impl, ...). Raises one ValueError listing what HybridLM cannot express."""

    def get(name):
        if name in hf:
            return hf[name]
        if _ALIASES.get(name) in hf:
            return hf[_ALIASES[name]]
        return _HF_DEFAULTS.get(name)

    if hf.get("model_type", "nemotron_h") != "nemotron_h":
        raise ValueError(f"model_type: {hf['model_type']!r} is not 'nemotron_h'")
    layer_types = get("layers_block_type")
    if layer_types is None and "hybrid_override_pattern" in hf:
        pattern = hf["hybrid_override_pattern"]
    elif layer_types is not None:
        unknown = sorted(set(layer_types) - LETTERS.keys())
        if unknown:
            raise ValueError(
                f"layers_block_type: {unknown} are not NemotronH layer types; "
                f"expected {sorted(LETTERS)}"
            )
        pattern = "".join(LETTERS[t] for t in layer_types)
    else:
        raise ValueError("config.json has neither layers_block_type nor hybrid_override_pattern")
    bad = []
    for flag in ("use_bias", "mamba_proj_bias", "attention_bias", "mlp_bias"):
        if get(flag):
            bad.append(f"{flag}=true: HybridLM projections have no bias")
    if not get("use_conv_bias"):
        bad.append("use_conv_bias=false: the HybridLM Mamba-2 conv1d always has a bias")
    if get("mamba_hidden_act") != "silu":
        bad.append(f"mamba_hidden_act={get('mamba_hidden_act')!r}: HybridLM Mamba-2 uses silu")
    act = get("mlp_hidden_act")
    if act not in HF_ACTIVATIONS:
        bad.append(f"mlp_hidden_act={act!r}: allowed {', '.join(map(repr, HF_ACTIVATIONS))}")
    if bad:
        raise ValueError(
            "cannot import this NemotronH checkpoint; these features have no "
            "HybridLM equivalent:\n  - " + "\n  - ".join(bad)
        )
    hidden, heads = hf["hidden_size"], get("num_attention_heads")
    fields = dict(  # noqa: C408 (keyword form: these are HybridConfig's field names)
        vocab_size=hf["vocab_size"],
        d_model=hidden,
        pattern=pattern,
        norm_eps=get("layer_norm_epsilon"),
        tie_embeddings=bool(get("tie_word_embeddings")),
        initializer_range=get("initializer_range"),
        mamba_heads=get("mamba_num_heads"),
        mamba_head_dim=get("mamba_head_dim"),
        ssm_state=get("ssm_state_size"),
        n_groups=get("n_groups"),
        conv_kernel=get("conv_kernel"),
        chunk_size=get("chunk_size"),
        time_step_min=get("time_step_min"),
        time_step_max=get("time_step_max"),
        time_step_floor=get("time_step_floor"),
        clamp_dt=True,
        attn_heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or hidden // heads,
        rope_theta=None,
        rope_original_max_len=get("max_position_embeddings"),
        n_experts=get("n_routed_experts"),
        top_k=get("num_experts_per_tok"),
        moe_ffn=get("moe_intermediate_size"),
        shared_ffn=get("moe_shared_expert_intermediate_size"),
        router="sigmoid",
        router_groups=get("n_group"),
        router_topk_groups=get("topk_group"),
        norm_topk_prob=bool(get("norm_topk_prob")),
        routed_scaling_factor=get("routed_scaling_factor"),
        expert_act=act,
        moe_latent=get("moe_latent_size"),
        ffn=get("intermediate_size"),
        mlp_act=act,
    )
    return HybridConfig(**{**fields, **overrides})


# --- tensors --------------------------------------------------------------------------------
class TensorSpec(NamedTuple):
    ours: str | tuple  # flat_params name, or names whose flattened parts one tensor concatenates
    hf: str  # checkpoint name; "{e}" in it = one tensor per routed expert
    kind: str  # "same" | "linear" (ours (in, out) = torch (out, in).T) | "conv" | "experts"
    shape: tuple  # torch shape (per expert for "experts")


def tensor_specs(cfg: HybridConfig) -> list[TensorSpec]:
    """One rule per tensor of a HybridLM with config `cfg`, in checkpoint order."""
    d, v = cfg.d_model, cfg.vocab_size
    specs = [TensorSpec("embeddings.embedding", "backbone.embeddings.weight", "same", (v, d))]
    for i, letter in enumerate(cfg.pattern):
        specs.append(
            TensorSpec(f"layers.{i}.norm.weight", f"backbone.layers.{i}.norm.weight", "same", (d,))
        )
        specs += [
            TensorSpec(
                _prefixed(f"layers.{i}.mixer.", ours),
                f"backbone.layers.{i}.mixer.{hf}",
                kind,
                shape,
            )
            for ours, hf, kind, shape in _mixer_tensors(cfg, letter)
        ]
    specs.append(TensorSpec("norm_f.weight", "backbone.norm_f.weight", "same", (d,)))
    # NemotronH always has its own lm_head tensor; a tied model writes the embedding table.
    if cfg.tie_embeddings:
        specs.append(TensorSpec("embeddings.embedding", "lm_head.weight", "same", (v, d)))
    else:
        specs.append(TensorSpec("lm_head.kernel", "lm_head.weight", "linear", (v, d)))
    return specs


def _prefixed(prefix: str, ours: str | tuple) -> str | tuple:
    return tuple(prefix + o for o in ours) if isinstance(ours, tuple) else prefix + ours


def _parts(spec: TensorSpec) -> tuple:
    """Our parameter names of one tensor, in concatenation order."""
    return spec.ours if isinstance(spec.ours, tuple) else (spec.ours,)


def _mixer_tensors(cfg: HybridConfig, letter: str) -> list[tuple]:
    """(our name, checkpoint name, kind, torch shape) of one mixer, names below `mixer.`."""

    def linear(name, d_in, d_out):
        return (f"{name}.kernel", f"{name}.weight", "linear", (d_out, d_in))

    d = cfg.d_model
    if letter == "M":
        h, inner = cfg.mamba_heads, cfg.d_inner
        conv_dim = inner + 2 * cfg.n_groups * cfg.ssm_state
        return [
            (
                ("zx_proj.kernel", "bc_proj.kernel", "dt_proj.kernel"),
                "in_proj.weight",
                "linear",
                (inner + conv_dim + h, d),
            ),
            (
                ("conv_x.kernel", "conv_bc.kernel"),
                "conv1d.weight",
                "conv",
                (conv_dim, 1, cfg.conv_kernel),
            ),
            (("conv_x.bias", "conv_bc.bias"), "conv1d.bias", "same", (conv_dim,)),
            ("dt_bias", "dt_bias", "same", (h,)),
            ("A_log", "A_log", "same", (h,)),
            ("D", "D", "same", (h,)),
            ("norm.weight", "norm.weight", "same", (inner,)),
            linear("out_proj", inner, d),
        ]
    if letter == "*":
        q, kv = cfg.attn_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        return [
            linear("q_proj", d, q),
            linear("k_proj", d, kv),
            linear("v_proj", d, kv),
            linear("o_proj", q, d),
        ]
    if letter == "-":
        return [linear("up_proj", d, cfg.ffn), linear("down_proj", cfg.ffn, d)]
    if letter == "E":
        e, f, d_in = cfg.n_experts, cfg.moe_ffn, cfg.moe_latent or d
        tensors = [
            ("gate.weight", "gate.weight", "same", (e, d)),
            ("gate.e_score_correction_bias", "gate.e_score_correction_bias", "same", (e,)),
            ("experts.up_proj", "experts.{e}.up_proj.weight", "experts", (f, d_in)),
            ("experts.down_proj", "experts.{e}.down_proj.weight", "experts", (d_in, f)),
            linear("shared_experts.up_proj", d, cfg.shared_ffn),
            linear("shared_experts.down_proj", cfg.shared_ffn, d),
        ]
        if cfg.moe_latent:
            tensors += [
                linear("fc1_latent_proj", d, cfg.moe_latent),
                linear("fc2_latent_proj", cfg.moe_latent, d),
            ]
        return tensors
    raise ValueError(f"pattern letter {letter!r} has no NemotronH layer")


# transformers keeps the router in float32 at any dtype: its correction bias and its gate weight
# (a bf16 gate could flip which experts win a close top-k after export)
FP32_TENSORS = ("e_score_correction_bias", "mixer.gate.weight")


def to_hf_tensors(
    cfg: HybridConfig, flat: dict[str, np.ndarray], dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """`flat_params` of a HybridLM -> checkpoint tensors (torch layout, `dtype`)."""
    specs = tensor_specs(cfg)
    unused = flat.keys() - {name for s in specs for name in _parts(s)}
    if unused:
        raise ValueError(
            "cannot export to a NemotronH checkpoint; these parameters have no "
            f"NemotronH tensor: {sorted(unused)}"
        )
    np_dtype = _np_dtype(dtype)
    out = {}
    for spec in specs:
        absent = [name for name in _parts(spec) if name not in flat]
        if absent:
            raise ValueError(
                f"to_hf: the model has no parameter {absent[0]!r} (needed for {spec.hf})"
            )
        value = _join([np.asarray(flat[name]) for name in _parts(spec)], spec)
        for name, t in _to_torch_layout(spec, value).items():
            cast = np.float32 if name.endswith(FP32_TENSORS) else np_dtype
            out[name] = np.ascontiguousarray(t.astype(cast))
    return out


def from_hf_tensors(
    cfg: HybridConfig, tensors: dict[str, np.ndarray], template: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Checkpoint tensors -> `flat_params` names and shapes (from `template`, the flat_params of a
    HybridLM built from `cfg`), keeping the checkpoint's values exactly (float32 holds bf16)."""
    tensors = _canonical_names(tensors)
    specs = tensor_specs(cfg)
    expected, missing, flat = set(), [], {}
    for spec in specs:
        names = _hf_names(spec, cfg)
        expected.update(names)
        if spec.ours in flat:  # the tied lm_head: the embedding table is already set
            continue
        absent = [n for n in names if n not in tensors]
        if absent:
            missing += absent
            continue
        parts = []
        for n in names:
            if tensors[n].shape != spec.shape:
                raise ValueError(
                    f"from_hf: {n} has shape {tensors[n].shape}, the config implies {spec.shape}"
                )
            parts.append(tensors[n])
        absent = [name for name in _parts(spec) if name not in template]
        if absent:
            raise ValueError(f"from_hf: the model has no parameter {absent[0]!r}")
        likes = [template[name] for name in _parts(spec)]
        joined = _from_torch_layout(spec, parts, _join(likes, spec))
        flat.update(zip(_parts(spec), _split(joined, likes)))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"from_hf: checkpoint tensors do not match the config: missing "
            f"{missing[:8]}, unexpected {unexpected[:8]}"
        )
    return flat


def _join(values: list[np.ndarray], spec: TensorSpec) -> np.ndarray:
    """Our parts of one tensor -> one array in our single-tensor layout: each part flattened to
    (rows, -1) (rows = the tensor's input size for "linear", K for "conv", 1 for "same") and
    concatenated along the last axis (the tensor's output channels)."""
    if len(values) == 1:
        return values[0]
    rows = {"linear": spec.shape[-1], "conv": spec.shape[-1], "same": 1}[spec.kind]
    joined = np.concatenate([v.reshape(rows, -1) for v in values], axis=-1)
    return joined.reshape(-1) if spec.kind == "same" else joined


def _split(joined: np.ndarray, likes: list[np.ndarray]) -> list[np.ndarray]:
    """Inverse of `_join`: the parts, shaped like `likes`."""
    if len(likes) == 1:
        return [joined]
    rows = joined.shape[0] if joined.ndim == 2 else 1
    sizes = np.cumsum([like.size // rows for like in likes])[:-1]
    return [
        part.reshape(like.shape)
        for part, like in zip(np.split(joined.reshape(rows, -1), sizes, axis=-1), likes)
    ]


def _hf_names(spec: TensorSpec, cfg: HybridConfig) -> list[str]:
    if spec.kind == "experts":
        return [spec.hf.format(e=e) for e in range(cfg.n_experts)]
    return [spec.hf]


def _to_torch_layout(spec: TensorSpec, value: np.ndarray) -> dict[str, np.ndarray]:
    shape = spec.shape
    if spec.kind == "same":
        return {spec.hf: value.reshape(shape)}
    if spec.kind == "linear":
        return {spec.hf: value.reshape(shape[1], shape[0]).T}
    if spec.kind == "conv":  # (K, C) -> (C, 1, K)
        return {spec.hf: value.reshape(shape[2], shape[0]).T[:, None, :]}
    if spec.kind == "experts":  # (E, in, out) -> E x (out, in)
        per = value.reshape(-1, shape[1], shape[0])
        return {spec.hf.format(e=e): per[e].T for e in range(per.shape[0])}
    raise AssertionError(spec.kind)


def _from_torch_layout(spec: TensorSpec, parts: list[np.ndarray], like: np.ndarray) -> np.ndarray:
    if spec.kind == "same":
        value = parts[0]
    elif spec.kind == "linear":
        value = parts[0].T
    elif spec.kind == "conv":
        value = parts[0][:, 0, :].T
    else:
        value = np.stack([p.T for p in parts])
    return np.asarray(value, dtype=like.dtype).reshape(like.shape)


_STACKED_EXPERTS = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)$")


def _canonical_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hub names: `model.` (transformers' in-memory prefix) -> `backbone.`, stacked 3D experts
    (in-memory layout) -> per-expert tensors; multi-token-prediction heads (`mtp.*`, unused by
    transformers' forward too) dropped."""
    out = {}
    for name, value in tensors.items():
        if name.startswith("mtp."):
            continue
        if name.startswith("model."):
            name = "backbone." + name[len("model.") :]
        m = _STACKED_EXPERTS.match(name)
        if m and value.ndim == 3:
            for e in range(value.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = value[e]
            continue
        out[name] = value
    return out


def _np_dtype(dtype: str):
    if dtype not in EXPORT_DTYPES:
        raise ValueError(
            f"dtype: {dtype!r} is not allowed; choose from "
            f"{', '.join(repr(d) for d in EXPORT_DTYPES)}"
        )
    import ml_dtypes

    return np.float32 if dtype == "float32" else ml_dtypes.bfloat16


# --- files ----------------------------------------------------------------------------------
def to_hf(
    model,
    out_dir,
    dtype: str = "float32",
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Write `model` (a HybridLM) as a NemotronH checkpoint that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads; returns `out_dir`.

    `dtype` "float32" or "bfloat16" (the router's e_score_correction_bias stays float32, as
    transformers keeps it). Nothing is written when the model is not exportable; the files
    appear together (written to a temporary directory, then moved in).
    """
    from hybridjax.model import flat_params

    cfg = model.config
    config = hf_config(
        cfg,
        dtype=dtype,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    tensors = to_hf_tensors(cfg, flat_params(model), dtype)
    generation = {
        "_from_model_config": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
    }
    return _write_checkpoint(Path(out_dir), config, generation, tensors)


def from_hf(path, **overrides):
    """A HybridLM from a NemotronH checkpoint directory (config.json + model.safetensors, or
    sharded with model.safetensors.index.json). `overrides` set runtime HybridConfig fields,
    e.g. `dtype="bfloat16"`, `ssd_impl="chunked"`. Parameters are `param_dtype` (float32 by
    default, which holds bf16 checkpoints exactly)."""
    from flax import nnx

    from hybridjax.model import HybridLM, flat_params, load_flat_params

    not_runtime = sorted(set(overrides) - RUNTIME_FIELDS)
    if not_runtime:
        raise ValueError(
            f"from_hf: {not_runtime} are not runtime fields; the checkpoint "
            f"defines them. Allowed overrides: {sorted(RUNTIME_FIELDS)}"
        )
    path = Path(path)
    cfg = hybrid_config(json.loads((path / "config.json").read_text()), **overrides)
    tensors = _canonical_names(read_safetensors(path))
    if (
        cfg.tie_embeddings
        and "lm_head.weight" in tensors
        and not np.array_equal(tensors["lm_head.weight"], tensors.get("backbone.embeddings.weight"))
    ):
        # transformers ignores tie_word_embeddings for NemotronH and uses its own lm_head
        cfg = cfg.replace(tie_embeddings=False)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    load_flat_params(model, from_hf_tensors(cfg, tensors, flat_params(model)))
    return model


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file or index-sharded) as numpy arrays."""
    from safetensors.numpy import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        tensors.update(load_file(path / name))
    return tensors


def _write_checkpoint(
    out: Path, config: dict, generation: dict, tensors: dict[str, np.ndarray]
) -> Path:
    from safetensors.numpy import save_file

    if out.exists():
        stale = [
            p.name
            for p in out.iterdir()
            if p.name != "model.safetensors"
            and (p.suffix == ".safetensors" or p.name.endswith(".index.json"))
        ]
        if stale:
            raise ValueError(
                f"{out}: holds other weight files {stale}; transformers could load "
                "those instead — choose an empty directory"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if not out.exists():
            tmp.rename(out)
        else:
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
