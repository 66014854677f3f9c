"""Device mesh and parameter sharding rules.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded parameters), `expert`
(MoE experts; tokens are also split over it outside the MoE layers) and `tensor` (Megatron-style
splits of projection matrices). Parameters are placed by name: the rules below give the axes of
each matrix's trailing dimensions; the leading repeat axis of scanned layers stays unsharded, and
a dimension that the mesh axis does not divide stays whole. Model code never mentions the mesh:
jit propagates these placements and inserts the collectives.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# (regex on the dotted parameter path, mesh axes of the trailing dimensions)
PARAM_RULES = (
    (r"embeddings\.embedding$", ("tensor", "fsdp")),
    (r"lm_head\.kernel$", ("fsdp", "tensor")),
    (r"experts\.(up_proj|gate_proj)$", ("expert", "fsdp", "tensor")),
    (r"experts\.down_proj$", ("expert", "tensor", "fsdp")),
    (r"(in_proj|[qkv]_proj|up_proj|gate_proj|fc1_latent_proj)\.kernel$", ("fsdp", "tensor")),
    (r"(out_proj|o_proj|down_proj|fc2_latent_proj)\.kernel$", ("tensor", "fsdp")),
)


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all); one size may be -1 to take the remaining devices."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh sizes: each must be >= 1, and at most one -1; got {sizes}")
    if free:
        sizes[free[0]] = len(devices) // fixed
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(f"mesh sizes: {sizes} multiply to {int(np.prod(list(sizes.values())))},"
                         f" but there are {len(devices)} devices")
    grid = np.asarray(devices).reshape([sizes[a] for a in AXES])
    return jax.sharding.Mesh(grid, AXES)


def param_spec(name: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """The PartitionSpec of the parameter called `name` (dotted path) with `shape`."""
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, name) and len(shape) >= len(axes):
            lead = (None,) * (len(shape) - len(axes))
            fitted = tuple(a if shape[len(lead) + i] % mesh.shape[a] == 0 else None
                           for i, a in enumerate(axes))
            return P(*lead, *fitted)
    return P()


def model_shardings(model: nnx.Module, mesh: jax.sharding.Mesh):
    """A state-shaped tree of NamedShardings for every variable of `model`."""
    state = nnx.state(model)
    return jax.tree.map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(_dotted(path), x.shape, mesh)), state)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> None:
    """Place every variable of `model` on `mesh` by the rules above (in place)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, model_shardings(model, mesh)))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Batches split over every data-like axis (rows), whole along the sequence."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
