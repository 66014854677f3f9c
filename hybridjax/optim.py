"""The optimiser: optax AdamW with a learning-rate schedule, global-norm clipping and a weight-decay
mask chosen by parameter name.

Takes a plain `OptimConfig`; nothing here knows about Hydra. Gradient accumulation is not an
optimiser wrapper: the train step scans over micro-batches and hands one summed gradient to
`update`, so the optimiser state holds nothing between steps beyond AdamW's own moments and count
(which keeps resume exact).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import optax

from hybridjax.pytree import dotted

SCHEDULES = ("cosine", "wsd", "constant")

# Leaves that take no weight decay: SSM dynamics, skip gains, biases and every norm's scale (and
# Mamba-3's B/C biases and MIMO gains).
NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "bias", "e_score_correction_bias")
NO_DECAY_NAMES += ("B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o")
NO_DECAY_PATH = re.compile(r"norm", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant (after warmup)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of steps that decays to min_lr
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0  # global-norm clipping; None or 0 = off

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            shown = ", ".join(repr(s) for s in SCHEDULES)
            raise ValueError(f"schedule: {self.schedule!r} is not allowed; choose from {shown}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction: must be in [0, 1], got {self.decay_fraction!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.clip_norm is not None and self.clip_norm < 0:
            raise ValueError(f"clip_norm: must be >= 0 (0 or None = off), got {self.clip_norm!r}")


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine to `min_lr`, stable then linear decay (WSD), or `lr`
    throughout (constant: for continuing a trained model, e.g. a long-context extension, whose
    first step must not restart from a warmup; with warmup_steps=0 step 0 already has `lr`)."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    warmup = min(config.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    warm = optax.linear_schedule(0.0 if warmup else peak, peak, max(warmup, 1))
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=config.min_lr_ratio)
    else:  # wsd
        decay = max(round(config.decay_fraction * rest), 1) if config.decay_fraction else 0
        stable = rest - decay
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, max(decay, 1))],
            [stable],
        )
    if not warmup:
        return after
    return optax.join_schedules([warm, after], [warmup])


def decays(path: str) -> bool:
    """Whether the parameter at dotted `path` takes weight decay."""
    leaf = path.rsplit(".", 1)[-1]
    return leaf not in NO_DECAY_NAMES and not NO_DECAY_PATH.search(path)


def weight_decay_mask(params):
    """A params-shaped tree of bools: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(dotted(path)), params)


def make_optimizer(config: OptimConfig, total_steps: int):
    """(optax transformation, schedule). Clipping acts on the raw gradient before AdamW."""
    schedule = make_schedule(config, total_steps)
    parts = []
    if config.clip_norm:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts), schedule
