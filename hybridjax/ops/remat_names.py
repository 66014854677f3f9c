"""The checkpoint_name that the matmul-saving remat policies ("dots", "dots_no_batch") save.

jax's dot policies save what dot_general computes; the output of a Pallas or Mosaic kernel is no
dot to them, so untagged, the backward would run the kernel a second time. Ops and layers tag
the outputs that are costly to recompute (the MoE experts' grouped matmuls, their routing choice
and dispatch, the Mamba-2 conv, scan and gated norm, the MLP activation, the blocks' RMSNorm)
with `saved_kernel_output`.
"""

from jax.ad_checkpoint import checkpoint_name

KERNEL_OUTPUT = "kernel_output"


def saved_kernel_output(x):
    """x, tagged for the matmul-saving remat policies to keep."""
    return checkpoint_name(x, KERNEL_OUTPUT)
