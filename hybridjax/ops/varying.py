"""Varying mesh axes inside `jax.shard_map`: a custom VJP's cotangents must have the types of
its primals, so the operands that meet in one (a grouped matmul's rows and weights, the MoE
combine's outputs and routing weights) are first cast to vary over the union of their axes."""

import jax


def same_varying_axes(*xs):
    """Under shard_map, give the operands the union of their varying mesh axes: the weight
    gradient computed from local rows varies with the rows, and a custom VJP's cotangents must
    have their primals' types. Outside, the cast's transpose sums the gradient over those axes."""
    union = frozenset().union(*map(varying_axes, xs))
    return tuple(vary(x, union) for x in xs)


def vary(x, axes: frozenset):
    """x typed as varying over `axes` too (values unchanged). Pallas calls may type their
    outputs as varying over fewer axes than their inputs (jax 0.11)."""
    missing = tuple(sorted(axes - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def varying_axes(x) -> frozenset:
    """The mesh axes x varies over inside shard_map (jax 0.10: manual_axis_type; later: vma)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))
