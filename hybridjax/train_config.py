"""The training configuration: plain dataclasses, and their structured-config schema for Hydra.

The Hydra tree in `configs/` is validated against `TrainSchema`, registered in Hydra's ConfigStore
as `train_schema` (config.yaml lists it first in its defaults). The model and data sections are
built from the library's own dataclasses (`HybridConfig`, the data configs of `hybridjax.data`), so
the YAML keys never drift from the code: a misspelt key fails at composition, a value of the wrong
type fails at composition, and a value the library rejects fails in `resolve` — all before any
training starts, each naming the key.

Hydra and OmegaConf are imported only inside the functions that need them; the dataclasses here are
plain and the training loop takes them without knowing about Hydra.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from hybridjax.config import HybridConfig
from hybridjax.optim import OptimConfig

RESUME = ("auto", "never")
# A model.vocab_size left to the data (null) is the data's vocabulary rounded up to a multiple of
# this, as Megatron pads: whole matmul tiles, and the embedding splits evenly over tensor shards.
VOCAB_MULTIPLE = 128
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")


@dataclasses.dataclass
class MeshConfig:
    """Device mesh sizes (hybridjax.sharding axes); all 1 = one device, no mesh. -1 = the rest."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    context: int = 1  # splits each row's sequence (context parallelism)
    tensor: int = 1

    @property
    def single_device(self) -> bool:
        return (self.data, self.fsdp, self.expert, self.context, self.tensor) == (1, 1, 1, 1, 1)


@dataclasses.dataclass
class DistributedConfig:
    """Joining a multi-process run (hybridjax.distributed). All unset = decided by the
    environment: SLURM / Open MPI jobs of several tasks and the JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID variables; none of them = one process."""

    coordinator_address: str | None = None  # host:port where process 0 serves the coordinator
    num_processes: int | None = None
    process_id: int | None = None  # this process, in [0, num_processes)
    local_device_ids: list[int] | None = None  # the host's devices this process drives; null =
    #                                            all (one per task under SLURM / Open MPI)
    initialization_timeout: int = 300  # seconds to wait for every process to join

    def __post_init__(self):
        _check(
            "num_processes",
            self.num_processes is None or self.num_processes > 0,
            "must be > 0 or null",
        )
        _check(
            "process_id", self.process_id is None or self.process_id >= 0, "must be >= 0 or null"
        )
        if self.process_id is not None and self.num_processes is not None:
            _check(
                "process_id",
                self.process_id < self.num_processes,
                f"must be < num_processes ({self.num_processes})",
            )
        address = self.coordinator_address
        _check(
            "coordinator_address",
            address is None or (":" in address and address.rsplit(":", 1)[1].isdigit()),
            f"must be host:port, got {address!r}",
        )
        ids = self.local_device_ids
        _check(
            "local_device_ids",
            ids is None or (len(ids) > 0 and len(set(ids)) == len(ids) and min(ids) >= 0),
            f"must be distinct device ids >= 0 or null, got {ids}",
        )
        _check("initialization_timeout", self.initialization_timeout > 0, "must be > 0")


@dataclasses.dataclass
class LengthPhase:
    """One entry of trainer.seq_len_schedule: `steps` consecutive steps of `batch_size` rows of
    `seq_len` tokens."""

    seq_len: int
    batch_size: int | None = None  # None = trainer.batch_size
    steps: int = 1

    def __post_init__(self):
        _check("seq_len", self.seq_len > 0, "must be > 0")
        _check("steps", self.steps > 0, "must be > 0")
        _check(
            "batch_size",
            self.batch_size is None or self.batch_size > 0,
            "must be > 0 or null (= trainer.batch_size)",
        )


@dataclasses.dataclass
class TrainerConfig:
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 32  # sequences per optimizer step (global, over all devices)
    seq_len: int = 128  # training rows (without a seq_len_schedule) and eval rows by default
    seq_len_schedule: list[LengthPhase] = dataclasses.field(default_factory=list)
    #   [{seq_len, batch_size, steps}, ...]: training cycles through the entries from step 0,
    #   each for its `steps` consecutive steps (e.g. 3 long batches, then 1 short); [] = seq_len
    eval_seq_len: int | None = None  # eval rows; None = seq_len
    init_from: str | None = None  # start at step 0 from this run's (latest) or this checkpoint's
    #   parameters and model state, with a fresh optimizer; the run's own checkpoints win (resume)
    state_passing: bool = False  # truncated BPTT: each training row continues its documents in
    #   the same row of the next step (of its length), from the Mamba-2 states the row's previous
    #   chunk ended with (carried in the train state, no gradient between steps); eval unchanged
    seed: int = 0  # model init, data order and the step RNG all derive from it
    grad_accum: int = 1  # micro-batches per step; batch_size must be divisible by it
    log_every: int = 10  # steps between metrics.jsonl lines (and NaN checks)
    eval_every: int = 200  # steps between held-out evaluations; 0 = only at the end
    eval_batches: int | None = None  # None = the whole held-out split (it is finite)
    eval_batch_size: int | None = None  # None = batch_size
    eval_seed: int = 1234  # the held-out split is drawn from its own seed, fixed across runs
    checkpoint_every: int = 500  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3  # orbax max_to_keep
    async_checkpoint: bool = True
    stop_at: int | None = None  # stop (with a checkpoint) after this step, as if pre-empted;
    #                             the schedule still spans `steps` (for time-sliced jobs)
    resume: str = "auto"  # auto: continue from the run directory's latest checkpoint | never
    peak_tflops: float | None = None  # per-device peak for the MFU estimate; None = by device kind
    progress: bool = True  # console progress bar
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "log_every",
            "keep_checkpoints",
        ):
            _check(name, getattr(self, name) > 0, "must be > 0")
        for name in ("eval_every", "checkpoint_every"):
            _check(name, getattr(self, name) >= 0, "must be >= 0 (0 = only at the end)")
        for name in ("eval_batches", "eval_batch_size", "eval_seq_len", "stop_at"):
            value = getattr(self, name)
            _check(name, value is None or value > 0, "must be > 0 or null")
        _check(
            "grad_accum",
            self.batch_size % self.grad_accum == 0,
            f"must divide batch_size ({self.batch_size})",
        )
        _check(
            "peak_tflops", self.peak_tflops is None or self.peak_tflops > 0, "must be > 0 or null"
        )
        _choice("resume", self.resume, RESUME)
        self.seq_len_schedule = [_phase(i, p, self) for i, p in enumerate(self.seq_len_schedule)]
        lengths = [p.seq_len for p in self.seq_len_schedule]
        _check(
            "seq_len_schedule",
            len(set(lengths)) == len(lengths),
            f"each seq_len may appear once (its `steps` give its share), got {lengths}",
        )
        if isinstance(self.mesh, dict):
            self.mesh = MeshConfig(**self.mesh)
        _check(
            "state_passing",
            isinstance(self.state_passing, bool),
            f"must be true or false, got {self.state_passing!r}",
        )
        if isinstance(self.distributed, dict):
            try:
                self.distributed = DistributedConfig(**self.distributed)
            except ValueError as err:
                raise ValueError(f"distributed.{err}") from None


def _phase(index: int, phase, trainer: TrainerConfig) -> LengthPhase:
    """Entry `index` of seq_len_schedule as a LengthPhase whose batch_size is set and divisible
    by grad_accum; errors name the entry."""
    name = f"seq_len_schedule[{index}]"
    try:
        phase = LengthPhase(**phase) if isinstance(phase, dict) else phase
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}.{err}") from None
    phase = dataclasses.replace(phase, batch_size=phase.batch_size or trainer.batch_size)
    _check(
        f"{name}.batch_size",
        phase.batch_size % trainer.grad_accum == 0,
        f"must be divisible by grad_accum ({trainer.grad_accum}), got {phase.batch_size}",
    )
    return phase


@dataclasses.dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none (metrics.jsonl is always written)
    mode: str = "offline"  # wandb mode: offline (default: no network) | online | disabled
    project: str = "hybridjax"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        _choice("name", self.name, LOGGERS)
        _choice("mode", self.mode, WANDB_MODES)


@dataclasses.dataclass
class RunConfig:
    """Everything one training run needs, as the library's own plain dataclasses."""

    model: HybridConfig
    data: Any  # one of the data configs of hybridjax.data
    optimizer: OptimConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    loss: LossConfig


@dataclasses.dataclass
class LossConfig:
    lb_coef: float = 1e-3  # MoE load-balancing loss coefficient
    # router z-loss coefficient: 0, as NemotronH and DeepSeek-V3 train their sigmoid routers (the
    # default router); ST-MoE used 1e-3 with softmax routers (model.router=softmax)
    z_coef: float = 0.0
    router_bias_rate: float = 1e-3  # aux-loss-free bias update step; 0 = off

    def __post_init__(self):
        for name in ("lb_coef", "z_coef", "router_bias_rate"):
            _check(name, getattr(self, name) >= 0, "must be >= 0")


def _check(name, ok, why):
    if not ok:
        raise ValueError(f"{name}: {why}")


def _choice(name, value, allowed):
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}: {value!r} is not allowed; choose from {shown}")


# --- schemas derived from the library's dataclasses ---------------------------------------------
def schema_of(cls: type, name: str, extra: tuple = (), nullable: tuple[str, ...] = ()) -> type:
    """A mutable dataclass with `cls`'s init fields, types and defaults (plus `extra` fields), for
    OmegaConf: the structured schema of a frozen library config, so the two never drift. Fields
    named in `nullable` (where `cls` has them) may also be null, which `resolve` fills in."""
    hints = typing.get_type_hints(cls)
    fields = list(extra)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if isinstance(f.default, (tuple, list)):
            default = dataclasses.field(default_factory=functools.partial(list, f.default))
        elif f.default is not dataclasses.MISSING:
            default = dataclasses.field(default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = dataclasses.field(default_factory=f.default_factory)
        else:
            default = dataclasses.field(default="???")  # MISSING: must be given
        tp = _omegaconf_type(hints[f.name])
        fields.append((f.name, tp | None if f.name in nullable else tp, default))
    return dataclasses.make_dataclass(name, fields)


def _omegaconf_type(tp):
    """Tuples become lists (OmegaConf has no tuple nodes); other types pass through."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return list[args[0]] if args else list
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):  # X | None
            return _omegaconf_type(rest[0]) | None
        return Any
    return tp


def build(cls: type, values: dict, section: str):
    """`cls(**values)` with lists turned back into tuples where `cls` wants tuples; a bad value
    raises ValueError prefixed with the section, e.g. "model.pattern: ..."."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if isinstance(value, list) and _wants_tuple(hints.get(key)):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{section}.{err}") from None


def _wants_tuple(tp) -> bool:
    if typing.get_origin(tp) is tuple:
        return True
    return any(
        _wants_tuple(a)
        for a in typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType)
    )


@functools.cache
def data_kinds() -> dict[str, type]:
    """Data config classes of `hybridjax.data` by kind: MQARConfig -> "mqar", TextConfig -> "text"."""
    from hybridjax import data

    return dict(data.CONFIGS)


@functools.cache
def schemas() -> dict[str, type]:
    """The structured-config schemas: model, optimizer, loss and one per data kind."""
    # vocab_size null: the model's follows the data's, the data's the model's (resolve)
    out = {
        "model": schema_of(HybridConfig, "ModelSchema", nullable=("vocab_size",)),
        "optimizer": schema_of(OptimConfig, "OptimizerSchema"),
        "loss": schema_of(LossConfig, "LossSchema"),
    }
    for kind, cls in data_kinds().items():
        out[f"data/{kind}"] = schema_of(
            cls,
            f"{cls.__name__}Schema",
            extra=(("kind", str, dataclasses.field(default=kind)),),
            nullable=("vocab_size",),
        )
    return out


@functools.cache
def train_schema() -> type:
    s = schemas()
    return dataclasses.make_dataclass(
        "TrainSchema",
        [
            ("model", s["model"], dataclasses.field(default_factory=s["model"])),
            ("data", Any, dataclasses.field(default="???")),
            ("optimizer", s["optimizer"], dataclasses.field(default_factory=s["optimizer"])),
            ("loss", s["loss"], dataclasses.field(default_factory=s["loss"])),
            ("trainer", TrainerConfig, dataclasses.field(default_factory=TrainerConfig)),
            ("logger", LoggerConfig, dataclasses.field(default_factory=LoggerConfig)),
            ("name", str, dataclasses.field(default="run")),
        ],
    )


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore: `train_schema` (the primary config's base) and
    `data/schema_<kind>` (each data/*.yaml lists its kind's schema first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=train_schema())
    for key, schema in schemas().items():
        if key.startswith("data/"):
            cs.store(group="data", name=f"schema_{key[5:]}", node=schema)


def resolve(cfg) -> RunConfig:
    """A composed Hydra/OmegaConf config -> RunConfig of plain library dataclasses, validated.

    A null model.vocab_size (the model presets' default) becomes the data's vocabulary padded to
    a multiple of VOCAB_MULTIPLE, and is written into `cfg` as well, so that the config saved
    beside the run (read back by export, init_from and the reports) names the size built.
    Raises ValueError naming the key (e.g. "model.pattern: 'X' is not allowed ...")."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from hybridjax.data import vocab_size

    merged = OmegaConf.merge(OmegaConf.structured(train_schema()), cfg)
    plain = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    data = dict(plain["data"])
    kinds = data_kinds()
    kind = data.pop("kind", None)
    if kind not in kinds:
        shown = ", ".join(repr(k) for k in kinds)
        raise ValueError(f"data.kind: {kind!r} is not allowed; choose from {shown}")
    if data.get("vocab_size", 0) is None:  # ${model.vocab_size} while that is left to the data
        if kind == "memmap":
            raise ValueError(
                "data.vocab_size: the token file's vocabulary size must be given: "
                "set data.vocab_size or model.vocab_size (> 0)"
            )
        del data["vocab_size"]  # a synthetic task's own default (MQAR, NIAH: 256)
    data_schema = OmegaConf.structured(schemas()[f"data/{kind}"])
    try:
        data = OmegaConf.to_container(OmegaConf.merge(data_schema, data), resolve=True)
    except (
        OmegaConfBaseException
    ) as err:  # a misspelt or mistyped key in a data section built by hand
        raise ValueError(f"data.{err}") from None
    data.pop("kind")
    data = build(kinds[kind], data, "data")
    model = plain["model"]
    needed = vocab_size(data)
    if model["vocab_size"] is None:
        model["vocab_size"] = -(-needed // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        cfg.model.vocab_size = model["vocab_size"]
    elif model["vocab_size"] < needed:
        raise ValueError(
            f"model.vocab_size: {model['vocab_size']} is smaller than the data's "
            f"vocabulary ({needed} ids); set at least {needed}, or null to follow "
            f"the data"
        )
    trainer = build(TrainerConfig, plain["trainer"], "trainer")
    return RunConfig(
        model=build(HybridConfig, model, "model"),
        data=data,
        optimizer=build(OptimConfig, plain["optimizer"], "optimizer"),
        loss=build(LossConfig, plain["loss"], "loss"),
        trainer=trainer,
        logger=build(LoggerConfig, plain["logger"], "logger"),
    )
