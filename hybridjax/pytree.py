"""Names of pytree leaves: what the sharding rules and the weight-decay mask match against."""

from __future__ import annotations


def dotted(path) -> str:
    """A jax key path as "a.b.0.c" (dict keys, attributes and sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)
