"""Pallas GPU kernels. `ssd_pallas` is the SSD scan (forward and backward) that
`hybridjax.ops.ssd(..., impl="pallas")` dispatches to; `pallas_unsupported_reason` says when a
call is outside what the kernels handle (None when supported)."""

from hybridjax.kernels.ssd import pallas_unsupported_reason, ssd_pallas

__all__ = ["pallas_unsupported_reason", "ssd_pallas"]
