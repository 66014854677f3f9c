"""Pallas GPU kernels. `ssd_pallas` is the SSD scan (forward and backward) that
`hybridjax.ops.ssd(..., impl="pallas")` dispatches to; `pallas_unsupported_reason` says when a
call is outside what the kernels handle (None when supported). `mamba3_siso_pallas` is the
Mamba-3 SISO scan of `hybridjax.ops.mamba3_siso(..., impl="pallas")` through the same kernels;
`mamba3_pallas_unsupported_reason` its support check. `causal_conv1d_silu_pallas` is the Mamba-2
short convolution fused with its SiLU, of `hybridjax.ops.conv1d.causal_conv1d(...,
activation="silu", impl="pallas")`."""

from hybridjax.kernels.conv1d import causal_conv1d_silu_pallas
from hybridjax.kernels.mamba3 import mamba3_pallas_unsupported_reason, mamba3_siso_pallas
from hybridjax.kernels.ssd import pallas_unsupported_reason, ssd_pallas

__all__ = [
    "causal_conv1d_silu_pallas",
    "mamba3_pallas_unsupported_reason",
    "mamba3_siso_pallas",
    "pallas_unsupported_reason",
    "ssd_pallas",
]
