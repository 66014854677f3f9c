"""hybridjax: hybrid Mamba-2 / attention / MoE language models in JAX and Flax NNX."""

from hybridjax.config import HybridConfig
from hybridjax.generate import generate
from hybridjax.model import HybridLM, ModelAux, make_pattern, param_counts

__all__ = ["HybridConfig", "HybridLM", "ModelAux", "generate", "make_pattern", "param_counts"]
