"""Pure functions: the scan path and friends."""

from hybridjax.ops.conv1d import causal_conv1d, causal_conv1d_update  # noqa: F401
from hybridjax.ops.mamba3 import Mamba3State, mamba3_mimo, mamba3_siso  # noqa: F401
from hybridjax.ops.norms import gated_rmsnorm, rmsnorm  # noqa: F401
from hybridjax.ops.rope import apply_rope, rope_frequencies  # noqa: F401
from hybridjax.ops.ssd import ssd  # noqa: F401
