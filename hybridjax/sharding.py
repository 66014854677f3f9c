"""Device mesh, parameter placement and batch layout.

Mesh axes: `data` (pure data parallel: parameters replicated), `fsdp` (data parallel with every
large matrix and its optimizer moments split over the devices, gathered for use), `expert` (MoE
experts live on their owners; tokens are split over it outside the MoE layers, like a batch
axis), `context` (the sequence split: each device holds a contiguous stretch of every row; the
SSM carries its state across devices, `hybridjax.ops.ssd_sharded`) and `tensor` (Megatron-style:
heads, groups and ffn columns split, activations between blocks whole).

Placement goes through logical axis names. `PARAM_AXES` names the axes of every parameter
(matched against the end of its real path, e.g. `periods.blocks.0.mixer.zx_proj.kernel`, or
`opt_state.0.mu.periods...` for its optimizer moments); `LOGICAL_RULES` maps those names to mesh
axes. Scanned stacks carry one leading repeat axis, never split. A parameter without a rule is
an error (so a new layer cannot silently stay replicated), and a dimension that its mesh axis
does not divide is kept whole and reported (`placement_report`, and one warning per model).

Model code does not mention the mesh, except where it must: `constrain_batch` pins activations
between blocks to the batch layout (so FSDP gathers weights rather than moving activations), and
custom kernels run per shard under `jax.shard_map`.
"""

from __future__ import annotations

import logging
import math
import re

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax.pytree import dotted

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "expert", "context", "tensor")  # tensor innermost: the busiest links
BATCH_AXES = ("data", "fsdp", "expert")  # rows of a batch are split over these
SEQUENCE_AXIS = "context"  # and the sequence over this one

# logical axis -> mesh axis
LOGICAL_RULES = {
    "embed": "fsdp",  # d_model
    "vocab": "tensor",
    "heads": "tensor",  # attention query heads, Mamba-2 and Mamba-3 heads
    "kv_heads": "tensor",
    "groups": "tensor",  # Mamba-2 B/C groups
    "mlp": "tensor",  # MLP and expert ffn
    "expert": "expert",
}

# (pattern matched at the end of a dotted path, logical axes of the trailing dimensions);
# the first match wins.
PARAM_AXES = (
    (r"embeddings\.embedding", ("vocab", "embed")),
    (r"lm_head\.kernel", ("embed", "vocab")),
    # Mamba-2
    (r"zx_proj\.kernel", ("embed", None, "heads", None)),
    (r"bc_proj\.kernel", ("embed", None, "groups", None)),
    (r"dt_proj\.kernel", ("embed", "heads")),
    (r"conv_x\.kernel", (None, "heads", None)),
    (r"conv_x\.bias", ("heads", None)),
    (r"conv_bc\.kernel", (None, None, "groups", None)),
    (r"conv_bc\.bias", (None, "groups", None)),
    (r"(dt_bias|A_log|D)", ("heads",)),
    (r"mixer\.norm\.weight", ("heads", None)),
    (r"mixer\.out_proj\.kernel", ("heads", None, "embed")),
    # Mamba-3 (zx_proj, dt_proj, dt_bias, D and out_proj as Mamba-2)
    (r"bc_rank_proj\.kernel", ("embed", None, None, "groups", None)),
    (r"(a_proj|trap_proj)\.kernel", ("embed", "heads")),
    (r"angle_proj\.kernel", ("embed", None)),
    (r"([BC]_bias|mimo_[xzo])", ("heads", None, None)),
    (r"[BC]_norm\.weight", (None,)),
    # attention
    (r"q_proj\.kernel", ("embed", "heads", None)),
    (r"[kv]_proj\.kernel", ("embed", "kv_heads", None)),
    (r"o_proj\.kernel", ("heads", None, "embed")),
    # MoE (routed experts are stacked arrays, not Linear modules)
    (r"experts\.(up_proj|gate_proj)", ("expert", "embed", "mlp")),
    (r"experts\.down_proj", ("expert", "mlp", "embed")),
    (r"gate\.weight", (None, "embed")),
    (r"gate\.e_score_correction_bias", (None,)),
    (r"fc1_latent_proj\.kernel", ("embed", None)),
    (r"fc2_latent_proj\.kernel", (None, "embed")),
    # dense MLP and the shared expert
    (r"(up_proj|gate_proj)\.kernel", ("embed", "mlp")),
    (r"down_proj\.kernel", ("mlp", "embed")),
    # norms
    (r"norm(_f)?\.weight", (None,)),
)
_COMPILED = tuple((re.compile(rf"(?:^|\.){pattern}$"), axes) for pattern, axes in PARAM_AXES)


def make_mesh(
    data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1, context: int = 1, devices=None
) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all); one size may be -1 to take the remaining devices."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "context": context, "tensor": tensor}
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh sizes: each must be >= 1, and at most one -1; got {sizes}")
    if free:
        sizes[free[0]] = len(devices) // fixed
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(
            f"mesh sizes: {sizes} multiply to {int(np.prod(list(sizes.values())))},"
            f" but there are {len(devices)} devices"
        )
    grid = np.asarray(devices).reshape([sizes[a] for a in AXES])
    return jax.sharding.Mesh(grid, AXES)


def logical_axes(name: str, ndim: int) -> tuple | None:
    """The logical axes of the parameter at dotted path `name` with `ndim` dimensions (a leading
    repeat axis of a scanned stack gets None); None when no rule names it."""
    for pattern, axes in _COMPILED:
        if pattern.search(name) and ndim in (len(axes), len(axes) + 1):
            return (None,) * (ndim - len(axes)) + axes
    return None


def param_spec(name: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """The PartitionSpec of the array at dotted path `name` with `shape` (P() when no rule)."""
    return _spec_and_problems(name, tuple(shape), mesh)[0]


def _spec_and_problems(name, shape, mesh):
    axes = logical_axes(name, len(shape))
    if axes is None:
        return P(), []
    spec, problems = [], []
    for size, logical in zip(shape, axes):
        axis = LOGICAL_RULES.get(logical)
        n = mesh.shape.get(axis, 1) if axis else 1
        if n > 1 and size % n:
            problems.append(
                f"{name}: {logical} dimension of {size} is not divisible by mesh "
                f"axis {axis!r} ({n}); kept whole"
            )
            axis = None
        spec.append(axis if n > 1 else None)
    return P(*spec), problems


def tree_shardings(tree, mesh: jax.sharding.Mesh):
    """NamedShardings for every array of `tree` (params, optimizer state, a whole TrainState, or
    their abstract shapes): by the rules where a rule names the path, replicated otherwise."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(dotted(path), np.shape(x), mesh)), tree
    )


def placement_report(tree, mesh: jax.sharding.Mesh) -> list[str]:
    """The dimensions of `tree`'s arrays that their mesh axis does not divide (kept whole)."""
    problems = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        problems += _spec_and_problems(dotted(path), tuple(np.shape(x)), mesh)[1]
    return problems


def unmatched_params(params) -> list[str]:
    """Dotted paths of `params` (a pure dict of a model's parameters) that no rule names."""
    return [
        dotted(path)
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if logical_axes(dotted(path), np.ndim(x)) is None
    ]


def warn_placement(params, mesh: jax.sharding.Mesh) -> None:
    """Raise for parameters without a rule; log the dimensions kept whole."""
    missing = unmatched_params(params)
    if missing:
        raise ValueError(f"sharding: no rule in hybridjax.sharding.PARAM_AXES for {missing}")
    for problem in placement_report(params, mesh):
        log.warning("sharding: %s", problem)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Batches (rows, sequence, ...) split over every data-like axis (rows) and over `context`
    (the sequence)."""
    return NamedSharding(mesh, batch_spec(mesh))


def batch_spec(mesh) -> P:
    """The PartitionSpec of (rows, sequence, ...) arrays on `mesh` (concrete or abstract)."""
    if SEQUENCE_AXIS in mesh.axis_names and mesh.shape[SEQUENCE_AXIS] > 1:
        return P(batch_axes(mesh), SEQUENCE_AXIS)
    return P(batch_axes(mesh))


def batch_axes(mesh) -> tuple[str, ...]:
    """The batch axes that `mesh` (concrete or abstract) has."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def replicate(x):
    """Gather `x` whole onto every device of the current mesh (no-op without one): FSDP's use of
    a weight whose lookup (a gather) cannot run on its shards."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, P())


def axis_size(mesh, axes) -> int:
    """Devices along a PartitionSpec entry: None, one axis name, or a tuple of them."""
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def kernel_split(mesh, rows: int, length: int | None, channel_blocks: int):
    """(row axes, sequence axis, channel axis) over which a custom kernel that XLA cannot
    partition runs per shard (`jax.shard_map`) on `mesh`: the free batch axes when they divide
    `rows`; "context" when `length` is given and it divides it; "tensor" when it divides
    `channel_blocks` (the channels' indivisible blocks). Each entry is None where nothing splits."""
    free = lambda a: a in mesh.axis_names and a not in mesh.manual_axes and mesh.shape[a] > 1
    row_axes = tuple(a for a in batch_axes(mesh) if free(a))
    row_axes = row_axes if row_axes and rows % axis_size(mesh, row_axes) == 0 else None
    seq = length is not None and free(SEQUENCE_AXIS) and length % mesh.shape[SEQUENCE_AXIS] == 0
    ch = free("tensor") and channel_blocks % mesh.shape["tensor"] == 0
    return row_axes, SEQUENCE_AXIS if seq else None, "tensor" if ch else None


def constrain_batch(x):
    """Pin activations (B, L, ...) to the batch layout of the current mesh (no-op without one,
    or when the rows or the sequence do not divide over their axes, e.g. while decoding)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = batch_spec(mesh)
    sizes = [axis_size(mesh, axes) for axes in spec]
    if all(n == 1 for n in sizes) or any(dim % n for dim, n in zip(x.shape, sizes)):
        return x
    return jax.lax.with_sharding_constraint(x, spec)
