"""Small random HybridLMs shared by the export tests (tests/export/test_*.py)."""

import functools

import numpy as np
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.model import HybridLM, flat_params, load_flat_params

# Small, with distinct sizes (no square projection a missed transpose could slip through),
# n_groups > 1, a shared expert, and time_step_min high enough that the dt clamp binds.
SMALL = dict(  # noqa: C408 (HybridConfig keywords)
    vocab_size=96,
    d_model=40,
    mamba_heads=4,
    mamba_head_dim=8,
    ssm_state=12,
    n_groups=2,
    chunk_size=8,
    attn_heads=6,
    kv_heads=2,
    head_dim=8,
    n_experts=6,
    top_k=2,
    moe_ffn=16,
    shared_ffn=24,
    ffn=56,
    initializer_range=0.1,
    time_step_min=0.02,
    time_step_max=0.2,
    rope_original_max_len=512,
)
PARITY = {  # HybridConfig overrides; together they use every NemotronH feature
    "all_letters": {"pattern": "M*E-M*E-"},
    "latent_grouped_router": {
        "pattern": "ME*-EM",
        "moe_latent": 20,
        "router_groups": 2,
        "router_topk_groups": 1,
        "routed_scaling_factor": 2.5,
    },
    "tied_silu_unnormed": {
        "pattern": "M-E*",
        "tie_embeddings": True,
        "mlp_act": "silu",
        "expert_act": "silu",
        "norm_topk_prob": False,
        "n_groups": 4,
        "top_k": 3,
    },
}
LENGTH = 27  # > chunk_size, not a multiple of it


def config(**kw) -> HybridConfig:
    return HybridConfig(**{**SMALL, **kw})


def random_model(cfg: HybridConfig, seed: int = 0) -> HybridLM:
    """A HybridLM whose every tensor is random: norms, biases and the router bias too, so a
    misplaced or untransposed tensor cannot hide behind a constant init."""
    model = HybridLM(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    flat = {}
    for name, value in flat_params(model).items():
        noise = rng.standard_normal(value.shape).astype(value.dtype)
        if name.endswith(("norm.weight", "norm_f.weight", ".D")):
            value = 1.0 + 0.2 * noise
        elif name.endswith(("conv1d.bias", "e_score_correction_bias", "dt_bias", "A_log")):
            value = value + 0.2 * noise
        flat[name] = value
    load_flat_params(model, flat)
    return model


def tokens(cfg, batch=2, length=LENGTH, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))


@functools.cache
def parity_model(name: str) -> HybridLM:
    """The random model of PARITY[name], built once per test session (model init compiles)."""
    return random_model(config(**PARITY[name]))
