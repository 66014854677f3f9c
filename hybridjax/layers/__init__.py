"""Flax NNX layers: RMSNorm, dense MLP, Mamba-2 mixer, attention (the MoE lives in moe.py)."""

from hybridjax.layers.attention import Attention, KVCache  # noqa: F401
from hybridjax.layers.mamba2 import Mamba2Cache, Mamba2Mixer  # noqa: F401
from hybridjax.layers.mlp import MLP, activation, is_gated  # noqa: F401
from hybridjax.layers.norm import RMSNorm  # noqa: F401
