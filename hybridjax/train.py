"""The training entry point: `python -m hybridjax.train [overrides]`.

Hydra composes `configs/config.yaml` (validated against the structured schema of
`hybridjax.train_config`), `resolve` turns it into the library's plain dataclasses, and `train`
runs the loop in Hydra's output directory (`hydra.run.dir`):

    metrics.jsonl       one JSON object per logged step (+ eval metrics at eval steps)
    config.yaml         the resolved config (Hydra also keeps .hydra/config.yaml and overrides)
    summary.json        parameter counts, final train/eval metrics, throughput, peak memory
    checkpoints/<step>  orbax checkpoints (train state + data iterator state)
    wandb/              the offline wandb run (logger=wandb)

Rerunning with the same `hydra.run.dir` resumes from its latest checkpoint (`trainer.resume=auto`)
and continues exactly as if never stopped: same data order, same RNG, same parameters.

`trainer.init_from` starts a new run (step 0, fresh optimizer and schedule) from another run's
parameters, e.g. to extend a model trained short to longer contexts; `trainer.seq_len_schedule`
then mixes batches of several lengths, step by step (one data stream and one compiled step per
length). `trainer.state_passing` trains on long documents in consecutive chunks (truncated BPTT):
each row of a length's stream continues its documents step after step, from the Mamba-2 states
the row's previous chunk ended with, which the train state carries and the checkpoints keep.

Several processes (hosts, or GPUs of one host) run one job when `hybridjax.distributed` finds
them (SLURM, Open MPI, `trainer.distributed.*`, JAX_* variables; `launch/`): every process runs
this same loop on its rows of each batch, they stop and save together, and process 0 alone writes
metrics.jsonl, summary.json and wandb. The run directory must be on storage every host sees.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax import distributed
from hybridjax.checkpoint import Checkpointer, StopSignal, all_finite, find_checkpoint, read_model
from hybridjax.data import bucket_names, make_dataset
from hybridjax.metrics_log import MetricsLog
from hybridjax.optim import make_optimizer
from hybridjax.train_config import RunConfig, register_configs, resolve
from hybridjax.train_step import (
    MODEL_INPUTS,
    init_carry,
    init_state,
    make_eval_step,
    make_train_step,
    model_batch,
)

log = logging.getLogger("hybridjax.train")

# Dense bf16 peak TFLOP/s per device, by substring of jax's device_kind, for the MFU estimate.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
    "TPU v6": 918.0,
}


class NonFiniteLoss(RuntimeError):
    """Raised when a step's loss or gradient norm is NaN or infinite."""


@dataclasses.dataclass
class Setup:
    """What a run builds before its first step."""

    run: RunConfig
    run_dir: str
    mesh: object
    graphdef: object
    state: object
    train_step: object
    eval_step: object
    schedule: object


def train(run: RunConfig, run_dir: str, *, config_dict: dict | None = None) -> dict:
    """Train as `run` says, in `run_dir`; returns the summary (also written to summary.json).

    Joins the other processes first when there are any (before anything touches a device), and
    then trains in process 0's `run_dir`: Hydra's default directory is named after the clock,
    which processes started a moment apart read differently."""
    if distributed.initialize(run.trainer.distributed):
        if run.trainer.mesh.single_device:
            raise ValueError(
                f"trainer.mesh: {jax.process_count()} processes need a mesh over "
                f"all their devices, e.g. trainer.mesh.data=-1"
            )
        shared = distributed.broadcast_str(os.path.abspath(run_dir))
        if shared != os.path.abspath(run_dir):
            log.warning(
                "process %d trains in process 0's run directory %s, not %s: give every "
                "process the same hydra.run.dir",
                jax.process_index(),
                shared,
                run_dir,
            )
        run_dir = shared
    os.makedirs(run_dir, exist_ok=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
    setup = build(run, run_dir)
    mesh_context = jax.set_mesh(setup.mesh) if setup.mesh is not None else contextlib.nullcontext()
    with mesh_context:
        return Loop(setup, config_dict).run()


def eval_bucket_names(run: RunConfig) -> list[str]:
    """The eval split's bucket labels: its rows are trainer.eval_seq_len long, and its buckets
    may differ from training's (NIAH's eval_context_lens)."""
    return bucket_names(run.data, run.trainer.eval_seq_len or run.trainer.seq_len, split="eval")


def build(run: RunConfig, run_dir: str) -> Setup:
    t = run.trainer
    mesh = None
    if not t.mesh.single_device:
        from hybridjax.sharding import make_mesh

        mesh = make_mesh(**dataclasses.asdict(t.mesh))
        n_context = mesh.shape["context"]
        lengths = [("trainer.seq_len", t.seq_len), ("trainer.eval_seq_len", t.eval_seq_len)]
        lengths += [
            (f"trainer.seq_len_schedule[{i}].seq_len", p.seq_len)
            for i, p in enumerate(t.seq_len_schedule)
        ]
        for name, length in lengths:
            if length and length % n_context:
                raise ValueError(
                    f"{name}: {length} does not split into trainer.mesh.context="
                    f"{n_context} equal stretches; use a multiple of {n_context}"
                )
    tx, schedule = make_optimizer(run.optimizer, t.steps)
    graphdef, state = init_state(run.model, tx, t.seed, mesh)
    if t.state_passing:  # before the step is built: the state's layout pins the step's
        shapes = LengthSchedule(t).shapes
        state = state._replace(carry=init_carry(graphdef, state, shapes, mesh))
    train_step = make_train_step(
        graphdef,
        tx,
        schedule,
        lb_coef=run.loss.lb_coef,
        z_coef=run.loss.z_coef,
        router_bias_rate=run.loss.router_bias_rate,
        grad_accum=t.grad_accum,
        has_moe=run.model.has("E"),
        donate=jax.default_backend() != "cpu",
        mesh=mesh,
        state=state,
    )
    eval_step = make_eval_step(graphdef, max(len(eval_bucket_names(run)), 1))
    return Setup(run, run_dir, mesh, graphdef, state, train_step, eval_step, schedule)


class Loop:
    """One run of the training loop; `run()` returns the summary."""

    def __init__(self, setup: Setup, config_dict: dict | None):
        self.s = setup
        self.t = setup.run.trainer
        self.config_dict = config_dict
        self.lengths = LengthSchedule(self.t)
        self.pending = []  # (step, device metrics) not yet checked and logged
        self.last_metrics = {}
        self.last_eval = {}
        self.bucket_names = eval_bucket_names(setup.run)
        self.clock = None  # when throughput timing (re)started; None until a step compiled
        self.trained = collections.Counter()  # seq_len -> tokens trained since the clock
        self.compiled = set()  # seq_lens whose train step has compiled
        self.step_memory = None

    # --- data --------------------------------------------------------------------------------
    def dataset(self, split: str, seed: int, batch_size: int, seq_len: int):
        """This process's rows of every batch (see `process_rows`); the eval split's batches
        come in the same number on every process."""
        index, count = process_rows(self.s.mesh)
        if batch_size % count:
            raise ValueError(
                f"trainer.batch_size: {batch_size} must divide evenly over the "
                f"{count} processes that read distinct rows"
            )
        batches = make_dataset(
            self.s.run.data,
            split=split,
            seed=seed,
            batch_size=batch_size // count,
            seq_len=seq_len,
            shard_index=index,
            shard_count=count,
            streams=split == "train" and self.t.state_passing,
        )
        if split == "eval" and jax.process_count() > 1:
            return agreed_batches(batches)
        return batches

    def to_device(self, batch: dict) -> dict:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        if self.s.mesh is None:
            return jax.device_put(batch)
        from hybridjax.train_step import batch_shardings

        shardings = batch_shardings(self.s.mesh, batch)
        if jax.process_count() > 1:  # each process holds its own rows of the global batch
            count = process_rows(self.s.mesh)[1]
            return {
                k: jax.make_array_from_process_local_data(
                    shardings[k], v, (v.shape[0] * count, *v.shape[1:])
                )
                for k, v in batch.items()
            }
        return jax.device_put(batch, shardings)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        t, s = self.t, self.s
        ckpt = Checkpointer(
            os.path.join(s.run_dir, "checkpoints"),
            keep=t.keep_checkpoints,
            async_save=t.async_checkpoint,
        )
        try:
            train_iter = TrainBatches(self)
            state, start = self.restore(ckpt, s.state, train_iter)
            s.state = None  # the loop owns the state from here (it may be donated)
            self.metrics = (
                MetricsLog(
                    s.run_dir,
                    total_steps=t.steps,
                    start_step=start,
                    logger=s.run.logger,
                    config=self.config_dict,
                    progress=t.progress,
                )
                if distributed.is_primary()
                else OtherProcessMetrics()
            )
            try:
                state = self.steps(state, start, train_iter, ckpt)
            finally:
                self.metrics.close()
        finally:
            ckpt.close()
        return self.summary(state)

    def restore(self, ckpt: Checkpointer, state, train_iter):
        if ckpt.latest_step() is None:
            if self.t.init_from:
                state = init_from(self.s.run, state)
            return state, 0
        if self.t.resume == "never":
            raise RuntimeError(
                f"trainer.resume=never, but {ckpt.directory} already holds checkpoints "
                f"(steps {ckpt.all_steps()}); choose a new hydra.run.dir or trainer.resume=auto"
            )
        # The newest checkpoint that restores intact: damaged newer ones are set aside, logged.
        step, state, data_state = ckpt.restore_latest(like=state)
        train_iter.set_state(data_state)
        log.info("resumed from checkpoint step %d in %s", step, ckpt.directory)
        return state, step

    def steps(self, state, start: int, train_iter, ckpt: Checkpointer):
        t = self.t
        if start >= t.steps:
            log.info("nothing to do: checkpoint step %d >= trainer.steps=%d", start, t.steps)
            return state
        self.metrics.message(self.describe(start))
        multi_process = jax.process_count() > 1
        with StopSignal() as stop:
            for step in range(start, t.steps):
                seq_len, batch_size = self.lengths.at(step)
                batch = self.to_device(model_batch(train_iter.next(step)))
                state, metrics = self.s.train_step(state, batch)
                done = step + 1
                self.pending.append((done, metrics))
                self.trained[seq_len] += batch_size * seq_len
                if seq_len not in self.compiled:  # this length's step compiled: time from here
                    jax.block_until_ready(metrics)
                    self.compiled.add(seq_len)
                    memory = step_memory_bytes(self.s.train_step, state, batch)
                    if memory is not None:
                        self.step_memory = max(memory, self.step_memory or 0)
                    self.restart_clock()
                if done == t.stop_at and not stop.requested:
                    stop.requested = f"trainer.stop_at={t.stop_at}"
                stopping = stop.requested  # read once: a signal may arrive at any moment
                if multi_process:
                    # All processes stop (and save) at one step or none does, else the savers
                    # wait for the rest forever. They compare flags where the loop waits for the
                    # device anyway (log steps; a signal waits for the next one) and at stop_at.
                    agree = done % t.log_every == 0 or done == t.stop_at
                    first = distributed.first_process(bool(stopping)) if agree else None
                    stopping = (
                        (stopping or f"a stop request on process {first}")
                        if first is not None
                        else None
                    )
                final = done == t.steps or bool(stopping)
                eval_now = done == t.steps or (t.eval_every and done % t.eval_every == 0)
                ckpt_now = final or (t.checkpoint_every and done % t.checkpoint_every == 0)
                log_now = final or done % t.log_every == 0 or eval_now or ckpt_now
                record = self.flush(ckpt) if log_now else None
                if eval_now:
                    record = {**(record or {}), **self.evaluate(done, state)}
                if record:
                    self.metrics.write(done, record)
                if ckpt_now:
                    self.save(ckpt, done, state, train_iter)
                self.metrics.show(done, self.last_metrics.get("loss"), logged=log_now, final=final)
                if stopping:
                    self.metrics.message(
                        f"stopped by {stopping} after step {done}; "
                        f"checkpoint saved in {ckpt.directory}"
                    )
                    break
        return state

    def describe(self, start: int) -> str:
        from hybridjax.model import param_counts

        total, active = param_counts(self.s.run.model)
        self.param_counts = (total, active)
        m = self.s.run.model
        return (
            f"training {m.pattern!r} d_model={m.d_model} ({total:,} params, {active:,} "
            f"active) for {self.t.steps} steps from step {start}; "
            f"batch {self.lengths.describe()}"
            f"{'; state passing between steps' if self.t.state_passing else ''}; "
            f"run dir {self.s.run_dir}"
        )

    def restart_clock(self) -> None:
        """Throughput counts from now: compiles and evals are not training time."""
        self.clock = time.perf_counter()
        self.trained.clear()

    def flush(self, ckpt: Checkpointer) -> dict:
        """Fetch the pending metrics and stop on a non-finite loss; the latest step's record."""
        fetched = jax.device_get(self.pending)
        self.pending = []
        for step, m in fetched:
            for key in ("loss", "grad_norm"):
                if not math.isfinite(float(m[key])):
                    latest = ckpt.latest_step()
                    kept = (
                        f"the last good checkpoint (step {latest}) is intact in {ckpt.directory}"
                        if latest is not None
                        else "no checkpoint saved"
                    )
                    raise NonFiniteLoss(
                        f"{key} is {float(m[key])} at step {step}: stopping; {kept}"
                    )
        done, m = fetched[-1]
        record = {k: float(v) for k, v in m.items() if k != "tokens"}
        if self.lengths.scheduled:
            record["seq_len"] = self.lengths.at(done - 1)[0]
        record["tokens_per_sec"] = record["mfu"] = None  # unknown until a step after compile
        if self.clock is not None and self.trained:
            seconds = time.perf_counter() - self.clock
            record["tokens_per_sec"] = sum(self.trained.values()) / seconds
            record["mfu"] = self.mfu(seconds)
            self.restart_clock()
        self.last_metrics = record
        return record

    def mfu(self, seconds: float) -> float | None:
        """Model FLOPs of the tokens trained in the last `seconds` over the devices' peak."""
        peak = self.t.peak_tflops
        if peak is None:
            kind = jax.devices()[0].device_kind
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
        if peak is None:
            return None
        flops = sum(
            n * flops_per_token(self.s.run.model, seq_len) for seq_len, n in self.trained.items()
        )
        n_devices = 1 if self.s.mesh is None else self.s.mesh.size
        return flops / seconds / (peak * 1e12 * n_devices)

    def evaluate(self, done: int, state) -> dict:
        """Held-out loss, perplexity and answer accuracy (overall and per difficulty bucket)."""
        from hybridjax.eval import lm_metrics, recall_metrics

        t = self.t
        sums = None
        batches = self.dataset(
            "eval", t.eval_seed, t.eval_batch_size or t.batch_size, t.eval_seq_len or t.seq_len
        )
        for i, batch in enumerate(batches):
            if t.eval_batches is not None and i >= t.eval_batches:
                break
            batch = {k: v for k, v in batch.items() if k in (*MODEL_INPUTS, "bucket")}
            out = self.s.eval_step(state.params, state.model_state, self.to_device(batch))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        sums = jax.device_get(sums)
        lm = lm_metrics(sums["loss_sum"], sums["weight_sum"])
        names = self.bucket_names
        recall = recall_metrics(sums["correct"], sums["total"], names or None)
        record = {
            "eval/loss": lm["loss"],
            "eval/perplexity": lm["perplexity"],
            "eval/accuracy": recall["accuracy"],
            "eval/answers": recall["answers"],
        }
        if names:
            record.update({f"eval/{k}": v for k, v in recall.items() if k.startswith("accuracy/")})
        self.last_eval = record
        self.metrics.message(
            f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items())
        )
        if self.clock is not None:
            self.restart_clock()
        return record

    def save(self, ckpt: Checkpointer, done: int, state, train_iter) -> None:
        if not bool(all_finite((state.params, state.opt_state))):
            raise NonFiniteLoss(
                f"non-finite parameters after step {done}: not saving; the last "
                f"good checkpoint (step {ckpt.latest_step()}) is intact"
            )
        if ckpt.latest_step() == done:
            return
        ckpt.save(done, state, train_iter.get_state())

    def summary(self, state) -> dict:
        total, active = getattr(self, "param_counts", (None, None))
        out = {
            "step": int(jax.device_get(state.step)),
            "params_total": total,
            "params_active": active,
            **self.last_metrics,
            **self.last_eval,
            "step_memory_bytes": self.step_memory,
            "peak_memory_bytes": peak_memory_bytes(),
        }
        if distributed.is_primary():
            with open(os.path.join(self.s.run_dir, "summary.json"), "w") as f:
                json.dump(out, f, indent=1)
        return out


class LengthSchedule:
    """The (seq_len, batch_size) of every step: trainer.seq_len_schedule's entries in turn, each
    for its `steps` consecutive steps, repeated from step 0 (without a schedule, trainer.seq_len
    and batch_size throughout). A function of the step alone, so a resumed run continues the
    sequence where it stopped."""

    def __init__(self, t):
        phases = t.seq_len_schedule
        self.scheduled = bool(phases)
        self.shapes = [(p.seq_len, p.batch_size) for p in phases] or [(t.seq_len, t.batch_size)]
        self.steps = [p.steps for p in phases] or [1]
        self.cycle = [shape for shape, n in zip(self.shapes, self.steps) for _ in range(n)]

    def at(self, step: int) -> tuple[int, int]:
        return self.cycle[step % len(self.cycle)]

    def describe(self) -> str:
        if not self.scheduled:
            return "{1} x {0}".format(*self.shapes[0])
        return (
            ", then ".join(
                f"{n} x ({b} x {length})" for (length, b), n in zip(self.shapes, self.steps)
            )
            + ", repeated"
        )


class TrainBatches:
    """The training batches of `loop`, step by step: one data stream per scheduled length, each
    seeded from trainer.seed and its length (without a schedule: trainer.seed, as always), and
    their positions together as one JSON-able state for the checkpoint."""

    def __init__(self, loop: Loop):
        self.lengths = loop.lengths
        seed = loop.t.seed
        self.iters = {
            length: iter(
                loop.dataset(
                    "train",
                    stream_seed(seed, length) if self.lengths.scheduled else seed,
                    batch_size,
                    length,
                )
            )
            for length, batch_size in self.lengths.shapes
        }

    def next(self, step: int) -> dict:
        return next(self.iters[self.lengths.at(step)[0]])

    def get_state(self) -> dict:
        """One stream's state as it is (checkpoints of unscheduled runs keep their form), or
        {"seq_len=<L>": state} for several."""
        if not self.lengths.scheduled:
            return next(iter(self.iters.values())).get_state()
        return {f"seq_len={length}": it.get_state() for length, it in self.iters.items()}

    def set_state(self, state: dict) -> None:
        if not self.lengths.scheduled:
            next(iter(self.iters.values())).set_state(state)
            return
        names = {f"seq_len={length}": it for length, it in self.iters.items()}
        if set(state) != set(names):
            raise ValueError(
                f"trainer.seq_len_schedule: the checkpoint holds data streams "
                f"{sorted(state)} but the schedule has {sorted(names)}; resume with "
                f"the lengths it was saved with"
            )
        for name, it in names.items():
            it.set_state(state[name])


def stream_seed(seed: int, seq_len: int) -> int:
    """The data seed of one scheduled length's stream: distinct per length, fixed per seed."""
    return int(np.random.SeedSequence([seed, seq_len]).generate_state(1)[0])


def init_from(run: RunConfig, state):
    """`state` with the parameters and model state of the checkpoint trainer.init_from names,
    restored into `state`'s layout (a mesh's shardings included). Its step, RNG and optimizer
    state stay fresh: AdamW's initial moments and count do not depend on parameter values."""
    try:
        step_dir = find_checkpoint(run.trainer.init_from)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"trainer.init_from: {err}") from None
    try:
        params, model_state = read_model(step_dir, state.params, state.model_state)
    except ValueError as err:
        raise ValueError(
            f"trainer.init_from: the model does not fit the parameters saved in "
            f"{step_dir}: {err}.{model_differences(run.model, step_dir)} Only "
            f"runtime fields (dtype, remat, ssd_impl, attn_impl, ...) may "
            f"differ"
        ) from None
    log.info("step 0 from the parameters of %s (fresh optimizer state)", step_dir)
    return state._replace(params=params, model_state=model_state)


def model_differences(model, step_dir: str) -> str:
    """ " Model fields that differ from the source run's config.yaml: ..." (empty without one)."""
    import yaml

    path = os.path.join(os.path.dirname(os.path.dirname(step_dir)), "config.yaml")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        saved = (yaml.safe_load(f) or {}).get("model", {})
    ours = dataclasses.asdict(model)
    changed = [
        f"{k} {saved[k]!r} -> {_listed(ours[k])!r}"
        for k in ours
        if k in saved and saved[k] != _listed(ours[k])
    ]
    return f" Model fields that differ from {path}: {', '.join(changed)}." if changed else ""


def _listed(value):
    return list(value) if isinstance(value, tuple) else value


@functools.cache
def flops_per_token(model, seq_len: int) -> float:
    from hybridjax.model import flops_per_token

    return flops_per_token(model, seq_len)


class OtherProcessMetrics:
    """The metrics sink of processes other than 0: the metrics are the global batch's, the same
    everywhere, so process 0 alone writes them (metrics.jsonl, wandb, the progress line);
    messages still reach each process's log."""

    def write(self, step: int, metrics: dict) -> None:
        pass

    def show(self, step: int, loss=None, *, logged: bool = False, final: bool = False) -> None:
        pass

    def message(self, text: str) -> None:
        log.info(text)

    def close(self) -> None:
        pass


def process_rows(mesh) -> tuple[int, int]:
    """(index, count): this process feeds row block `index` of `count` equal blocks of every
    batch, the rows its devices hold under `batch_sharding(mesh)`. Processes whose devices hold
    the same rows (a batch axis within each process, e.g. tensor parallel across hosts) read the
    same block; one process reads the whole batch."""
    if mesh is None or jax.process_count() == 1:
        return 0, 1
    from hybridjax.sharding import BATCH_AXES, batch_sharding

    rows = math.prod(mesh.shape[a] for a in BATCH_AXES)
    indices = batch_sharding(mesh).addressable_devices_indices_map((rows,)).values()
    held = sorted({r for index in indices for r in range(rows)[index[0]]})
    block = len(held)
    if held != list(range(held[0], held[0] + block)) or held[0] % block:
        raise ValueError(
            f"trainer.mesh: process {jax.process_index()}'s devices hold batch "
            f"blocks {held} of {rows}, not one aligned run; order the mesh's "
            f"devices by process"
        )
    return held[0] // block, rows // block


def agreed_batches(batches):
    """`batches` (a process's share of the finite eval split), padded with rows of loss_mask 0
    until every process has run out: each batch is one step of all processes together, and the
    shards of a split need not hold equally many rows."""
    batches, last = iter(batches), None
    while True:
        batch = next(batches, None)
        if distributed.first_process(batch is not None) is None:
            return
        if batch is None:
            if last is None:
                raise ValueError(
                    f"process {jax.process_index()} got no eval rows while others "
                    f"did: the eval split is smaller than the process count"
                )
            batch = {k: np.zeros_like(v) for k, v in last.items()}
        last = batch
        yield batch


def step_memory_bytes(train_step, state, batch) -> int | None:
    """XLA's buffers for one compiled train step (arguments + outputs + temporaries, less what
    outputs alias): unlike the process's peak RSS, comparable between runs of one multirun.
    Called after the first step, so lowering hits the compile cache."""
    stats = train_step.lower(state, batch).compile().memory_analysis()
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def peak_memory_bytes() -> int | None:
    """Peak accelerator memory of this process's first device where the backend reports it, else
    the process's peak resident set (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# --- Hydra ---------------------------------------------------------------------------------------
# The Hydra tree: inside the package when installed from a wheel (pyproject.toml ships the
# repository's top-level configs/ as hybridjax/configs), beside the package in a checkout.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
if not os.path.isdir(CONFIG_DIR):
    CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(CONFIG_DIR)), "configs")


def run_from_config(cfg, run_dir: str) -> dict:
    """Validate a composed config, write it resolved to `run_dir/config.yaml`, train."""
    from omegaconf import OmegaConf

    run = resolve(cfg)  # raises ValueError naming the bad key, before any training
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    return train(run, run_dir, config_dict=OmegaConf.to_container(cfg, resolve=True))


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register_configs()

    @hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
    def _main(cfg) -> float | None:
        summary = run_from_config(cfg, HydraConfig.get().runtime.output_dir)
        return summary.get("eval/accuracy")

    _main()


if __name__ == "__main__":
    main()
