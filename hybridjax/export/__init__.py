"""Export to / import from `transformers` NemotronH checkpoints (see `hybridjax.export.hf`)."""

from hybridjax.export.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
